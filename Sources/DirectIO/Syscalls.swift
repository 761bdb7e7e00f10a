import CURing
import Glibc
import Synchronization

/// The syscall seam: every write-side and read-side data call goes through these functions, so tests
/// can force ENOSPC, EIO, EINTR and short transfers at a chosen call index.
///
/// Faults come from ``FaultInjection/install(_:)`` (tests) or from the environment variable
/// `QCOWPRESS_FAULT` (end-to-end tests of the binary), e.g. `write:3:ENOSPC`, `write:2:short`,
/// `write:1:EINTR`, `read:5:EIO`. The index counts data writes (or reads) from 1 in the process.
public enum FaultInjection {
    public enum Kind: Sendable, Equatable {
        case fail(Int32)
        /// Transfer only half of the request (rounded down to 512 bytes, at least 0).
        case short
        /// Succeed after sleeping this many milliseconds (a slow disk).
        case delay(Int)
    }
    public enum Operation: String, Sendable { case write, read }
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
        var envChecked = false
    }
    static let state = Mutex(State())
    /// 1 while a plan is installed, 0 when none, -1 until the environment was read. Every syscall
    /// reads this first, so without a plan the seam costs one relaxed atomic load, no lock.
    static let active = Atomic<Int>(-1)

    public static func install(_ plan: Plan?) {
        state.withLock { $0 = State(plan: plan, envChecked: true) }
        active.store(plan == nil ? 0 : 1, ordering: .releasing)
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
        case "short": kind = .short
        case let d where d.hasPrefix("delay"):
            guard let ms = Int(d.dropFirst(5)), ms >= 0 else { return nil }
            kind = .delay(ms)
        default: return nil
        }
        return Plan(operation: op, index: index, kind: kind, sticky: parts.count > 3 && parts[3] == "sticky")
    }

    /// Counts one call and says whether it must be faulted.
    @inline(__always)
    static func check(_ op: Operation, fd: Int32) -> Kind? {
        if active.load(ordering: .acquiring) == 0 { return nil }
        return checkSlow(op, fd: fd)
    }

    static func checkSlow(_ op: Operation, fd: Int32) -> Kind? {
        state.withLock { s in
            if !s.envChecked {
                s.envChecked = true
                if let env = getenv("QCOWPRESS_FAULT") { s.plan = parse(String(cString: env)) }
                active.store(s.plan == nil ? 0 : 1, ordering: .releasing)
            }
            guard let plan = s.plan, plan.fd == nil || plan.fd == fd else { return nil }
            let n: Int
            switch op {
            case .write: s.writes += 1; n = s.writes
            case .read: s.reads += 1; n = s.reads
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

    /// preadv(2) into `buffers`; an injected short transfer reads only the first half.
    static func preadv(_ fd: Int32, _ buffers: [UnsafeMutableRawBufferPointer], _ offset: UInt64) -> Int {
        let total = buffers.reduce(0) { $0 + $1.count }
        let f = fault(.read, fd: fd, length: total)
        if let r = f.result { return r }
        if f.length == 0 && total > 0 { return 0 }
        var iov: [iovec] = []
        var left = f.length
        for b in buffers where left > 0 {
            let n = min(left, b.count)
            iov.append(iovec(iov_base: b.baseAddress, iov_len: n))
            left -= n
        }
        let r = iov.withUnsafeBufferPointer { Glibc.preadv(fd, $0.baseAddress, Int32($0.count), off_t(offset)) }
        return r < 0 ? -Int(Glibc.errno) : r
    }

    static func read(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int) -> Int {
        let f = fault(.read, fd: fd, length: count)
        if let r = f.result { return r }
        if f.length == 0 && count > 0 { return -Int(EIO) }
        let r = Glibc.read(fd, buf, f.length)
        return r < 0 ? -Int(Glibc.errno) : r
    }

    static func fsync(_ fd: Int32) -> Int32 {
        Glibc.fsync(fd) < 0 ? Glibc.errno : 0
    }
}
