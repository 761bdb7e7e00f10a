import CURing
import Glibc
import Synchronization

/// QEMU's block-layer permissions (BLK_PERM_* in include/block/block-common.h), in QEMU's bit
/// order: bit i is what image lock bytes 100 + i ("holds it") and 200 + i ("does not share it")
/// stand for (block/file-posix.c).
public struct BlockPermissions: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let consistentRead = BlockPermissions(rawValue: 1 << 0)
    public static let write = BlockPermissions(rawValue: 1 << 1)
    public static let writeUnchanged = BlockPermissions(rawValue: 1 << 2)
    public static let resize = BlockPermissions(rawValue: 1 << 3)
    /// BLK_PERM_GRAPH_MOD: gone from QEMU 8, still locked (byte 104/204) by QEMU 7; never held here.
    public static let graphMod = BlockPermissions(rawValue: 1 << 4)
    public static let all: BlockPermissions = [.consistentRead, .write, .writeUnchanged, .resize, .graphMod]
    /// QEMU's names (bdrv_perm_names), as its "Failed to get … lock" errors say them.
    static let names = ["consistent read", "write", "write unchanged", "resize", "change children"]
}

/// QEMU's image lock on one file (block/file-posix.c, raw_apply_lock_bytes and
/// raw_check_lock_bytes), so QcowPress and QEMU (qemu-img, qemu-storage-daemon, a VM) see each
/// other: open-file-description locks (F_OFD_SETLK), all shared (F_RDLCK), one byte each — byte
/// 100 + i while permission i is held, byte 200 + i while it is not shared with others. Taking
/// it locks this holder's bytes, then refuses (as QEMU words it) when another holder has a byte
/// that conflicts: one that does not share a permission this one holds ("Failed to get "write"
/// lock"), or one that holds a permission this one does not share ("Failed to get shared
/// "write" lock").
///
/// The lock lives on its own descriptor (opened read-only), so it is independent of how the
/// file is read or written; it is dropped by ``release()`` or when the object goes. Locks follow
/// the inode: a temporary file's lock is the destination's once it is renamed there.
public final class ImageLock: Sendable {
    /// What the holder does, with QEMU's permissions for it (the bytes qemu-img 7.2 locks, seen with
    /// strace: convert's source and backing files, info, check, convert's target).
    public enum Use: Sendable, Equatable {
        /// A reader, as qemu-img without -U: consistent read; write and resize not shared (bytes
        /// 100, 201, 203), so it is refused while a writer is there and refuses writers.
        case read
        /// A reader that shares everything, as qemu-img -U: byte 100 only; never refused, never
        /// refuses anyone.
        case readSharingAll
        /// Reading metadata only, as qemu-img info of a qcow2 (BDRV_O_NO_IO): no permission held,
        /// write and resize not shared (bytes 201, 203), so it is refused while a writer is there.
        case inspect
        /// A writer, as qemu-img convert's target or a VM's disk: consistent read, write and
        /// resize held, write and resize not shared (bytes 100, 101, 103, 201, 203).
        case write

        var held: BlockPermissions {
            switch self {
            case .read, .readSharingAll: [.consistentRead]
            case .inspect: []
            case .write: [.consistentRead, .write, .resize]
            }
        }
        var shared: BlockPermissions {
            switch self {
            case .read, .inspect, .write: [.consistentRead, .writeUnchanged, .graphMod]
            case .readSharingAll: .all
            }
        }
    }

    /// Lock byte of permission bit i held: 100 + i (LOCK_BASE_PERM); not shared: 200 + i (LOCK_BASE_SHARED).
    static let heldBase: Int64 = 100
    static let unsharedBase: Int64 = 200

    public let path: String
    /// The name errors use (the destination as given, for a temporary file or resolved link).
    public let displayPath: String
    /// The file locked (as ``FileNames/status(_:)`` tells it); nil when nothing is.
    public let identity: FileIdentity?
    /// The descriptor holding the locks, and what they say; nil once released (or when nothing
    /// could be locked: not a regular file or block device, or OFD locks unsupported).
    private let state: Mutex<(fd: Int32, use: Use)?>

