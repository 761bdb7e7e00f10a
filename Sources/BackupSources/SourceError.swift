import DirectIO
import Glibc

/// A damaged, inconsistent or unusable backup input: what and where (file, offset, chunk).
public struct SourceError: Error, Sendable, CustomStringConvertible {
    /// `network`: a server could not be reached, refused us, or broke off (remote repositories).
    public enum Kind: Sendable { case damaged, unsupported, missing, wrongKey, io, network }
    public var kind: Kind
    /// The file or archive concerned.
    public var path: String
    /// What is wrong and where (field, offset, chunk), one line.
    public var detail: String
    public var errno: Int32?

    public init(_ kind: Kind, path: String, _ detail: String, errno: Int32? = nil) {
        self.kind = kind
        self.path = path
        self.detail = detail
        self.errno = errno
    }
    public var description: String { "\(path): \(detail)" }
}

/// Reads a whole small source file (manifest, index, key) through the syscall seam: a missing
/// file is ``SourceError/Kind/missing`` with `cannotRead` as the message; a FIFO, device or
/// directory, or a file over `limit` bytes, is refused at once in one line (never a blocked read).
func readSourceFile(_ path: String, limit: Int, what: String, cannotRead: String) throws(SourceError) -> [UInt8] {
    var buffer: [UInt8] = []
    let n: Int
    do { n = try WholeFile.read(path: path, limit: limit, into: &buffer) } catch {
        switch error {
        case .io(let e) where e.operation == "open" && (e.errno == ENOENT || e.errno == ENOTDIR):
            throw SourceError(.missing, path: path, "\(cannotRead): \(e.errnoName)", errno: e.errno)
        case .io(let e):
            throw SourceError(.io, path: path, "\(cannotRead): \(e.reason ?? "\(e.operation) failed: \(e.errnoName)")", errno: e.errno)
        case .notRegular(let kind):
            throw SourceError(.damaged, path: path, "\(what) is \(kind.rawValue), not a regular file")
        case .tooLarge(let size):
            throw SourceError(.damaged, path: path, "\(what) is \(size) bytes (limit \(limit >> 20) MiB)")
        }
    }
    buffer.removeLast(buffer.count - n)
    return buffer
}
