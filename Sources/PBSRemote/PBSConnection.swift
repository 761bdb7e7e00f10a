import BackupSources
import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOPosix
import NIOSSL
import NIOTLS

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
final class PBSConnector: @unchecked Sendable {
    let repository: PBSRepository
    let expectedFingerprint: String?
    let group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    private let lock = NSLock()
    private var trust: PBSTrust?
    /// Connecting gives up after this long (a server that does not answer SYN).
    static let connectTimeout = TimeAmount.seconds(15)

    init(repository: PBSRepository, fingerprint: String?) {
        self.repository = repository
        expectedFingerprint = fingerprint
    }

    private func error(_ detail: String, errno: Int32? = nil) -> SourceError {
        SourceError(.network, path: repository.server, detail, errno: errno)
    }

    /// Colon-separated lowercase hex of SHA-256 over the DER form.
    static func fingerprint(of cert: NIOSSLCertificate) -> String? {
        guard let der = try? cert.toDERBytes() else { return nil }
        return SHA256.hash(data: der).map { String(format: "%02x", $0) }.joined(separator: ":")
    }

    /// A connected channel with TLS up, then `configure` run on it (on its event loop).
    func connect(_ configure: @escaping @Sendable (Channel) throws -> Void) throws(SourceError) -> Channel {
        let order: [PBSTrust]
        if let t = lock.withLock({ trust }) {
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
                lock.withLock { trust = mode }
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
        let handshake = group.next().makePromise(of: Void.self)
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(Self.connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handler: NIOSSLClientHandler
                    switch mode {
                    case .systemRoots:
                        handler = try NIOSSLClientHandler(context: context, serverHostname: hostname)
                    case .fingerprint:
                        handler = try NIOSSLClientHandler(context: context, serverHostname: hostname) { certs, promise in
                            let fp = certs.first.flatMap(Self.fingerprint(of:))
                            seenBox.withLockedValue { $0 = fp }
                            promise.succeed(fp != nil && fp == expected ? .certificateVerified : .failed)
                        }
                    }
                    try channel.pipeline.syncOperations.addHandler(handler)
                    try channel.pipeline.syncOperations.addHandler(HandshakeWaiter(promise: handshake))
                    try configure(channel)
                }
            }
        let ch: Channel
        do {
            ch = try bootstrap.connect(host: repository.connectHost, port: repository.port).wait()
        } catch {
            handshake.fail(error)
            throw error
        }
        // A server that accepts and then says nothing must not hang the restore.
        ch.eventLoop.scheduleTask(in: Self.connectTimeout) {
            handshake.fail(PBSTransportError.connectionLost("no TLS handshake within \(Self.connectTimeout.nanoseconds / 1_000_000_000) s"))
        }
        do {
            try handshake.futureResult.wait()
        } catch {
            ch.close(promise: nil)
            throw error
        }
        return ch
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

    // MARK: HTTP/1.1 one-shot requests

    /// One request on a fresh connection (login, listings); the body is at most `limit` bytes.
    func request(method: HTTPMethod, target: String, headers extra: [(String, String)], body: [UInt8]? = nil,
                 limit: Int = 64 << 20) throws(SourceError) -> PBSResponse {
        let done = group.next().makePromise(of: PBSResponse.self)
        let ch: Channel
        do {
            ch = try connect { channel in
                try channel.pipeline.syncOperations.addHTTPClientHandlers()
                try channel.pipeline.syncOperations.addHandler(HTTP1Collector(promise: done, limit: limit))
            }
        } catch {
            done.fail(error)
            throw error
        }
        var h = HTTPRequestHead(version: .http1_1, method: method, uri: target)
        h.headers.add(name: "Host", value: repository.server)
        h.headers.add(name: "User-Agent", value: "qcowpress")
        h.headers.add(name: "Connection", value: "close")
        for (k, v) in extra { h.headers.add(name: k, value: v) }
        if let body { h.headers.add(name: "Content-Length", value: String(body.count)) }
        let head = h
        let bodyBuffer = body.map { ByteBuffer(bytes: $0) }
        ch.eventLoop.execute {
            ch.write(HTTPClientRequestPart.head(head), promise: nil)
            if let bodyBuffer { ch.write(HTTPClientRequestPart.body(.byteBuffer(bodyBuffer)), promise: nil) }
            ch.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        }
        defer { ch.close(promise: nil) }
        do { return try done.futureResult.wait() } catch {
            if case PBSTransportError.tooLarge(let n) = error { throw self.error("\(target): the answer is larger than \(n) bytes") }
            throw self.error("\(target): \(Self.describe(error))")
        }
    }

    // MARK: reader sessions

    /// Opens a reader session: `GET target` upgraded to `proxmox-backup-reader-protocol-v1`, then
    /// HTTP/2 on the same connection. A refusal is returned as the server's response.
    func openReader(target: String, headers extra: [(String, String)]) throws(SourceError) -> ReaderOpening {
        let upgraded = group.next().makePromise(of: MultiplexerBox.self)
        let refused = group.next().makePromise(of: PBSResponse.self)
        let ch: Channel
        do {
            ch = try connect { channel in
                let upgrader = ReaderUpgrader(done: upgraded)
                try channel.pipeline.syncOperations.addHTTPClientHandlers(
                    leftOverBytesStrategy: .forwardBytes,
                    withClientUpgrade: (upgraders: [upgrader], completionHandler: { _ in }))
                try channel.pipeline.syncOperations.addHandler(HTTP1Collector(promise: refused, limit: 1 << 20))
            }
        } catch {
            upgraded.fail(error)
            refused.fail(error)
            throw error
        }
        var h = HTTPRequestHead(version: .http1_1, method: .GET, uri: target)
        h.headers.add(name: "Host", value: repository.server)
        h.headers.add(name: "User-Agent", value: "qcowpress")
        for (k, v) in extra { h.headers.add(name: k, value: v) }
        let head = h
        ch.eventLoop.execute {
            ch.write(HTTPClientRequestPart.head(head), promise: nil)
            ch.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        }
        // Whichever comes first: the upgrade, or a plain answer (an error status).
        let first = ch.eventLoop.makePromise(of: ReaderOpening.self)
        let authority = repository.server
        upgraded.futureResult.whenComplete { r in
            switch r {
            case .success(let m): first.succeed(.session(PBSReaderSession(channel: ch, multiplexer: m.multiplexer, authority: authority)))
            case .failure(let e): first.fail(e)
            }
        }
        refused.futureResult.whenComplete { r in
            switch r {
            case .success(let resp): first.succeed(.refused(resp))
            case .failure(let e): first.fail(e)
            }
        }
        defer {
            // Whichever did not happen never will: complete it (a no-op for the one that did).
            upgraded.fail(PBSTransportError.connectionLost("superseded"))
            refused.fail(PBSTransportError.connectionLost("superseded"))
        }
        do {
            let r = try first.futureResult.wait()
            if case .refused = r { ch.close(promise: nil) }
            return r
        } catch {
            ch.close(promise: nil)
            throw self.error("reader upgrade: \(Self.describe(error))")
        }
    }
}

/// A reader session, or the server's refusal (an error status and its message).
enum ReaderOpening: Sendable {
    case session(PBSReaderSession)
    case refused(PBSResponse)
}

/// Carries the multiplexer (used on its event loop only) out of the upgrade.
final class MultiplexerBox: @unchecked Sendable {
    let multiplexer: HTTP2StreamMultiplexer
    init(_ m: HTTP2StreamMultiplexer) { multiplexer = m }
}

/// Completes when the TLS handshake is done (or fails with the handshake's error).
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
        promise.fail(PBSTransportError.connectionLost("the server closed the connection during the TLS handshake"))
        context.fireChannelInactive()
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { context.fireChannelRead(data) }
}

