import CZlib

/// Raw deflate with a 4 KiB window (`windowBits = −12`), exactly what QEMU's qcow2 reader inflates.
/// One `z_stream` per instance, reset between clusters.
public final class ZlibDeflateCompressor: ClusterCompressor {
    /// QEMU: `deflateInit2(&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY)`.
    static let windowBits: Int32 = -12
    /// 8 (zlib's default; QEMU passes 9): a 64 KiB hash table instead of 128 KiB, which stays in
    /// cache. Measured on the bench disk's first 512 MiB in 64 KiB clusters (thread CPU, zlib
    /// 1.2.13, twice each, interleaved): level 6 12.17–12.20 s and 162.4 MiB against 14.09–14.19 s
    /// and 162.5 MiB with 9 — 14 % less CPU, no larger; level 4 −16 %, level 9 −9 %, sizes equal.
    /// The bytes differ from QEMU's; any inflate with a 4 KiB window reads them.
    static let memLevel: Int32 = 8
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
