import Crypto
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS
import Synchronization

/// A response as read off the wire: status, headers, the body (for an error status, at most
/// `S3ResponseHandler.errorBodyLimit` bytes of it) and whether the connection may be reused.
struct S3HTTPResponse: Sendable {
    var status: Int
    var headers: HTTPHeaders
    var body: [UInt8]
    var keepAlive: Bool
}

/// Why a request got no response.
enum S3TransportError: Error, Sendable {
    /// Could not connect (refused, unresolvable, connect timeout): not retried.
    case connect(String)
    /// The TLS handshake failed (untrusted certificate, wrong pinned fingerprint): not retried.
    case tls(String)
    /// The connection closed or reset before the response was complete: retried on a new one.
    /// `sawResponse` is false when not a byte of the response had arrived.
    case dropped(String, sawResponse: Bool)
    /// Nothing arrived for `S3ResponseHandler.idleTimeout`: not retried.
    case timeout(String)
    /// The body is larger than the caller's limit (the Content-Length, or what arrived).
    case tooLarge(Int)
    /// The client was shut down.
    case shutdown
}

/// One request handed to a connection's handler: its head and where the response goes.
struct S3Exchange: Sendable {
    var head: HTTPRequestHead
    var limit: Int
    var promise: EventLoopPromise<S3HTTPResponse>
}

/// The fingerprint a pinned connection saw, for the error message (set on the event loop,
/// read after the failure).
final class SeenFingerprint: Sendable {
    let value = Mutex<String?>(nil)
}

