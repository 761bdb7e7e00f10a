import DirectIO
import Glibc

/// A raw file or block device as a source: its size, its format by magic, and `feed` (an
/// ``ImageCopier`` over a ``RawGuestImage``).
public struct RawImageReader: Sendable {
    /// Bytes read per request. 4 MiB: large enough that O_DIRECT reads run at device speed here,
    /// small enough that two readers hold only 8 MiB.
    public static let chunkSize = 4 << 20
    /// Reader threads. Two keep the compression workers fed on this 2-core machine (reads are
    /// ~10× faster than the codec); more only add memory.
    public static let defaultReaders = 2

    public let path: String
    /// The image's virtual size: the file size rounded up to 512 bytes, as QEMU's raw driver
    /// reports it (the tail past the end of the file reads as zeros).
    public let size: UInt64

    public init(path: String) throws(QcowPressError) {
        let file: InputFile
        do { file = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        self.path = path
        size = (file.size + 511) & ~511
    }

    /// "qcow2" when the file starts with the qcow2 magic, otherwise "raw".
    public static func detectFormat(path: String) throws(QcowPressError) -> String {
        let f: InputFile
        do { f = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        guard f.size >= 4 else { return "raw" }
        var magic: UInt32 = 0
        do {
            _ = try withUnsafeMutableBytes(of: &magic) { (p) throws(IOError) -> Int in try f.read(into: p.baseAddress!, length: 4, offset: 0) }
        } catch { throw .from(error) }
        return UInt32(bigEndian: magic) == 0x5146_49FB ? "qcow2" : "raw"
    }

    /// Pushes the whole source into `encoder`: holes (SEEK_DATA/SEEK_HOLE) become zero ranges
    /// without a read; data is read with O_DIRECT in 4 MiB chunks by `readers` threads.
    public func feed(_ encoder: Qcow2Encoder, readers: Int = RawImageReader.defaultReaders) throws(QcowPressError) {
        var copier = ImageCopier(source: try RawGuestImage(path: path), clusterSize: encoder.options.clusterSize)
        copier.readers = readers
        try copier.feed(encoder)
    }
}

/// Chunks taken in order by several threads: a list, or a stride computed on demand (so an
/// image claiming an absurd size allocates nothing up front).
final class ChunkQueue: @unchecked Sendable {
    private let lock = ConditionLock()
    private let count: UInt64
    private let chunk: @Sendable (UInt64) -> Range<UInt64>
    private var next_: UInt64 = 0
    private var stopped = false
    /// [0, size) in steps of `step`.
    init(size: UInt64, step: UInt64) {
        count = size / step + (size % step == 0 ? 0 : 1)
        chunk = { i in (i * step)..<min(size, (i + 1) * step) }
    }
    func next() -> Range<UInt64>? {
        lock.withLock {
            guard !stopped, next_ < count else { return nil }
            defer { next_ += 1 }
            return chunk(next_)
        }
    }
    func stop() { lock.withLock { stopped = true } }
}

/// OS threads that run to completion; the first error is kept.
final class ThreadGroup: @unchecked Sendable {
    private let lock = ConditionLock()
    private var running = 0
    private var error: QcowPressError?
    func spawn(name: String, _ body: @escaping @Sendable () throws(QcowPressError) -> Void) {
        lock.withLock { running += 1 }
        startThread(name: name) { [self] in
            var failure: QcowPressError?
            do throws(QcowPressError) { try body() } catch { failure = error }
            lock.withLock {
                if let failure, error == nil { error = failure }
                running -= 1
                lock.broadcast()
            }
        }
    }
    func wait() -> QcowPressError? {
        lock.withLock {
            while running > 0 { lock.wait() }
            return error
        }
    }
}
