import Foundation
import Glibc
import Synchronization

/// A QMP server on a unix socket in a fresh directory, answering only what it is told to: the
/// greeting (unless `greeting` is nil), then each command found in `replies` (one or more lines
/// sent as they are); any other command gets silence, with the connection left open.
/// `closeAfterGreeting` hangs up right after the greeting instead.
final class FakeQMPServer: Sendable {
    static let qemuGreeting = #"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 9}}, "capabilities": []}}"#

    let dir: String
    let path: String
    private let listener: Int32
    private let received = Mutex<[String]>([])

    /// The commands received so far, in order.
    var commands: [String] { received.withLock { $0 } }

    init(greeting: String? = FakeQMPServer.qemuGreeting, replies: [String: String] = [:], closeAfterGreeting: Bool = false) throws {
        dir = NSTemporaryDirectory() + "qp-qmp-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        path = dir + "/qmp.sock"
        listener = try Self.listen(path)
        let fd = listener
        Thread.detachNewThread { [self] in
            while true {
                let c = accept(fd, nil, nil)
                if c < 0 { return }
                Thread.detachNewThread { [self] in serve(c, greeting: greeting, replies: replies, close: closeAfterGreeting) }
            }
        }
    }

    /// A socket bound and listening at `path`.
    static func listen(_ path: String, backlog: Int32 = 4) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in path.utf8.enumerated() { p[i] = b } }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard fd >= 0, bound == 0, backlog < 0 || Glibc.listen(fd, backlog) == 0 else {
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
        return fd
    }

    private func serve(_ c: Int32, greeting: String?, replies: [String: String], close hangUp: Bool) {
        defer { close(c) }
        func send(_ s: String) { _ = (s + "\r\n").withCString { Glibc.send(c, $0, strlen($0), Int32(MSG_NOSIGNAL)) } }
        if let greeting { send(greeting) }
        if hangUp { return }
        var pending = Data()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(c, &buf, buf.count, 0)
            if n <= 0 { return }
            pending.append(contentsOf: buf[0..<n])
            while let nl = pending.firstIndex(of: 0x0A) {
                let line = pending[pending.startIndex..<nl]
                pending.removeSubrange(pending.startIndex...nl)
                let cmd = ((try? JSONSerialization.jsonObject(with: line)) as? [String: Any])?["execute"] as? String ?? "?"
                received.withLock { $0.append(cmd) }
                if let r = replies[cmd] { send(r) }
            }
        }
    }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// A value shared with closures that run on other threads.
final class Shared<Value: Sendable>: Sendable {
    let value: Mutex<Value>
    init(_ v: Value) { value = Mutex(v) }
    var current: Value { value.withLock { $0 } }
}
