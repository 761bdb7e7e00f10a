import Qcow2Format

/// What the engine knows about one guest cluster while its region is in memory.
enum ClusterState: Equatable {
    /// Nothing written or announced yet.
    case untouched
    /// Claimed by a write (whole, partial or copy); its final entry is on its way.
    case pending
    /// Final: reads as zero (found at intake, by a worker, or declared by `writeZeroes`).
    case zero
    /// Final: this L2 entry (a standard or compressed entry, never 0).
    case final(UInt64)
}

/// What became final in one call: copies that were waiting for those clusters (each to be resolved
/// by the writer thread) and regions whose every cluster is now final (their tables can be written).
struct Finalized {
    var copies: [(dst: UInt64, src: UInt64)] = []
    var regions: [Int] = []
    var isEmpty: Bool { copies.isEmpty && regions.isEmpty }
}

/// The L2 table of one region in flight. Entries are ``ClusterState``s to every caller; inside,
/// one UInt64 each (half the memory of the enum's 16-byte stride): a final entry as itself, and
/// the three other states as values no final entry can take (0; bit 1, reserved in an L2 entry;
/// the bare zero flag, since a final zero is stored as `.zero`).
final class RegionTable {
    private var raw: [UInt64]
    /// Clusters of this region whose state is final (zero or written).
    var done = 0
    /// Clusters in this region (the last region of an image may be shorter).
    let clusters: Int

    private static let untouched: UInt64 = 0
    private static let pending: UInt64 = 1 << 1
    private static let zero: UInt64 = L2Entry.zeroFlag

    init(count: Int, clusters: Int) {
        raw = Array(repeating: Self.untouched, count: count)
        self.clusters = clusters
    }
    var isComplete: Bool { done == clusters }
    var count: Int { raw.count }

    subscript(i: Int) -> ClusterState {
        get {
            switch raw[i] {
            case Self.untouched: return .untouched
            case Self.pending: return .pending
            case Self.zero: return .zero
            case let e: return .final(e)
            }
        }
        set {
            switch newValue {
            case .untouched: raw[i] = Self.untouched
            case .pending: raw[i] = Self.pending
            case .zero: raw[i] = Self.zero
            case .final(let e):
                precondition(e != Self.untouched && e != Self.pending && e != Self.zero, "not a final L2 entry: \(e)")
                raw[i] = e
            }
        }
    }

    /// The on-disk entry of slot `i`: `zeroFlag` says whether a zero cluster is written as the zero
    /// flag (a backing file would show through an unallocated entry) or as 0.
    func diskEntry(_ i: Int, zeroFlag: Bool) -> UInt64 {
        switch self[i] {
        case .untouched, .pending: return 0
        case .zero: return zeroFlag ? L2Entry.zeroFlag : 0
        case .final(let e): return e
        }
    }
}
