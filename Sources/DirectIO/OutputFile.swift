import CURing
import Glibc

/// How image bytes reach the disk.
public enum IOMode: String, Sendable, CaseIterable {
    /// io_uring with O_DIRECT (default).
    case uring
    /// pwrite on a dedicated thread with O_DIRECT.
    case pwrite
    /// Buffered pwrite (page cache) with the written range dropped behind the writer.
    case buffered
}

/// A file being written by QcowPress. Only this type and the writers issue write syscalls.
public final class OutputFile: Sendable {
    /// The name errors use: the final destination, not the temporary file being written.
    public let path: String
    public let fd: Int32
    /// True when opened with O_DIRECT.
    public let direct: Bool
    /// Size of the block device written in place; nil for a regular file.
    public let deviceSize: UInt64?
    public var isBlockDevice: Bool { deviceSize != nil }

    /// Creates `path` exclusively (it must not exist). With `direct`, tries O_DIRECT and falls back to
    /// buffered I/O when the file system refuses it (tmpfs); `direct` then reads false.
    public init(creating path: String, direct wantDirect: Bool, displayName: String? = nil) throws(IOError) {
        self.path = displayName ?? path
        let base = O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC
        var fd: Int32 = -1
        var direct = false
        if wantDirect {
            fd = open(path, base | CURING_O_DIRECT, 0o644)
            if fd >= 0 {
                direct = true
            } else if errno != EINVAL {
                throw IOError(errno: errno, operation: "open", path: self.path)
            }
        }
        if fd < 0 {
            fd = open(path, base, 0o644)
            if fd < 0 { throw IOError(errno: errno, operation: "open", path: self.path) }
        }
        self.fd = fd
        self.direct = direct
        deviceSize = nil
    }

    /// Opens an existing block device for writing in place: O_DIRECT (falling back to buffered
    /// only if the driver refuses it) and O_EXCL, which for a block device means an exclusive open:
    /// EBUSY when it is mounted or held by another exclusive user (open(2)).
    public init(blockDevice path: String, displayName: String? = nil) throws(IOError) {
        self.path = displayName ?? path
        let base = O_RDWR | O_EXCL | O_CLOEXEC
        var fd = open(path, base | CURING_O_DIRECT)
        var direct = fd >= 0
        if fd < 0 && errno == EINVAL {
            fd = open(path, base)
            direct = false
        }
        if fd < 0 { throw IOError(errno: errno, operation: "open", path: self.path) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK else {
            close(fd)
            throw IOError(errno: ENOTBLK, operation: "open", path: self.path)
        }
        let end = lseek(fd, 0, SEEK_END)
        if end < 0 {
            let e = errno
            close(fd)
            throw IOError(errno: e, operation: "lseek", path: self.path)
        }
        self.fd = fd
        self.direct = direct
        deviceSize = UInt64(end)
    }

    deinit { close(fd) }

    /// Writes all of `length` bytes, retrying EINTR and continuing after short writes. A write that
    /// makes no progress is reported as EIO (the disk refused more bytes without saying why).
    public func pwriteAll(_ pointer: UnsafeRawPointer, length: Int, offset: UInt64) throws(IOError) {
        var done = 0
        while done < length {
            let r = Sys.retryingEINTR { Sys.pwrite(fd, pointer + done, length - done, offset + UInt64(done)) }
            if r == -Int(EAGAIN) { continue }
            if r < 0 { throw IOError(errno: Int32(-r), operation: "pwrite", path: path, offset: offset + UInt64(done)) }
            if r == 0 { throw IOError(errno: EIO, operation: "pwrite (no progress)", path: path, offset: offset + UInt64(done)) }
            done += r
        }
    }

    /// Reads back bytes this process wrote (used to patch a table in place). Returns bytes read.
    public func preadAll(_ pointer: UnsafeMutableRawPointer, length: Int, offset: UInt64) throws(IOError) -> Int {
        var done = 0
        while done < length {
            let r = Sys.retryingEINTR { Sys.pread(fd, pointer + done, length - done, offset + UInt64(done)) }
            if r == -Int(EAGAIN) { continue }
            if r < 0 { throw IOError(errno: Int32(-r), operation: "pread", path: path, offset: offset + UInt64(done)) }
            if r == 0 { break }
            done += r
        }
        return done
    }

    /// Reads back [offset, offset + length) in whole 4 KiB blocks (what O_DIRECT needs) into
    /// `buffer`, which holds at least `length` + 8 KiB; returns where the bytes start in it. Bytes
    /// the file does not have yet are an EIO naming the offset.
    public func readBlocks(offset: UInt64, length: Int, into buffer: AlignedBuffer) throws(IOError) -> Int {
        let base = offset & ~4095
        let span = (Int(offset - base) + length + 4095) & ~4095
        precondition(span <= buffer.capacity, "read-back buffer too small")
        let n = try preadAll(buffer.pointer, length: span, offset: base)
        guard n >= Int(offset - base) + length else { throw IOError(errno: EIO, operation: "read back", path: path, offset: base + UInt64(n)) }
        return Int(offset - base)
    }

    public func sync() throws(IOError) {
        let r = Sys.retryingEINTR { Sys.fsync(fd) }
        if r < 0 { throw IOError(errno: -r, operation: "fsync", path: path) }
    }

    /// Sets a file's size. A block device keeps its size: an image on it ends where its data
    /// ends (as qcow2 on LVM), so this does nothing there.
    public func truncate(to size: UInt64) throws(IOError) {
        if isBlockDevice { return }
        if ftruncate(fd, off_t(size)) < 0 { throw IOError(errno: errno, operation: "ftruncate", path: path) }
    }

    /// Makes [offset, offset+length) read as zeros: FALLOC_FL_ZERO_RANGE (on a block device the
    /// kernel turns it into a write-zeroes or discard-with-zeroing command), or written zeros where
    /// that is refused. `scratch` is a zeroed, aligned buffer used for the fallback writes.
    public func zeroRange(offset: UInt64, length: UInt64, scratch: UnsafeRawPointer, scratchSize: Int) throws(IOError) {
        guard length > 0 else { return }
        let mode = CURING_FALLOC_FL_ZERO_RANGE | CURING_FALLOC_FL_KEEP_SIZE
        if Sys.fallocate(fd, mode: mode, offset: offset, length: length) == 0 { return }
        var at = offset
        while at < offset + length {
            let n = Int(min(UInt64(scratchSize), offset + length - at))
            try pwriteAll(scratch, length: n, offset: at)
            at += UInt64(n)
        }
    }

    /// Frees the blocks of [offset, offset+length), which then read as zeros (FALLOC_FL_PUNCH_HOLE,
    /// keeping the size); false where the file system refuses it.
    public func punchHole(offset: UInt64, length: UInt64) -> Bool {
        // linux/falloc.h: FALLOC_FL_PUNCH_HOLE (0x02) must come with FALLOC_FL_KEEP_SIZE.
        let punchHole: Int32 = 0x02
        return Sys.fallocate(fd, mode: punchHole | CURING_FALLOC_FL_KEEP_SIZE, offset: offset, length: length) == 0
    }

    /// Starts writeback of a written range and drops it from the page cache (buffered mode only).
    public func dropBehind(offset: UInt64, length: Int) {
        guard !direct, length > 0 else { return }
        // WAIT_BEFORE|WRITE|WAIT_AFTER makes the pages clean so DONTNEED can drop them.
        _ = curing_sync_file_range(fd, Int64(offset), Int64(length), CURING_SYNC_RANGE_ALL)
        _ = posix_fadvise(fd, off_t(offset), off_t(length), POSIX_FADV_DONTNEED)
    }
}
