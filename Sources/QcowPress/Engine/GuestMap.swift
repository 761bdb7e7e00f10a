import DirectIO
import Qcow2Format

/// The guest side of the encoder: the L2 tables of regions still in flight, clusters being
/// assembled from partial writes, regions already complete, and copies waiting for their source.
/// One lock; every method is one critical section, so a state change and what it releases (waiting
/// copies, a complete region) are decided together — whoever makes a cluster final, the producer
/// (zero clusters at intake) or the writer (worker results), gets its waiters.
// @unchecked: its RegionTables (classes) leave the lock for the writer (takeTable), which a Mutex refuses; every var only inside `lock`.
final class GuestMap: @unchecked Sendable {
    private let lock = ConditionLock()
    private let geometry: ClusterGeometry
    private let guestClusters: UInt64
    private let clusterBytes: (UInt64) -> Int
    /// Zero clusters need an entry (the zero flag): over a backing file a region without an L2
    /// table reads the backing file, so an all-zero region still gets its table.
    private let zeroNeedsEntry: Bool

    // Guarded by `lock`.
    private var tables: [Int: RegionTable] = [:]
    private var completed = Set<Int>()
    private var partials: [UInt64: PartialCluster] = [:]
    /// Copies waiting for their source: source cluster → destinations.
    private var waiting: [UInt64: [UInt64]] = [:]
    /// Clusters 0..<prefix are all final (progress in guest order).
    private var prefix: UInt64 = 0
    /// Regions `markZero` completed as a whole: they have no table, every cluster reads as zero.
    private var wholeZero = Set<Int>()
    /// The encoder stopped: partial clusters take no more claims (see ``stop()``).
    private var stopped = false

    /// `clusterBytes(c)`: the guest bytes cluster c holds (the last one may be short).
    init(geometry: ClusterGeometry, guestClusters: UInt64, zeroNeedsEntry: Bool = false, clusterBytes: @escaping (UInt64) -> Int) {
        self.geometry = geometry
        self.guestClusters = guestClusters
        self.zeroNeedsEntry = zeroNeedsEntry
        self.clusterBytes = clusterBytes
    }

    private func overlap(_ c: UInt64) -> QcowPressError {
        .misuse("overlapping write: guest cluster \(c) was already written")
    }

    /// The in-memory table of the region holding `c`, created when first touched.
    private func table(_ c: UInt64) throws(QcowPressError) -> RegionTable {
        let r = geometry.l1Index(ofGuestCluster: c)
        if let t = tables[r] { return t }
        if completed.contains(r) { throw overlap(c) }
        let first = UInt64(r) << UInt64(geometry.l2Bits)
        let t = RegionTable(count: geometry.l2Entries, clusters: Int(min(UInt64(geometry.l2Entries), guestClusters - first)))
        tables[r] = t
        return t
    }

    /// Marks an entry final and collects what that releases. Caller holds the lock.
    private func finalize(_ c: UInt64, _ t: RegionTable, _ s: ClusterState, into out: inout Finalized) {
        let i = geometry.l2Index(ofGuestCluster: c)
        if case .untouched = t[i] {} else if case .pending = t[i] {} else {
            preconditionFailure("guest cluster \(c) made final twice")
        }
        t[i] = s
        t.done += 1
        if let w = waiting.removeValue(forKey: c) { for d in w { out.copies.append((d, c)) } }
        if t.isComplete { out.regions.append(geometry.l1Index(ofGuestCluster: c)) }
    }

    // MARK: - intake (producers)

    /// Calls `body(r, c, stop)` for each region `r` that [first, end) touches, with the part of
    /// the range inside it.
    private func forEachRegion(_ first: UInt64, _ end: UInt64,
                               _ body: (Int, UInt64, UInt64) throws(QcowPressError) -> Void) throws(QcowPressError) {
        var c = first
        while c < end {
            let r = geometry.l1Index(ofGuestCluster: c)
            let regionEnd = min((UInt64(r) + 1) << UInt64(geometry.l2Bits), guestClusters)
            let stop = min(regionEnd, end)
            try body(r, c, stop)
            c = stop
        }
    }

