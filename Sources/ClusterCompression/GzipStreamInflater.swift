import CZlib

/// Why a gzip stream did not inflate: zlib's return code and message, and how many bytes the
/// failing call had produced before it (callers name the offset in their own words).
public struct GzipStreamError: Error, Sendable {
    /// zlib's return code (`Z_DATA_ERROR`, `Z_MEM_ERROR`, …).
    public var code: Int32
    /// zlib's message, or "zlib error N" when it gave none.
    public var message: String
    /// Bytes written to the output by this call before the failure.
    public var produced: Int
}

/// Inflates a gzip stream piece by piece (an OVA file stored with `ovf:compression="gzip"`, a
/// `.vma.gz`): feed input as it arrives, take output into any buffer. Concatenated members (pigz,
/// gzip -c a b) are one stream, as gzip reads them. The CRC-32 and length of every member are
/// checked by zlib.
public final class GzipStreamInflater {
    /// Which wrapper a member may have.
    public enum Wrapper: Sendable {
        /// gzip only (15 + 16): a zlib or raw stream is not what an OVF's "gzip" says.
        case gzip
        /// gzip or zlib, detected per member (15 + 32): what the VMA reader has always accepted
        /// after it saw the gzip magic.
        case gzipOrZlib
    }

    private var z = z_stream()
    private let ok: Bool
    private var memberEnded = false

    public init(wrapper: Wrapper = .gzip) {
        ok = czlib_inflate_init2(&z, wrapper == .gzip ? 15 + 16 : 15 + 32) == Z_OK
    }
    deinit { if ok { inflateEnd(&z) } }

    /// False when zlib could not set up its state (out of memory); every inflate then fails.
    public var isReady: Bool { ok }

    /// Inflates from `input` into `output`: returns the bytes consumed and produced. A member's
    /// end followed by more input starts the next member. Returns early when the input is used
    /// up (feed more) or the output is full; (0, 0) with both non-empty means zlib made no progress.
    public func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(DecompressionError) -> (consumed: Int, produced: Int) {
        do {
            return try decode(input, into: output)
        } catch {
            throw DecompressionError(codec: "gzip", reason: error.message)
        }
    }

    /// `inflate(_:into:)` with zlib's code and the bytes produced before a failure in the error.
    public func decode(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(GzipStreamError) -> (consumed: Int, produced: Int) {
        guard ok else { throw GzipStreamError(code: Z_MEM_ERROR, message: "cannot initialise zlib", produced: 0) }
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
                throw GzipStreamError(code: r, message: msg, produced: produced)
            }
        }
        return (consumed, produced)
    }

    /// At the end of the input: true when the stream ended cleanly (not inside a member).
    public var atMemberBoundary: Bool { memberEnded }
}
