import Foundation
import Glibc
import Synchronization

/// A QMP server on a unix socket (at `path`, or in a fresh directory of its own), answering only
/// what it is told to: the greeting (unless `greeting` is nil), then each command found in
/// `replies` (one or more lines sent as they are); any other command gets silence, with the
/// connection left open. `closeAfterGreeting` hangs up right after the greeting instead. Used by
/// the QMP client's unit tests and by the command's end-to-end deadline tests.
public final class FakeQMPServer: Sendable {
    public static let qemuGreeting = #"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 9}}, "capabilities": []}}"#

    /// The directory of the socket (made here, and removed by ``stop()``, when no path was given).
    public let dir: String
    public let path: String
    private let madeDir: Bool
    private let listener: Int32
    private let state = Mutex<(received: [String], open: Int, accepted: Int)>(([], 0, 0))
    private let disconnected = DispatchSemaphore(value: 0)

    /// The commands received so far, in order.
    public var commands: [String] { state.withLock { $0.received } }

    public init(path: String? = nil, greeting: String? = FakeQMPServer.qemuGreeting, replies: [String: String] = [:],
                closeAfterGreeting: Bool = false) throws {
        if let path {
            dir = (path as NSString).deletingLastPathComponent
            self.path = path
            madeDir = false
        } else {
            dir = NSTemporaryDirectory() + "qp-qmp-\(UUID().uuidString.prefix(8))"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            self.path = dir + "/qmp.sock"
            madeDir = true
        }
        listener = try Self.listen(self.path)
        let fd = listener
        Thread.detachNewThread { [self] in
            while true {
                let c = accept(fd, nil, nil)
                if c < 0 { return }
                state.withLock { $0.open += 1; $0.accepted += 1 }
                Thread.detachNewThread { [self] in serve(c, greeting: greeting, replies: replies, close: closeAfterGreeting) }
            }
        }
    }

    /// A socket bound at `path`, listening unless `backlog` is negative.
    public static func listen(_ path: String, backlog: Int32 = 4) throws -> Int32 {
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
        defer {
            close(c)
            if state.withLock({ $0.open -= 1; return $0.open == 0 }) { disconnected.signal() }
        }
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
                state.withLock { $0.received.append(cmd) }
                if let r = replies[cmd] { send(r) }
            }
        }
    }

    /// Waits until a client connected and every client has gone.
    public func waitForDisconnect(seconds: Double) -> Bool {
        if state.withLock({ $0.accepted > 0 && $0.open == 0 }) { return true }
        return disconnected.wait(timeout: .now() + seconds) == .success
    }

    public func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        if madeDir { try? FileManager.default.removeItem(atPath: dir) } else { unlink(path) }
    }
}
