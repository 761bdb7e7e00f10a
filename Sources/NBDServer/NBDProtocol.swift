/// Constants of the NBD protocol (the NBD project's doc/proto.md), fixed newstyle negotiation and
/// the transmission phase. Only what this server speaks.
public enum NBD {
    // Negotiation.
    static let initMagic: UInt64 = 0x4E42_444D_4147_4943  // "NBDMAGIC"
    static let optMagic: UInt64 = 0x4948_4156_454F_5054  // "IHAVEOPT"
    static let optReplyMagic: UInt64 = 0x0003_E889_0455_65A9
    static let flagFixedNewstyle: UInt16 = 1 << 0
    static let flagNoZeroes: UInt16 = 1 << 1
    static let clientFlagFixedNewstyle: UInt32 = 1 << 0
    static let clientFlagNoZeroes: UInt32 = 1 << 1

    enum Option: UInt32 {
        case exportName = 1, abort = 2, list = 3, startTLS = 5, info = 6, go = 7
        case structuredReply = 8, listMetaContext = 9, setMetaContext = 10
    }
    enum OptionReply: UInt32 {
        case ack = 1, server = 2, info = 3, metaContext = 4
        case errUnsupported = 0x8000_0001, errPolicy = 0x8000_0002, errInvalid = 0x8000_0003
        case errTLSRequired = 0x8000_0005, errUnknown = 0x8000_0006, errShutdown = 0x8000_0007, errTooBig = 0x8000_0009
    }
    static let infoExport: UInt16 = 0
    static let infoBlockSize: UInt16 = 3

    // Transmission flags.
    static let hasFlags: UInt16 = 1 << 0
    static let readOnly: UInt16 = 1 << 1
    static let sendFlush: UInt16 = 1 << 2
    static let sendTrim: UInt16 = 1 << 5
    static let sendWriteZeroes: UInt16 = 1 << 6
    static let canMultiConn: UInt16 = 1 << 8

    // Requests and replies.
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let structuredReplyMagic: UInt32 = 0x668E_33EF
    enum Command: UInt16 { case read = 0, write = 1, disc = 2, flush = 3, trim = 4, cache = 5, writeZeroes = 6, blockStatus = 7 }
    static let cmdFlagFUA: UInt16 = 1 << 0
    static let cmdFlagNoHole: UInt16 = 1 << 1
    static let cmdFlagDF: UInt16 = 1 << 2
    static let cmdFlagReqOne: UInt16 = 1 << 3
    static let replyFlagDone: UInt16 = 1 << 0
    static let replyNone: UInt16 = 0
    static let replyOffsetData: UInt16 = 1
    static let replyOffsetHole: UInt16 = 2
    static let replyBlockStatus: UInt16 = 5
    static let replyError: UInt16 = 0x8001

    // Errors (the protocol's own numbers, equal to Linux errno values).
    public static let EPERM: UInt32 = 1, EIO: UInt32 = 5, ENOMEM: UInt32 = 12, EINVAL: UInt32 = 22
    public static let ENOSPC: UInt32 = 28, EOVERFLOW: UInt32 = 75, ENOTSUP: UInt32 = 95, ESHUTDOWN: UInt32 = 108

    /// block status flags of the base:allocation context.
    public static let stateHole: UInt32 = 1 << 0
    public static let stateZero: UInt32 = 1 << 1
    static let baseAllocation = "base:allocation"
    static let baseAllocationID: UInt32 = 1
}

import NIOCore

