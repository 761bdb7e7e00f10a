#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import NIOHTTP1
import NIOSSL
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
            if "\(e)".contains("WRONG_VERSION_NUMBER") {
                return .tls("the server does not speak TLS (is the endpoint http://?)")
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