/// Collects one HTTP/1.1 response (head, body up to `limit`, end).
final class HTTP1Collector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart
    let promise: EventLoopPromise<PBSResponse>
    let limit: Int
    var status = 0
    var body = ByteBuffer()
    init(promise: EventLoopPromise<PBSResponse>, limit: Int) {
        self.promise = promise
        self.limit = limit
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): status = Int(h.status.code)
        case .body(var b):
            if body.readableBytes + b.readableBytes > limit {
                promise.fail(PBSTransportError.tooLarge(limit))
                context.close(promise: nil)
                return
            }
            body.writeBuffer(&b)
        case .end: promise.succeed(PBSResponse(status: status, body: body))
        }
    }
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(PBSTransportError.connectionLost("the server closed the connection"))
        context.fireChannelInactive()
    }
}

/// The HTTP/2 settings of a reader session. proxmox-backup-client asks for windows of
/// (1 << 31) - 2 (http_client.rs start_h2_connection) so the server never waits for window
/// updates; nio-http2 1.46 overflows adding to a window that large, so 256 MiB here: twice what 32
/// streams of 4 MiB chunks hold at once. Memory stays bounded by the requests in flight, whose
/// bodies are read as they come. Frames up to 4 MiB, as that client.
enum PBSHTTP2 {
    static let window = 256 << 20
    static let maxFrame = 4 << 20
    static var settings: [HTTP2Setting] {
        [HTTP2Setting(parameter: .maxConcurrentStreams, value: 1000),
         HTTP2Setting(parameter: .initialWindowSize, value: window),
         HTTP2Setting(parameter: .maxFrameSize, value: maxFrame)]
    }
}

