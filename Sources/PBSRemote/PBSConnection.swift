import BackupSources
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOPosix
import NIOSSL
import NIOSupport
import Synchronization

/// A response as the client keeps it: status, the `Set-Cookie`-free headers it needs, the body.
struct PBSResponse: Sendable {
    var status: Int
    var body: ByteBuffer
    var text: String { String(buffer: body).trimmingCharacters(in: .whitespacesAndNewlines) }
}

/// Why a request did not get a response: the connection is gone (worth reconnecting) or it never
/// came up (wrong certificate, refused, …: not worth retrying).
enum PBSTransportError: Error {
    case connectionLost(String)
    case tooLarge(Int)
}

/// How the server's certificate was accepted on the first connection; later connections use the
/// same way at once.
enum PBSTrust: Sendable { case systemRoots, fingerprint }

/// TLS connections to one server: certificate checks (system roots, or PBS_FINGERPRINT as
/// proxmox-backup-client does: SHA-256 of the leaf's DER form), one-shot HTTP/1.1 requests (login,
/// listings) and reader sessions (HTTP/1.1 upgraded to HTTP/2).
final class PBSConnector: Sendable {
    let repository: PBSRepository
    let expectedFingerprint: String?
    let group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    private let trust = Mutex<PBSTrust?>(nil)
    /// Connecting gives up after this long (a server that does not answer SYN).
    static let connectTimeout = TimeAmount.seconds(15)

    init(repository: PBSRepository, fingerprint: String?) {
        self.repository = repository
        expectedFingerprint = fingerprint
    }

    func error(_ detail: String, errno: Int32? = nil) -> SourceError {
        SourceError(.network, path: repository.server, detail, errno: errno)
    }

    /// A connected channel with TLS up, then `configure` run on it (on its event loop).
    func connect(_ configure: @escaping @Sendable (Channel) throws -> Void) throws(SourceError) -> Channel {
        let order: [PBSTrust]
        if let t = trust.withLock({ $0 }) {
            order = [t]
        } else {
            order = expectedFingerprint != nil ? [.fingerprint, .systemRoots] : [.systemRoots, .fingerprint]
        }
        var seen: String? = nil
        var lastTLS: String? = nil
        for mode in order {
            let seenBox = NIOLockedValueBox<String?>(nil)
            do {
                let ch = try attempt(mode, seenBox: seenBox, configure: configure)
                trust.withLock { $0 = mode }
                return ch
            } catch let e as SourceError {
                throw e
            } catch {
                if let s = seenBox.withLockedValue({ $0 }) { seen = s }
                if Self.isTLSFailure(error) {
                    lastTLS = "\(error)"
                    continue
                }
                throw self.error(Self.describe(error), errno: Self.errno(of: error))
            }
        }
        if let seen {
            if let expected = expectedFingerprint {
                throw self.error("the server's certificate is not trusted and its fingerprint \(seen) is not PBS_FINGERPRINT's \(expected)")
            }
            throw self.error("the server's certificate is not trusted (fingerprint \(seen)): check it and pass it in PBS_FINGERPRINT")
        }
        throw self.error("TLS handshake failed: \(lastTLS ?? "unknown error")")
    }

    private func attempt(_ mode: PBSTrust, seenBox: NIOLockedValueBox<String?>,
                         configure: @escaping @Sendable (Channel) throws -> Void) throws -> Channel {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateVerification = .fullVerification
        let context = try NIOSSLContext(configuration: tls)
        let hostname = repository.hostIsIPAddress ? nil : repository.connectHost
        let expected = expectedFingerprint
        // A server that accepts and then says nothing must not hang the restore.
        return try connectAwaitingHandshake(
            group: group, host: repository.connectHost, port: repository.port, timeout: Self.connectTimeout,
            handshakeTimeout: { PBSTransportError.connectionLost("no TLS handshake within \(Self.connectTimeout.nanoseconds / 1_000_000_000) s") }
        ) { channel, handshake in
            let handler: NIOSSLClientHandler
            switch mode {
            case .systemRoots:
                handler = try NIOSSLClientHandler(context: context, serverHostname: hostname)
            case .fingerprint:
                handler = try NIOSSLClientHandler(context: context, serverHostname: hostname) { certs, promise in
                    let fp = certs.first.flatMap(sha256Fingerprint(of:))
                    seenBox.withLockedValue { $0 = fp }
                    promise.succeed(fp != nil && fp == expected ? .certificateVerified : .failed)
                }
            }
            try channel.pipeline.syncOperations.addHandler(handler)
            try channel.pipeline.syncOperations.addHandler(HandshakeWaiter(
                promise: handshake,
                closedError: PBSTransportError.connectionLost("the server closed the connection during the TLS handshake")))
            try configure(channel)
        }.wait()
    }

    static func isTLSFailure(_ e: Error) -> Bool {
        if e is NIOSSLError || e is BoringSSLError { return true }
        return false
    }

    static func errno(of e: Error) -> Int32? {
        if let io = e as? IOError { return io.errnoCode }
        if let c = e as? NIOConnectionError, let first = c.connectionErrors.first?.error as? IOError { return first.errnoCode }
        return nil
    }

    static func describe(_ e: Error) -> String {
        if let c = e as? NIOConnectionError {
            if let first = c.connectionErrors.first { return "cannot connect: \(describe(first.error))" }
            if c.dnsAAAAError != nil || c.dnsAError != nil { return "cannot resolve the host name" }
            return "cannot connect"
        }
        if let io = e as? IOError { return String(cString: strerror(io.errnoCode)) }
        if e is ChannelError { return "connection failed (\(e))" }
        if case PBSTransportError.connectionLost(let why) = e { return why }
        return "\(e)"
    }
}
