/// A damaged, inconsistent or unusable backup input: what and where (file, offset, chunk).
public struct SourceError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable { case damaged, unsupported, missing, wrongKey, io }
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
