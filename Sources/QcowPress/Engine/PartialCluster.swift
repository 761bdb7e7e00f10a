/// A cluster assembled from several writes: its slot, the byte ranges claimed, the bytes copied.
struct PartialCluster {
    /// Its slot, or (negative) its region of the spill file: a ``PartialHome``'s raw value.
    var slot: Int32
    /// Claimed byte ranges. A write claims its range before copying into the slot.
    var claimed: ClaimedRanges
    /// Bytes claimed so far; `claimedBytes - filled` are being copied in right now.
    var claimedBytes: Int
    /// Bytes copied in so far; the cluster is complete when this reaches its valid length.
    var filled: Int

    init(slot: Int32, clusterSize: Int) {
        self.slot = slot
        claimed = ClaimedRanges(clusterSize: clusterSize)
        claimedBytes = 0
        filled = 0
    }

    /// Claims `range`; false (nothing claimed) when it overlaps an earlier claim.
    mutating func claim(_ range: Range<Int>) -> Bool {
        guard claimed.claim(range) else { return false }
        claimedBytes += range.count
        return true
    }
}

/// What counting copied bytes into a partial cluster decided.
enum PartialFill {
    /// More bytes are to come.
    case incomplete
    /// Every valid byte is in: the cluster left the partial table and goes to the workers.
    case complete
    /// The encoder stopped and this was the last copy running into the slot: the caller gives the
    /// slot back (nobody else holds it any more).
    case abandoned
}

/// The byte ranges of one cluster claimed by writes (disjoint: an overlapping claim is refused).
/// Whole 512-byte sectors are bits; a sector claimed only in part keeps its ranges (sorted,
/// adjacent ones merged). A claim costs O(the sectors it spans + the ranges of its two edge
/// sectors), so a cluster written in n pieces costs O(n + cluster/512) in all. Scanning every
/// earlier piece, as before, was O(n²): 2 MiB in 64-byte pieces is 32768 pieces.
struct ClaimedRanges {
    static let sectorBits = 9
    static let sector = 1 << sectorBits
    /// Bit s: sector s is claimed whole.
    private var whole: [UInt64]
    /// Sectors claimed in part: their claimed ranges, sorted, disjoint, not touching.
    private var parts: [Int: [Range<Int>]] = [:]

    init(clusterSize: Int) {
        whole = Array(repeating: 0, count: ((clusterSize + Self.sector - 1) >> Self.sectorBits + 63) / 64)
    }

    private func isWhole(_ s: Int) -> Bool { whole[s >> 6] & (1 << UInt64(s & 63)) != 0 }
    private mutating func setWhole(_ s: Int) { whole[s >> 6] |= 1 << UInt64(s & 63) }

    /// The part of `r` inside sector `s`.
    private static func piece(_ r: Range<Int>, _ s: Int) -> Range<Int> {
        max(r.lowerBound, s << sectorBits)..<min(r.upperBound, (s + 1) << sectorBits)
    }

    /// Claims `r`; false, claiming nothing, when any byte of it was claimed before.
    mutating func claim(_ r: Range<Int>) -> Bool {
        if r.isEmpty { return true }
        let first = r.lowerBound >> Self.sectorBits
        let last = (r.upperBound - 1) >> Self.sectorBits
        for s in first...last {
            if isWhole(s) { return false }
            if let p = parts[s] {
                let piece = Self.piece(r, s)
                if p.contains(where: { $0.overlaps(piece) }) { return false }
            }
        }
        for s in first...last {
            let piece = Self.piece(r, s)
            if piece.count == Self.sector {
                setWhole(s)
                continue
            }
            var p = parts.removeValue(forKey: s) ?? []  // taken out, so changed in place
            // Sorted insert, merged with the neighbours it touches.
            var i = p.partitionPoint { $0.lowerBound >= piece.upperBound }
            var merged = piece
            if i < p.count && p[i].lowerBound == merged.upperBound {
                merged = merged.lowerBound..<p[i].upperBound
                p.remove(at: i)
            }
            if i > 0 && p[i - 1].upperBound == merged.lowerBound {
                merged = p[i - 1].lowerBound..<merged.upperBound
                p.remove(at: i - 1)
                i -= 1
            }
            p.insert(merged, at: i)
            if merged.count == Self.sector {
                setWhole(s)
            } else {
                parts[s] = p
            }
        }
        return true
    }

    /// The claimed ranges in order, adjacent ones merged, within [0, limit).
    func ranges(below limit: Int) -> [Range<Int>] {
        var out: [Range<Int>] = []
        func add(_ r: Range<Int>) {
            let r = r.clamped(to: 0..<limit)
            if r.isEmpty { return }
            if let l = out.last, l.upperBound == r.lowerBound {
                out[out.count - 1] = l.lowerBound..<r.upperBound
            } else {
                out.append(r)
            }
        }
        let sectors = (limit + Self.sector - 1) >> Self.sectorBits
        for s in 0..<sectors {
            if isWhole(s) {
                add((s << Self.sectorBits)..<((s + 1) << Self.sectorBits))
            } else if let p = parts[s] {
                for r in p { add(r) }
            }
        }
        return out
    }
}

extension Array {
    /// The first index whose element satisfies `belongsAfter` (which must be false for a prefix
    /// and true for the rest): binary search.
    func partitionPoint(_ belongsAfter: (Element) -> Bool) -> Int {
        var lo = 0
        var hi = count
        while lo < hi {
            let mid = (lo + hi) / 2
            if belongsAfter(self[mid]) { hi = mid } else { lo = mid + 1 }
        }
        return lo
    }
}