    /// Takes the lock on `path`. A name that cannot be opened, or that is not a regular file or
    /// a block device, gets no lock (the caller's own open reports it); neither does a file
    /// system without OFD locks (EINVAL, EOPNOTSUPP). Throws the conflict as QEMU words it
    /// (errno EAGAIN), or a failed lock call.
    public init(path: String, use: Use, displayPath: String? = nil) throws(IOError) {
        self.path = path
        let name = displayPath ?? path
        self.displayPath = name
        let fd = Sys.openForLock(path)
        var st = Glibc.stat()
        let kind = fd >= 0 && Sys.fstatForLock(fd, &st) == 0 ? st.st_mode & S_IFMT : 0
        guard kind == S_IFREG || kind == S_IFBLK else {
            if fd >= 0 { close(fd) }
            identity = nil
            state = Mutex(nil)
            return
        }
        do throws(IOError) {
            guard try Self.apply(fd: fd, use: use, path: name) else {
                close(fd)
                identity = nil
                state = Mutex(nil)
                return
            }
            try Self.check(fd: fd, use: use, path: name)
        } catch {
            close(fd)
            throw error
        }
        identity = kind == S_IFBLK ? FileIdentity(device: UInt64(st.st_rdev), inode: 0)
            : FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        state = Mutex((fd, use))
    }

    deinit { release() }

    /// Whether a lock is held (false after ``release()`` or where none could be taken).
    public var isHeld: Bool { state.withLock { $0 != nil } }

    /// Whether another holder has the file open for writing (holds the write permission's byte).
    public var writerPresent: Bool {
        state.withLock { s in
            guard let s else { return false }
            return Sys.ofdTestLock(s.fd, type: CURING_F_WRLCK, start: Self.heldBase + Self.bit(.write), length: 1) == 1
        }
    }

    /// Holds the bytes of `use` instead (e.g. a finished output: `.readSharingAll`, so QEMU can
    /// open it read-write). Only gives up bytes when `use` holds and unshares less; otherwise the
    /// new bytes are checked as at the start.
    public func change(to use: Use) throws(IOError) {
        let fd: Int32? = state.withLock { $0?.fd }
        guard let fd else { return }
        _ = try Self.apply(fd: fd, use: use, path: displayPath)
        try Self.check(fd: fd, use: use, path: displayPath)
        state.withLock { s in if s != nil { s = (fd, use) } }
    }

    /// Drops every byte (closes the descriptor). Idempotent.
    public func release() {
        let fd: Int32? = state.withLock { s in
            defer { s = nil }
            return s?.fd
        }
        if let fd { close(fd) }
    }

    static func bit(_ p: BlockPermissions) -> Int64 { Int64(p.rawValue.trailingZeroBitCount) }

    /// raw_apply_lock_bytes: each held permission's byte locked, each other one unlocked; the
    /// same for the bytes of permissions not shared. False when the file system has no OFD locks.
    private static func apply(fd: Int32, use: Use, path: String) throws(IOError) -> Bool {
        for i in 0..<BlockPermissions.names.count {
            let p = BlockPermissions(rawValue: 1 << i)
            for (base, on) in [(heldBase, use.held.contains(p)), (unsharedBase, !use.shared.contains(p))] {
                let byte = base + Int64(i)
                let r = Sys.ofdSetLock(fd, type: on ? CURING_F_RDLCK : CURING_F_UNLCK, start: byte, length: 1)
                if r == 0 { continue }
                if r == -EINVAL || r == -EOPNOTSUPP || r == -ENOSYS { return false }
                throw IOError(errno: -r, operation: "lock byte \(byte)", path: path)
            }
        }
        return true
    }

    /// raw_check_lock_bytes: refuses when another holder does not share a permission this one
    /// holds, or holds one this one does not share (QEMU's words, on one line).
    private static func check(fd: Int32, use: Use, path: String) throws(IOError) {
        let hint = "Is another process using the image [\(path)]?"
        for i in 0..<BlockPermissions.names.count where use.held.contains(BlockPermissions(rawValue: 1 << i)) {
            let r = Sys.ofdTestLock(fd, type: CURING_F_WRLCK, start: unsharedBase + Int64(i), length: 1)
            if r < 0 { throw IOError(errno: -r, operation: "test lock byte \(unsharedBase + Int64(i))", path: path) }
            if r == 1 {
                throw IOError(errno: EAGAIN, operation: "lock", path: path, reason: "Failed to get \"\(BlockPermissions.names[i])\" lock. \(hint)")
            }
        }
        for i in 0..<BlockPermissions.names.count where !use.shared.contains(BlockPermissions(rawValue: 1 << i)) {
            let r = Sys.ofdTestLock(fd, type: CURING_F_WRLCK, start: heldBase + Int64(i), length: 1)
            if r < 0 { throw IOError(errno: -r, operation: "test lock byte \(heldBase + Int64(i))", path: path) }
            if r == 1 {
                throw IOError(errno: EAGAIN, operation: "lock", path: path, reason: "Failed to get shared \"\(BlockPermissions.names[i])\" lock. \(hint)")
            }
        }
    }
}

