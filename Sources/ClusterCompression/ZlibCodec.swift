import CZlib

/// Raw deflate with a 4 KiB window (`windowBits = −12`), exactly what QEMU's qcow2 reader inflates.
/// memLevel 9 as QEMU writes. One `z_stream` per instance, reset between clusters.
public final class ZlibDeflateCompressor: ClusterCompressor {
    /// QEMU: `deflateInit2(&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY)`.
    static let windowBits: Int32 = -12
    static let memLevel: Int32 = 9
    private var stream = z_stream()
    private let ok: Bool

    public init(level: Int) {
        ok = czlib_deflate_init2(&stream, Int32(level), Self.windowBits, Self.memLevel) == Z_OK
    }
    deinit { if ok { deflateEnd(&stream) } }

    public func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> CompressionResult {
        guard ok else { return .didNotFit }
        deflateReset(&stream)
        let cap = min(destination.count, source.count - 1)
        stream.next_in = UnsafeMutablePointer(mutating: source.baseAddress!.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(source.count)
        stream.next_out = destination.baseAddress!.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(cap)
        let ret = deflate(&stream, Z_FINISH)
        if ret == Z_STREAM_END {
            return .compressed(length: cap - Int(stream.avail_out))
        }
        return .didNotFit
    }
}

/// Raw inflate with a 4 KiB window: decodes zlib-compressed qcow2 clusters.
public final class ZlibInflateDecompressor: ClusterDecompressor {
    private var stream = z_stream()
    private let ok: Bool
    public init() { ok = czlib_inflate_init2(&stream, -12) == Z_OK }
    deinit { if ok { inflateEnd(&stream) } }

    public func decompress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) throws(DecompressionError) {
        guard ok else { throw DecompressionError(codec: "zlib", reason: "inflateInit2 failed") }
        inflateReset(&stream)
        stream.next_in = UnsafeMutablePointer(mutating: source.baseAddress!.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(source.count)
        stream.next_out = destination.baseAddress!.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(destination.count)
        let ret = inflate(&stream, Z_FINISH)
        // As QEMU: success when the output is full and the stream ended or simply needs no more space.
        guard (ret == Z_STREAM_END || ret == Z_BUF_ERROR) && stream.avail_out == 0 else {
            throw DecompressionError(codec: "zlib", reason: "inflate returned \(ret) with \(stream.avail_out) bytes of the cluster missing")
        }
    }
}
