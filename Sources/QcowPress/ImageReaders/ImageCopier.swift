import DirectIO
import Glibc
import Synchronization

/// Where guest data goes: a qcow2 encoder or a raw file. Called from the copier's threads.
public protocol BlockingImageSink: AnyObject, Sendable {
    func writeBlocking(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws(QcowPressError)
    func writeZeroesBlocking(at offset: UInt64, length: UInt64) throws(QcowPressError)
}

extension Qcow2Encoder: BlockingImageSink {}

/// Copies a guest image into a sink with several reader threads, in 4 MiB chunks (a multiple of
/// every cluster size). Ranges the source knows to be zero are announced without a read. With a
/// `base`, only clusters whose content differs from what the base reads are written (incremental
/// export); the rest stay unallocated so they read through to the base.
public struct ImageCopier: Sendable {
    /// Bytes read per request. 4 MiB: large enough that O_DIRECT reads run at device speed here,
    /// small enough that two readers hold only 8 MiB; a multiple of every cluster size.
    public static let chunkSize = 4 << 20
    /// Reader threads. Two keep the compression workers fed on this 2-core machine (reads are
    /// ~10× faster than the codec); more only add memory.
    public static let defaultReaders = 2

    public let source: any GuestImage
    public let base: (any GuestImage)?
    /// Cluster size of the destination (comparison granularity with a base).
    public let clusterSize: Int
    public var readers = ImageCopier.defaultReaders

    public init(source: any GuestImage, base: (any GuestImage)? = nil, clusterSize: Int) {
        self.source = source
        self.base = base
        self.clusterSize = clusterSize
    }

    /// Returns the number of clusters written (differing from the base, when there is one).
    /// The work follows the data: a `CopyPlan` hands out zero runs whole (one
    /// `writeZeroesBlocking` each, nothing at all over a base that reads zero there) and chunks
    /// to read.
    @discardableResult
    public func feed(_ sink: any BlockingImageSink) throws(QcowPressError) -> UInt64 {
        let written = Atomic<UInt64>(0)
        let plan = CopyPlan(source: source, base: base, chunkSize: Self.chunkSize)
        let (source, base, cs) = (self.source, self.base, self.clusterSize)
        let group = ThreadGroup()
        for t in 0..<max(1, readers) {
            group.spawn(name: "qp-copy-\(t)") { () throws(QcowPressError) in
                let ctx = ReadContext()
                // Untouched until used (a raw source into an encoder reads straight into its slots).
                let buf = AlignedBuffer(capacity: Self.chunkSize, zeroed: false)
                let other = base == nil ? nil : AlignedBuffer(capacity: Self.chunkSize)
                do throws(QcowPressError) {
                    while let unit = try plan.take() {
                        switch unit {
                        case .zero(let r):
                            // Over a base that reads zero there too, nothing differs.
                            if base == nil { try sink.writeZeroesBlocking(at: r.lowerBound, length: r.upperBound - r.lowerBound) }
                        case .chunk(let at0, let n, let srcZero):
                            guard let base, let other else {
                                try Self.copy(source, at: at0, count: n, buf: buf, ctx: ctx, into: sink)
                                continue
                            }
                            written.add(try Self.copyDiffering(source, base, at: at0, count: n, sourceZero: srcZero, clusterSize: cs,
                                                               buf: buf, other: other, ctx: ctx, into: sink), ordering: .relaxed)
                        }
                    }
                } catch {
                    plan.stop()
                    throw error
                }
            }
        }
        if let e = group.wait() { throw e }
        return written.load(ordering: .relaxed)
    }

    /// Copies one chunk that may hold data.
    static func copy(_ source: any GuestImage, at at0: UInt64, count n: Int, buf: AlignedBuffer, ctx: ReadContext,
                     into sink: any BlockingImageSink) throws(QcowPressError) {
        if let enc = sink as? Qcow2Encoder, enc.clusterSize >= 4096 {
            // Straight into the encoder's cluster slots (O_DIRECT reads need 4 KiB-aligned
            // memory, which slots of 4 KiB and up are).
            try enc.fillBlocking(at: at0, count: n) { (at, b) throws(QcowPressError) in
                try source.read(at: at, into: b, context: ctx)
            }
        } else {
            try source.read(at: at0, count: n, into: buf.pointer, context: ctx)
            try sink.writeBlocking(at: at0, UnsafeRawBufferPointer(start: buf.pointer, count: n))
        }
    }

