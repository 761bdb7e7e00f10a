import Qcow2Format

/// In-memory L2 tables of regions still being written, and clusters being assembled from partial
/// writes. Guarded by the encoder's map lock; the writer thread sets final entries.
///
/// In-memory entry values: 0 untouched; ``zeroMarker`` final zero; ``pendingMarker`` handed to the
/// workers; anything else a final L2 entry.
final class L2Table {
    let entries: UnsafeMutablePointer<UInt64>
    let count: Int
    /// Clusters of this region whose entry is final (zero or written).
    var done = 0
    /// Clusters in this region (the last region of an image may be shorter).
    let clusters: Int

    init(count: Int, clusters: Int) {
        self.count = count
        self.clusters = clusters
        entries = .allocate(capacity: count)
        entries.initialize(repeating: 0, count: count)
    }
    deinit { entries.deallocate() }
    var isComplete: Bool { done == clusters }
}

/// A cluster assembled from several writes: its slot and the byte ranges already claimed.
struct PartialCluster {
    var slot: Int32
    /// Claimed ranges (sorted, disjoint). A write claims its range before copying.
    var claimed: [Range<Int>]
    /// Bytes copied in so far; the cluster is complete when this reaches its valid length.
    var filled: Int
}

enum MapMarker {
    static let zero: UInt64 = L2Entry.zeroFlag
    /// Bit 1 is reserved in an on-disk L2 entry, so it can never be confused with a final entry.
    static let pending: UInt64 = 1 << 1
}

extension Range where Bound == Int {
    func overlaps(any sorted: [Range<Int>]) -> Bool {
        sorted.contains { $0.overlaps(self) }
    }
}
