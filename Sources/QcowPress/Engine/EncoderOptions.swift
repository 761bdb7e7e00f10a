import ClusterCompression
import DirectIO
import Glibc
import Qcow2Format

/// How a qcow2 image is written.
public struct EncoderOptions: Sendable {
    /// Guest-visible size in bytes.
    public var virtualSize: UInt64
    /// Bytes per cluster, a power of two in 512…2 MiB (default 64 KiB, as qemu-img).
    public var clusterSize: Int = 65536
    /// Compression of data clusters; `nil` writes them uncompressed.
    public var compression: CompressionSettings? = nil
    /// The compression type recorded in the header when ``compression`` is nil (qemu-img records
    /// `-o compression_type` even without `-c`).
    public var headerCompressionType: CompressionSettings.Algorithm = .zlib
    /// Refcount width is `1 << refcountOrder` bits (default 4: 16-bit, as qemu-img).
    public var refcountOrder: Int = 4
    /// Compression workers (default: every core).
    public var threads: Int = EncoderOptions.defaultThreads
    /// The engine's memory budget in bytes (cluster assembly, queues, write buffers, tables).
    public var memoryLimit: Int = 256 << 20
    /// How data reaches the disk.
    public var ioMode: IOMode = .uring
    /// A backing file name to record in the header (relative names are resolved by readers
    /// against the image's directory), and its format.
    public var backingFile: String? = nil
    public var backingFormat: String? = nil
    /// Overwrite an existing destination (or write into a block device).
    public var overwrite: Bool = false
    /// Files the job reads that the destination may never be, even with ``overwrite``.
    public var protectedInputs: [ProtectedInput] = []
    /// Workers and memory shared with other encoders (nil: a private group). Its cluster size and
    /// compression must equal these options'; `threads` and `memoryLimit` are then the group's.
    public var group: EncoderGroup? = nil

    public init(virtualSize: UInt64) { self.virtualSize = virtualSize }

    public static var defaultThreads: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// Checks every field; throws ``QcowPressError/invalidArgument(_:)`` naming the bad one.
    public func validate() throws(QcowPressError) {
        guard ClusterGeometry(clusterSize: clusterSize) != nil else {
            throw .invalidArgument("cluster_size \(clusterSize) must be a power of two from 512 to 2M")
        }
        guard (0...6).contains(refcountOrder) else {
            throw .invalidArgument("refcount_bits must be 1, 2, 4, 8, 16, 32 or 64")
        }
        // Low refcount widths cannot count the references a shared compressed host cluster gets.
        guard refcountOrder >= 4 || compression == nil else {
            throw .invalidArgument("compressed images need refcount_bits of at least 16")
        }
        if let c = compression, !CompressionSettings.levelRange(c.algorithm).contains(c.level) {
            let r = CompressionSettings.levelRange(c.algorithm)
            throw .invalidArgument("compression_level \(c.level) is out of range for \(c.algorithm.rawValue) (\(r.lowerBound)…\(r.upperBound))")
        }
        guard (1...1024).contains(threads) else { throw .invalidArgument("threads must be 1…1024") }
        guard memoryLimit >= 4 << 20 else { throw .invalidArgument("memory limit must be at least 4M") }
        let g = ClusterGeometry(clusterSize: clusterSize)!
        guard g.l1Entries(forVirtualSize: virtualSize) <= UInt64(Qcow2Header.maxL1Size) else {
            throw .invalidArgument("virtual size \(virtualSize) is too large for cluster_size \(clusterSize)")
        }
        if let b = backingFile, b.utf8.count > Int(Qcow2Header.maxBackingFileSize) {
            throw .invalidArgument("backing file name longer than 1023 bytes")
        }
    }
}

/// How the memory budget is divided: one plan per ``EncoderGroup`` bounds the whole engine —
/// every image's write buffers, the workers (cluster scratch and codec context each), the cluster
/// slots and the tables. What does not fit is cut (fewer workers, smaller or fewer write buffers,
/// fewer slots), and what cannot be cut that far is refused with the size that would fit.
struct MemoryPlan {
    /// Write buffers per image: one filling, the others in flight.
    /// Measured here (2 cores, ext4 on virtio, 3 GiB image, uncompressed so the disk is the limit):
    /// 3 buffers 1.78–1.92 s, 6 buffers 2.20–2.32 s (the device is shared and noisy; more in flight
    /// bought nothing), so 3: one filling, two in flight. 2 is the floor (one filling, one in flight).
    static let bufferCount = 3
    /// The preferred write buffer size: 4 MiB at the default budget; at least 2 clusters so raw
    /// clusters fit beside compressed data; 1 MiB keeps per-request overhead negligible.
    let bufferSize: Int
    /// Workers the budget allows (at most the ones asked for).
    let threads: Int
    let slotCount: Int
    let tableBudget: Int
    /// Every image's write buffers together (images of a group take their share as they start).
    let writeBufferBudget: Int
    let clusterSize: Int
    let images: Int

