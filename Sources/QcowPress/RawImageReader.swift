import DirectIO
import Glibc

/// Feeds a raw file or block device into an encoder with several reader threads: holes found with
/// SEEK_DATA/SEEK_HOLE become zero ranges without a read; data is read with O_DIRECT in chunks.
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
    let file: InputFile

    public init(path: String) throws(QcowPressError) {
        do {
            file = try InputFile(path: path)
        } catch {
            throw QcowPressError.from(error)
        }
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

    /// Pushes the whole source into `encoder`; returns when every byte was handed over.
    public func feed(_ encoder: Qcow2Encoder, readers: Int = RawImageReader.defaultReaders) throws(QcowPressError) {
        let data = file.dataRanges()
        // Holes first: they cost nothing and let regions complete early.
        var pos: UInt64 = 0
        for r in data {
            if r.lowerBound > pos { try encoder.writeZeroesBlocking(at: pos, length: r.lowerBound - pos) }
            pos = r.upperBound
        }
        if pos < size { try encoder.writeZeroesBlocking(at: pos, length: size - pos) }

        var chunks: [Range<UInt64>] = []
        let step = UInt64(Self.chunkSize)
        for r in data {
            var a = r.lowerBound
            while a < r.upperBound {
                let b = min(r.upperBound, (a / step + 1) * step)
                chunks.append(a..<b)
                a = b
            }
        }
        let queue = ChunkQueue(chunks)
        let group = ThreadGroup()
        let file = self.file
        for i in 0..<max(1, readers) {
            group.spawn(name: "qp-reader-\(i)") { () throws(QcowPressError) in
                let buf = AlignedBuffer(capacity: Self.chunkSize)
                while let c = queue.next() {
                    // Round the request to 4 KiB for O_DIRECT; the file's end stops it early.
                    let start = c.lowerBound & ~4095
                    let lead = Int(c.lowerBound - start)
                    let want = (lead + Int(c.count) + 4095) & ~4095
                    let big = want > buf.capacity ? AlignedBuffer(capacity: want) : buf
                    let got: Int
                    do throws(IOError) { got = try file.read(into: big.pointer, length: want, offset: start) } catch {
                        queue.stop()
                        throw QcowPressError.from(error)
                    }
                    guard got >= lead + Int(c.count) else {
                        queue.stop()
                        throw .inputDamaged(path: file.path, location: "file ended at offset \(start + UInt64(got)) while reading (size changed during conversion?)")
                    }
                    do throws(QcowPressError) {
                        try encoder.writeBlocking(at: c.lowerBound, UnsafeRawBufferPointer(start: big.pointer + lead, count: Int(c.count)))
                    } catch {
                        queue.stop()
                        throw error
                    }
                }
            }
        }
        if let e = group.wait() { throw e }
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
    init(_ c: [Range<UInt64>]) {
        count = UInt64(c.count)
        chunk = { c[Int($0)] }
    }
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
