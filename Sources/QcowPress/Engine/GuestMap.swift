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
    /// Regions complete (their table written, or zero as a whole), as ranges: a zero range costs
    /// O(1) entries here whatever its length.
    private var completed = RegionSet()
    private var partials: [UInt64: PartialCluster] = [:]
    /// Copies waiting for their source: source cluster → destinations.
    private var waiting: [UInt64: [UInt64]] = [:]
    /// Clusters 0..<prefix are all final (progress in guest order).
    private var prefix: UInt64 = 0
    /// Regions `markZero` completed as a whole: they have no table, every cluster reads as zero.
    private var wholeZero = RegionSet()
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
        let t = RegionTable(count: geometry.l2Entries, clusters: Int(regionEnd(r) - regionFirst(r)))
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

    /// The regions [first, end) touches.
    private func regions(_ first: UInt64, _ end: UInt64) -> Range<Int> {
        end <= first ? 0..<0 : geometry.l1Index(ofGuestCluster: first)..<(geometry.l1Index(ofGuestCluster: end - 1) + 1)
    }
    private func regionFirst(_ r: Int) -> UInt64 { UInt64(r) << UInt64(geometry.l2Bits) }
    private func regionEnd(_ r: Int) -> UInt64 { min(regionFirst(r + 1), guestClusters) }

    /// The regions of `span` that have a table in memory, in order (a few: those in flight).
    private func tablesIn(_ span: Range<Int>) -> [Int] {
        tables.keys.filter { span.contains($0) }.sorted()
    }

    /// Throws unless every cluster of [first, end) is untouched: it looks at the completed ranges
    /// and the tables in memory only, never cluster by cluster through a region without a table.
    /// Names the lowest cluster touched. Caller holds the lock.
    private func checkUntouched(_ first: UInt64, _ end: UInt64) throws(QcowPressError) {
        let span = regions(first, end)
        var bad: UInt64? = completed.first(in: span).map { max(first, regionFirst($0)) }
        for r in tablesIn(span) {
            let t = tables[r]!
            if let b = bad, regionFirst(r) > b { break }
            // No hash lookup per cluster when no cluster is partly written (the common case).
            let anyPartial = !partials.isEmpty
            for k in max(first, regionFirst(r))..<min(end, regionEnd(r))
            where t[geometry.l2Index(ofGuestCluster: k)] != .untouched || (anyPartial && partials[k] != nil) {
                bad = min(bad ?? k, k)
                break
            }
        }
        if let bad { throw overlap(bad) }
    }

    /// Claims clusters for whole-cluster writes or copy destinations: untouched → pending, all of
    /// them or (on an overlap) none, in one critical section.
    func reserve(_ clusters: Range<UInt64>) throws(QcowPressError) {
        try lock.withLock { () throws(QcowPressError) in
            try checkUntouched(clusters.lowerBound, clusters.upperBound)
            for r in regions(clusters.lowerBound, clusters.upperBound) {
                let c = max(clusters.lowerBound, regionFirst(r))
                let t = try table(c)
                for k in c..<min(clusters.upperBound, regionEnd(r)) { t[geometry.l2Index(ofGuestCluster: k)] = .pending }
            }
        }
    }

    func reserve(_ c: UInt64) throws(QcowPressError) { try reserve(c..<(c + 1)) }

    /// Marks clusters [first, end) zero (found at intake or declared): all of them or (on an
    /// overlap) none, in one critical section. A run of whole untouched regions needs no table
    /// (unless zero clusters need an entry): it is recorded as one range, so the cost follows the
    /// tables in memory and the copies waiting, not the length. Returns the copies and regions
    /// this released.
    func markZero(_ first: UInt64, _ end: UInt64) throws(QcowPressError) -> Finalized {
        try lock.withLock { () throws(QcowPressError) -> Finalized in
            try checkUntouched(first, end)
            var out = Finalized()
            let span = regions(first, end)
            var withTable = tablesIn(span)[...]
            var r = span.lowerBound
            while r < span.upperBound {
                let c = max(first, regionFirst(r)), stop = min(end, regionEnd(r))
                if withTable.first == r || zeroNeedsEntry || c != regionFirst(r) || stop != regionEnd(r) {
                    if withTable.first == r { withTable.removeFirst() }
                    let t = try table(c)
                    for k in c..<stop { finalize(k, t, .zero, into: &out) }
                    r += 1
                    continue
                }
                // Whole regions without a table, up to the next one with a table or the last
                // region when the range ends inside it.
                var runEnd = min(withTable.first ?? span.upperBound, span.upperBound)
                if end < regionEnd(span.upperBound - 1) { runEnd = min(runEnd, span.upperBound - 1) }
                completed.insert(r..<runEnd)
                wholeZero.insert(r..<runEnd)
                releaseWaiting(regionFirst(r)..<regionEnd(runEnd - 1), into: &out)
                r = runEnd
            }
            advancePrefix()
            return out
        }
    }

    /// Hands out the copies waiting for a source in `clusters` (now final as zero): looks at the
    /// waiting copies, not at each cluster. Caller holds the lock.
    private func releaseWaiting(_ clusters: Range<UInt64>, into out: inout Finalized) {
        guard !waiting.isEmpty else { return }
        for k in waiting.keys.filter({ clusters.contains($0) }).sorted() {
            for d in waiting.removeValue(forKey: k)! { out.copies.append((d, k)) }
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
            } else if let done = completed.range(containing: r) {
                prefix = regionEnd(done.upperBound - 1)
            } else {
                return
            }
        }
    }

    /// Clusters from the start of the image that are all final (written or zero), in guest order.
    var clustersDoneInOrder: UInt64 { lock.withLock { prefix } }

    /// What the map holds, for tests that check its cost follows the data: tables in memory,
    /// ranges of completed and of whole-zero regions, partial clusters and waiting copies.
    var footprint: (tables: Int, completedRanges: Int, zeroRanges: Int, partials: Int, waiting: Int) {
        lock.withLock { (tables.count, completed.ranges.count, wholeZero.ranges.count, partials.count, waiting.count) }
    }

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
