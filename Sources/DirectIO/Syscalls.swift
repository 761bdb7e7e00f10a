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
/// renameat2 (the link + unlink fallback then runs). `lock:N:EIO` fails the Nth image-lock call
/// (fcntl F_OFD_SETLK or F_OFD_GETLK, ``ImageLock`` and ``NameLock``).
public enum FaultInjection {
    public enum Kind: Sendable, Equatable {
        case fail(Int32)
        /// Transfer only half of the request (rounded down to 512 bytes, at least 0).
        case short
        /// Succeed after sleeping this many milliseconds (a slow disk).
        case delay(Int)
    }
    public enum Operation: String, Sendable { case write, read, open, stat, rename, mkdir, lock }
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
        var opens = 0
        var stats = 0
        var renames = 0
        var mkdirs = 0
        var locks = 0
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
            case .open: s.opens += 1; n = s.opens
            case .stat: s.stats += 1; n = s.stats
            case .rename: s.renames += 1; n = s.renames
            case .mkdir: s.mkdirs += 1; n = s.mkdirs
            case .lock: s.locks += 1; n = s.locks
            }
            guard let p = s.plan, p.operation == op else { return nil }
            if n == p.index || (p.sticky && n > p.index) { return p.kind }
            return nil
        }
    }
}

/// One function per syscall. Each returns the raw result (bytes or -errno) after the fault seam.
enum Sys {
    /// The one place EINTR is retried: runs `call` again while it returns -EINTR. `call` returns
    /// its result or -errno, as every function here does and as liburing's calls do (so this also
    /// serves `io_uring_submit` and `io_uring_wait_cqe`). EAGAIN is left to the caller, which knows
    /// whether to wait (poll) or try again at once.
    @inline(__always)
    static func retryingEINTR<R: FixedWidthInteger & SignedInteger>(_ call: () -> R) -> R {
        while true {
            let r = call()
            if !interrupted(r) { return r }
        }
    }

    /// Whether a result (-errno) says the call was interrupted before it did anything: for results
    /// that cannot be retried by calling again, such as an io_uring completion (resubmitted instead).
    @inline(__always)
    static func interrupted<R: FixedWidthInteger & SignedInteger>(_ r: R) -> Bool { r == -R(EINTR) }

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

    /// fsync(2): 0 or -errno.
    static func fsync(_ fd: Int32) -> Int32 {
        Glibc.fsync(fd) < 0 ? -Glibc.errno : 0
    }

    /// open(2) after the seam (`open:N:EIO` faults the Nth open): the descriptor, or -errno.
    static func open(_ path: String, _ flags: Int32) -> Int32 {
        if case .fail(let e) = FaultInjection.check(.open, fd: -1) { return -e }
        let fd = Glibc.open(path, flags)
        return fd < 0 ? -Glibc.errno : fd
    }

    /// stat(2)/fstat(2) after the seam (`stat:N:EIO`): 0 or -errno.
    static func stat(_ path: String, _ st: inout Glibc.stat) -> Int32 {
        if case .fail(let e) = FaultInjection.check(.stat, fd: -1) { return -e }
        return libcStat(path, &st) < 0 ? -Glibc.errno : 0
    }
    static func fstat(_ fd: Int32, _ st: inout Glibc.stat) -> Int32 {
        if case .fail(let e) = FaultInjection.check(.stat, fd: fd) { return -e }
        return Glibc.fstat(fd, &st) < 0 ? -Glibc.errno : 0
    }

    /// poll(2) on one descriptor: the events that are ready (POLLHUP and POLLERR too; 0 when
    /// `timeoutMS` passed first, -1 waits without one), or -errno. EINTR is the caller's to retry
    /// (through ``retryingEINTR(_:)``), which works out a timeout again when it has a deadline.
    static func poll(_ fd: Int32, events: Int16, timeoutMS: Int32 = -1) -> Int {
        var p = pollfd(fd: fd, events: events, revents: 0)
        let r = Glibc.poll(&p, 1, timeoutMS)
        return r < 0 ? -Int(Glibc.errno) : Int(p.revents)
    }

    static func fadvise(_ fd: Int32, _ offset: UInt64, _ length: UInt64, _ advice: Int32) {
        _ = posix_fadvise(fd, off_t(offset), off_t(length), advice)
    }
}

