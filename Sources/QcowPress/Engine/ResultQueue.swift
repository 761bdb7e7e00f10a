import DirectIO

/// A cluster's way to the writer thread.
struct ResultItem {
    enum Kind { case zero, raw, compressed(Int), copy(from: UInt64) }
    var cluster: UInt64
    /// The slot holding the data: raw and compressed results have one, zero clusters and copies
    /// none.
    var heldSlot: Int32?
    var kind: Kind

    init(cluster: UInt64, slot: Int32?, kind: Kind) {
        self.cluster = cluster
        heldSlot = slot
        self.kind = kind
    }

    /// The slot of a raw or compressed result (the writer copies from it and gives it back).
    var slot: Int32 {
        guard let heldSlot else { preconditionFailure("a \(kind) result holds no slot") }
        return heldSlot
    }
}

/// Everything handed to one encoder's writer thread: worker results, copies to resolve, regions
/// whose tables can be written; with the counts that tell the writer when the input is complete
/// and the flag that stops it. One lock, a leaf (nothing else is locked while it is held).
// @unchecked: the writer waits on its condition for work (a Mutex has none); every var is touched only inside `lock`.
final class ResultQueue: @unchecked Sendable {
    private let lock = ConditionLock()
    // Guarded by `lock`.
    private var items: [ResultItem] = []
    private var regions: [Int] = []
    /// Results announced (clusters handed to workers, copies queued) but not yet taken.
    private var outstanding: UInt64 = 0
    private var closed = false
    private var stopped = false
    private var codecNs: UInt64 = 0
    private var guestBytes: UInt64 = 0
    private var zeroMarked: UInt64 = 0

    /// `n` results will arrive (clusters just handed to the workers).
    func expect(_ n: Int) {
        lock.withLock { outstanding += UInt64(n) }
    }

    /// Results of one worker batch, in one go. False once the writer was stopped: nothing is
    /// taken (no one would take it from here), `out` keeps the batch and the worker gives its
    /// slots back.
    @discardableResult
    func deliver(_ out: inout [ResultItem], codecNanoseconds dt: UInt64) -> Bool {
        let taken = lock.withLock {
            if stopped { return false }
            items.append(contentsOf: out)
            codecNs += dt
            lock.signal()
            return true
        }
        if taken { out.removeAll(keepingCapacity: true) }
        return taken
    }

    /// Copies to resolve (new ones from `writeCopy`, or waiting ones whose source became final at
    /// intake) and regions complete at intake.
    func post(_ f: Finalized, copies extra: [ResultItem] = []) {
        guard !f.isEmpty || !extra.isEmpty else { return }
        lock.withLock {
            if stopped { return }
            let copies = f.copies.map { ResultItem(cluster: $0.dst, slot: nil, kind: .copy(from: $0.src)) } + extra
            items.append(contentsOf: copies)
            outstanding += UInt64(copies.count)
            regions.append(contentsOf: f.regions)
            lock.signal()
        }
    }

    /// Guest bytes written or announced, and clusters marked zero without a worker (the counts).
    func count(bytes: UInt64, zeroClusters: UInt64 = 0) {
        lock.withLock {
            guestBytes += bytes
            zeroMarked += zeroClusters
        }
    }

    /// No more input: once every announced result is taken, the writer finishes.
    func close() {
        lock.withLock {
            closed = true
            lock.signal()
        }
    }

    /// Stops the writer; returns what was still queued (their slots go back to the pool).
    func stop() -> [ResultItem] {
        lock.withLock {
            stopped = true
            lock.broadcast()
            let r = items
            items = []
            return r
        }
    }

    enum Next { case work, finished, stopped }

    /// Waits for work and swaps it into `into`/`regionsInto` (both empty on entry). `.finished`:
    /// the input is closed and this was the last of it (anything in the buffers still to handle).
    func next(into out: inout [ResultItem], regionsInto rs: inout [Int]) -> Next {
        lock.withLock {
            while items.isEmpty && regions.isEmpty && !stopped && !(closed && outstanding == 0) { lock.wait() }
            if stopped { return .stopped }
            swap(&out, &items)
            swap(&rs, &regions)
            outstanding -= UInt64(out.count)
            return closed && outstanding == 0 ? .finished : .work
        }
    }

    /// Regions announced and not yet taken (picked up once more after the last result).
    func takeRegions() -> [Int] {
        lock.withLock {
            let r = regions
            regions = []
            return r
        }
    }

    var codecNanoseconds: UInt64 { lock.withLock { codecNs } }
    var bytesIn: UInt64 { lock.withLock { guestBytes } }
    var zeroClustersMarked: UInt64 { lock.withLock { zeroMarked } }
}
