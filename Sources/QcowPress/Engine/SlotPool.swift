import DirectIO
import Glibc
import Synchronization

/// Fixed-size cluster buffers ("slots") carved from one aligned arena. The arena is the bulk of the
/// memory budget: producers take slots to assemble clusters; workers compress in place; the writer
/// returns them once the bytes are in a write buffer. Producers wait here, and only here, when the
/// budget is used up (back-pressure).
// @unchecked: owns the raw slot arena (pointers handed out) and producers wait on its condition; `free` only inside `lock`.
final class SlotPool: @unchecked Sendable {
    let slotSize: Int
    let count: Int
    private let arena: AlignedBuffer
    private let lock = ConditionLock()
    // Guarded by `lock`.
    private var free: [Int32]
    /// Tasks waiting for a slot: each is resumed with one, or with nil once the pool failed.
    private var asyncWaiters: [CheckedContinuation<Int32?, Never>] = []
    private var failed = false
    /// Threads in ``waitUntilAllFree(within:)``: while there are any, a release wakes every waiter.
    private var drainWaiters = 0
    /// Seconds producers spent waiting for a slot.
    private(set) var stallNanoseconds: UInt64 = 0
    /// Slots held by partly written clusters. Those come back only when a client writes the rest,
    /// so a producer waiting for one could wait forever; at most ``partialCap`` are allowed, and a
    /// cluster beyond that is assembled in the encoder's ``SpillFile`` instead.
    private let partialHeld = Atomic<Int>(0)
    /// Half the pool: the other half keeps whole clusters flowing to the workers (the plan sizes
    /// the pool for 8 MiB per worker plus 32 MiB of bursts). In-order writes stay below it:
    /// measured, `nbdcopy --requests=64 --request-size=65536` of 64 MiB into 2 MiB clusters spilled
    /// no cluster at `--memory-limit 32M` (a handful of slots) nor at the default.
    let partialCap: Int

    init(slotSize: Int, count: Int) {
        self.slotSize = slotSize
        self.count = count
        arena = AlignedBuffer(capacity: slotSize * count, zeroed: false)
        free = (0..<Int32(count)).reversed().map { $0 }
        partialCap = max(1, count / 2)
    }

    /// Counts one more slot held by a partly written cluster; false (counting nothing) when
    /// ``partialCap`` are held already: the cluster goes to the spill file.
    func reservePartial() -> Bool {
        if partialHeld.wrappingAdd(1, ordering: .relaxed).newValue <= partialCap { return true }
        partialHeld.wrappingSubtract(1, ordering: .relaxed)
        return false
    }

    /// A partly written cluster's slot left that role (complete, queued, or given back).
    func endPartial() {
        partialHeld.wrappingSubtract(1, ordering: .relaxed)
    }

    /// Slots partly written clusters hold now.
    var partialCount: Int { partialHeld.load(ordering: .relaxed) }

    @inline(__always)
    func pointer(_ slot: Int32) -> UnsafeMutableRawPointer { arena.pointer + Int(slot) * slotSize }

    /// A free slot, or nil without waiting.
    func tryAcquire() -> Int32? {
        lock.withLock { failed ? nil : free.popLast() }
    }

    /// Takes a slot, blocking the calling OS thread while none is free. Nil once the pool was
    /// failed (the engine stopped).
    func acquireBlocking() -> Int32? {
        lock.withLock {
            if let s = free.popLast() { return s }
            let t0 = monotonicNanoseconds()
            while free.isEmpty && !failed { lock.wait() }
            stallNanoseconds += monotonicNanoseconds() - t0
            return failed ? nil : free.removeLast()
        }
    }

    /// Takes between 1 and `n` slots: as many as are free now, waiting only while none is (so a
    /// caller never holds slots while it waits, and callers cannot deadlock each other). Empty
    /// once the pool was failed.
    func acquireBlocking(upTo n: Int) -> [Int32] {
        lock.withLock {
            if free.isEmpty {
                let t0 = monotonicNanoseconds()
                while free.isEmpty && !failed { lock.wait() }
                stallNanoseconds += monotonicNanoseconds() - t0
            }
            if failed { return [] }
            let k = min(n, free.count)
            let taken = Array(free.suffix(k))
            free.removeLast(k)
            // Slots left for another waiter: pass the wake-up on (release signals only one).
            if !free.isEmpty { lock.signal() }
            return taken
        }
    }

