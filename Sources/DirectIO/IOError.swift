import Glibc

/// An operating-system error at the I/O edge, with what was being done and where.
public struct IOError: Error, Sendable, CustomStringConvertible, Equatable {
    public var errno: Int32
    /// The system call or step (`pwrite`, `open`, `fsync`, `io_uring write`, …).
    public var operation: String
    public var path: String
    /// File offset of the failing request, when there is one.
    public var offset: UInt64?

    public init(errno: Int32, operation: String, path: String, offset: UInt64? = nil) {
        self.errno = errno
        self.operation = operation
        self.path = path
        self.offset = offset
    }

    public var errnoName: String { String(cString: strerror(errno)) }
    public var isOutOfSpace: Bool { errno == ENOSPC || errno == EDQUOT }

    public var description: String {
        var s = "\(path): \(operation) failed"
        if let offset { s += " at offset \(offset)" }
        return s + ": \(errnoName)"
    }
}
