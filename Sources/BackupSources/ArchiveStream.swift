import ClusterCompression
import CZstd
import DirectIO
import Glibc

/// A byte stream of an archive that may be compressed as a whole (zstd or gzip, recognised by
/// magic, not by name), read front to back exactly once.
public final class ArchiveStream {
    public enum Compression: String, Sendable { case none, zstd, gzip }
    public let file: StreamFile
    public private(set) var compression: Compression = .none
    /// Bytes of the decompressed stream handed out so far (the offset errors name).
    public private(set) var offset: UInt64 = 0

    private var inBuf: UnsafeMutableRawPointer
    private let inCap = 1 << 20
    private var inPos = 0
    private var inLen = 0
    private var inEOF = false
    private var zstd: OpaquePointer?
    /// ZSTD_decompressStream's last answer: 0 once a frame is decoded, checked and flushed.
    private var zstdHint = 1
    private var gzip: GzipStreamInflater?

    public init(file: StreamFile) throws(SourceError) {
        self.file = file
        inBuf = .allocate(byteCount: inCap, alignment: 64)
        try fill(min: 4)
        let avail = inLen - inPos
        if avail >= 4 {
            let b = inBuf.assumingMemoryBound(to: UInt8.self)
            if b[0] == 0x28 && b[1] == 0xB5 && b[2] == 0x2F && b[3] == 0xFD {
                compression = .zstd
                zstd = ZSTD_createDStream()
                ZSTD_initDStream(zstd)
            } else if b[0] == 0x1F && b[1] == 0x8B {
                compression = .gzip
                let inflater = GzipStreamInflater(wrapper: .gzipOrZlib)
                guard inflater.isReady else {
                    throw SourceError(.io, path: file.path, "cannot initialise gzip decoding")
                }
                gzip = inflater
            }
        }
    }
    deinit {
        inBuf.deallocate()
        if let zstd { ZSTD_freeDStream(zstd) }
    }

    /// Compressed bytes read from the file (for progress against the file size).
    public var fileBytesRead: UInt64 { file.position - UInt64(inLen - inPos) }

    private func fill(min: Int) throws(SourceError) {
        if inPos > 0 && inPos == inLen { inPos = 0; inLen = 0 }
        while !inEOF && inLen - inPos < min {
            if inPos > 0 {
                memmove(inBuf, inBuf + inPos, inLen - inPos)
                inLen -= inPos
                inPos = 0
            }
            let n: Int
            do { n = try file.read(into: inBuf + inLen, count: inCap - inLen) } catch {
                throw SourceError(.io, path: file.path, error.description, errno: error.errno)
            }
            if n == 0 { inEOF = true }
            inLen += n
        }
    }

    /// Reads up to `count` decompressed bytes; 0 only at the end of the stream.
    public func read(into out: UnsafeMutableRawPointer, count: Int) throws(SourceError) -> Int {
        var produced = 0
        while produced < count {
            if inPos == inLen { try fill(min: 1) }
            switch compression {
            case .none:
                if inPos == inLen { break }
                let n = min(count - produced, inLen - inPos)
                memcpy(out + produced, inBuf + inPos, n)
                inPos += n
                produced += n
                continue
            case .zstd:
                if inPos == inLen && inEOF { break }
                var input = ZSTD_inBuffer(src: inBuf, size: inLen, pos: inPos)
                var output = ZSTD_outBuffer(dst: out + produced, size: count - produced, pos: 0)
                let r = ZSTD_decompressStream(zstd, &output, &input)
                if ZSTD_isError(r) != 0 {
                    throw SourceError(.damaged, path: file.path, "zstd stream is damaged near archive offset \(offset + UInt64(produced)): \(String(cString: ZSTD_getErrorName(r)))")
                }
                zstdHint = r
                inPos = input.pos
                produced += output.pos
                if output.pos == 0 && input.pos == inLen && inEOF { break }
                continue
            case .gzip:
                if inPos == inLen && inEOF { break }
                guard let gzip else { break }
                let r: (consumed: Int, produced: Int)
                do {
                    r = try gzip.decode(UnsafeRawBufferPointer(start: inBuf + inPos, count: inLen - inPos),
                                        into: UnsafeMutableRawBufferPointer(start: out + produced, count: count - produced))
                } catch {
                    throw damagedGzip(at: produced + error.produced, zlibCode: error.code)
                }
                inPos += r.consumed
                produced += r.produced
                // Input and room were there and zlib took none of it nor gave anything.
                if r.consumed == 0 && r.produced == 0 { throw damagedGzip(at: produced, zlibCode: -5) }  // Z_BUF_ERROR
                continue
            }
            break
        }
        if produced == 0 && count > 0 { try checkEnded() }
        offset += UInt64(produced)
        return produced
    }

    /// At the end of the file: the compressed stream must end where a frame or member does. A
    /// stream cut there has lost its integrity check (gzip's CRC-32 and length, zstd's checksum)
    /// even when every byte of the archive decoded: refused, as `zcat` and `zstd -d` refuse it.
    /// (A stream cut earlier also lacks archive bytes; this names the cause first.)
    private func checkEnded() throws(SourceError) {
        switch compression {
        case .none: return
        case .zstd where zstdHint != 0:
            throw SourceError(.damaged, path: file.path, "zstd stream ends inside a frame at archive offset \(offset): the file is truncated (the rest of the frame and its checksum are missing)")
        case .gzip where gzip?.atMemberBoundary == false:
            throw SourceError(.damaged, path: file.path, "gzip stream ends inside a member at archive offset \(offset): the file is truncated (the rest of the member and its CRC-32 are missing)")
        default: return
        }
    }

    private func damagedGzip(at produced: Int, zlibCode: Int32) -> SourceError {
        SourceError(.damaged, path: file.path, "gzip stream is damaged near archive offset \(offset + UInt64(produced)) (zlib \(zlibCode))")
    }

    /// Reads into `array[from..<from+count]`; returns how many bytes arrived before the end.
    public func readFully(into array: inout [UInt8], from: Int, count: Int) throws(SourceError) -> Int {
        let r: Result<Int, SourceError> = array.withUnsafeMutableBytes { p in
            Result { () throws(SourceError) -> Int in try readFully(into: p.baseAddress! + from, count: count) }
        }
        return try r.get()
    }

    /// Reads exactly `count` bytes, or returns how many were read before the stream ended.
    public func readFully(into out: UnsafeMutableRawPointer, count: Int) throws(SourceError) -> Int {
        var done = 0
        while done < count {
            let n = try read(into: out + done, count: count - done)
            if n == 0 { break }
            done += n
        }
        return done
    }
}