    /// Memory one worker holds: its compression scratch cluster and codec context.
    static func workerBytes(_ o: EncoderOptions) -> Int {
        o.clusterSize + (o.compression.map { Codecs.contextBytes($0, clusterSize: o.clusterSize) } ?? 0)
    }

    /// - Parameter images: images the group will write at the same time (each gets an equal share
    ///   of the write-buffer budget).
    init(options o: EncoderOptions, images: Int = 1) throws(QcowPressError) {
        let cs = o.clusterSize
        let budget = o.memoryLimit
        var buf = min(4 << 20, max(1 << 20, budget / 32))
        buf = max(buf, 2 * cs)
        buf = (buf + cs - 1) / cs * cs
        bufferSize = buf
        clusterSize = cs
        self.images = max(1, images)
        tableBudget = budget / 16
        let perWorker = Self.workerBytes(o)
        // Write buffers: a quarter of the budget (three images at the default budget get full 4 MiB
        // buffers), and at least every image's floor of 2 buffers of 2 clusters.
        let floor = max(1, images) * 4 * cs
        let wanted = max(budget / 4, floor)
        let tables = budget / 16
        let fixed = { (t: Int) -> Int in Self.fixedBytes(o, images: images, threads: t) }
        var t = o.threads
        while t > 1 && fixed(t) > budget { t -= 1 }
        guard fixed(t) <= budget else {
            let what = images > 1 ? "\(images) images" : "an image"
            throw .invalidArgument("memory limit \(budget >> 20)M cannot hold \(what) at cluster_size \(cs) with \(o.compression?.description ?? "no compression"): at least \(Self.smallestLimit(o, images: images) >> 20)M is needed")
        }
        threads = t
        let available = budget - tables - t * perWorker - (2 * t + 2) * cs
        let writeBudget = min(wanted, available)
        writeBufferBudget = writeBudget
        let forSlots = budget - writeBudget - tables - t * perWorker
        // The budget is a ceiling, not a target: queued clusters beyond what keeps every worker and
        // the writer busy only add resident memory. Measured here (3 GiB ext4 image, 2 cores,
        // zstd 3): 8 MiB of slots per worker + 32 MiB for bursts ran as fast as 220 MiB of slots.
        let useful = (t * (8 << 20) + (32 << 20)) / cs
        slotCount = max(2 * t + 2, min(max(useful, 4 * t + 4), forSlots / cs))
    }

    /// What a plan cannot cut below at `o.memoryLimit` with `t` workers: every image's floor of
    /// write buffers (2 of 2 clusters), the tables' share (a sixteenth), and each worker's context
    /// and cluster slots (one in hand, one queued, two more).
    static func fixedBytes(_ o: EncoderOptions, images: Int, threads t: Int) -> Int {
        let cs = o.clusterSize
        return max(1, images) * 4 * cs + o.memoryLimit / 16 + t * workerBytes(o) + (2 * t + 2) * cs
    }

    /// The smallest limit in whole MiB that holds one worker and `images` images' smallest write
    /// buffers: what a refusal names, so that the size it names is one that runs (the tables'
    /// share grows with the limit: the shortfall at one limit is not the answer).
    static func smallestLimit(_ o: EncoderOptions, images: Int) -> Int {
        var e = o
        e.memoryLimit = max(4, (o.memoryLimit + (1 << 20) - 1) >> 20) << 20
        while fixedBytes(e, images: images, threads: 1) > e.memoryLimit { e.memoryLimit += 1 << 20 }
        return e.memoryLimit
    }

    /// One image's write buffers out of what `inUse` leaves of the write-buffer budget, at most its
    /// share: 3 of the preferred size when they fit, else smaller ones (whole clusters, at least 2),
    /// else only 2; nil when not even 2 buffers of 2 clusters fit.
    func writeBuffers(inUse: Int) -> (count: Int, size: Int)? {
        let left = min(writeBufferBudget - inUse, max(writeBufferBudget / images, 4 * clusterSize))
        for count in [Self.bufferCount, 2] {
            let size = min(bufferSize, left / count / clusterSize * clusterSize)
            if size >= 2 * clusterSize { return (count, size) }
        }
        return nil
    }
}