/// The client side of the `proxmox-backup-reader-protocol-v1` upgrade: on 101 the connection
/// speaks HTTP/2 (client mode).
final class ReaderUpgrader: NIOHTTPClientProtocolUpgrader, Sendable {
    static let protocolName = "proxmox-backup-reader-protocol-v1"
    let done: EventLoopPromise<MultiplexerBox>
    init(done: EventLoopPromise<MultiplexerBox>) { self.done = done }
    var supportedProtocol: String { Self.protocolName }
    var requiredUpgradeHeaders: [String] { [] }
    func addCustom(upgradeRequestHeaders: inout HTTPHeaders) {}
    func shouldAllowUpgrade(upgradeResponse: HTTPResponseHead) -> Bool { true }
    func upgrade(context: ChannelHandlerContext, upgradeResponse: HTTPResponseHead) -> EventLoopFuture<Void> {
        do {
            let sync = context.pipeline.syncOperations
            // The collector of refusals goes first: from here on the bytes are HTTP/2 frames.
            if let collector = try? sync.context(handlerType: HTTP1Collector.self) {
                sync.removeHandler(context: collector, promise: nil)
            }
            let h2 = NIOHTTP2Handler(mode: .client, initialSettings: PBSHTTP2.settings)
            let mux = HTTP2StreamMultiplexer(mode: .client, channel: context.channel, targetWindowSize: PBSHTTP2.window,
                                             outboundBufferSizeHighWatermark: 8192, outboundBufferSizeLowWatermark: 4096,
                                             inboundStreamInitializer: nil)
            try sync.addHandlers([h2, mux])
            done.succeed(MultiplexerBox(mux))
            return context.eventLoop.makeSucceededVoidFuture()
        } catch {
            done.fail(error)
            return context.eventLoop.makeFailedFuture(error)
        }
    }
}

/// One reader session: an HTTP/2 connection on which every request is one stream.
final class PBSReaderSession: @unchecked Sendable {
    let channel: Channel
    let multiplexer: HTTP2StreamMultiplexer
    let authority: String

    init(channel: Channel, multiplexer: HTTP2StreamMultiplexer, authority: String) {
        self.channel = channel
        self.multiplexer = multiplexer
        self.authority = authority
    }

    var isActive: Bool { channel.isActive }

    /// How long one request may go unanswered.
    static let requestTimeout = TimeAmount.seconds(300)

    /// `GET /path?query` on a new stream; the body is at most `limit` bytes.
    func get(_ target: String, limit: Int) -> EventLoopFuture<PBSResponse> {
        let promise = channel.eventLoop.makePromise(of: PBSResponse.self)
        guard channel.isActive else {
            promise.fail(PBSTransportError.connectionLost("the connection is closed"))
            return promise.futureResult
        }
        var head = HTTPRequestHead(version: .http2, method: .GET, uri: target)
        head.headers.add(name: "host", value: authority)
        let request = head
        channel.eventLoop.execute {
            let multiplexer = self.multiplexer
            let streamPromise = promise.futureResult.eventLoop.makePromise(of: Channel.self)
            multiplexer.createStreamChannel(promise: streamPromise) { stream in
                stream.eventLoop.makeCompletedFuture {
                    try stream.pipeline.syncOperations.addHandler(HTTP2FramePayloadToHTTP1ClientCodec(httpProtocol: .https))
                    try stream.pipeline.syncOperations.addHandler(HTTP1Collector(promise: promise, limit: limit))
                }
            }
            streamPromise.futureResult.whenComplete { r in
                switch r {
                case .success(let stream):
                    stream.write(HTTPClientRequestPart.head(request), promise: nil)
                    stream.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
                case .failure(let e):
                    promise.fail(PBSTransportError.connectionLost("cannot open a stream: \(e)"))
                }
            }
        }
        // A server that stops answering (the connection still up) must not hang the restore: the
        // connection is closed, which makes the reader reconnect. 32 requests of 4 MiB share the
        // link: at 1 MB/s the last answer of a full window arrives after about 130 s.
        let channel = self.channel
        let timer = channel.eventLoop.scheduleTask(in: Self.requestTimeout) {
            promise.fail(PBSTransportError.connectionLost("no answer to \(target) within \(Self.requestTimeout.nanoseconds / 1_000_000_000) s"))
            channel.close(promise: nil)
        }
        promise.futureResult.whenComplete { _ in timer.cancel() }
        return promise.futureResult.flatMapErrorThrowing { e in
            if e is PBSTransportError { throw e }
            throw PBSTransportError.connectionLost("\(e)")
        }
    }

    func close() { channel.close(promise: nil) }
}
