import Qcow2Format
import QcowPress
import Testing

/// Property tests of the compressed write cache's placement: random mixes of compressed and
/// cluster-aligned items never overlap, stay inside their buffer, aligned items are aligned, and
/// refcounts computed from the placements equal the number of references per host cluster.
@Suite struct StreamPackerTests {
    struct Placed { var start: UInt64; var length: Int; var aligned: Bool }

    @Test(arguments: [9, 12, 16, 21])
    func placementsNeverOverlap(bits: Int) {
        let cs = 1 << bits
        var rng = SystemRandomNumberGenerator()
        for round in 0..<20 {
            let bufferSize = cs * Int.random(in: 2...8, using: &rng)
            var p = StreamPacker(clusterSize: cs, bufferSize: bufferSize, firstHostOffset: UInt64(cs))
            var placed: [Placed] = []
            let alignedShare = Double(round % 5) / 4
            for _ in 0..<400 {
                let aligned = Double.random(in: 0..<1, using: &rng) < alignedShare
                let len = aligned ? cs : Int.random(in: 1..<cs, using: &rng)
                while true {
                    let at = aligned ? p.placeAligned() : p.placeCompressed(length: len)
                    if let at {
                        #expect(at >= 0 && at + len <= bufferSize)
                        if aligned { #expect(at % cs == 0) }
                        placed.append(Placed(start: p.bufferStart + UInt64(at), length: len, aligned: aligned))
                        break
                    }
                    let before = p.bufferStart
                    p.advance()
                    #expect(p.bufferStart == before + UInt64(bufferSize) || p.bufferStart > before)
                }
            }
            // No overlap.
            let sorted = placed.sorted { $0.start < $1.start }
            for (a, b) in zip(sorted, sorted.dropFirst()) {
                #expect(a.start + UInt64(a.length) <= b.start)
            }
            // Refcounts as the encoder computes them equal references counted independently.
            var refcount: [UInt64: Int] = [:]
            var references: [UInt64: Set<Int>] = [:]
            for (i, x) in placed.enumerated() {
                let clusters: ClosedRange<UInt64>
                if x.aligned {
                    clusters = (x.start >> UInt64(bits))...(x.start >> UInt64(bits))
                } else {
                    clusters = CompressedDescriptor(hostOffset: x.start, length: x.length, clusterBits: bits).hostClusterRange(clusterBits: bits)
                }
                for c in clusters { refcount[c, default: 0] += 1 }
                let first = x.start >> UInt64(bits)
                let last = (x.start + UInt64(x.length) - 1) >> UInt64(bits)
                for c in first...last { references[c, default: []].insert(i) }
            }
            for (c, n) in refcount { #expect(references[c]?.count == n) }
            // An aligned cluster's host cluster is referenced by nothing else.
            for x in placed where x.aligned { #expect(refcount[x.start >> UInt64(bits)] == 1) }
            // No buffer leaves a whole unreferenced host cluster between used ones, except the
            // final (unfinished) buffer's gap.
            let used = Set(refcount.keys)
            let lastBufferStart = p.bufferStart >> UInt64(bits)
            if let maxUsed = used.max() {
                for c in 1...maxUsed where c < lastBufferStart { #expect(used.contains(c), "host cluster \(c) unused") }
            }
        }
    }
}
