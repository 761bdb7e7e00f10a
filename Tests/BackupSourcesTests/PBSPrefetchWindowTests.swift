import BackupSources
import Foundation
import Synchronization
import Testing

/// The fetch-ahead window of the network chunk stores (S3): how far ahead it asks, how much it
/// holds, answers in any order, failures handed to the loader that takes the chunk.
@Suite(.tags(.pbs, .fast)) struct PBSPrefetchWindowTests {
    /// A transport whose requests complete only when the test says so.
    final class Transport: Sendable {
        let pending = Mutex<[(digest: [UInt8], done: PBSPrefetchWindow<[UInt8]>.Completion)]>([])
        /// Signalled once per request started.
        let startedOne = DispatchSemaphore(value: 0)
        var started: [[UInt8]] { pending.withLock { $0.map(\.digest) } }

        func start(_ d: ArraySlice<UInt8>, _ done: @escaping PBSPrefetchWindow<[UInt8]>.Completion) {
            pending.withLock { $0.append((Array(d), done)) }
            startedOne.signal()
        }
        /// Completes the request for `digest` (echoing the digest as the body, or failing).
        func complete(_ digest: [UInt8], failing: Bool = false) {
            let done = pending.withLock { p -> PBSPrefetchWindow<[UInt8]>.Completion? in
                guard let i = p.firstIndex(where: { $0.digest == digest }) else { return nil }
                return p.remove(at: i).done
            }
            done?(failing ? .failure(SourceError(.network, path: "s3://b/k", "boom")) : .success(digest))
        }
    }

    static func digests(_ n: Int) -> [ArraySlice<UInt8>] { (0..<n).map { ArraySlice([UInt8(truncatingIfNeeded: $0), 7]) } }

    @Test func asksAheadWithinTheWindowAndHandsOutOfOrderAnswers() throws {
        let t = Transport()
        let w = PBSPrefetchWindow<[UInt8]> { t.start($0, $1) }
        let d = Self.digests(10)
        w.announce(d, window: 3)
        #expect(t.started == d[0..<3].map(Array.init), "three out at once, in order")
        // Answers arrive in reverse; each loader gets its own.
        for i in [2, 1, 0] { t.complete(Array(d[i])) }
        #expect(try w.take(d[0]) == Array(d[0]))
        // Taking 0 lets one more go out (3 held/out at most).
        #expect(t.started == [Array(d[3])], "\(t.started)")
        #expect(try w.take(d[1]) == Array(d[1]))
        #expect(try w.take(d[2]) == Array(d[2]))
        #expect(t.started == d[3..<6].map(Array.init))
        #expect(w.requestCount == 6)
        // Not announced: the store fetches it itself.
        #expect(try w.take([9, 9]) == nil)
        // Taken once: a second take is not served from the window.
        #expect(try w.take(d[0]) == nil)
    }

    @Test func aLoaderWaitsForItsChunkAndGetsItsFailure() throws {
        let t = Transport()
        let w = PBSPrefetchWindow<[UInt8]> { t.start($0, $1) }
        let d = Self.digests(4)
        w.announce(d, window: 1)
        final class Box: Sendable { let value = Mutex<Result<[UInt8]?, SourceError>?>(nil) }
        let got = Box()
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let r = Result { () throws(SourceError) -> [UInt8]? in try w.take(d[0]) }
            got.value.withLock { $0 = r }
            done.signal()
        }
        // The loader is waiting; the answer fails: it gets the failure, one line naming the key.
        t.complete(Array(d[0]), failing: true)
        done.wait()
        let r = try #require(got.value.withLock { $0 })
        #expect(throws: SourceError.self) { try r.get() }
        // A loader jumping ahead asks for its own chunk even when the window is full.
        t.complete(Array(d[1]))
        let ahead = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            _ = try? w.take(d[3])
            ahead.signal()
        }
        while !t.started.contains(Array(d[3])) { t.startedOne.wait() }
        t.complete(Array(d[3]))
        ahead.wait()
    }

    @Test func aNewListReplacesTheOldOne() throws {
        let t = Transport()
        let w = PBSPrefetchWindow<[UInt8]> { t.start($0, $1) }
        let d = Self.digests(6)
        w.announce(Array(d[0..<3]), window: 2)
        w.announce(Array(d[3..<6]), window: 2)
        // Answers for the old list are ignored; the old digests are no longer the window's.
        t.complete(Array(d[0]))
        #expect(try w.take(d[0]) == nil)
        t.complete(Array(d[3]))
        #expect(try w.take(d[3]) == Array(d[3]))
    }
}
