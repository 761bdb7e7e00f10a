import Foundation
import QcowPress
import Testing

/// The PBS chunk cache and archive view that `serve pbs` and live restore read through, driven
/// directly: read-ahead, slices shared with replies, readers handed over to a load, single flight.
// Serialized: the read-ahead tests tell this suite's loading threads by their names.
@Suite(.tags(.pbs), .serialized, .enabled(if: PBSFixture.available, "needs python3"))
struct PBSChunkCacheTests {
    /// A sequential reader gets the next chunk loaded ahead of it (once); random reads do not
    /// make loads of their own.
    @Test(.enabled(if: Wait.canWaitForThreads, "waits for the read-ahead threads: needs pidfd_open(PIDFD_THREAD), Linux 6.9"))
    func sequentialReadersLoadTheNextChunkAhead() throws {
        let f = try PBSFixture(.init(name: "read-ahead", chunk: 1 << 20))
        defer { f.remove() }
        let (index, cache, view) = try Self.view(of: f.datastore)
        // Two neighbouring chunks with data.
        guard let i = (0..<(index.chunkCount - 1)).first(where: { !view.isZeroChunk($0) && !view.isZeroChunk($0 + 1) }) else {
            Issue.record("the fixture has no two neighbouring data chunks")
            return
        }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 19, alignment: 4096)
        defer { buf.deallocate() }
        let at = UInt64(i) << 20
        // A random read in the second half of chunk i: no read-ahead (a load ahead would run on a
        // thread started before `read` returns).
        let none = try Wait.threadsStarted(named: ["qp-prefetch"]) {
            try view.read(at: at + (700 << 10), count: 4096, into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<4096]))
        }
        #expect(none.isEmpty && cache.stats.loads == 1, "a random read loaded ahead")
        // Two sequential reads, the second ending in the chunk's second half: the next
        // `PBSChunkCache.depth` chunks (those with data) load ahead, each on a thread of its own.
        // (distinct digests: a repeated chunk loads once)
        let ahead = Self.distinctAhead(after: i, in: view)
        let loaders = try Wait.threadsStarted(named: ["qp-prefetch"]) {
            try view.read(at: at, count: 1 << 19, into: buf)
            try view.read(at: at + (1 << 19), count: 1 << 19, into: buf)
        }
        #expect(Wait.end(ofThreads: loaders, timeout: 30), "the loads ahead did not end")
        #expect(cache.stats.loads == 1 + ahead, "the next chunks were loaded ahead")
        try view.read(at: at + (1 << 20), count: 1 << 19, into: buf)
        #expect(cache.stats.loads == 1 + ahead, "and the reader found chunk i + 1 in the cache")
    }

    /// drive-scsi0 of the test snapshot in `datastore`, read through a chunk cache of `capacity` bytes.
    static func view(of datastore: String, capacity: Int = 64 << 20) throws -> (PBSFixedIndex, PBSChunkCache, PBSArchiveView) {
        let restore = try PBSRestore(datastore: datastore, namespace: nil, snapshot: PBSRestoreTests.snapshot, keyFile: nil) { () throws(QcowPressError) -> String in "" }
        let drive = try restore.drive("drive-scsi0")
        let cache = PBSChunkCache(reader: restore.reader, capacity: capacity, indexes: [drive.index])
        return (drive.index, cache, PBSArchiveView(drive: drive, cache: cache))
    }

    /// Distinct digests of the `PBSChunkCache.depth` chunks with data after chunk `i` (what a
    /// sequential reader of chunk `i` loads ahead), chunk `i`'s own left out.
    static func distinctAhead(after i: Int, in view: PBSArchiveView) -> Int {
        let next = (i + 1..<view.index.chunkCount).filter { !view.isZeroChunk($0) }.prefix(PBSChunkCache.depth)
        return Set(next.map { view.index.digest($0) }).subtracting([view.index.digest(i)]).count
    }

    /// A copying client skips zero chunks (holes in block status): a read that ends where zero
    /// chunks begin, then one at the next chunk with data, is a sequential reader going on, and
    /// gets the chunks after it loaded ahead.
    @Test(.enabled(if: Wait.canWaitForThreads, "waits for the read-ahead threads: needs pidfd_open(PIDFD_THREAD), Linux 6.9"))
    func sequentialReadersGoOnAfterZeroChunks() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        // Chunk 0 with data, chunks 1 and 2 zero, then 3 + depth distinct chunks with data.
        let raw = dir.appendingPathComponent("a.raw").path
        let data = SourceImage.noise((4 + PBSChunkCache.depth) << 20, seed: 9)
        try (data.prefix(1 << 20) + Data(count: 2 << 20) + data.dropFirst(1 << 20)).write(to: URL(fileURLWithPath: raw))
        let ds = try PBSFixture.datastore(in: dir, drives: ["drive-scsi0.img": raw], seed: 4)
        let (index, cache, view) = try Self.view(of: ds)
        #expect(index.chunkSize == 1 << 20 && !view.isZeroChunk(0) && view.isZeroChunk(1) && view.isZeroChunk(2) && !view.isZeroChunk(3))
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 3 << 18, alignment: 4096)
        defer { buf.deallocate() }
        // The end of chunk 0 (not sequential itself: no read-ahead), then the first three
        // quarters of chunk 3, past its middle: chunks 4 ... 3 + depth load ahead.
        let loaders = try Wait.threadsStarted(named: ["qp-prefetch"]) {
            try view.read(at: (1 << 20) - 4096, count: 4096, into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<4096]))
            try view.read(at: 3 << 20, count: 3 << 18, into: buf)
        }
        #expect(Wait.end(ofThreads: loaders, timeout: 30), "the loads ahead did not end")
        let expected = 2 + PBSChunkCache.depth
        #expect(cache.stats.loads == expected, "\(cache.stats.loads) loads")
        // Each chunk read ahead is in the cache now.
        try view.read(at: UInt64(3 + PBSChunkCache.depth) << 20, count: 4096, into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<4096]))
        #expect(cache.stats.loads == expected)
    }

    /// Reads inside one chunk are slices of the cached chunk (what an NBD reply sends without a
    /// copy): right bytes, loaded once; `cachedSlice` never loads; a range across chunks or in a
    /// zero chunk is left to the copying read; a slice outlives its chunk's eviction intact.
    @Test func slicesShareTheCachedChunk() throws {
        let f = try PBSFixture(.init(name: "slices", chunk: 1 << 20))
        defer { f.remove() }
        // Room for one chunk: loading another evicts the first.
        let (index, cache, view) = try Self.view(of: f.datastore, capacity: 1 << 20)
        let data = (0..<index.chunkCount).filter { !view.isZeroChunk($0) }
        guard let i = data.first, let j = data.first(where: { index.digest($0) != index.digest(i) }),
              let z = (0..<index.chunkCount).first(where: { view.isZeroChunk($0) }) else {
            Issue.record("the fixture needs two distinct data chunks and a zero chunk")
            return
        }
        let expected = try Data(contentsOf: URL(fileURLWithPath: f.rawA))
        func bytes(_ at: Int, _ n: Int) -> [UInt8] { Array(expected[at..<(at + n)]) }
        let at = i << 20 + 1000
        #expect(view.cachedSlice(at: UInt64(at), count: 5000) == nil)
        #expect(cache.stats.loads == 0, "cachedSlice loaded a chunk")
        let first = try #require(try view.slice(at: UInt64(at), count: 5000))
        #expect(first.readableBytesView.elementsEqual(bytes(at, 5000)))
        #expect(cache.stats.loads == 1)
        let again = try #require(view.cachedSlice(at: UInt64(at), count: 5000))
        #expect(again.readableBytesView.elementsEqual(bytes(at, 5000)))
        #expect(cache.stats.loads == 1)
        // Across the chunk's end, in a zero chunk, empty: the copying read's.
        #expect(try view.slice(at: UInt64((i + 1) << 20 - 10), count: 20) == nil)
        #expect(try view.slice(at: UInt64(z << 20), count: 4096) == nil)
        #expect(try view.slice(at: UInt64(at), count: 0) == nil)
        // Chunk j evicts chunk i; the slices handed out still hold chunk i's bytes.
        let other = try #require(try view.slice(at: UInt64(j << 20), count: index.chunkLength(j)))
        #expect(other.readableBytesView.elementsEqual(bytes(j << 20, index.chunkLength(j))))
        #expect(view.cachedSlice(at: UInt64(at), count: 5000) == nil, "chunk i was not evicted")
        #expect(first.readableBytesView.elementsEqual(bytes(at, 5000)))
        #expect(again.readableBytesView.elementsEqual(bytes(at, 5000)))
    }

    /// Readers that must not block (an NBD event loop) hand over a callback: eight asking for one
    /// chunk at once share one load and get the right bytes; a cached chunk calls back before
    /// returning; ranges across chunks or in zero chunks are declined (read on a thread then).
    @Test func handedOverReadsShareOneLoad() throws {
        let f = try PBSFixture(.init(name: "handed over", chunk: 1 << 20))
        defer { f.remove() }
        let (index, cache, view) = try Self.view(of: f.datastore)
        let expected = try Data(contentsOf: URL(fileURLWithPath: f.rawA))
        guard let i = (0..<index.chunkCount).first(where: { !view.isZeroChunk($0) }),
              let z = (0..<index.chunkCount).first(where: { view.isZeroChunk($0) }) else {
            Issue.record("the fixture needs a data chunk and a zero chunk")
            return
        }
        let good = ConditionCounter()
        let bad = ConditionCounter(sharing: good)
        for k in 0..<8 {
            let at = i << 20 + k * 4096
            let accepted = view.slice(at: UInt64(at), count: 4096) { r in
                if case .success(let b) = r, b.readableBytesView.elementsEqual(expected[at..<(at + 4096)]) { good.add() } else { bad.add() }
            }
            #expect(accepted)
        }
        #expect(good.wait(until: 8, plus: bad), "a reader was left waiting")
        #expect(good.value == 8 && bad.value == 0)
        #expect(cache.stats.loads == 1)
        // Cached now: called back before `slice` returns.
        let now = ConditionCounter()
        #expect(view.slice(at: UInt64(i << 20), count: 512) { r in if case .success = r { now.add() } })
        #expect(now.value == 1)
        #expect(!view.slice(at: UInt64((i + 1) << 20 - 10), count: 20) { _ in Issue.record("called back for a range across chunks") })
        #expect(!view.slice(at: UInt64(z << 20), count: 4096) { _ in Issue.record("called back for a zero chunk") })
        #expect(cache.stats.loads == 1)
    }

    /// A chunk that fails verification: every reader handed over for it gets the error (none is
    /// left waiting), the next asks load it again and fail the same way, and other chunks read.
    @Test func handedOverReadsOfADamagedChunkFail() throws {
        let f = try PBSFixture(.init(name: "handed over, damaged", chunk: 1 << 20, corrupt: "chunk-digest"))
        defer { f.remove() }
        let (index, _, view) = try Self.view(of: f.datastore)
        let data = (0..<index.chunkCount).filter { !view.isZeroChunk($0) }
        let failed = ConditionCounter(), messages = Messages()
        let fine = ConditionCounter(sharing: failed)
        for i in data {
            for k in 0..<3 {
                #expect(view.slice(at: UInt64(i << 20 + k * 4096), count: 4096) { r in
                    switch r {
                    case .success: fine.add()
                    case .failure(let e):
                        failed.add()
                        messages.add(e.message)
                    }
                })
            }
        }
        _ = failed.wait(until: 3 * data.count, plus: fine)
        #expect(failed.value + fine.value == 3 * data.count, "a reader was left waiting")
        #expect(failed.value >= 3 && fine.value >= 3, "\(failed.value) failed, \(fine.value) fine")
        #expect(messages.all.allSatisfy { $0.contains("digest mismatch") }, "\(messages.all)")
    }

    /// Eight threads read the same chunks at once: each digest is loaded once (the others wait
    /// for that load), and hot chunks stay while single-use ones are evicted.
    @Test func concurrentReadersShareOneLoad() throws {
        let f = try PBSFixture(.init(name: "single flight", chunk: 1 << 20))
        defer { f.remove() }
        let (index, cache, view) = try Self.view(of: f.datastore)
        let distinct = Set((0..<index.chunkCount).filter { !view.isZeroChunk($0) }.map { Array(index.digest($0)) }).count
        let expected = try Data(contentsOf: URL(fileURLWithPath: f.rawA))
        let failures = ConditionCounter()
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
            defer { buf.deallocate() }
            for i in 0..<index.chunkCount {
                let at = UInt64(i) << 20
                let n = Int(min(UInt64(1 << 20), UInt64(expected.count) - at))
                do {
                    try view.read(at: at, count: n, into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<n]))
                    // memcmp: a byte-by-byte Sequence compare of 80 MiB took 20 s in a debug build.
                    let same = expected.withUnsafeBytes { e in memcmp(e.baseAddress! + Int(at), buf.baseAddress!, n) == 0 }
                    if !same { failures.add() }
                } catch { failures.add() }
            }
            _ = t
        }
        #expect(failures.value == 0)
        #expect(cache.stats.loads == distinct, "\(cache.stats.loads) loads for \(distinct) distinct chunks")
        #expect(cache.stats.hits >= 7 * distinct)
    }
}

final class Messages: @unchecked Sendable {
    private let lock = NSLock()
    private var list: [String] = []
    func add(_ m: String) { lock.withLock { list.append(m) } }
    var all: [String] { lock.withLock { list } }
}

/// A count that callbacks raise and a test waits on (no polling: each `add` signals).
final class ConditionCounter: @unchecked Sendable {
    private let condition: NSCondition
    private var n = 0
    init(sharing other: ConditionCounter? = nil) { condition = other?.condition ?? NSCondition() }
    func add() { condition.withLock { n += 1; condition.broadcast() } }
    var value: Int { condition.withLock { n } }
    /// Waits until this count plus `other`'s (made `sharing:` this one) reaches `target`;
    /// false after `timeout` seconds.
    func wait(until target: Int, plus other: ConditionCounter? = nil, timeout: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        return condition.withLock {
            while n + (other?.n ?? 0) < target { if !condition.wait(until: deadline) { break } }
            return n + (other?.n ?? 0) >= target
        }
    }
}
