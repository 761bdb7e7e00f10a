import CZstd

/// One zstd frame per cluster (QEMU writes level 3). The `ZSTD_CCtx` lives as long as the worker.
public final class ZstdClusterCompressor: ClusterCompressor {
    private let cctx: OpaquePointer?
    private let level: Int32
    public init(level: Int) {
        cctx = ZSTD_createCCtx()
        self.level = Int32(level)
    }
    deinit { ZSTD_freeCCtx(cctx) }

    public func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> CompressionResult {
        guard let cctx else { return .didNotFit }
        let cap = min(destination.count, source.count - 1)
        let n = ZSTD_compressCCtx(cctx, destination.baseAddress, cap, source.baseAddress, source.count, level)
        if ZSTD_isError(n) != 0 { return .didNotFit }
        return .compressed(length: n)
    }
}

/// Decodes one cluster as QEMU does: streaming decompression until the cluster is full, across as
/// many frames as it takes (skippable frames included); bytes after that are ignored (a qcow2
/// reader fetches whole sectors). A step that makes no progress, or a frame still unfinished when
/// the cluster is full, is an error.
public final class ZstdClusterDecompressor: ClusterDecompressor {
    private let dctx: OpaquePointer?
    public init() { dctx = ZSTD_createDCtx() }
    deinit { ZSTD_freeDCtx(dctx) }

    public func decompress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) throws(DecompressionError) {
        guard let dctx else { throw DecompressionError(codec: "zstd", reason: "cannot create context") }
        ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only)
        var input = ZSTD_inBuffer(src: source.baseAddress, size: source.count, pos: 0)
        var output = ZSTD_outBuffer(dst: destination.baseAddress, size: destination.count, pos: 0)
        var last = 0
        while output.pos < output.size {
            let before = (input.pos, output.pos)
            last = ZSTD_decompressStream(dctx, &output, &input)
            if ZSTD_isError(last) != 0 {
                throw DecompressionError(codec: "zstd", reason: String(cString: ZSTD_getErrorName(last)))
            }
            if input.pos <= before.0 && output.pos <= before.1 {
                throw DecompressionError(codec: "zstd", reason: "data ends after \(output.pos) of \(output.size) bytes")
            }
        }
        if last > 0 {
            throw DecompressionError(codec: "zstd", reason: "a frame continues past the end of the cluster (\(output.size) bytes)")
        }
    }
}
