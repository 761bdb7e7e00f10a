import DirectIO
import Glibc
import Qcow2Format

/// Every failure QcowPress reports. Each case carries what a caller needs to react, and
/// ``message`` is the one line the command prints unchanged.
public enum QcowPressError: Error, Sendable, CustomStringConvertible {
    /// The input is damaged or not what it claims to be; `location` names the field or offset.
    case inputDamaged(path: String, location: String)
    /// The input uses something QcowPress does not handle.
    case unsupported(path: String, what: String)
    /// An operating-system error (errno, operation, path, offset).
    case io(IOError)
    /// The disk is full (ENOSPC/EDQUOT) while writing `path`.
    case outOfSpace(IOError)
    /// The destination exists and overwriting was not allowed.
    case destinationExists(path: String)
    /// An option or argument is invalid.
    case invalidArgument(String)
    /// The API was used against its contract (write after finish, overlap, beyond the size).
    case misuse(String)
    /// The operation was cancelled; partial output was removed.
    case cancelled

    public var message: String {
        switch self {
        case .inputDamaged(let path, let location): "\(path): \(location)"
        case .unsupported(let path, let what): "\(path): unsupported: \(what)"
        case .io(let e): e.description
        case .outOfSpace(let e): "\(e.description) (out of space)"
        case .destinationExists(let path): "\(path): already exists (use --force to overwrite)"
        case .invalidArgument(let s): s
        case .misuse(let s): s
        case .cancelled: "cancelled"
        }
    }
    public var description: String { message }

    static func from(_ e: IOError) -> QcowPressError {
        // A no-replace rename refused: the destination appeared while the output was written.
        if e.errno == EEXIST && e.operation == "rename" { return .destinationExists(path: e.path) }
        return e.isOutOfSpace ? .outOfSpace(e) : .io(e)
    }
}
