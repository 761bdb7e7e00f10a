import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOSupport

/// Opens connections to the endpoint: TCP (connect timeout), TLS (system CAs, or only the pinned
/// SHA-256 fingerprint of the leaf certificate), HTTP/1.1 codec, the response handler.
struct S3Connector: Sendable {
    let endpoint: S3Endpoint
    let bucket: String
    let group: EventLoopGroup
    let tlsContext: NIOSSLContext?
    /// See `S3ResponseHandler.idleTimeout` (tests shorten it).
    var idleTimeout = S3ResponseHandler.idleTimeout

    /// Connecting gives up after this long (a host that drops SYNs); 10 s as the brief states,
    /// well above a cross-region TCP+TLS setup (~0.3 s).
    static let connectTimeout = TimeAmount.seconds(10)

    init(endpoint: S3Endpoint, bucket: String, group: EventLoopGroup) throws(S3Error) {
        self.endpoint = endpoint
        self.bucket = bucket
        self.group = group
        guard endpoint.tls else {
            tlsContext = nil
            return
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        // Pinned: the chain is not checked against CAs, nor the name; only the fingerprint counts
        // (the custom callback below). Otherwise: system CAs and the host name.
        tls.certificateVerification = endpoint.fingerprint == nil ? .fullVerification : .noHostnameVerification
        do {
            tlsContext = try NIOSSLContext(configuration: tls)
        } catch {
            throw S3Error(code: "tls", bucket: bucket, message: "cannot set up TLS: \(error)")
        }
    }

    /// A connected channel, with TLS up when the endpoint is https. Fails with an
    /// `S3TransportError` (.connect, .tls or .timeout). A certificate the system CAs refuse is
    /// named by its fingerprint (from a second handshake that only looks at it), so that the
    /// administrator can check it and pin it.
    func connect() -> EventLoopFuture<Channel> {
        let seen = SeenFingerprint()
        return open(probe: false, seen: seen).flatMapError { e in
            let loop = self.group.next()
            guard let t = e as? S3TransportError, case .tls(let why) = t, self.endpoint.fingerprint == nil,
                  why.contains("CERTIFICATE_VERIFY_FAILED") else {
                return loop.makeFailedFuture(e)
            }
            let probed = SeenFingerprint()
            return self.open(probe: true, seen: probed).flatMapThrowing { ch -> Channel in
                ch.close(promise: nil)
                throw t
            }.flatMapErrorThrowing { _ in
                guard let fp = probed.value.withLock({ $0 }) else { throw t }
                throw S3TransportError.tls("the server's certificate (SHA-256 fingerprint \(fp)) is not trusted by the "
                    + "system CAs; check the fingerprint and pin it to trust this certificate")
            }
        }
    }

    /// One connection attempt. `probe`: the handshake records the leaf certificate's fingerprint in
    /// `seen` and refuses it (nothing is sent).
    private func open(probe: Bool, seen: SeenFingerprint) -> EventLoopFuture<Channel> {
        let serverName = endpoint.serverName(bucket: bucket)
        let pinned = endpoint.fingerprint
        let context = tlsContext
        let idleTimeout = idleTimeout
        // A server that accepts and then says nothing must not hang the request.
        return connectAwaitingHandshake(
            group: group, host: endpoint.connectHost(bucket: bucket), port: endpoint.port, timeout: Self.connectTimeout,
            handshakeTimeout: { S3TransportError.timeout("no TLS handshake within \(S3ResponseHandler.seconds(Self.connectTimeout))") }
        ) { channel, handshake in
            if let context {
                let ssl: NIOSSLClientHandler
                if pinned != nil || probe {
                    ssl = try NIOSSLClientHandler(context: context, serverHostname: serverName) { certs, promise in
                        let fp = certs.first.flatMap(sha256Fingerprint(of:))
                        seen.value.withLock { $0 = fp }
                        promise.succeed(!probe && fp != nil && fp == pinned ? .certificateVerified : .failed)
                    }
                } else {
                    ssl = try NIOSSLClientHandler(context: context, serverHostname: serverName)
                }
                try channel.pipeline.syncOperations.addHandler(ssl)
                try channel.pipeline.syncOperations.addHandler(HandshakeWaiter(
                    promise: handshake,
                    closedError: S3TransportError.tls("the server closed the connection during the TLS handshake")))
            } else {
                handshake.succeed(())
            }
            try channel.pipeline.syncOperations.addHTTPClientHandlers()
            try channel.pipeline.syncOperations.addHandler(S3ResponseHandler(seen: seen, idleTimeout: idleTimeout))
        }.flatMapErrorThrowing { e in
            if let t = e as? S3TransportError { throw t }
            if e is NIOSSLError || e is BoringSSLError {
                throw S3ResponseHandler.transportError(e, sawResponse: false, seen: seen)
            }
            throw S3TransportError.connect(self.describeConnectFailure(e))
        }
    }

    /// One line for a failed connect: the endpoint and the reason.
    func describeConnectFailure(_ e: Error) -> String {
        let target = "\(endpoint.tls ? "https" : "http")://\(endpoint.connectHost(bucket: bucket)):\(endpoint.port)"
        if let c = e as? NIOConnectionError {
            if let first = c.connectionErrors.first {
                if let io = first.error as? IOError {
                    return "cannot connect to \(target): \(S3ResponseHandler.describeErrno(io.errnoCode))"
                }
                return "cannot connect to \(target): \(first.error)"
            }
            if c.dnsAAAAError != nil || c.dnsAError != nil { return "cannot resolve the host name of \(target)" }
            return "cannot connect to \(target)"
        }
        if let ch = e as? ChannelError, case .connectTimeout = ch {
            return "cannot connect to \(target): no answer within \(Self.connectTimeout.nanoseconds / 1_000_000_000) s"
        }
        if let io = e as? IOError { return "cannot connect to \(target): \(S3ResponseHandler.describeErrno(io.errnoCode))" }
        return "cannot connect to \(target): \(e)"
    }
}
