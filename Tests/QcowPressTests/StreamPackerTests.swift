import Qcow2Format
import QcowPress
import Testing

/// Property tests of the compressed write cache's placement: random mixes of compressed and
/// cluster-aligned items never overlap, stay inside their buffer, aligned items are aligned, and
/// refcounts computed from the placements equal the number of references per host cluster.
@Suite(.tags(.property)) struct StreamPackerTests {
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
                    // It did not fit: the buffer really is full for this item.
                    if aligned {
                        let frontClusterEnd = (p.front + cs - 1) / cs * cs
                        #expect(p.back - cs < frontClusterEnd)
                    } else {
                        #expect(p.front + len > p.back)
                    }
                    // The next buffer starts right after the last used host cluster of this one.
                    let end = p.back < bufferSize ? p.bufferStart + UInt64(bufferSize)
                        : p.bufferStart + UInt64((p.front + cs - 1) / cs * cs)
                    p.advance()
                    #expect(p.bufferStart == end && p.front == 0 && p.back == bufferSize)
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

    /// The same with compressed clusters running on into the next buffer whenever the back region
    /// is empty: placements never overlap, the carried tail starts the next buffer (which begins
    /// right at the previous buffer's end), and such buffers end with no gap at all.
    @Test(arguments: [9, 12, 16, 21])
    func compressedClustersRunOnAcrossBuffers(bits: Int) {
        let cs = 1 << bits
        var rng = SystemRandomNumberGenerator()
        for round in 0..<20 {
            let bufferSize = cs * Int.random(in: 2...8, using: &rng)
            var p = StreamPacker(clusterSize: cs, bufferSize: bufferSize, firstHostOffset: UInt64(cs))
            var placed: [Placed] = []
            var carriedOver = 0
            let alignedShare = Double(round % 4) / 8
            for _ in 0..<400 {
                let aligned = Double.random(in: 0..<1, using: &rng) < alignedShare
                let len = aligned ? cs : Int.random(in: 1..<cs, using: &rng)
                while true {
                    if let at = aligned ? p.placeAligned() : p.placeCompressed(length: len) {
                        #expect(at + len <= bufferSize)
                        placed.append(Placed(start: p.bufferStart + UInt64(at), length: len, aligned: aligned))
                        break
                    }
                    let start = p.bufferStart
                    let backEmpty = p.back == bufferSize
                    if !aligned, let at = p.placeCompressedAcrossEnd(length: len) {
                        #expect(backEmpty && at + len > bufferSize && p.front == bufferSize && p.carried == at + len - bufferSize)
                        placed.append(Placed(start: start + UInt64(at), length: len, aligned: false))
                        p.advance()
                        carriedOver += 1
                        #expect(p.bufferStart == start + UInt64(bufferSize) && p.front == at + len - bufferSize && p.carried == 0)
                        break
                    }
                    #expect(aligned || !backEmpty || p.front == bufferSize, "a compressed cluster runs on whenever the back is empty")
                    p.advance()
                }
            }
            let sorted = placed.sorted { $0.start < $1.start }
            for (a, b) in zip(sorted, sorted.dropFirst()) { #expect(a.start + UInt64(a.length) <= b.start) }
            // Every host cluster below the last buffer is used by something.
            var used = Set<UInt64>()
            for x in placed {
                for c in (x.start >> UInt64(bits))...((x.start + UInt64(x.length) - 1) >> UInt64(bits)) { used.insert(c) }
            }
            let lastBufferStart = p.bufferStart >> UInt64(bits)
            for c in 1..<lastBufferStart { #expect(used.contains(c), "host cluster \(c) unused") }
            if alignedShare == 0 {
                #expect(carriedOver > 0)
                // Compressed only: the stream has no gap at all up to the front.
                var end = UInt64(cs)
                for x in sorted {
                    #expect(x.start == end)
                    end = x.start + UInt64(x.length)
                }
            }
        }
    }

    /// The last buffer's compaction plan: every back cluster gets one aligned destination, right
    /// after the front's last cluster, in order, never above its source (so memmove in order is
    /// safe), never over front data or another destination; the written length covers them all.
    @Test(arguments: [9, 12, 16, 21])
    func compactionPlanClosesTheGap(bits: Int) {
        let cs = 1 << bits
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let bufferSize = cs * Int.random(in: 2...16, using: &rng)
            var p = StreamPacker(clusterSize: cs, bufferSize: bufferSize, firstHostOffset: UInt64(cs))
            var back: [Int] = []
            // Fill part of one buffer at random, never advancing.
            for _ in 0..<Int.random(in: 0...40, using: &rng) {
                if Bool.random(using: &rng) {
                    guard let at = p.placeAligned() else { break }
                    if at == p.back { back.append(at) }
                } else {
                    guard p.placeCompressed(length: Int.random(in: 1..<cs, using: &rng)) != nil else { break }
                }
            }
            let plan = LastBufferCompaction.plan(front: p.front, back: back.shuffled(using: &rng), clusterSize: cs)
            #expect(plan.frontEnd % cs == 0 && plan.frontEnd >= p.front && plan.frontEnd < p.front + cs)
            #expect(plan.moves.map(\.from) == back.sorted())
            var lastTo = plan.frontEnd - cs
            for m in plan.moves {
                #expect(m.to % cs == 0 && m.to <= m.from && m.to == lastTo + cs)
                lastTo = m.to
            }
            #expect(plan.end == plan.frontEnd + back.count * cs && plan.end <= bufferSize)
            // Applying the moves in order to a model buffer keeps every cluster's identity.
            var model = [Int](repeating: -1, count: bufferSize / cs)
            for b in back { model[b / cs] = b }
            for m in plan.moves { model[m.to / cs] = model[m.from / cs] }
            for m in plan.moves { #expect(model[m.to / cs] == m.from) }
        }
    }

    /// Skipping to a cluster boundary starts the next compressed item in a fresh host cluster.
    @Test func skipToClusterBoundary() {
        var p = StreamPacker(clusterSize: 4096, bufferSize: 4 * 4096, firstHostOffset: 4096)
        _ = p.placeCompressed(length: 100)
        #expect(p.skipToClusterBoundary() && p.front == 4096)
        #expect(p.skipToClusterBoundary() && p.front == 4096)  // already aligned: no move
        _ = p.placeAligned()  // front, aligned
        _ = p.placeAligned()
        _ = p.placeAligned()
        #expect(p.front == 4 * 4096 && !p.skipToClusterBoundary())
    }
}
