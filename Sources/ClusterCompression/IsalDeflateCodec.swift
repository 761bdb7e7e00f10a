import CISAL

/// ISA-L igzip level 1 emitting raw deflate with a 4 KiB history (`hist_bits = 12`), so that QEMU's
/// `windowBits = −12` inflate decodes it. Selected by zlib `compression_level=1`.
public final class IsalDeflateCompressor: ClusterCompressor {
    /// 2^12 = 4 KiB: QEMU inflates with a 4 KiB window; longer distances would not decode.
    static let histBits: UInt16 = 12
    private var stream = isal_zstream()
    private let levelBuffer: UnsafeMutableRawPointer
    private let levelBufferSize: Int

    public init(clusterSize: Int) {
        levelBufferSize = Int(CISAL_LVL1_BUF_SIZE)
        levelBuffer = UnsafeMutableRawPointer.allocate(byteCount: levelBufferSize, alignment: 64)
    }
    deinit { levelBuffer.deallocate() }

    public func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> CompressionResult {
        isal_deflate_stateless_init(&stream)
        stream.level = 1
        stream.level_buf = levelBuffer.assumingMemoryBound(to: UInt8.self)
        stream.level_buf_size = UInt32(levelBufferSize)
        stream.hist_bits = Self.histBits
        stream.gzip_flag = 0
        stream.end_of_stream = 1
        stream.flush = 0
        let cap = min(destination.count, source.count - 1)
        stream.next_in = UnsafeMutablePointer(mutating: source.baseAddress!.assumingMemoryBound(to: UInt8.self))
        stream.avail_in = UInt32(source.count)
        stream.next_out = destination.baseAddress!.assumingMemoryBound(to: UInt8.self)
        stream.avail_out = UInt32(cap)
        let ret = isal_deflate_stateless(&stream)
        guard ret == CISAL_COMP_OK, stream.avail_in == 0 else { return .didNotFit }
        return .compressed(length: cap - Int(stream.avail_out))
    }
}