/// An exclusive lock on a file name that may not exist yet (a destination), held through a lock
/// file beside it: created if missing, locked with an exclusive OFD lock (so a process that dies
/// drops it; a file left by a killed run is taken over), and removed while still locked when
/// released. A holder that opened the file before it was removed finds, once it gets the lock,
/// that the name no longer leads to its file, and starts over: the name has one holder at a time.
public final class NameLock: Sendable {
    public let lockFile: String
    private let fd: Mutex<Int32?>

    /// Takes the lock. Throws the refusal (errno EAGAIN, `reason` QEMU's words for `displayPath`)
    /// while another process holds it, or the failed call. nil when the directory does not
    /// exist (there is nothing to write into yet; the caller's own create reports it).
    public init?(lockFile: String, displayPath: String) throws(IOError) {
        self.lockFile = lockFile
        // Tries again only when the file was replaced between open and lock (another holder
        // released it meanwhile): a handful of rounds is plenty, and bounded.
        for _ in 0..<16 {
            let f = Sys.openForLock(lockFile, creating: true)
            if f == -ENOENT { return nil }
            if f < 0 { throw IOError(errno: -f, operation: "open", path: displayPath) }
            let r = Sys.ofdSetLock(f, type: CURING_F_WRLCK, start: 0, length: 0)
            if r == -EAGAIN || r == -EACCES {
                close(f)
                throw IOError(errno: EAGAIN, operation: "lock", path: displayPath,
                              reason: "Failed to get \"write\" lock. Is another process using the image [\(displayPath)]?")
            }
            if r == -EINVAL || r == -EOPNOTSUPP || r == -ENOSYS {
                close(f)
                return nil
            }
            if r < 0 {
                close(f)
                throw IOError(errno: -r, operation: "lock", path: lockFile)
            }
            var mine = Glibc.stat()
            var named = Glibc.stat()
            if Sys.fstatForLock(f, &mine) == 0, Sys.lstatForLock(lockFile, &named) == 0,
               mine.st_dev == named.st_dev, mine.st_ino == named.st_ino {
                fd = Mutex(f)
                return
            }
            close(f)
        }
        throw IOError(errno: EAGAIN, operation: "lock", path: displayPath,
                      reason: "Failed to get \"write\" lock (\(lockFile) keeps being replaced). Is another process using the image [\(displayPath)]?")
    }

    deinit { release() }

    /// Removes the lock file (still locked, so nobody else holds it meanwhile), then unlocks.
    /// Idempotent.
    public func release() {
        let f: Int32? = fd.withLock { v in
            defer { v = nil }
            return v
        }
        guard let f else { return }
        FileNames.unlink(lockFile)
        close(f)
    }
}

extension Sys {
    /// open(2) of a file to lock: read-only (OFD read locks need no more), non-blocking (a FIFO
    /// cannot stall it), close-on-exec; with `creating`, read-write and created (mode 0644, no
    /// symbolic link followed) for a ``NameLock``. The descriptor or -errno; not faulted (the
    /// lock calls are).
    static func openForLock(_ path: String, creating: Bool = false) -> Int32 {
        let fd = creating
            ? Glibc.open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, 0o644)
            : Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        return fd < 0 ? -Glibc.errno : fd
    }

    /// fstat(2) of a lock's descriptor: 0 or -errno (not counted with the data path's stats).
    static func fstatForLock(_ fd: Int32, _ st: inout Glibc.stat) -> Int32 {
        Glibc.fstat(fd, &st) < 0 ? -Glibc.errno : 0
    }

    /// lstat(2) for a ``NameLock``'s check that its file still has its name: 0 or -errno.
    static func lstatForLock(_ path: String, _ st: inout Glibc.stat) -> Int32 {
        Glibc.lstat(path, &st) < 0 ? -Glibc.errno : 0
    }

    /// fcntl(F_OFD_SETLK) on [start, start + length) (length 0: to the end, growing with the
    /// file): 0 or -errno (EAGAIN or EACCES: another open file description holds a conflicting
    /// lock). `lock:N:EIO` faults the Nth lock call (set or test).
    static func ofdSetLock(_ fd: Int32, type: Int16, start: Int64, length: Int64) -> Int32 {
        if case .fail(let e) = FaultInjection.check(.lock, fd: fd) { return -e }
        return curing_ofd_setlk(fd, type, start, length) < 0 ? -Glibc.errno : 0
    }

    /// fcntl(F_OFD_GETLK): 1 when another open file description holds a lock on the range that
    /// conflicts with `type`, 0 when none does, or -errno.
    static func ofdTestLock(_ fd: Int32, type: Int16, start: Int64, length: Int64) -> Int32 {
        if case .fail(let e) = FaultInjection.check(.lock, fd: fd) { return -e }
        let r = curing_ofd_getlk(fd, type, start, length)
        return r < 0 ? -Glibc.errno : r
    }
}
