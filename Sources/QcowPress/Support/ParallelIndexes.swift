import Dispatch
import DirectIO
import Synchronization

/// Runs `threads` OS threads over the indexes 0..<count, handed out in order (so sources are
/// read front to back). Each thread first builds its own state with `makeWorker` (buffers, codec
/// contexts) and then handles one index at a time. The first error stops the hand-out and is
/// thrown once every thread has returned. Indexes are computed, never listed, so an absurd count
/// allocates nothing.
func forEachIndex(_ count: UInt64, threads: Int, name: String,
                  _ makeWorker: @escaping @Sendable () -> (UInt64) throws(QcowPressError) -> Void) throws(QcowPressError) {
    let next = IndexQueue(count: count)
    let group = ThreadGroup()
    for t in 0..<max(1, threads) {
        group.spawn(name: "\(name)-\(t)") { () throws(QcowPressError) in
            let work = makeWorker()
            while let i = next.take() {
                do throws(QcowPressError) { try work(i) } catch {
                    next.stop()
                    throw error
                }
            }
        }
    }
    if let e = group.wait() { throw e }
}

/// The next index to hand out, until `count` or `stop()`.
final class IndexQueue: Sendable {
    private let state: Mutex<(next: UInt64, stopped: Bool)>
    private let count: UInt64
    init(count: UInt64) {
        self.count = count
        state = Mutex((0, false))
    }
    func take() -> UInt64? {
        state.withLock { s in
            guard !s.stopped, s.next < count else { return nil }
            defer { s.next += 1 }
            return s.next
        }
    }
    func stop() { state.withLock { $0.stopped = true } }
}

/// OS threads that run to completion; the first error is kept.
final class ThreadGroup: Sendable {
    private let running = DispatchGroup()
    /// The first error of any thread.
    private let error = Mutex<QcowPressError?>(nil)
    func spawn(name: String, _ body: @escaping @Sendable () throws(QcowPressError) -> Void) {
        running.enter()
        startThread(name: name) { [self] in
            do throws(QcowPressError) { try body() } catch {
                let failure = error
                self.error.withLock { if $0 == nil { $0 = failure } }
            }
            running.leave()
        }
    }
    func wait() -> QcowPressError? {
        running.wait()
        return error.withLock { $0 }
    }
}
