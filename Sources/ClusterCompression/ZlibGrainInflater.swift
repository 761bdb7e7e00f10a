import CISAL

/// Inflates one zlib-wrapped deflate stream (RFC 1950: header, deflate, Adler-32 trailer) into a
/// buffer in one call: a VMDK streamOptimized grain as VMware's writer and QEMU's `compress()`
/// make it (QEMU reads it back with `uncompress()`, the same format). ISA-L's stateless inflate
/// parses the header and checks the Adler-32; it decodes about twice as fast as zlib's inflate.
///
/// One instance per thread (its state is mutable); the state is about 10 KiB.
public final class ZlibGrainInflater {
    private let state: UnsafeMutablePointer<inflate_state>

    public init() {
        state = .allocate(capacity: 1)
        isal_inflate_init(state)
    }
    deinit { state.deallocate() }

    /// Inflates `source` (which must hold the whole stream; trailing bytes are ignored) into
    /// `destination`, returning the number of bytes produced. A stream that is damaged, whose
    /// checksum does not match, or whose output does not fit in `destination` throws.
    public func inflate(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) throws(DecompressionError) -> Int {
        isal_inflate_init(state)
        state.pointee.crc_flag = UInt32(ISAL_ZLIB)
        state.pointee.next_in = UnsafeMutablePointer(mutating: source.baseAddress?.assumingMemoryBound(to: UInt8.self))
        state.pointee.avail_in = UInt32(clamping: source.count)
        state.pointee.next_out = destination.baseAddress?.assumingMemoryBound(to: UInt8.self)
        state.pointee.avail_out = UInt32(clamping: destination.count)
        let ret = isal_inflate_stateless(state)
        if ret == ISAL_DECOMP_OK { return Int(state.pointee.total_out) }
        switch ret {
        case ISAL_OUT_OVERFLOW:
            throw DecompressionError(codec: "zlib", reason: "inflates to more than \(destination.count) bytes")
        case ISAL_INCORRECT_CHECKSUM:
            throw DecompressionError(codec: "zlib", reason: "Adler-32 or header checksum does not match")
        case ISAL_END_INPUT:
            throw DecompressionError(codec: "zlib", reason: "stream ends early (truncated)")
        default:
            throw DecompressionError(codec: "zlib", reason: "invalid stream (isa-l error \(ret))")
        }
    }
}
