import BackupSources
import Foundation
import NIOCore
import NIOHTTP1

/// What is asked on a connection: one-shot HTTP/1.1 requests and the opening of reader sessions.
extension PBSConnector {
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
            case .success(let m): first.succeed(.session(PBSReaderSession(channel: ch, multiplexer: m, authority: authority)))
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
