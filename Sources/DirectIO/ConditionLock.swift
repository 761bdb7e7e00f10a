import CURing
import Glibc

/// A pthread mutex with one condition variable, for the engine's dedicated threads (never used to
/// block a Swift concurrency thread). `withLock` runs a closure under the mutex; `wait()` may only
/// be called inside it.
///
/// Not `Sendable` itself: it is held only by the owners that guard their state with it — each says
/// in its own `// @unchecked:` line what the lock guards — and by ``ConditionMutex``.
public final class ConditionLock {
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

/// A value guarded by a ``ConditionLock``: `Mutex`, plus waiting under the lock until the value
/// is ready. The wait happens before `body` gets the value, so no access to it stays open while
/// the lock is released (other threads change it meanwhile). Owners holding their state in one of
/// these are checked `Sendable`; this type is the one place the compiler takes it on trust.
// @unchecked: the value is reached only under `lock` (a pthread mutex behind raw pointers).
public final class ConditionMutex<Value: Sendable>: @unchecked Sendable {
    private let lock = ConditionLock()
    private var value: Value

    public init(_ value: Value) { self.value = value }

    /// Runs `body` with the value under the lock.
    @inline(__always)
    public func withLock<R, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        try lock.withLock { () throws(E) -> R in try body(&value) }
    }

    /// Waits (the lock released meanwhile) until `ready` says yes, then runs `body` under the lock.
    /// Whoever changes what `ready` looks at calls ``broadcast()`` (or ``signal()``) afterwards.
    @inline(__always)
    public func withLock<R, E: Error>(waitingUntil ready: (Value) -> Bool, _ body: (inout Value) throws(E) -> R) throws(E) -> R {
        try lock.withLock { () throws(E) -> R in
            while !ready(value) { lock.wait() }
            return try body(&value)
        }
    }

    /// ``withLock(waitingUntil:_:)`` that stops waiting after `seconds` (the body runs then,
    /// whether or not `ready` says yes: it looks at the value itself).
    public func withLock<R, E: Error>(waitingUntil ready: (Value) -> Bool, atMost seconds: Double,
                                      _ body: (inout Value) throws(E) -> R) throws(E) -> R {
        let deadline = ContinuousClock.now + .seconds(max(0, seconds))
        return try lock.withLock { () throws(E) -> R in
            while !ready(value) {
                let left = deadline - ContinuousClock.now
                guard left > .zero else { break }
                _ = lock.wait(seconds: Double(left.components.seconds) + Double(left.components.attoseconds) / 1e18)
            }
            return try body(&value)
        }
    }

    /// Wakes every waiter (each checks its condition again).
    public func broadcast() { lock.broadcast() }
    /// Wakes one waiter.
    public func signal() { lock.signal() }
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
