import Foundation
import Glibc
import Synchronization

/// A small NBD client for the sink tests: fixed newstyle, `NBD_OPT_EXPORT_NAME`, simple replies
/// (the sink answers writes with simple replies unless structured ones were negotiated). Writes
/// are pipelined (up to `window` in flight, so the server runs several at once); every reply is
/// awaited at most `timeout` seconds, so a server that stops answering fails the test instead of
/// hanging it.
final class NBDWriteClient: Sendable {
    let fd: Int32
    let size: UInt64
    let timeout: Int
    private let cookies = Atomic<UInt64>(0)

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// Connects to the unix socket `path` and selects `export`.
    init(socket path: String, export: String = "backup", timeout: Int = 30) throws {
        self.timeout = timeout
        fd = try Self.connect(path, timeout: timeout)
        do {
            let greeting = try Self.read(fd, 18)
            guard greeting.be64(0) == 0x4e42_444d_4147_4943, greeting.be64(8) == 0x4948_4156_454f_5054 else {
                throw Failure(description: "not an NBD newstyle server")
            }
            // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES.
            try Self.send(fd, Data.be32(3))
            try Self.send(fd, Data.be64(0x4948_4156_454f_5054) + Data.be32(1) + Data.be32(UInt32(export.utf8.count)) + Data(export.utf8))
            let reply = try Self.read(fd, 10)
            size = reply.be64(0)
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    static func connect(_ path: String, timeout: Int) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: errno \(errno)") }
        var tv = timeval(tv_sec: timeout, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            let b = Array(path.utf8.prefix(p.count - 1))
            p.copyBytes(from: b)
            p[b.count] = 0
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0 else {
            let e = errno
            close(fd)
            throw Failure(description: "connect \(path): errno \(e)")
        }
        return fd
    }

    static func send(_ fd: Int32, _ d: Data) throws {
        try d.withUnsafeBytes { p in
            var done = 0
            while done < p.count {
                let n = Glibc.send(fd, p.baseAddress! + done, p.count - done, Int32(MSG_NOSIGNAL))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw Failure(description: "send: errno \(errno)") }
                done += n
            }
        }
    }

    /// Exactly `n` bytes, or a failure (EOF, or nothing within the timeout).
    static func read(_ fd: Int32, _ n: Int) throws -> Data {
        var d = Data(count: n)
        var done = 0
        try d.withUnsafeMutableBytes { p in
            while done < n {
                let r = recv(fd, p.baseAddress! + done, n - done, 0)
                if r < 0 && errno == EINTR { continue }
                if r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { throw Failure(description: "no reply in time (the server stalled)") }
                guard r > 0 else { throw Failure(description: "connection closed") }
                done += r
            }
        }
        return d
    }

    /// Sends one request (and its payload) without waiting; returns its cookie.
    @discardableResult
    func request(_ type: UInt16, offset: UInt64, length: UInt32, payload: Data? = nil) throws -> UInt64 {
        let cookie = cookies.wrappingAdd(1, ordering: .relaxed).newValue
        var h = Data.be32(0x2560_9513) + Data.be16(0) + Data.be16(type) + Data.be64(cookie) + Data.be64(offset) + Data.be32(length)
        if let payload { h += payload }
        try Self.send(fd, h)
        return cookie
    }

    /// Reads one simple reply: its cookie and error number (0: success).
    func reply() throws -> (cookie: UInt64, error: UInt32) {
        let r = try Self.read(fd, 16)
        guard r.be32(0) == 0x6744_6698 else { throw Failure(description: "not a simple reply") }
        return (r.be64(8), r.be32(4))
    }

    /// Writes `pieces` (offset, bytes) in the given order, at most `window` in flight; returns
    /// the error numbers of the replies that were not successes.
    func write(_ pieces: [(offset: UInt64, bytes: Data)], window: Int = 8) throws -> [UInt32] {
        var errors: [UInt32] = []
        var inFlight = 0
        for p in pieces {
            if inFlight == window {
                let r = try reply()
                if r.error != 0 { errors.append(r.error) }
                inFlight -= 1
            }
            try request(1, offset: p.offset, length: UInt32(p.bytes.count), payload: p.bytes)
            inFlight += 1
        }
        while inFlight > 0 {
            let r = try reply()
            if r.error != 0 { errors.append(r.error) }
            inFlight -= 1
        }
        return errors
    }

    /// `NBD_CMD_DISC`: the sink decides the backup is complete.
    func disconnect() throws {
        try request(2, offset: 0, length: 0)
    }
}

fileprivate extension Data {
    static func be16(_ v: UInt16) -> Data { Swift.withUnsafeBytes(of: v.bigEndian) { Data($0) } }
    static func be32(_ v: UInt32) -> Data { Swift.withUnsafeBytes(of: v.bigEndian) { Data($0) } }
    static func be64(_ v: UInt64) -> Data { Swift.withUnsafeBytes(of: v.bigEndian) { Data($0) } }
    func be32(_ at: Int) -> UInt32 { self[startIndex + at..<startIndex + at + 4].reduce(0) { $0 << 8 | UInt32($1) } }
    func be64(_ at: Int) -> UInt64 { self[startIndex + at..<startIndex + at + 8].reduce(0) { $0 << 8 | UInt64($1) } }
}
