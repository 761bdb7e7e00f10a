import NIOCore
import NIOPosix
import Synchronization

/// A raw HTTP/1.1 server on 127.0.0.1 for transport tests: each request (head only; S3 reads
/// have no body) gets the bytes `script` returns for it, then the connection stays open or is
/// closed. Counts connections and requests.
final class StubServer: Sendable {
    enum Reply: Sendable {
        /// Sent as is; the connection is closed afterwards when `close`.
        case raw(String, close: Bool)
        /// Nothing is sent; the connection is closed at once.
        case hangUp
    }

    let port: Int
    private let channel: Channel
    private final class Counts: Sendable {
        let m = Mutex<(connections: Int, requests: [String])>((0, []))
    }
    private let counts = Counts()

    var connections: Int { counts.m.withLock { $0.connections } }
    var requests: [String] { counts.m.withLock { $0.requests } }

    init(script: @escaping @Sendable (_ index: Int, _ request: String) -> Reply) throws {
        let counts = self.counts
        channel = try ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                counts.m.withLock { $0.connections += 1 }
                return ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(Handler { request in
                        let index = counts.m.withLock { c in
                            c.requests.append(request)
                            return c.requests.count - 1
                        }
                        return script(index, request)
                    })
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        port = channel.localAddress?.port ?? 0
    }

    /// A response with `status`, the body, and Content-Length.
    static func response(_ status: Int, _ reason: String, body: String, headers: [String] = []) -> String {
        var s = "HTTP/1.1 \(status) \(reason)\r\nContent-Length: \(body.utf8.count)\r\n"
        for h in headers { s += h + "\r\n" }
        return s + "\r\n" + body
    }

    static func errorDocument(_ code: String, _ message: String) -> String {
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>\(code)</Code><Message>\(message)</Message></Error>"
    }

    func stop() { try? channel.close().wait() }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let reply: @Sendable (String) -> Reply
        var pending = ""
        init(reply: @escaping @Sendable (String) -> Reply) { self.reply = reply }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var buf = unwrapInboundIn(data)
            pending += buf.readString(length: buf.readableBytes) ?? ""
            while let end = pending.range(of: "\r\n\r\n") {
                let request = String(pending[..<end.lowerBound])
                pending = String(pending[end.upperBound...])
                switch reply(request) {
                case .hangUp:
                    context.close(promise: nil)
                    return
                case .raw(let text, let close):
                    let out = context.channel.allocator.buffer(string: text)
                    if close {
                        context.writeAndFlush(wrapOutboundOut(out)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
                        return
                    }
                    context.writeAndFlush(wrapOutboundOut(out), promise: nil)
                }
            }
        }
    }
}