    /// Throws unless every cluster of [first, end) is untouched. Caller holds the lock.
    private func checkUntouched(_ first: UInt64, _ end: UInt64) throws(QcowPressError) {
        try forEachRegion(first, end) { (r, c, stop) throws(QcowPressError) in
            if completed.contains(r) { throw overlap(c) }
            guard let t = tables[r] else { return }
            // No hash lookup per cluster when no cluster is partly written (the common case).
            let anyPartial = !partials.isEmpty
            for k in c..<stop where t[geometry.l2Index(ofGuestCluster: k)] != .untouched || (anyPartial && partials[k] != nil) {
                throw overlap(k)
            }
        }
    }

    /// Claims clusters for whole-cluster writes or copy destinations: untouched → pending, all of
    /// them or (on an overlap) none, in one critical section.
    func reserve(_ clusters: Range<UInt64>) throws(QcowPressError) {
        try lock.withLock { () throws(QcowPressError) in
            try checkUntouched(clusters.lowerBound, clusters.upperBound)
            try forEachRegion(clusters.lowerBound, clusters.upperBound) { (_, c, stop) throws(QcowPressError) in
                let t = try table(c)
                for k in c..<stop { t[geometry.l2Index(ofGuestCluster: k)] = .pending }
            }
        }
    }

    func reserve(_ c: UInt64) throws(QcowPressError) { try reserve(c..<(c + 1)) }

    /// Marks clusters [first, end) zero (found at intake or declared): all of them or (on an
    /// overlap) none, in one critical section. A whole untouched region needs no table at all
    /// (unless zero clusters need an entry). Returns the copies and regions this released.
    func markZero(_ first: UInt64, _ end: UInt64) throws(QcowPressError) -> Finalized {
        try lock.withLock { () throws(QcowPressError) -> Finalized in
            try checkUntouched(first, end)
            var out = Finalized()
            try forEachRegion(first, end) { (r, c, stop) throws(QcowPressError) in
                let regionFirst = UInt64(r) << UInt64(geometry.l2Bits)
                let regionEnd = min(regionFirst + UInt64(geometry.l2Entries), guestClusters)
                if c == regionFirst && stop == regionEnd && tables[r] == nil && !zeroNeedsEntry {
                    completed.insert(r)
                    wholeZero.insert(r)
                    if !waiting.isEmpty {
                        for k in c..<stop { if let w = waiting.removeValue(forKey: k) { for d in w { out.copies.append((d, k)) } } }
                    }
                } else {
                    let t = try table(c)
                    for k in c..<stop { finalize(k, t, .zero, into: &out) }
                }
            }
            advancePrefix()
            return out
        }
    }

    /// Claims `range` of a partially written cluster. Returns its slot, or nil when the cluster has
    /// none yet (the caller takes a slot and calls ``installPartial(_:range:slot:)``).
    func claimPartial(_ c: UInt64, range: Range<Int>) throws(QcowPressError) -> Int32? {
        try lock.withLock { () throws(QcowPressError) -> Int32? in
            if stopped { throw .cancelled }
            guard partials[c] != nil else {
                let t = try table(c)
                guard t[geometry.l2Index(ofGuestCluster: c)] == .untouched else { throw overlap(c) }
                return nil
            }
            // In place: a copy of the entry would copy its claimed ranges on every claim.
            guard partials[c]!.claim(range) else { throw overlapAt(c, range) }
            return partials[c]!.slot
        }
    }

    private func overlapAt(_ c: UInt64, _ range: Range<Int>) -> QcowPressError {
        .misuse("overlapping write at guest offset \((c << UInt64(geometry.clusterBits)) + UInt64(range.lowerBound))")
    }

