import Glibc

/// An operating-system error at the I/O edge, with what was being done and where.
public struct IOError: Error, Sendable, CustomStringConvertible, Equatable {
    public var errno: Int32
    /// The system call or step (`pwrite`, `open`, `fsync`, `io_uring write`, …).
    public var operation: String
    public var path: String
    /// File offset of the failing request, when there is one.
    public var offset: UInt64?
    /// A plain-words explanation that replaces "operation failed: errno" (e.g. "is a FIFO, not a
    /// regular file").
    public var reason: String?

    public init(errno: Int32, operation: String, path: String, offset: UInt64? = nil, reason: String? = nil) {
        self.errno = errno
        self.operation = operation
        self.path = path
        self.offset = offset
        self.reason = reason
    }

    public var errnoName: String { String(cString: strerror(errno)) }
    public var isOutOfSpace: Bool { errno == ENOSPC || errno == EDQUOT }

    public var description: String {
        if let reason { return "\(path): \(reason)" }
        var s = "\(path): \(operation) failed"
        if let offset { s += " at offset \(offset)" }
        return s + ": \(errnoName)"
    }
}