    /// Takes a slot, suspending the task (never blocking a cooperative thread) while none is free.
    /// Nil once the pool was failed (the engine stopped).
    func acquire() async -> Int32? {
        if let s = lock.withLock({ failed ? nil : free.popLast() }) { return s }
        let t0 = monotonicNanoseconds()
        let s = await withCheckedContinuation { (c: CheckedContinuation<Int32?, Never>) in
            enum Now { case slot(Int32), failed, wait }
            let now: Now = lock.withLock {
                if failed { return .failed }
                if let s = free.popLast() { return .slot(s) }
                asyncWaiters.append(c)
                return .wait
            }
            switch now {
            case .slot(let s): c.resume(returning: s)
            case .failed: c.resume(returning: nil)
            case .wait: break
            }
        }
        let dt = monotonicNanoseconds() - t0
        lock.withLock { stallNanoseconds += dt }
        return s
    }

    /// Gives back several slots under one lock: async waiters first, then one wake-up per blocked
    /// thread that can be served (the writer returns a batch of results' slots at once, so a
    /// producer waiting for slots wakes once for many instead of once per slot).
    func release<C: Collection<Int32>>(_ slots: C) {
        guard !slots.isEmpty else { return }
        var resumed: [(CheckedContinuation<Int32?, Never>, Int32)] = []
        lock.withLock {
            var rest = slots[...]
            while !asyncWaiters.isEmpty, let s = rest.first {
                resumed.append((asyncWaiters.removeFirst(), s))
                rest = rest.dropFirst()
            }
            free.append(contentsOf: rest)
            // One wake-up: the thread woken takes what it needs and wakes the next while slots
            // are left (a broadcast woke every producer for one to take them all: measured here,
            // 66 k voluntary context switches per GiB through the sink instead of 37 k).
            if drainWaiters > 0 { lock.broadcast() } else if !rest.isEmpty { lock.signal() }
        }
        for (w, s) in resumed { w.resume(returning: s) }
    }

    func release(_ slot: Int32) {
        let waiter: CheckedContinuation<Int32?, Never>? = lock.withLock {
            if !asyncWaiters.isEmpty { return asyncWaiters.removeFirst() }
            free.append(slot)
            if drainWaiters > 0 { lock.broadcast() } else { lock.signal() }
            return nil
        }
        waiter?.resume(returning: slot)
    }

    /// Wakes every waiter with nil: the engine failed or was cancelled.
    func fail() {
        let waiters: [CheckedContinuation<Int32?, Never>] = lock.withLock {
            failed = true
            lock.broadcast()
            let w = asyncWaiters
            asyncWaiters = []
            return w
        }
        for w in waiters { w.resume(returning: nil) }
    }

    /// Slots free now (tests check that every slot comes back).
    var freeCount: Int { lock.withLock { free.count } }

    /// Waits until every slot is free again, at most `seconds`: true when they all are (tests
    /// wait for every slot to come back after a stop).
    func waitUntilAllFree(within seconds: Double) -> Bool {
        lock.withLock {
            drainWaiters += 1
            defer { drainWaiters -= 1 }
            let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
            while free.count != count {
                let now = monotonicNanoseconds()
                guard now < deadline else { return false }
                _ = lock.wait(seconds: Double(deadline - now) / 1e9)
            }
            return true
        }
    }

    var stallSeconds: Double { Double(lock.withLock { stallNanoseconds }) / 1e9 }
}

@inline(__always)
func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// True when every byte is zero. Word-at-a-time; runs at memory speed in release builds.
@inline(__always)
func isAllZero(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
    var i = 0
    let words = count / 8
    @inline(__always) func w(_ k: Int) -> UInt64 { p.loadUnaligned(fromByteOffset: k &* 8, as: UInt64.self) }
    // Unrolled by 4 so the compiler keeps the loop vectorised.
    while i + 4 <= words {
        if (w(i) | w(i + 1) | w(i + 2) | w(i + 3)) != 0 { return false }
        i += 4
    }
    while i < words {
        if w(i) != 0 { return false }
        i += 1
    }
    var j = words * 8
    while j < count {
        if p.load(fromByteOffset: j, as: UInt8.self) != 0 { return false }
        j += 1
    }
    return true
}
