import NIOCore
import NIOHTTP1
import NIOHTTP2

/// Carries the multiplexer out of the upgrade; it is used on its channel's event loop only.
typealias MultiplexerBox = NIOLoopBound<HTTP2StreamMultiplexer>

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
            done.succeed(MultiplexerBox(mux, eventLoop: context.eventLoop))
            return context.eventLoop.makeSucceededVoidFuture()
        } catch {
            done.fail(error)
            return context.eventLoop.makeFailedFuture(error)
        }
    }
}

/// One reader session: an HTTP/2 connection on which every request is one stream.
final class PBSReaderSession: Sendable {
    let channel: Channel
    /// Touched on the channel's event loop only.
    let multiplexer: MultiplexerBox
    let authority: String

    init(channel: Channel, multiplexer: MultiplexerBox, authority: String) {
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
            let multiplexer = self.multiplexer.value
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