/// What the server serves. Implementations do their own I/O; the server calls them off the event
/// loop (on its thread pool), several at once — all but ``readNow(at:count:)`` and
/// ``read(at:count:then:)``, which run on the event loop and must not block.
public protocol NBDExport: AnyObject, Sendable {
    var name: String { get }
    var size: UInt64 { get }
    /// A short description for `NBD_INFO_DESCRIPTION`-less clients' listings.
    var isReadOnly: Bool { get }
    /// Reads [offset, offset + count) into `into` (count ≤ the server's maximum request).
    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawBufferPointer) throws(NBDError)
    /// [offset, offset + count) as a buffer the reply sends as is — it may share memory with the
    /// export's cache, and nobody writes to it again — or nil to be read with
    /// ``read(at:count:into:)`` into a buffer of the server's.
    func readBuffer(at offset: UInt64, count: Int) throws(NBDError) -> ByteBuffer?
    /// ``readBuffer(at:count:)`` when the bytes are at hand now (cached), on the event loop: it must
    /// not block or do I/O. Nil sends the read to the thread pool.
    func readNow(at offset: UInt64, count: Int) -> ByteBuffer?
    /// ``readBuffer(at:count:)`` without blocking the event loop that calls it: `then` gets the
    /// buffer (on any thread, or before this returns) once the export has it. False, without
    /// calling `then`, to have the read run on the server's thread pool instead.
    func read(at offset: UInt64, count: Int, then: @escaping @Sendable (Result<ByteBuffer, NBDError>) -> Void) -> Bool
    /// Extents from `offset` covering at most `length` bytes (at least one byte), each with
    /// ``NBD/stateHole``/``NBD/stateZero`` flags.
    func blockStatus(at offset: UInt64, length: UInt64) throws(NBDError) -> [(length: UInt64, flags: UInt32)]
    /// Writable exports: data, zeroes (`NBD_CMD_TRIM` arrives here too), flush. Read-only exports
    /// never see these.
    func write(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws(NBDError)
    func writeZeroes(at offset: UInt64, length: UInt64) throws(NBDError)
    func flush() throws(NBDError)
    /// The block size advertised in `NBD_INFO_BLOCK_SIZE` as preferred (a power of two).
    var preferredBlockSize: Int { get }
    /// Whether `NBD_FLAG_CAN_MULTI_CONN` is advertised (several connections see one consistent
    /// export).
    var allowsMultipleConnections: Bool { get }
    /// A client selects this export for transmission (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`); an
    /// error refuses it (the option gets an error reply, or the connection closes).
    func clientAttached() throws(NBDError)
    /// A client that attached is gone and every request it sent is done. `sentDisc`: it ended
    /// with `NBD_CMD_DISC` (otherwise the connection dropped).
    func clientDetached(sentDisc: Bool)
}

extension NBDExport {
    public func readBuffer(at offset: UInt64, count: Int) throws(NBDError) -> ByteBuffer? { nil }
    public func readNow(at offset: UInt64, count: Int) -> ByteBuffer? { nil }
    public func read(at offset: UInt64, count: Int, then: @escaping @Sendable (Result<ByteBuffer, NBDError>) -> Void) -> Bool { false }
    public func write(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws(NBDError) { throw NBDError(NBD.EPERM, "read-only export") }
    public func writeZeroes(at offset: UInt64, length: UInt64) throws(NBDError) { throw NBDError(NBD.EPERM, "read-only export") }
    public func flush() throws(NBDError) {}
    /// 64 KiB, the qcow2 cluster size most images use.
    public var preferredBlockSize: Int { 64 << 10 }
    public var allowsMultipleConnections: Bool { true }
    public func clientAttached() throws(NBDError) {}
    public func clientDetached(sentDisc: Bool) {}
}

/// An error for one request: an NBD error number and a message for the client (and the log).
public struct NBDError: Error, Sendable {
    public var code: UInt32
    public var message: String
    public init(_ code: UInt32, _ message: String) {
        self.code = code
        self.message = message
    }
    public static func io(_ message: String) -> NBDError { NBDError(NBD.EIO, message) }
}

extension NBD {
    /// `base:allocation` extents of [offset, end), looked at in steps that end on multiples of
    /// `granule`: a step where `isZero(from, to)` holds is a hole that reads as zero, any other is
    /// data; neighbours of one kind are merged (each extent below 2 GiB, as its 32-bit length needs).
    public static func extents<E: Error>(from offset: UInt64, to end: UInt64, granule: UInt64,
                                         isZero: (UInt64, UInt64) throws(E) -> Bool) throws(E) -> [(length: UInt64, flags: UInt32)] {
        var out: [(length: UInt64, flags: UInt32)] = []
        var at = offset
        while at < end {
            let next = min(end, (at / granule + 1) * granule)
            let flags = try isZero(at, next) ? stateHole | stateZero : 0
            if let last = out.last, last.flags == flags, last.length + (next - at) < 1 << 31 {
                out[out.count - 1].length += next - at
            } else {
                out.append((next - at, flags))
            }
            at = next
        }
        return out
    }
}