    /// Installs a zeroed slot for a partial cluster, or returns the slot another producer installed
    /// meanwhile (`installed` false: the caller gives its own back).
    func installPartial(_ c: UInt64, range: Range<Int>, slot: Int32) -> Result<(slot: Int32, installed: Bool), QcowPressError> {
        lock.withLock {
            if stopped { return .failure(.cancelled) }
            if partials[c] != nil {
                guard partials[c]!.claim(range) else { return .failure(overlapAt(c, range)) }
                return .success((partials[c]!.slot, false))
            }
            let t: RegionTable
            do throws(QcowPressError) { t = try table(c) } catch { return .failure(error) }
            let i = geometry.l2Index(ofGuestCluster: c)
            guard t[i] == .untouched else { return .failure(overlap(c)) }
            t[i] = .pending
            var p = PartialCluster(slot: slot, clusterSize: 1 << geometry.clusterBits)
            _ = p.claim(range)
            partials[c] = p
            return .success((slot, true))
        }
    }

    /// Counts `count` bytes copied into a partial cluster: `.complete` when that completed it (it
    /// leaves the partial table and the caller queues it), `.abandoned` when the map was stopped
    /// and no other copy into the slot is running (the caller gives the slot back).
    func filledPartial(_ c: UInt64, count: Int) -> PartialFill {
        lock.withLock {
            guard partials[c] != nil else { return .incomplete }
            partials[c]!.filled += count
            let p = partials[c]!
            if stopped ? p.filled < p.claimedBytes : p.filled < clusterBytes(c) { return .incomplete }
            partials[c] = nil
            return stopped ? .abandoned : .complete
        }
    }

    /// The guest byte ranges not written yet inside clusters that are partly written, in guest
    /// order (each range inside one cluster).
    func partialGaps() -> [Range<UInt64>] {
        lock.withLock {
            var gaps: [Range<UInt64>] = []
            for c in partials.keys.sorted() {
                let start = c << UInt64(geometry.clusterBits)
                let valid = clusterBytes(c)
                var at = 0
                for r in partials[c]!.claimed.ranges(below: valid) {
                    if r.lowerBound > at { gaps.append(start + UInt64(at)..<start + UInt64(r.lowerBound)) }
                    at = r.upperBound
                }
                if at < valid { gaps.append(start + UInt64(at)..<start + UInt64(valid)) }
            }
            return gaps
        }
    }

    /// Every cluster still being assembled (at finish: its unwritten bytes are zero).
    func takePartials() -> [(cluster: UInt64, slot: Int32)] {
        lock.withLock {
            let all = partials.map { ($0.key, $0.value.slot) }
            partials.removeAll()
            return all
        }
    }

    /// The encoder stopped: no more partial claims. Returns the slots of partial clusters nobody
    /// is copying into (the caller gives them back); a slot a producer is copying into now goes
    /// back through that producer's ``filledPartial(_:count:)`` (`.abandoned`).
    func stop() -> [Int32] {
        lock.withLock {
            stopped = true
            var idle: [Int32] = []
            for (c, p) in partials where p.filled >= p.claimedBytes {
                idle.append(p.slot)
                partials[c] = nil
            }
            return idle
        }
    }

    // MARK: - writer thread

    /// Records the final state of cluster `c` (a worker's result or a resolved copy).
    func setFinal(_ c: UInt64, _ s: ClusterState) -> Finalized {
        lock.withLock {
            var out = Finalized()
            let r = geometry.l1Index(ofGuestCluster: c)
            if let t = tables[r] { finalize(c, t, s, into: &out) }
            if c == prefix { advancePrefix() }
            return out
        }
    }

    /// Where the source of a copy stands.
    enum Source {
        /// Final in memory (`.zero` or `.final`).
        case known(ClusterState)
        /// Its region's table has been written (or the whole region was zero): look it up there.
        case written(region: Int)
        /// Not final yet: `dst` now waits for it and comes back through a ``Finalized``.
        case waiting
    }

    /// The state of `src` for a copy into `dst`; registers `dst` as waiting when `src` is not
    /// final yet (in the same critical section, so no final state can slip between).
    func source(_ src: UInt64, for dst: UInt64) -> Source {
        lock.withLock {
            let r = geometry.l1Index(ofGuestCluster: src)
            if let t = tables[r] {
                let s = t[geometry.l2Index(ofGuestCluster: src)]
                switch s {
                case .zero, .final: return .known(s)
                case .untouched, .pending: break
                }
            } else if completed.contains(r) {
                return .written(region: r)
            }
            waiting[src, default: []].append(dst)
            return .waiting
        }
    }

