import CZlib

/// Inflates a gzip stream piece by piece (an OVA file stored with `ovf:compression="gzip"`):
/// feed input as it arrives, take output into any buffer. Concatenated members (pigz, gzip -c a b)
/// are one stream, as gzip reads them. The CRC-32 and length of every member are checked by zlib.
public final class GzipStreamInflater {
    private var z = z_stream()
    private let ok: Bool
    /// True once the last member ended and no input followed.
    public private(set) var finished = false
    private var memberEnded = false

    public init() {
        // 15 + 16: a gzip wrapper only (a zlib or raw stream is not what the OVF says).
        ok = czlib_inflate_init2(&z, 15 + 16) == Z_OK
    }
    deinit { if ok { inflateEnd(&z) } }

    /// Inflates from `input` into `output`: returns the bytes consumed and produced. A member's
    /// end followed by more input starts the next member.
    public func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(DecompressionError) -> (consumed: Int, produced: Int) {
        guard ok else { throw DecompressionError(codec: "gzip", reason: "cannot initialise zlib") }
        var consumed = 0
        var produced = 0
        while produced < output.count {
            if memberEnded {
                guard consumed < input.count else { break }
                inflateReset(&z)
                memberEnded = false
            }
            z.next_in = UnsafeMutablePointer(mutating: input.baseAddress.map { $0.assumingMemoryBound(to: Bytef.self) + consumed })
            z.avail_in = uInt(input.count - consumed)
            z.next_out = output.baseAddress!.assumingMemoryBound(to: Bytef.self) + produced
            z.avail_out = uInt(output.count - produced)
            let before = (Int(z.avail_in), Int(z.avail_out))
            let r = CZlib.inflate(&z, Z_NO_FLUSH)
            consumed += before.0 - Int(z.avail_in)
            produced += before.1 - Int(z.avail_out)
            if r == Z_STREAM_END {
                memberEnded = true
                continue
            }
            if r == Z_BUF_ERROR || (r == Z_OK && z.avail_in == 0) { break }
            guard r == Z_OK else {
                let msg = z.msg.map { String(cString: $0) } ?? "zlib error \(r)"
                throw DecompressionError(codec: "gzip", reason: msg)
            }
        }
        return (consumed, produced)
    }

    /// At the end of the input: true when the stream ended cleanly (not inside a member).
    public var atMemberBoundary: Bool { memberEnded }
}
