import ClusterCompression
import DirectIO
import Glibc
import Synchronization

/// The size of a compressed conversion (`convert -c`), estimated from a sample of the clusters
/// that hold data: each sampled cluster is read and compressed with the codec and level the
/// encoder uses, the mean is scaled by the number of data clusters, and the destination's
/// metadata is added.
public enum CompressedEstimate {
    /// The first sample. 1024 clusters of 64 KiB (64 MiB read and compressed) put the bench disk's
    /// zlib and zstd estimates within 1.5 % of the real size at 95 % confidence (measured).
    static let firstSample = 1024
    /// The sample grows until the stated error is at most this, or reaches ``maxSample``.
    static let targetError = 0.02
    /// At most this many clusters are compressed (1 GiB of 64 KiB clusters).
    static let maxSample = 16384
    /// The encoder's write buffer: each costs about half a compressed cluster of gap
    /// (StreamPacker: 0.25 % of a zstd image of a 1 GiB ext4 disk).
    static let packerBuffer = Double(4 << 20)

    /// What the layout model itself may miss, relative (packing gaps and table placement): the
    /// estimate of a file system image whose every cluster was sampled landed within 0.33 % of
    /// the real size (zlib and zstd, 96 MiB ext4 of perl's files).
    static let modelError = 0.003

    /// The estimate in bytes and its relative error: the sample's 95 % interval, plus the final
    /// cluster's padding (up to half a cluster either way) and the layout model's 0.3 %. `seed` fixes which
    /// clusters are sampled.
    public static func estimate(_ image: any GuestImage, options o: MeasureOptions, threads: Int = ImageCompare.cores,
                                seed: UInt64 = 0x5EED_C0DE) throws(QcowPressError) -> (bytes: UInt64, error: Double) {
        let cs = UInt64(o.clusterSize)
        let l2Span = cs * (cs / (o.extendedL2 ? 16 : 8))
        // Pass 1: how many destination clusters hold data, and in how many L2 regions.
        var clusters: UInt64 = 0, regions: UInt64 = 0, lastRegion = UInt64.max
        try forEachDataCluster(image, cs) { c in
            clusters += 1
            if c * cs / l2Span != lastRegion {
                lastRegion = c * cs / l2Span
                regions += 1
            }
        }
        var sizes: [Int] = []
        var rng = SplitMix64(seed: seed)
        var k = Int(min(clusters, UInt64(firstSample)))
        while true {
            let picks = samplePicks(count: clusters, k: k, rng: &rng)
            sizes = try compressedSizes(image, clusters: picks, o, threads: threads)
            let err = relativeError(sizes, population: clusters)
            if err <= targetError || k >= maxSample || UInt64(k) >= clusters { break }
            k = min(maxSample, Int(min(clusters, UInt64(Double(k) * (err / targetError) * (err / targetError) + 1))))
        }
        let mean = sizes.isEmpty ? 0 : Double(sizes.reduce(0, +)) / Double(sizes.count)
        let data = mean * Double(clusters)
        let gaps = data / packerBuffer * mean / 2
        let l1 = ImageMeasure.roundUp(ImageMeasure.roundUp(image.virtualSize, l2Span) / l2Span * 8, cs)
        var meta = cs + l1 + regions * cs
        let hostClusters = (meta + UInt64(data + gaps) + cs - 1) / cs
        meta += ImageMeasure.refcountMetadataSize(clusters: hostClusters, clusterSize: cs, refcountOrder: o.refcountOrder)
        // The data ends anywhere in its last host cluster; the tables after it start on the next
        // one: half a cluster of padding on average, up to a whole one.
        let total = UInt64(data + gaps) + meta + cs / 2
        let sampling = relativeError(sizes, population: clusters) * data / max(1, Double(total))
        let err = sampling + Double(cs / 2) / max(1, Double(total)) + modelError
        return (total, (err * 10000).rounded(.up) / 10000)
    }

    /// The destination clusters (index) that hold data, in order: those qcow2_measure counts.
    static func forEachDataCluster(_ image: any GuestImage, _ cs: UInt64, _ body: (UInt64) throws(QcowPressError) -> Void) throws(QcowPressError) {
        var next: UInt64 = 0
        try ImageMeasure.forEachDataRun(image, clusterSize: cs) { (offset, pnum) throws(QcowPressError) in
            var c = max(next, offset / cs)
            while c < (offset + pnum) / cs {
                try body(c)
                c += 1
            }
            next = c
        }
    }

    /// `k` ordinals of `count`, one drawn at random from each of `k` equal strata (spread over
    /// the whole image, ascending).
    static func samplePicks(count: UInt64, k: Int, rng: inout SplitMix64) -> [UInt64] {
        guard k > 0 else { return [] }
        return (0..<UInt64(k)).map { j in
            let lo = j * count / UInt64(k), hi = (j + 1) * count / UInt64(k)
            return lo + rng.next() % max(1, hi - lo)
        }
    }

    /// The stored size of each picked data cluster (by ordinal among the data clusters): 0 when it
    /// is all zeros (the encoder writes none), the compressed length, or the cluster size when
    /// it does not compress.
    static func compressedSizes(_ image: any GuestImage, clusters picks: [UInt64], _ o: MeasureOptions,
                                threads: Int) throws(QcowPressError) -> [Int] {
        guard !picks.isEmpty else { return [] }
        let cs = UInt64(o.clusterSize)
        var offsets: [UInt64] = []
        offsets.reserveCapacity(picks.count)
        var ordinal: UInt64 = 0, i = 0
        try forEachDataCluster(image, cs) { c in
            while i < picks.count && picks[i] == ordinal {
                offsets.append(c * cs)
                i += 1
            }
            ordinal += 1
        }
        let offsetsDone = offsets
        let out = Mutex<[Int]>(Array(repeating: 0, count: offsetsDone.count))
        let settings = o.compression
        try forEachIndex(UInt64(offsetsDone.count), threads: threads, name: "qp-measure") {
            let ctx = ReadContext()
            let buf = AlignedBuffer(capacity: Int(cs))
            let scratch = AlignedBuffer(capacity: Int(cs))
            let codec = Codecs.makeCompressor(settings, clusterSize: Int(cs))
            return { (j: UInt64) throws(QcowPressError) in
                try image.read(at: offsetsDone[Int(j)], count: Int(cs), into: buf.pointer, context: ctx)
                let n: Int
                if isAllZero(buf.pointer, Int(cs)) {
                    n = 0
                } else {
                    switch codec.compress(UnsafeRawBufferPointer(start: buf.pointer, count: Int(cs)), into: scratch.bytes) {
                    case .compressed(let length): n = length
                    case .didNotFit: n = Int(cs)
                    }
                }
                out.withLock { $0[Int(j)] = n }
            }
        }
        return out.withLock { $0 }
    }

    /// Half-width of the 95 % interval of the mean over its mean, with the finite-population
    /// correction (a sample of every cluster has none).
    static func relativeError(_ sizes: [Int], population: UInt64) -> Double {
        let k = Double(sizes.count)
        guard k > 1 else { return 0 }
        let mean = Double(sizes.reduce(0, +)) / k
        guard mean > 0 else { return 0 }
        let variance = sizes.reduce(0.0) { $0 + (Double($1) - mean) * (Double($1) - mean) } / (k - 1)
        let fpc = max(0, 1 - k / Double(population))
        return 1.96 * (variance / k * fpc).squareRoot() / mean
    }
}

/// A small seeded generator (SplitMix64): the same seed picks the same clusters.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
