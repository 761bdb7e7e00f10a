import DirectIO
import Glibc

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
    public static let chunkSize = 4 << 20

    public let source: any GuestImage
    public let base: (any GuestImage)?
    /// Cluster size of the destination (comparison granularity with a base).
    public let clusterSize: Int
    public var readers = 2

    public init(source: any GuestImage, base: (any GuestImage)? = nil, clusterSize: Int) {
        self.source = source
        self.base = base
        self.clusterSize = clusterSize
    }

    /// Returns the number of clusters written (differing from the base, when there is one).
    @discardableResult
    public func feed(_ sink: any BlockingImageSink) throws(QcowPressError) -> UInt64 {
        let size = source.virtualSize
        let step = UInt64(Self.chunkSize)
        let queue = ChunkQueue(size: size, step: step)
        let group = ThreadGroup()
        let written = RestoreCounters()
        let (source, base, cs) = (self.source, self.base, self.clusterSize)
        for i in 0..<max(1, readers) {
            group.spawn(name: "qp-copy-\(i)") { () throws(QcowPressError) in
                let ctx = ReadContext()
                let buf = AlignedBuffer(capacity: Self.chunkSize)
                let other = base == nil ? nil : AlignedBuffer(capacity: Self.chunkSize)
                do throws(QcowPressError) {
                    while let c = queue.next() {
                        let n = Int(c.count)
                        let srcZero = try source.isKnownZero(at: c.lowerBound, count: n)
                        guard let base, let other else {
                            if srcZero {
                                try sink.writeZeroesBlocking(at: c.lowerBound, length: UInt64(n))
                            } else {
                                try source.read(at: c.lowerBound, count: n, into: buf.pointer, context: ctx)
                                try sink.writeBlocking(at: c.lowerBound, UnsafeRawBufferPointer(start: buf.pointer, count: n))
                            }
                            continue
                        }
                        var baseZero = c.lowerBound >= base.virtualSize
                        if !baseZero { baseZero = try base.isKnownZero(at: c.lowerBound, count: n) }
                        if srcZero && baseZero { continue }
                        if srcZero { memset(buf.pointer, 0, n) } else {
                            try source.read(at: c.lowerBound, count: n, into: buf.pointer, context: ctx)
                        }
                        if baseZero { memset(other.pointer, 0, n) } else {
                            try base.read(at: c.lowerBound, count: n, into: other.pointer, context: ctx)
                        }
                        var k = 0
                        var count: UInt64 = 0
                        while k < n {
                            let m = min(cs, n - k)
                            if memcmp(buf.pointer + k, other.pointer + k, m) != 0 {
                                let at = c.lowerBound + UInt64(k)
                                if isAllZero(buf.pointer + k, m) {
                                    try sink.writeZeroesBlocking(at: at, length: UInt64(m))
                                } else {
                                    try sink.writeBlocking(at: at, UnsafeRawBufferPointer(start: buf.pointer + k, count: m))
                                }
                                count += 1
                            }
                            k += m
                        }
                        written.add(read: Int(count))
                    }
                } catch {
                    queue.stop()
                    throw error
                }
            }
        }
        if let e = group.wait() { throw e }
        return UInt64(written.readCount)
    }
}

/// A raw output file: written sparsely (zeros are never written), under a temporary name that is
/// renamed after fsync.
public final class RawImageWriter: BlockingImageSink, @unchecked Sendable {
    public let destination: String
    let tempPath: String
    let file: OutputFile
    let size: UInt64

    public init(destination: String, size: UInt64, overwrite: Bool) throws(QcowPressError) {
        if FileNames.isDirectory(destination) { throw .invalidArgument("\(destination): is a directory") }
        if FileNames.exists(destination) && !overwrite { throw .destinationExists(path: destination) }
        self.destination = destination
        self.size = size
        tempPath = TemporaryFiles.make(for: destination)
        do {
            file = try OutputFile(creating: tempPath, direct: false, displayName: destination)
            try file.truncate(to: size)
        } catch {
            TemporaryFiles.discard(tempPath)
            throw .from(error)
        }
    }

    public func writeBlocking(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws(QcowPressError) {
        // Skip zero runs cluster-wise so the output stays sparse.
        let step = 65536
        var k = 0
        while k < bytes.count {
            let m = min(step, bytes.count - k)
            if !isAllZero(bytes.baseAddress! + k, m) {
                do { try file.pwriteAll(bytes.baseAddress! + k, length: m, offset: offset + UInt64(k)) } catch {
                    throw .from(error)
                }
                file.dropBehind(offset: offset + UInt64(k), length: m)
            }
            k += m
        }
    }

    public func writeZeroesBlocking(at offset: UInt64, length: UInt64) throws(QcowPressError) {}

    public func finish() throws(QcowPressError) {
        do {
            try file.sync()
            try TemporaryFiles.commit(tempPath, to: destination)
            FileNames.syncDirectory(of: destination)
        } catch {
            TemporaryFiles.discard(tempPath)
            throw .from(error)
        }
    }

    public func cancel() { TemporaryFiles.discard(tempPath) }
}