/// Sends one exchange at a time (HTTP/1.1, no pipelining) and collects its response, bounded by
/// the exchange's limit; fails the exchange when the connection drops or goes silent.
final class S3ResponseHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundIn = S3Exchange
    typealias OutboundOut = HTTPClientRequestPart

    /// A request whose connection receives nothing for this long fails with "timeout" (the brief's
    /// 60 s: S3 sends the first byte of a chunk-sized GET within a second even when throttling).
    static let idleTimeout = TimeAmount.seconds(60)
    /// The part of an error response's body kept (S3 error documents are under 1 KiB; a proxy's
    /// HTML page is cut, not refused).
    static let errorBodyLimit = 64 * 1024

    private var current: S3Exchange?
    private var status = 0
    private var headers = HTTPHeaders()
    private var keepAlive = true
    private var isError = false
    private var body: [UInt8] = []
    private var sawResponse = false
    private var lastActivity = NIODeadline.now()
    private var timer: Scheduled<Void>?
    private let seen: SeenFingerprint
    private let idleTimeout: TimeAmount

    init(seen: SeenFingerprint, idleTimeout: TimeAmount = S3ResponseHandler.idleTimeout) {
        self.seen = seen
        self.idleTimeout = idleTimeout
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let ex = unwrapOutboundIn(data)
        guard current == nil else {
            ex.promise.fail(S3TransportError.dropped("a second request on a busy connection", sawResponse: false))
            promise?.fail(ChannelError.inappropriateOperationForState)
            return
        }
        current = ex
        status = 0
        headers = HTTPHeaders()
        keepAlive = true
        isError = false
        body = []
        sawResponse = false
        lastActivity = .now()
        armTimer(context: context, at: lastActivity + idleTimeout)
        context.write(wrapOutboundOut(.head(ex.head)), promise: nil)
        let written = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: written)
        written.futureResult.assumeIsolated().whenComplete { result in
            promise?.completeWith(result)
            if case .failure(let e) = result {
                self.fail(context: context, Self.transportError(e, sawResponse: false, seen: self.seen))
            }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let ex = current else { return }
        lastActivity = .now()
        switch unwrapInboundIn(data) {
        case .head(let h):
            sawResponse = true
            status = Int(h.status.code)
            headers = h.headers
            keepAlive = h.isKeepAlive
            isError = !(200..<300).contains(status)
            if let cl = headers.first(name: "content-length").flatMap({ Int($0) }) {
                if !isError, cl > ex.limit, ex.head.method != .HEAD {
                    fail(context: context, .tooLarge(cl))
                    return
                }
                body.reserveCapacity(min(cl, isError ? Self.errorBodyLimit : ex.limit))
            }
        case .body(let buf):
            if isError {
                let room = Self.errorBodyLimit - body.count
                if room > 0 { body.append(contentsOf: buf.readableBytesView.prefix(room)) }
            } else if body.count + buf.readableBytes > ex.limit {
                fail(context: context, .tooLarge(body.count + buf.readableBytes))
            } else {
                body.append(contentsOf: buf.readableBytesView)
            }
        case .end:
            current = nil
            timer?.cancel()
            timer = nil
            let response = S3HTTPResponse(status: status, headers: headers, body: body, keepAlive: keepAlive)
            body = []
            if !keepAlive { context.close(promise: nil) }
            ex.promise.succeed(response)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        fail(context: context, .dropped("the server closed the connection", sawResponse: sawResponse))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        fail(context: context, Self.transportError(error, sawResponse: sawResponse, seen: seen))
        context.close(promise: nil)
    }

    /// Fails the exchange in progress (once) and closes the connection.
    private func fail(context: ChannelHandlerContext, _ e: S3TransportError) {
        timer?.cancel()
        timer = nil
        guard let ex = current else { return }
        current = nil
        body = []
        context.close(promise: nil)
        ex.promise.fail(e)
    }

    private func armTimer(context: ChannelHandlerContext, at deadline: NIODeadline) {
        timer?.cancel()
        timer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in
            guard current != nil else { return }
            let due = lastActivity + idleTimeout
            if due <= .now() {
                fail(context: context, .timeout("no response for \(Self.seconds(idleTimeout))"))
            } else {
                armTimer(context: context, at: due)
            }
        }
    }

    static func transportError(_ e: Error, sawResponse: Bool, seen: SeenFingerprint) -> S3TransportError {
        if let t = e as? S3TransportError { return t }
        if e is NIOSSLError || e is BoringSSLError {
            if let fp = seen.value.withLock({ $0 }) {
                return .tls("the server's certificate has the fingerprint \(fp), not the pinned one")
            }
            return .tls("the TLS handshake failed: \(e)")
        }
        if let io = e as? IOError { return .dropped(describeErrno(io.errnoCode), sawResponse: sawResponse) }
        return .dropped("\(e)", sawResponse: sawResponse)
    }

    static func describeErrno(_ code: Int32) -> String { String(cString: strerror(code)) }

    /// "60 s", or "300 ms" below a second.
    static func seconds(_ t: TimeAmount) -> String {
        t.nanoseconds >= 1_000_000_000 ? "\(t.nanoseconds / 1_000_000_000) s" : "\(t.nanoseconds / 1_000_000) ms"
    }
}

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

    /// Colon-separated lowercase hex of SHA-256 over the certificate's DER form (the form PBS uses).
    static func fingerprint(of cert: NIOSSLCertificate) -> String? {
        guard let der = try? cert.toDERBytes() else { return nil }
        return SHA256.hash(data: der).map { b in
            let h = String(b, radix: 16)
            return h.count == 1 ? "0" + h : h
        }.joined(separator: ":")
    }

    /// A connected channel, with TLS up when the endpoint is https. Fails with an
    /// `S3TransportError` (.connect, .tls or .timeout).
    func connect() -> EventLoopFuture<Channel> {
        let serverName = endpoint.serverName(bucket: bucket)
        let pinned = endpoint.fingerprint
        let context = tlsContext
        let idleTimeout = idleTimeout
        let seen = SeenFingerprint()
        let loop = group.next()
        let handshake = loop.makePromise(of: Void.self)
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(Self.connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let context {
                        let ssl: NIOSSLClientHandler
                        if let pinned {
                            ssl = try NIOSSLClientHandler(context: context, serverHostname: serverName) { certs, promise in
                                let fp = certs.first.flatMap(Self.fingerprint(of:))
                                seen.value.withLock { $0 = fp }
                                promise.succeed(fp != nil && fp == pinned ? .certificateVerified : .failed)
                            }
                        } else {
                            ssl = try NIOSSLClientHandler(context: context, serverHostname: serverName)
                        }
                        try channel.pipeline.syncOperations.addHandler(ssl)
                        try channel.pipeline.syncOperations.addHandler(HandshakeWaiter(promise: handshake))
                    } else {
                        handshake.succeed(())
                    }
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(S3ResponseHandler(seen: seen, idleTimeout: idleTimeout))
                }
            }
        let connected = bootstrap.connect(host: endpoint.connectHost(bucket: bucket), port: endpoint.port)
        connected.whenFailure { handshake.fail($0) }
        return connected.flatMap { ch in
            // A server that accepts and then says nothing must not hang the request.
            let timer = ch.eventLoop.scheduleTask(in: Self.connectTimeout) {
                handshake.fail(S3TransportError.timeout("no TLS handshake within \(Self.connectTimeout.nanoseconds / 1_000_000_000) s"))
            }
            return handshake.futureResult.map { _ -> Channel in
                timer.cancel()
                return ch
            }.flatMapErrorThrowing { e in
                timer.cancel()
                ch.close(promise: nil)
                throw e
            }
        }.flatMapErrorThrowing { e in
            if let t = e as? S3TransportError { throw t }
            if e is NIOSSLError || e is BoringSSLError {
                throw S3ResponseHandler.transportError(e, sawResponse: false, seen: seen)
            }
            throw S3TransportError.connect(describeConnectFailure(e))
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

/// Completes when the TLS handshake is done, or fails with the handshake's error.
final class HandshakeWaiter: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    let promise: EventLoopPromise<Void>
    init(promise: EventLoopPromise<Void>) { self.promise = promise }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            promise.succeed(())
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(S3TransportError.tls("the server closed the connection during the TLS handshake"))
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) { context.fireChannelRead(data) }
}
