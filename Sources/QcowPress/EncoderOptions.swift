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

/// How the memory budget is divided. Every number here is a floor or a share of the budget.
struct MemoryPlan {
    /// Write buffers: one filling, the others in flight.
    /// Measured here (2 cores, ext4 on virtio, 3 GiB image, uncompressed so the disk is the limit):
    /// 3 buffers 1.78–1.92 s, 6 buffers 2.20–2.32 s (the device is shared and noisy; more in flight
    /// bought nothing), so 3: one filling, two in flight.
    static let bufferCount = 3
    let bufferSize: Int
    let slotCount: Int
    let tableBudget: Int

    init(options o: EncoderOptions) {
        let cs = o.clusterSize
        // 4 MiB buffers at the default budget; at least 2 clusters so raw clusters fit beside
        // compressed data; 1 MiB floor keeps per-request overhead negligible.
        var buf = min(4 << 20, max(1 << 20, o.memoryLimit / 32))
        buf = max(buf, 2 * cs)
        buf = (buf + cs - 1) / cs * cs
        bufferSize = buf
        tableBudget = o.memoryLimit / 16
        let forSlots = o.memoryLimit - Self.bufferCount * buf - tableBudget - o.threads * cs
        // The budget is a ceiling, not a target: queued clusters beyond what keeps every worker and
        // the writer busy only add resident memory. Measured here (3 GiB ext4 image, 2 cores,
        // zstd 3): 8 MiB of slots per worker + 32 MiB for bursts ran as fast as 220 MiB of slots.
        let useful = (o.threads * (8 << 20) + (32 << 20)) / cs
        // Each worker needs a batch in hand and one queued, or the cores idle.
        slotCount = max(4 * o.threads + 4, min(useful, forSlots / cs))
    }
}
