import CURing
import Glibc

/// A source file or block device, read without filling the page cache: O_DIRECT where the file
/// system allows it, otherwise buffered reads with the range dropped behind the reader.
public final class InputFile: Sendable {
    public let path: String
    public let fd: Int32
    public let size: UInt64
    /// True when reads bypass the page cache (O_DIRECT).
    public let direct: Bool
    /// Buffered reads: drop pages behind us (off for small files the caller may reread).
    public let dropBehind: Bool

    public init(path: String, direct wantDirect: Bool = true) throws(IOError) {
        self.path = path
        // Only files that can be read at any offset: a FIFO, socket or character device would
        // block or read differently each time. O_NONBLOCK keeps open(2) itself from waiting on a
        // FIFO swapped in after the check; the descriptor is checked again.
        let before: FileStatus
        do { before = try FileStatus.of(path: path) } catch { throw IOError(errno: error.errno, operation: "open", path: path) }
        if before.kind == .directory { throw IOError(errno: EISDIR, operation: "open", path: path) }
        guard before.kind == .regular || before.kind == .blockDevice else {
            throw IOError(errno: EINVAL, operation: "open", path: path, reason: "is \(before.kind.rawValue), not a regular file or block device")
        }
        var fd: Int32 = -1
        var direct = false
        if wantDirect {
            fd = Sys.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | CURING_O_DIRECT)
            direct = fd >= 0
        }
        if fd < 0 {
            fd = Sys.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
            if fd < 0 { throw IOError(errno: -fd, operation: "open", path: path) }
        }
        let kind = (try? FileStatus.of(fd: fd, path: path))?.kind
        guard kind == .regular || kind == .blockDevice else {
            close(fd)
            throw IOError(errno: EINVAL, operation: "open", path: path, reason: "is \(kind?.rawValue ?? "not a file"), not a regular file or block device")
        }
        let end = lseek(fd, 0, SEEK_END)
        if end < 0 {
            let e = errno
            close(fd)
            throw IOError(errno: e, operation: "lseek", path: path)
        }
        self.fd = fd
        self.size = UInt64(end)
        self.direct = direct
        self.dropBehind = true
        if !direct { Sys.fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL) }
    }
    deinit { close(fd) }

    /// Reads up to `length` bytes at `offset` into `buffer` (which must be 4 KiB-aligned when
    /// `offset` and `length` are 512-aligned, for O_DIRECT). Returns bytes read; stops early only at
    /// end of file. Retries EINTR and short reads.
    public func read(into buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64) throws(IOError) -> Int {
        try read(into: [UnsafeMutableRawBufferPointer(start: buffer, count: length)], offset: offset)
    }

    /// Reads consecutive bytes at `offset` into several buffers in one request (preadv), as
    /// ``read(into:length:offset:)`` does into one. Returns bytes read; stops early only at end of file.
    public func read(into buffers: [UnsafeMutableRawBufferPointer], offset: UInt64) throws(IOError) -> Int {
        let length = buffers.reduce(0) { $0 + $1.count }
        var done = 0
        var rest = buffers
        while done < length {
            let at = offset + UInt64(done)
            let r = Sys.retryingEINTR { Sys.preadv(fd, rest, at) }
            if r == -Int(EAGAIN) { continue }
            if r < 0 { throw IOError(errno: Int32(-r), operation: "read", path: path, offset: at) }
            if r == 0 {
                if at >= size { break }
                throw IOError(errno: EIO, operation: "read (no progress)", path: path, offset: at)
            }
            done += r
            // Drop what was filled; a partly filled buffer continues where it stopped.
            var skip = r
            while skip > 0, let first = rest.first {
                if skip >= first.count {
                    skip -= first.count
                    rest.removeFirst()
                } else {
                    rest[0] = UnsafeMutableRawBufferPointer(rebasing: first[skip...])
                    skip = 0
                }
            }
        }
        if !direct && dropBehind && done > 0 {
            _ = posix_fadvise(fd, off_t(offset), off_t(done), POSIX_FADV_DONTNEED)
        }
        return done
    }

    /// Data ranges of the file in [from, to), using SEEK_DATA/SEEK_HOLE. Where the file system
    /// cannot tell, the whole range is data.
    public func dataRanges(from: UInt64 = 0, to: UInt64? = nil) -> [Range<UInt64>] {
        let end = to ?? size
        var out: [Range<UInt64>] = []
        var pos = from
        while pos < end {
            let d = Sys.seek(fd, pos, SEEK_DATA)
            if d < 0 {
                if d == -Int64(ENXIO) { break }  // no more data
                return out + [pos..<end]  // not supported: everything is data
            }
            let dataStart = UInt64(d)
            if dataStart >= end { break }
            let h = Sys.seek(fd, dataStart, SEEK_HOLE)
            let holeStart = h < 0 ? end : min(end, UInt64(h))
            out.append(dataStart..<holeStart)
            pos = holeStart
        }
        return out
    }
}
