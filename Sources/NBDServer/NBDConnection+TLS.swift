import Foundation
import NIOCore
import NIOSSL
import NIOTLS

/// TLS (`NBD_OPT_STARTTLS`) and the refusals of the negotiation: a client refused is logged in
/// one line naming its address and why, and only its connection ends.
///
/// As qemu-nbd: with TLS configured, every option before the upgrade but `NBD_OPT_STARTTLS` and
/// `NBD_OPT_ABORT` gets `NBD_REP_ERR_TLS_REQD` (`NBD_OPT_EXPORT_NAME`, which has no error reply,
/// ends the connection); `NBD_OPT_STARTTLS` is acknowledged in plaintext, then the TLS handshake
/// runs on the same connection and option haggling goes on encrypted. Plaintext the client sent
/// after `NBD_OPT_STARTTLS` (before the handshake) is never taken as options (an injection).
extension NBDConnection {
    /// Whether an option may be handled now; if not, it has been answered (or the client refused).
    func tlsAllows(_ context: ChannelHandlerContext, _ opt: UInt32, _ data: inout ByteBuffer) -> Bool {
        let option = NBD.Option(rawValue: opt)
        guard core.tls != nil, tls != .established else {
            if option == .startTLS {
                if tls == .established { replyError(context, opt, .errInvalid, "TLS already enabled") }
                else { replyError(context, opt, .errPolicy, "TLS not configured") }
                return false
            }
            return true
        }
        if tls == .handshaking {
            refuse(context, "sent options inside the TLS handshake")
            return false
        }
        switch option {
        case .startTLS:
            startTLS(context, opt, &data)
        case .abort:
            return true
        case .exportName:
            refuse(context, "NBD_OPT_EXPORT_NAME without TLS (TLS required)")
        default:
            pendingRefusal = "plaintext client (TLS required; it did not send NBD_OPT_STARTTLS)"
            replyError(context, opt, .errTLSRequired, "TLS required")
        }
        return false
    }

    private func startTLS(_ context: ChannelHandlerContext, _ opt: UInt32, _ data: inout ByteBuffer) {
        guard let config = core.tls else { return }
        guard data.readableBytes == 0 else { return replyError(context, opt, .errInvalid, "NBD_OPT_STARTTLS takes no data") }
        reply(context, opt, .ack)
        context.flush()  // the ACK goes out in plaintext, ahead of the handler added next
        let handler: NIOSSLServerHandler
        do {
            handler = try NIOSSLServerHandler(context: config.context) { [weak self] result, certificate in
                // Called for every certificate of the chain: the first refused one says why.
                if result == .failed, self?.refusedCertificate == nil { self?.refusedCertificate = certificate }
                return result
            }
            try context.pipeline.syncOperations.addHandler(handler, position: .first)
        } catch {
            return refuse(context, "cannot start TLS: \(error)")
        }
        tls = .handshaking
        pendingRefusal = nil
    }

    /// The TLS handshake is complete: the client's certificate verified; its subject CN is checked
    /// against the allowed names.
    func tlsEstablished(_ context: ChannelHandlerContext) {
        guard tls == .handshaking, let config = core.tls else { return }
        let certificate = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self).peerCertificate
        guard let certificate else { return refuse(context, "no client certificate signed by ca-cert.pem") }
        let names = NBDTLS.commonNames(certificate)
        if !config.allowedNames.isEmpty && !names.contains(where: config.allowedNames.contains) {
            return refuse(context, "client certificate CN \(names.first ?? "(none)") is not allowed (--tls-allow)")
        }
        tls = .established
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted = event as? TLSUserEvent { tlsEstablished(context) }
        context.fireUserInboundEventTriggered(event)
    }

    /// Why an error during the negotiation ended it, in words.
    func negotiationFailure(_ error: any Error) -> String {
        if tls == .handshaking {
            if let refusedCertificate, let config = core.tls { return config.refusal(of: refusedCertificate, now: Int(time(nil))) }
            let text = "\(error)"
            // Clients offer only a certificate of a CA the server names (ca-cert.pem's).
            if text.contains("PEER_DID_NOT_RETURN_A_CERTIFICATE") { return "no client certificate signed by ca-cert.pem" }
            if text.contains("eofDuringHandshake") || text.contains("uncleanShutdown") { return "closed the connection during the TLS handshake" }
            // BoringSSL's reasons are the upper-case words of its message (WRONG_VERSION_NUMBER, ...).
            let reasons = text.split(whereSeparator: { !($0.isUppercase || $0 == "_") }).filter { $0.count > 3 && $0.contains("_") && !$0.hasPrefix("OPENSSL") }
            return "TLS handshake failed: " + (reasons.isEmpty ? text : reasons.joined(separator: ", "))
        }
        return "\(error)"
    }

    /// Ends a client's negotiation: one line in the log with its address and `reason`.
    func refuse(_ context: ChannelHandlerContext, _ reason: String) {
        if !refusalLogged {
            refusalLogged = true
            core.log("\(peer): refused: \(pendingRefusal.map { "\($0); " } ?? "")\(reason)")
        }
        pendingRefusal = nil
        close(context)
    }

    /// Starts the handshake's deadline: a client still negotiating when it passes is refused.
    func startHandshakeTimer(_ context: ChannelHandlerContext) {
        guard let limit = core.handshakeTimeout else { return }
        let ms = limit.components.seconds * 1000 + limit.components.attoseconds / 1_000_000_000_000_000
        handshakeTimer = context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(ms)) { [weak self] in
            guard let self, let context = self.context, self.phase == .clientFlags || self.phase == .options else { return }
            let said = ms % 1000 == 0 ? "\(ms / 1000) s" : "\(ms) ms"
            self.refuse(context, "no NBD handshake within \(said)")
        }
    }

    static func describe(_ address: SocketAddress?) -> String {
        guard let address else { return "a client" }
        switch address {
        case .v4, .v6:
            let ip = address.ipAddress ?? "?"
            let port = address.port.map(String.init) ?? "?"
            return address.protocol == .inet6 ? "[\(ip)]:\(port)" : "\(ip):\(port)"
        case .unixDomainSocket:
            return "a client of the unix socket"
        }
    }
}
