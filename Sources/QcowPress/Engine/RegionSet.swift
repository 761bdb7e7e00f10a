/// A set of region indexes kept as sorted, disjoint, non-adjacent ranges: a run of regions costs
/// one entry whatever its length, so a 64 TiB zero range is one range, not 131,072 members.
/// Lookups are binary searches; inserting in order (as regions complete) appends or extends the
/// last range.
struct RegionSet {
    private(set) var ranges: [Range<Int>] = []

    var isEmpty: Bool { ranges.isEmpty }

    /// The index of the first range whose upper bound is above `r` (ranges.count if none).
    private func firstEnding(after r: Int) -> Int {
        var lo = 0, hi = ranges.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if ranges[mid].upperBound > r { hi = mid } else { lo = mid + 1 }
        }
        return lo
    }

    /// The range holding `r`, if any.
    func range(containing r: Int) -> Range<Int>? {
        let i = firstEnding(after: r)
        return i < ranges.count && ranges[i].lowerBound <= r ? ranges[i] : nil
    }

    func contains(_ r: Int) -> Bool { range(containing: r) != nil }

    /// The lowest member inside `span`, if any.
    func first(in span: Range<Int>) -> Int? {
        let i = firstEnding(after: span.lowerBound)
        guard i < ranges.count, ranges[i].lowerBound < span.upperBound else { return nil }
        return max(ranges[i].lowerBound, span.lowerBound)
    }

    mutating func insert(_ r: Int) { insert(r..<(r + 1)) }

    /// Adds `span`, merging it with the ranges it overlaps or touches.
    mutating func insert(_ span: Range<Int>) {
        guard !span.isEmpty else { return }
        // First range that ends at or after span's start (touching counts), and the first that
        // starts after span's end.
        let i = firstEnding(after: span.lowerBound - 1)
        var j = i
        var merged = span
        while j < ranges.count && ranges[j].lowerBound <= span.upperBound {
            merged = min(merged.lowerBound, ranges[j].lowerBound)..<max(merged.upperBound, ranges[j].upperBound)
            j += 1
        }
        ranges.replaceSubrange(i..<j, with: [merged])
    }
}