    /// Writes the clusters of one chunk whose content differs from what the base reads there;
    /// returns how many.
    static func copyDiffering(_ source: any GuestImage, _ base: any GuestImage, at at0: UInt64, count n: Int, sourceZero srcZero: Bool,
                              clusterSize cs: Int, buf: AlignedBuffer, other: AlignedBuffer, ctx: ReadContext,
                              into sink: any BlockingImageSink) throws(QcowPressError) -> UInt64 {
        // A base of another size compares as qemu reads an overlay over it: past the base's
        // end it reads zeros, and what lies past the source's end does not matter.
        let inBase = at0 < base.virtualSize ? Int(min(UInt64(n), base.virtualSize - at0)) : 0
        var baseZero = inBase == 0
        if !baseZero { baseZero = try base.isKnownZero(at: at0, count: inBase) }
        if srcZero && baseZero { return 0 }
        if srcZero { memset(buf.pointer, 0, n) } else {
            try source.read(at: at0, count: n, into: buf.pointer, context: ctx)
        }
        if baseZero { memset(other.pointer, 0, n) } else {
            try base.read(at: at0, count: inBase, into: other.pointer, context: ctx)
            if inBase < n { memset(other.pointer + inBase, 0, n - inBase) }
        }
        var written: UInt64 = 0
        var k = 0
        while k < n {
            let m = min(cs, n - k)
            if memcmp(buf.pointer + k, other.pointer + k, m) != 0 {
                let at = at0 + UInt64(k)
                if isAllZero(buf.pointer + k, m) {
                    try sink.writeZeroesBlocking(at: at, length: UInt64(m))
                } else {
                    try sink.writeBlocking(at: at, UnsafeRawBufferPointer(start: buf.pointer + k, count: m))
                }
                written += 1
            }
            k += m
        }
        return written
    }
}

/// A raw output. A file is written sparsely (zeros are never written) under a temporary name that
/// is renamed after fsync. A block device is written in place with O_DIRECT, zeros included (as
/// write-zeroes where the device supports it), and must hold at least `size` bytes.
public final class RawImageWriter: BlockingImageSink {
    public let destination: String
    let output: PendingOutput
    var file: OutputFile { output.file }
    let size: UInt64
    /// Zeros for writes the device cannot take as write-zeroes, and bounce space for an
    /// unaligned tail under O_DIRECT.
    let zeros = AlignedBuffer(capacity: 1 << 20)

    public init(destination: String, size: UInt64, overwrite: Bool, protecting inputs: [ProtectedInput] = []) throws(QcowPressError) {
        let target = try OutputTarget(destination: destination, overwrite: overwrite, protecting: inputs)
        self.destination = destination
        self.size = size
        output = try target.open(direct: target.isBlockDevice)
        if let capacity = output.file.deviceSize, capacity < size {
            throw .invalidArgument("\(destination): block device of \(capacity) bytes is smaller than the image (virtual size \(size))")
        }
        do { try output.file.truncate(to: size) } catch {
            output.discard()
            throw .from(error)
        }
    }

    public func writeBlocking(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws(QcowPressError) {
        // Zero runs, cluster-wise: skipped on a file (it stays sparse), zeroed on a device.
        let step = 65536
        var k = 0
        while k < bytes.count {
            let m = min(step, bytes.count - k)
            let at = offset + UInt64(k)
            if isAllZero(bytes.baseAddress! + k, m) {
                if file.isBlockDevice { try writeZeroesBlocking(at: at, length: UInt64(m)) }
            } else {
                try write(bytes.baseAddress! + k, length: m, at: at)
            }
            k += m
        }
    }

    /// One write; under O_DIRECT a length that is not a multiple of 512 (the image's tail) goes
    /// through the zeroed bounce buffer, padded to 512 (a device's size is a multiple of 512).
    private func write(_ p: UnsafeRawPointer, length m: Int, at: UInt64) throws(QcowPressError) {
        do {
            if file.direct && m % 512 != 0 {
                let padded = (m + 511) & ~511
                let bounce = AlignedBuffer(capacity: padded)
                bounce.pointer.copyMemory(from: p, byteCount: m)
                try file.pwriteAll(bounce.pointer, length: padded, offset: at)
            } else {
                try file.pwriteAll(p, length: m, offset: at)
            }
        } catch {
            throw .from(error)
        }
        file.dropBehind(offset: at, length: m)
    }

    public func writeZeroesBlocking(at offset: UInt64, length: UInt64) throws(QcowPressError) {
        guard file.isBlockDevice, length > 0 else { return }
        do {
            let aligned = length & ~511
            try file.zeroRange(offset: offset, length: aligned, scratch: zeros.pointer, scratchSize: zeros.capacity)
            if aligned < length { try file.pwriteAll(zeros.pointer, length: 512, offset: offset + aligned) }
        } catch {
            throw .from(error)
        }
    }

    public func finish() throws(QcowPressError) {
        do {
            try file.sync()
            try output.commit()
        } catch {
            output.discard()
            throw .from(error)
        }
    }

    public func cancel() { output.discard() }
}