/// stat(2) under a name that cannot be confused with `struct stat` or ``Sys/stat(_:_:)``.
private func libcStat(_ path: String, _ st: inout stat) -> Int32 { stat(path, &st) }

/// What kind of file a path or descriptor is, and its size (through the syscall seam).
public struct FileStatus: Sendable, Equatable {
    public enum Kind: String, Sendable {
        case regular = "a regular file", directory = "a directory", fifo = "a FIFO", socket = "a socket"
        case blockDevice = "a block device", characterDevice = "a character device", symlink = "a symbolic link", other = "not a file"
    }
    public var kind: Kind
    public var size: UInt64
    /// Bytes allocated on disk (st_blocks × 512).
    public var allocated: UInt64
    /// "device:inode", to tell whether two paths are the same file.
    public var identity: String

    init(_ st: Glibc.stat) {
        switch st.st_mode & S_IFMT {
        case S_IFREG: kind = .regular
        case S_IFDIR: kind = .directory
        case S_IFIFO: kind = .fifo
        case S_IFSOCK: kind = .socket
        case S_IFBLK: kind = .blockDevice
        case S_IFCHR: kind = .characterDevice
        case S_IFLNK: kind = .symlink
        default: kind = .other
        }
        size = UInt64(max(0, st.st_size))
        allocated = UInt64(max(0, st.st_blocks)) * 512
        identity = "\(st.st_dev):\(st.st_ino)"
    }

    /// The status of `path` (symbolic links followed).
    public static func of(path: String) throws(IOError) -> FileStatus {
        var st = Glibc.stat()
        let r = Sys.stat(path, &st)
        if r < 0 { throw IOError(errno: -r, operation: "stat", path: path) }
        return FileStatus(st)
    }
    public static func of(fd: Int32, path: String) throws(IOError) -> FileStatus {
        var st = Glibc.stat()
        let r = Sys.fstat(fd, &st)
        if r < 0 { throw IOError(errno: -r, operation: "fstat", path: path) }
        return FileStatus(st)
    }
}

/// Small regular files read whole (PBS chunks): opened without blocking (a FIFO cannot stall the
/// reader), refused unless regular, read with pread through the seam, then dropped from the page
/// cache (a restore host's cache belongs to its VMs).
public enum WholeFile {
    public enum Failure: Error, Sendable {
        case io(IOError)
        case notRegular(FileStatus.Kind)
        case tooLarge(UInt64)
    }

    /// Reads `path` into `buffer` (grown when needed); returns its length.
    public static func read(path: String, limit: Int, into buffer: inout [UInt8]) throws(Failure) -> Int {
        let fd = Sys.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        if fd < 0 { throw .io(IOError(errno: -fd, operation: "open", path: path)) }
        defer { close(fd) }
        let st: FileStatus
        do { st = try FileStatus.of(fd: fd, path: path) } catch { throw .io(error) }
        guard st.kind == .regular else { throw .notRegular(st.kind) }
        guard st.size <= UInt64(limit) else { throw .tooLarge(st.size) }
        let size = Int(st.size)
        if buffer.count < size {
            // Grown in whole MiB and not zero-filled (pread fills what is used): PBS chunk files of
            // one datastore differ by a few bytes, and growing by each one's exact size made every
            // loader reallocate and zero a fresh buffer again and again (15 % of `serve pbs`'s
            // page faults).
            let grown = min(limit, (size + (1 << 20) - 1) & ~((1 << 20) - 1))
            buffer = [UInt8](unsafeUninitializedCapacity: grown) { _, n in n = grown }
        }
        let result: Swift.Result<Int, IOError> = buffer.withUnsafeMutableBytes { p in
            var done = 0
            while done < size {
                let r = Sys.retryingEINTR { Sys.pread(fd, p.baseAddress! + done, size - done, UInt64(done)) }
                if r == -Int(EAGAIN) { continue }
                if r < 0 { return .failure(IOError(errno: Int32(-r), operation: "read", path: path, offset: UInt64(done))) }
                if r == 0 { break }
                done += r
            }
            return .success(done)
        }
        let got: Int
        do { got = try result.get() } catch { throw .io(error) }
        guard got == size else {
            throw .io(IOError(errno: EIO, operation: "read", path: path, offset: UInt64(got), reason: "short read (\(got) of \(size) bytes)"))
        }
        Sys.fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        return size
    }
}
