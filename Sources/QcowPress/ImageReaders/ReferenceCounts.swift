import DirectIO
import Qcow2Format

/// References counted so far: one counter per host cluster, kept in chunks of `chunkClusters`
/// that exist only where something was referenced (a 1 MiB image truncated to 4 TiB costs one
/// chunk, not 64 Mi counters). Counters are 16-bit; the rare larger count spills to a dictionary.
struct ReferenceCounts {
    static let chunkShift: UInt64 = 15
    static let chunkClusters = 1 << Int(chunkShift)
    final class Chunk {
        var counts = [UInt16](repeating: 0, count: ReferenceCounts.chunkClusters)
    }
    private var chunks: [UInt64: Chunk] = [:]
    private var big: [UInt64: UInt64] = [:]
    /// Clusters through which references may have been counted (exclusive upper bound).
    private(set) var extent: UInt64 = 0

    func get(_ c: UInt64) -> UInt64 {
        guard let ch = chunks[c >> Self.chunkShift] else { return 0 }
        let v = ch.counts[Int(c & UInt64(Self.chunkClusters - 1))]
        return v == UInt16.max ? big[c] ?? UInt64(v) : UInt64(v)
    }
    /// Adds one; returns false (unchanged) when the count is already `max`.
    mutating func increment(_ c: UInt64, max: UInt64) -> Bool {
        let k = c >> Self.chunkShift
        let ch: Chunk
        if let x = chunks[k] { ch = x } else { ch = Chunk(); chunks[k] = ch }
        extent = Swift.max(extent, c + 1)
        let i = Int(c & UInt64(Self.chunkClusters - 1))
        let v = ch.counts[i]
        let cur = v == UInt16.max ? big[c] ?? UInt64(v) : UInt64(v)
        guard cur < max else { return false }
        if cur + 1 >= UInt64(UInt16.max) {
            ch.counts[i] = UInt16.max
            big[c] = cur + 1
        } else {
            ch.counts[i] = v + 1
        }
        return true
    }
    func hasChunk(covering c: UInt64) -> Bool { chunks[c >> Self.chunkShift] != nil }
    /// First cluster of every chunk with references, ascending.
    var chunkStarts: [UInt64] { chunks.keys.sorted().map { $0 << Self.chunkShift } }
}
