import DirectIO
import Glibc

/// A QMP failure: the socket, what went wrong, and a one-line message naming both.
public struct QMPError: Error, Sendable, CustomStringConvertible, Equatable {
    public enum Reason: Sendable, Equatable {
        /// Nothing accepts connections there (yet): no socket file (ENOENT), no listener
        /// (ECONNREFUSED), or a full backlog (EAGAIN). `waited` says for how long this was tried.
        case notListening(errno: Int32, waited: Duration?)
        /// No answer within the deadline. `exchange` is the command, or "greeting" for the
        /// message QEMU sends first.
        case noAnswer(exchange: String, after: Duration)
        /// QEMU closed the connection while `exchange` waited for its answer.
        case closed(exchange: String)
        /// The socket failed (recv, send, poll, a path too long).
        case io(IOError)
        /// QEMU sent something that is not a QMP message.
        case malformed(String)
        /// QEMU answered the command with an error.
        case failed(command: String, description: String)
        /// The block graph is not what the switch needs (no such node, no backing child).
        case blockGraph(String)
    }

    public var socket: String
    public var reason: Reason

    public init(socket: String, reason: Reason) {
        self.socket = socket
        self.reason = reason
    }

    /// True when the error says only that nothing listens yet (worth trying again later).
    public var isNotListening: Bool {
        if case .notListening = reason { return true }
        return false
    }

    public var description: String {
        switch reason {
        case .notListening(let e, let waited):
            let why = String(cString: strerror(e))
            if let waited { return "QMP \(socket): nothing accepted a connection within \(Self.format(waited)) (\(why))" }
            return "QMP \(socket): nothing accepts connections (\(why))"
        case .noAnswer("greeting", let after):
            // QEMU's monitor serves one client at a time: a second one is accepted and left waiting.
            return "QMP \(socket): no greeting within \(Self.format(after)) (is another client connected to this monitor?)"
        case .noAnswer(let exchange, let after):
            return "QMP \(socket): no answer to \(exchange) within \(Self.format(after))"
        case .closed(let exchange):
            return "QMP \(socket): QEMU closed the connection (waiting for the answer to \(exchange))"
        case .io(let e):
            return "QMP \(e.description)"
        case .malformed(let what):
            return "QMP \(socket): \(what)"
        case .failed(let command, let d):
            return "QMP \(socket): \(command) failed: \(d)"
        case .blockGraph(let what):
            return "QMP \(socket): \(what)"
        }
    }

    /// "2 s", "0.5 s", "10 minutes".
    static func format(_ d: Duration) -> String {
        let (s, atto) = d.components
        if atto == 0 && s >= 120 && s % 60 == 0 { return "\(s / 60) minutes" }
        if atto == 0 { return "\(s) s" }
        return "\(Double(s) + Double(atto) / 1e18) s"
    }
}
