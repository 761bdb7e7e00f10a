import Glibc
import Synchronization

/// A file or pipe read front to back with read(2), never seeked (stdin included). Reads of a
/// regular file are dropped from the page cache behind the reader.
public final class StreamFile: Sendable {
    public let path: String
    public let fd: Int32
    let ownsFD: Bool
    let regular: Bool
    /// Size when it is a regular file (for progress), else nil.
    public let size: UInt64?
    /// Written by the reading thread, read by progress reporters on others.
    private let consumed = Atomic<UInt64>(0)
    /// Where the page cache was last dropped up to; only the reading thread touches this.
    private let dropped = Atomic<UInt64>(0)

    /// Opens `path`, or standard input for "-".
    public init(path: String) throws(IOError) {
        self.path = path == "-" ? "<stdin>" : path
        if path == "-" {
            fd = 0
            ownsFD = false
        } else {
            let f = Sys.open(path, O_RDONLY | O_CLOEXEC)
            if f < 0 { throw IOError(errno: -f, operation: "open", path: path) }
            fd = f
            ownsFD = true
        }
        let st: FileStatus
        do { st = try FileStatus.of(fd: fd, path: path) } catch {
            if ownsFD { close(fd) }
            throw error
        }
        regular = st.kind == .regular
        if st.kind == .directory {
            if ownsFD { close(fd) }
            throw IOError(errno: EISDIR, operation: "open", path: path)
        }
        size = regular ? st.size : nil
        if regular { _ = posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL) }
    }
    deinit { if ownsFD { close(fd) } }

    /// Bytes read so far.
    public var position: UInt64 { consumed.load(ordering: .relaxed) }

    /// Reads up to `count` bytes; 0 at end of file. Retries EINTR. On a non-blocking descriptor
    /// with nothing to read yet (a pipe handed over that way), sleeps in poll(2) until there is
    /// (or the writer is gone) instead of spinning on read(2).
    public func read(into p: UnsafeMutableRawPointer, count: Int) throws(IOError) -> Int {
        while true {
            let r = Sys.retryingEINTR { Sys.read(fd, p, count) }
            if r == -Int(EAGAIN) || r == -Int(EWOULDBLOCK) {
                // Readable, hung up or in error: the next read says which.
                let w = Sys.retryingEINTR { Sys.poll(fd, events: Int16(POLLIN)) }
                if w < 0 { throw IOError(errno: Int32(-w), operation: "poll", path: path, offset: position) }
                continue
            }
            let before = consumed.load(ordering: .relaxed)
            if r < 0 { throw IOError(errno: Int32(-r), operation: "read", path: path, offset: before) }
            let now = before + UInt64(r)
            consumed.store(now, ordering: .relaxed)
            let from = dropped.load(ordering: .relaxed)
            if regular && now - from >= 8 << 20 {
                _ = posix_fadvise(fd, off_t(from), off_t(now - from), POSIX_FADV_DONTNEED)
                dropped.store(now, ordering: .relaxed)
            }
            return r
        }
    }
}
