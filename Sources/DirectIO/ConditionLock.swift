import CURing
import Glibc

/// A pthread mutex with one condition variable, for the engine's dedicated threads (never used to
/// block a Swift concurrency thread). `withLock` runs a closure under the mutex; `wait()` may only
/// be called inside it.
// @unchecked: the lock itself; its pthread mutex and condition live behind raw pointers.
public final class ConditionLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
    }
    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        cond.deallocate()
    }

    @inline(__always)
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
    /// Waits for a signal; call only while holding the lock (inside `withLock`).
    public func wait() { pthread_cond_wait(cond, mutex) }
    /// Waits at most `seconds`; returns false on timeout.
    @discardableResult
    public func wait(seconds: Double) -> Bool {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let ns = Int(now.tv_nsec) + Int(seconds * 1e9)
        var deadline = timespec(tv_sec: now.tv_sec + ns / 1_000_000_000, tv_nsec: ns % 1_000_000_000)
        return pthread_cond_timedwait(cond, mutex, &deadline) == 0
    }
    public func broadcast() { pthread_cond_broadcast(cond) }
    public func signal() { pthread_cond_signal(cond) }
}

/// Starts a named detached OS thread (not a Swift concurrency thread).
public func startThread(name: String, _ body: @escaping @Sendable () -> Void) {
    final class Box: Sendable {
        let body: @Sendable () -> Void
        let name: String
        init(_ b: @escaping @Sendable () -> Void, _ n: String) { body = b; name = n }
    }
    let box = Unmanaged.passRetained(Box(body, name)).toOpaque()
    var attr = pthread_attr_t()
    pthread_attr_init(&attr)
    pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
    // 8 MiB stacks are wasteful for workers that only run small loops.
    pthread_attr_setstacksize(&attr, 1 << 20)
    var tid = pthread_t()
    let r = pthread_create(&tid, &attr, { raw in
        let box = Unmanaged<AnyObject>.fromOpaque(raw!).takeRetainedValue() as! Box
        box.name.withCString { curing_set_thread_name($0) }
        box.body()
        return nil
    }, box)
    pthread_attr_destroy(&attr)
    precondition(r == 0, "pthread_create failed: \(r)")
}