    /// Copies still waiting at the end, for sources that were never written; they leave the map.
    func takeWaiting() -> [(dst: UInt64, src: UInt64)] {
        lock.withLock {
            var all: [(dst: UInt64, src: UInt64)] = []
            for (src, dsts) in waiting { for d in dsts { all.append((d, src)) } }
            waiting.removeAll()
            all.sort { $0.dst < $1.dst }
            return all
        }
    }

    /// What the map says of clusters [first, first + count) (one region) to a reader of the image
    /// being written (``Qcow2Encoder/readWritten(at:count:into:context:)``).
    enum Readback {
        /// Every one is final: its entry (0 for a zero cluster).
        case entries([UInt64])
        /// The region was completed as zero without a table.
        case zero
        /// The region's table left memory to be written: ``WrittenImage`` knows where it went.
        case elsewhere
        /// Some cluster is written but not final yet (being compressed): it will be.
        case pending
        /// Some cluster was never written.
        case untouched
    }

    func readback(_ first: UInt64, count: Int) -> Readback {
        lock.withLock {
            let r = geometry.l1Index(ofGuestCluster: first)
            if let t = tables[r] {
                let i0 = geometry.l2Index(ofGuestCluster: first)
                var out: [UInt64] = []
                out.reserveCapacity(count)
                var pending = false
                for i in i0..<(i0 + count) {
                    switch t[i] {
                    case .zero: out.append(0)
                    case .final(let e): out.append(e)
                    case .pending: pending = true
                    case .untouched: return .untouched
                    }
                }
                return pending ? .pending : .entries(out)
            }
            if wholeZero.contains(r) { return .zero }
            return completed.contains(r) ? .elsewhere : .untouched
        }
    }

    /// The states of `clusters` in one critical section (a reader's snapshot); nil for a cluster
    /// whose region's table left memory (final, written out).
    func states(_ clusters: Range<UInt64>) -> [ClusterState?] {
        lock.withLock {
            clusters.map { c -> ClusterState? in
                let r = geometry.l1Index(ofGuestCluster: c)
                if let t = tables[r] { return t[geometry.l2Index(ofGuestCluster: c)] }
                if wholeZero.contains(r) { return .zero }
                return completed.contains(r) ? nil : .untouched
            }
        }
    }

    /// Takes a region's table out of memory to be written; the region counts as complete.
    func takeTable(_ r: Int) -> RegionTable? {
        lock.withLock {
            guard let t = tables.removeValue(forKey: r) else { return nil }
            completed.insert(r)
            return t
        }
    }

    /// Moves the in-order prefix over every final cluster after it. Caller holds the lock.
    private func advancePrefix() {
        while prefix < guestClusters {
            let r = geometry.l1Index(ofGuestCluster: prefix)
            if let t = tables[r] {
                switch t[geometry.l2Index(ofGuestCluster: prefix)] {
                case .zero, .final: prefix += 1
                case .untouched, .pending: return
                }
            } else if completed.contains(r) {
                prefix = min(guestClusters, (UInt64(r) + 1) << UInt64(geometry.l2Bits))
            } else {
                return
            }
        }
    }

    /// Clusters from the start of the image that are all final (written or zero), in guest order.
    var clustersDoneInOrder: UInt64 { lock.withLock { prefix } }

    /// Regions whose tables are still in memory (at the end: partly unwritten regions).
    var regionsInMemory: [Int] { lock.withLock { tables.keys.sorted() } }

    /// Clears the copied flag of `c`'s entry if its table is still in memory; false otherwise.
    func clearCopiedInMemory(_ c: UInt64) -> Bool {
        lock.withLock {
            guard let t = tables[geometry.l1Index(ofGuestCluster: c)] else { return false }
            let i = geometry.l2Index(ofGuestCluster: c)
            if case .final(let e) = t[i] { t[i] = .final(e & ~L2Entry.copiedFlag) }
            return true
        }
    }
}
