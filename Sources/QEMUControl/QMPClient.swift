import DirectIO
import Foundation

/// A QMP client on a unix socket: the greeting, `qmp_capabilities`, then one command at a time
/// (events are skipped). Every exchange — the greeting, each command with its answer — has
/// `timeout` to complete: a QEMU that stops answering ends the exchange with
/// ``QMPError/Reason/noAnswer(exchange:after:)`` instead of holding the caller.
public final class QMPClient {
    public let path: String
    public let timeout: Duration
    private let socket: UnixSocket
    /// Bytes received after the last complete line.
    private var pending: [UInt8] = []

    /// Connects, reads the greeting and leaves capabilities negotiation mode. Nothing listening
    /// is ``QMPError/isNotListening`` (the caller may try again later); anything else after the
    /// connection was made is final.
    public init(path: String, timeout: Duration = .seconds(30)) throws(QMPError) {
        self.path = path
        self.timeout = timeout
        do {
            socket = try UnixSocket(connectingTo: path)
        } catch {
            switch error.errno {
            case ENOENT, ECONNREFUSED, EAGAIN: throw QMPError(socket: path, reason: .notListening(errno: error.errno, waited: nil))
            default: throw QMPError(socket: path, reason: .io(error))
            }
        }
        let greeting = try message(awaiting: "greeting", before: ContinuousClock.now + timeout)
        guard greeting["QMP"] != nil else { throw QMPError(socket: path, reason: .malformed("the first message is not a QMP greeting")) }
        try execute("qmp_capabilities")
    }

    /// Runs one command: its "return" value, or ``QMPError/Reason/failed(command:description:)``
    /// with QEMU's description of the error. `arguments` must be valid JSON objects.
    @discardableResult
    public func execute(_ command: String, _ arguments: [String: Any]? = nil) throws(QMPError) -> Any {
        let deadline = ContinuousClock.now + timeout
        var request: [String: Any] = ["execute": command]
        if let arguments { request["arguments"] = arguments }
        guard let json = try? JSONSerialization.data(withJSONObject: request) else {
            preconditionFailure("QMP \(command): arguments that are not JSON")
        }
        let bytes = [UInt8](json) + [0x0A]
        let sent = bytes.withUnsafeBytes { p in Result { () throws(IOError) in try socket.send(p, before: deadline) } }
        switch sent {
        case .failure(let e): throw failure(e, during: command)
        case .success(false): throw QMPError(socket: path, reason: .noAnswer(exchange: command, after: timeout))
        case .success(true): break
        }
        let reply = try message(awaiting: command, before: deadline)
        if let e = reply["error"] as? [String: Any] {
            throw QMPError(socket: path, reason: .failed(command: command, description: e["desc"] as? String ?? "\(e)"))
        }
        return reply["return"] ?? [String: Any]()
    }

    /// A socket error: a peer that hung up (EPIPE, ECONNRESET) is QEMU closing the connection.
    private func failure(_ e: IOError, during exchange: String) -> QMPError {
        QMPError(socket: path, reason: e.errno == EPIPE || e.errno == ECONNRESET ? .closed(exchange: exchange) : .io(e))
    }

    /// The next message that is not an event, read before `deadline`.
    private func message(awaiting exchange: String, before deadline: ContinuousClock.Instant) throws(QMPError) -> [String: Any] {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            while let nl = pending.firstIndex(of: 0x0A) {
                let line = Data(pending[..<nl])
                pending.removeSubrange(...nl)
                // QEMU ends lines with CRLF; a blank line carries nothing.
                if line.allSatisfy({ $0 == 0x0D || $0 == 0x20 }) { continue }
                guard let obj = (try? JSONSerialization.jsonObject(with: line)) as? [String: Any] else {
                    throw QMPError(socket: path, reason: .malformed("QEMU sent something that is not a JSON object"))
                }
                if obj["event"] != nil { continue }
                return obj
            }
            let got = buffer.withUnsafeMutableBytes { p in Result { () throws(IOError) in try socket.receive(into: p, before: deadline) } }
            switch got {
            case .failure(let e): throw failure(e, during: exchange)
            case .success(nil): throw QMPError(socket: path, reason: .noAnswer(exchange: exchange, after: timeout))
            case .success(0): throw QMPError(socket: path, reason: .closed(exchange: exchange))
            case .success(let n?): pending += buffer[..<n]
            }
        }
    }
}
