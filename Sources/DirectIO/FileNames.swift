import CURing
import Glibc

/// What a name refers to, after following symbolic links.
public enum FileKind: Sendable, Equatable {
    case regular, directory, blockDevice, characterDevice
    /// A FIFO, a socket or anything else that is neither a file nor a block device.
    case other
}

/// A file's identity: device and inode, so two names (a hard link, a symlink, `a/../a`) of one
/// file compare equal. For device nodes the device number itself (`st_rdev`), so two nodes of
/// one disk compare equal too.
public struct FileIdentity: Sendable, Hashable {
    public var device: UInt64
    public var inode: UInt64
}

/// `stat` of a name, following symbolic links.
public struct NameStatus: Sendable {
    public var kind: FileKind
    public var identity: FileIdentity
    public var size: UInt64
}

/// Filesystem operations on names (rename, unlink, fsync of a directory, identity).
public enum FileNames {
    public static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }
    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }
    /// True when the name itself (not followed) is a unix socket.
    public static func isSocket(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK
    }
    public static func isSymbolicLink(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK
    }

    /// What `path` names (symbolic links followed); nil when nothing is there (or a link dangles).
    public static func status(_ path: String) -> NameStatus? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        let kind: FileKind
        switch st.st_mode & S_IFMT {
        case S_IFREG: kind = .regular
        case S_IFDIR: kind = .directory
        case S_IFBLK: kind = .blockDevice
        case S_IFCHR: kind = .characterDevice
        default: kind = .other
        }
        let id = kind == .blockDevice || kind == .characterDevice
            ? FileIdentity(device: UInt64(st.st_rdev), inode: 0)
            : FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        return NameStatus(kind: kind, identity: id, size: UInt64(st.st_size))
    }

    /// The absolute name with every symbolic link resolved (realpath(3)).
    public static func resolved(_ path: String) throws(IOError) -> String {
        guard let p = realpath(path, nil) else { throw IOError(errno: errno, operation: "resolve symbolic link", path: path) }
        defer { free(p) }
        return String(cString: p)
    }

    /// Replaces `to` with `from` (rename(2)).
    public static func rename(_ from: String, _ to: String) throws(IOError) {
        if case .fail(let e) = FaultInjection.check(.rename, fd: -1) { throw IOError(errno: e, operation: "rename to \(to)", path: from) }
        if Glibc.rename(from, to) < 0 { throw IOError(errno: errno, operation: "rename to \(to)", path: from) }
    }

    /// Renames `from` to `to` only if `to` does not exist, atomically: renameat2(RENAME_NOREPLACE),
    /// or, where the kernel or file system lacks it (EINVAL, ENOSYS), link(2) + unlink(2) (link
    /// never replaces either). Throws errno EEXIST, path `to`, when `to` exists.
    public static func renameNoReplace(_ from: String, _ to: String) throws(IOError) {
        let e = Sys.renameNoReplace(from, to)
        if e == 0 { return }
        if e == EEXIST { throw IOError(errno: EEXIST, operation: "rename", path: to) }
        guard e == EINVAL || e == ENOSYS else { throw IOError(errno: e, operation: "rename to \(to)", path: from) }
        if Glibc.link(from, to) < 0 {
            let le = errno
            if le == EEXIST { throw IOError(errno: EEXIST, operation: "rename", path: to) }
            throw IOError(errno: le, operation: "link to \(to)", path: from)
        }
        _ = Glibc.unlink(from)
    }

    public static func unlink(_ path: String) {
        _ = Glibc.unlink(path)
    }

    /// Makes `to` a second name of `from` (link(2)); false when it could not (errno says why).
    public static func link(_ from: String, _ to: String) -> Bool {
        Glibc.link(from, to) == 0
    }

    /// Removes an empty directory; false if it is not empty or cannot be removed.
    @discardableResult
    public static func removeEmptyDirectory(_ path: String) -> Bool {
        rmdir(path) == 0
    }

    /// Creates a directory (mode 0755); false if it could not (errno says why, EEXIST included).
    public static func makeDirectory(_ path: String) -> Bool {
        if case .fail(let e) = FaultInjection.check(.mkdir, fd: -1) {
            errno = e
            return false
        }
        return mkdir(path, 0o755) == 0
    }

    /// The names in a directory (without `.` and `..`); empty when it cannot be read.
    public static func list(_ directory: String) -> [String] {
        (try? listing(directory)) ?? []
    }

    /// The names in a directory (without `.` and `..`); opening it goes through the fault seam
    /// as an `open`.
    public static func listing(_ directory: String) throws(IOError) -> [String] {
        if case .fail(let e) = FaultInjection.check(.open, fd: -1) {
            throw IOError(errno: e, operation: "opendir", path: directory)
        }
        guard let d = opendir(directory) else { throw IOError(errno: errno, operation: "opendir", path: directory) }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// True when a process with this id exists (kill(pid, 0); EPERM still means it exists).
    public static func processExists(_ pid: Int32) -> Bool {
        guard pid > 0 else { return false }
        return kill(pid, 0) == 0 || errno == EPERM
    }

    /// The directory part of `path` ("." when there is none).
    public static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// fsync of the directory holding `path`, so a rename is durable.
    public static func syncDirectory(of path: String) {
        let fd = open(directory(of: path), O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 {
            _ = Glibc.fsync(fd)
            close(fd)
        }
    }
}
