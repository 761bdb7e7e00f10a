import CURing
import Glibc
import Synchronization

/// The syscall seam: every write-side and read-side data call goes through these functions, so tests
/// can force ENOSPC, EIO, EINTR and short transfers at a chosen call index.
///
/// Faults come from ``FaultInjection/install(_:)`` (tests) or from the environment variable
/// `QCOWPRESS_FAULT` (end-to-end tests of the binary), e.g. `write:3:ENOSPC`, `write:2:short`,
/// `write:1:EINTR`, `read:5:EIO`. The index counts data writes (or reads) from 1 in the process.
/// `rename:1:EINVAL` makes the first no-replace rename fail as on a file system without
/// renameat2 (the link + unlink fallback then runs).
public enum FaultInjection {
    public enum Kind: Sendable, Equatable {
        case fail(Int32)
        /// Transfer only half of the request (rounded down to 512 bytes, at least 0).
        case short
        /// Succeed after sleeping this many milliseconds (a slow disk).
        case delay(Int)
    }
    public enum Operation: String, Sendable { case write, read, rename }
    public struct Plan: Sendable, Equatable {
        public var operation: Operation
        /// 1-based index of the call that fails.
        public var index: Int
        public var kind: Kind
        /// Fail every call from `index` on (otherwise only that one).
        public var sticky: Bool
        /// Only calls on this descriptor count (so concurrent tests do not disturb each other).
        public var fd: Int32?
        public init(operation: Operation, index: Int, kind: Kind, sticky: Bool = false, fd: Int32? = nil) {
            self.operation = operation
            self.index = index
            self.kind = kind
            self.sticky = sticky
            self.fd = fd
        }
    }

    struct State {
        var plan: Plan?
        var writes = 0
        var reads = 0
        var renames = 0
        var envChecked = false
    }
    static let state = Mutex(State())

    public static func install(_ plan: Plan?) {
        state.withLock { $0 = State(plan: plan, envChecked: true) }
    }

    /// Parses `op:index:kind[:sticky]` with kind ENOSPC, EIO, EINTR, EDQUOT, short or delayMS.
    public static func parse(_ s: String) -> Plan? {
        let parts = s.split(separator: ":").map(String.init)
        guard parts.count >= 3, let op = Operation(rawValue: parts[0]), let index = Int(parts[1]) else { return nil }
        let kind: Kind
        switch parts[2] {
        case "ENOSPC": kind = .fail(ENOSPC)
        case "EIO": kind = .fail(EIO)
        case "EINTR": kind = .fail(EINTR)
        case "EDQUOT": kind = .fail(EDQUOT)
        case "EINVAL": kind = .fail(EINVAL)
        case "ENOSYS": kind = .fail(ENOSYS)
        case "short": kind = .short
        case let d where d.hasPrefix("delay"):
            guard let ms = Int(d.dropFirst(5)), ms >= 0 else { return nil }
            kind = .delay(ms)
        default: return nil
        }
        return Plan(operation: op, index: index, kind: kind, sticky: parts.count > 3 && parts[3] == "sticky")
    }

    /// Counts one call and says whether it must be faulted.
    static func check(_ op: Operation, fd: Int32) -> Kind? {
        state.withLock { s in
            if !s.envChecked {
                s.envChecked = true
                if let env = getenv("QCOWPRESS_FAULT") { s.plan = parse(String(cString: env)) }
            }
            guard let plan = s.plan, plan.fd == nil || plan.fd == fd else { return nil }
            let n: Int
            switch op {
            case .write: s.writes += 1; n = s.writes
            case .read: s.reads += 1; n = s.reads
            case .rename: s.renames += 1; n = s.renames
            }
            guard let p = s.plan, p.operation == op else { return nil }
            if n == p.index || (p.sticky && n > p.index) { return p.kind }
            return nil
        }
    }
}

/// One function per syscall. Each returns the raw result (bytes or -errno) after the fault seam.
enum Sys {
    /// Applies an injected fault to a transfer request: returns a replacement result, or the length
    /// to actually transfer.
    @inline(__always)
    static func fault(_ op: FaultInjection.Operation, fd: Int32, length: Int) -> (result: Int?, length: Int) {
        switch FaultInjection.check(op, fd: fd) {
        case nil: return (nil, length)
        case .fail(let e): return (-Int(e), length)
        case .short: return (nil, (length / 2) & ~511)
        case .delay(let ms):
            usleep(UInt32(ms) * 1000)
            return (nil, length)
        }
    }

    static func pwrite(_ fd: Int32, _ buf: UnsafeRawPointer, _ count: Int, _ offset: UInt64) -> Int {
        let f = fault(.write, fd: fd, length: count)
        if let r = f.result { return r }
        if f.length == 0 { return 0 }
        let r = Glibc.pwrite(fd, buf, f.length, off_t(offset))
        return r < 0 ? -Int(Glibc.errno) : r
    }

    static func pread(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int, _ offset: UInt64) -> Int {
        let f = fault(.read, fd: fd, length: count)
        if let r = f.result { return r }
        if f.length == 0 && count > 0 { return 0 }
        let r = Glibc.pread(fd, buf, f.length, off_t(offset))
        return r < 0 ? -Int(Glibc.errno) : r
    }

    static func read(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int) -> Int {
        let f = fault(.read, fd: fd, length: count)
        if let r = f.result { return r }
        if f.length == 0 && count > 0 { return -Int(EIO) }
        let r = Glibc.read(fd, buf, f.length)
        return r < 0 ? -Int(Glibc.errno) : r
    }

    /// renameat2(RENAME_NOREPLACE): 0 or an errno (EEXIST when `to` exists; EINVAL or ENOSYS
    /// where the file system or kernel lacks it).
    static func renameNoReplace(_ from: String, _ to: String) -> Int32 {
        if case .fail(let e) = FaultInjection.check(.rename, fd: -1) { return e }
        return curing_renameat2(CURING_AT_FDCWD, from, CURING_AT_FDCWD, to, CURING_RENAME_NOREPLACE) < 0 ? Glibc.errno : 0
    }

    /// fallocate(2): 0 or an errno.
    static func fallocate(_ fd: Int32, mode: Int32, offset: UInt64, length: UInt64) -> Int32 {
        curing_fallocate(fd, mode, Int64(offset), Int64(length)) < 0 ? Glibc.errno : 0
    }

    static func fsync(_ fd: Int32) -> Int32 {
        Glibc.fsync(fd) < 0 ? Glibc.errno : 0
    }
}
