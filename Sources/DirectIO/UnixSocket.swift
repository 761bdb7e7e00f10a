import Glibc

/// A connected unix stream socket (QEMU's QMP monitor), non-blocking, where every wait ends at a
/// deadline: a peer that accepts and then never answers cannot hold the caller. One owner
/// (`~Copyable`); closed when dropped.
public struct UnixSocket: ~Copyable {
    public let path: String
    let fd: Int32

    /// Connects to the socket at `path`. Fails at once when nothing accepts connections there:
    /// ENOENT (no socket yet), ECONNREFUSED (no listener), EAGAIN (its backlog is full); the caller
    /// decides whether to try again.
    public init(connectingTo path: String) throws(IOError) {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let room = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < room else {
            throw IOError(errno: ENAMETOOLONG, operation: "connect", path: path,
                          reason: "socket path too long (\(bytes.count) bytes; a unix socket's path holds at most \(room - 1))")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        let fd = Sys.unixStreamSocket()
        if fd < 0 { throw IOError(errno: -fd, operation: "socket", path: path) }
        let r = Sys.retryingEINTR { Sys.connect(fd, &addr) }
        // EISCONN: an interrupted connect went on in the kernel and completed.
        if r < 0 && r != -Int(EISCONN) {
            close(fd)
            throw IOError(errno: Int32(-r), operation: "connect", path: path)
        }
        self.path = path
        self.fd = fd
    }

    deinit { close(fd) }

    /// Receives up to `buffer.count` bytes, waiting at most until `deadline`: the count (0 at the
    /// end of the stream), or nil when the deadline passed with nothing to read.
    public func receive(into buffer: UnsafeMutableRawBufferPointer, before deadline: ContinuousClock.Instant) throws(IOError) -> Int? {
        while true {
            let r = Sys.retryingEINTR { Sys.recv(fd, buffer.baseAddress!, buffer.count) }
            if r >= 0 { return r }
            guard r == -Int(EAGAIN) || r == -Int(EWOULDBLOCK) else { throw IOError(errno: Int32(-r), operation: "recv", path: path) }
            guard try wait(for: Int16(POLLIN), before: deadline) else { return nil }
        }
    }

    /// Sends all of `bytes`, waiting at most until `deadline` for room: false when the deadline
    /// passed first (part of the message may have been sent).
    public func send(_ bytes: UnsafeRawBufferPointer, before deadline: ContinuousClock.Instant) throws(IOError) -> Bool {
        var done = 0
        while done < bytes.count {
            let r = Sys.retryingEINTR { Sys.send(fd, bytes.baseAddress! + done, bytes.count - done) }
            if r > 0 {
                done += r
            } else if r == -Int(EAGAIN) || r == -Int(EWOULDBLOCK) {
                guard try wait(for: Int16(POLLOUT), before: deadline) else { return false }
            } else {
                throw IOError(errno: r == 0 ? EPIPE : Int32(-r), operation: "send", path: path)
            }
        }
        return true
    }

    /// Waits until the socket is ready for `events` (or has an error or hang-up, which the next
    /// call reports): false when the deadline passed first.
    private func wait(for events: Int16, before deadline: ContinuousClock.Instant) throws(IOError) -> Bool {
        // The time left is worked out again on each try, so an interrupted poll keeps the deadline.
        let r = Sys.retryingEINTR { () -> Int in
            let left = deadline - ContinuousClock.now
            guard left > .zero else { return 0 }
            let (s, atto) = left.components
            let ms = s * 1000 + (atto + 999_999_999_999_999) / 1_000_000_000_000_000  // rounded up
            return Sys.poll(fd, events: events, timeoutMS: Int32(clamping: ms))
        }
        if r < 0 { throw IOError(errno: Int32(-r), operation: "poll", path: path) }
        return r > 0
    }
}

/// The socket calls of the seam (each returns its result or -errno). `send` and `recv` count as
/// the seam's writes and reads, so `QCOWPRESS_FAULT` and ``FaultInjection`` reach them too.
extension Sys {
    /// socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC).
    static func unixStreamSocket() -> Int32 {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        return fd < 0 ? -Glibc.errno : fd
    }

    static func connect(_ fd: Int32, _ addr: inout sockaddr_un) -> Int {
        let r = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return r < 0 ? -Int(Glibc.errno) : 0
    }

    /// send(2) with MSG_NOSIGNAL: a peer that has gone is EPIPE, not a SIGPIPE that ends the
    /// process. An injected short transfer of a message under 1 KiB sends one byte.
    static func send(_ fd: Int32, _ buf: UnsafeRawPointer, _ count: Int) -> Int {
        let f = fault(.write, fd: fd, length: count)
        if let r = f.result { return r }
        let n = f.length == 0 && count > 0 ? 1 : f.length
        let r = Glibc.send(fd, buf, n, Int32(MSG_NOSIGNAL))
        return r < 0 ? -Int(Glibc.errno) : r
    }

    /// recv(2). An injected short transfer of a request under 1 KiB receives one byte.
    static func recv(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int) -> Int {
        let f = fault(.read, fd: fd, length: count)
        if let r = f.result { return r }
        let n = f.length == 0 && count > 0 ? 1 : f.length
        let r = Glibc.recv(fd, buf, n, 0)
        return r < 0 ? -Int(Glibc.errno) : r
    }
}
