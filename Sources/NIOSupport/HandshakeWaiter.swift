import Crypto
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS

/// Completes `promise` when the TLS handshake is done, or fails it with the handshake's error, or
/// with `closedError` when the server closes the connection before the handshake ends (each client
/// names that in its own error type). Put it right after the TLS handler; it removes itself once
/// the handshake is done.
public final class HandshakeWaiter: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = NIOAny
    let promise: EventLoopPromise<Void>
    let closedError: any Error

    public init(promise: EventLoopPromise<Void>, closedError: any Error) {
        self.promise = promise
        self.closedError = closedError
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            promise.succeed(())
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.fireErrorCaught(error)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        promise.fail(closedError)
        context.fireChannelInactive()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) { context.fireChannelRead(data) }
}

/// Colon-separated lowercase hex of SHA-256 over the certificate's DER form: the fingerprint PBS
/// shows and `PBS_FINGERPRINT` takes, and the form a pinned S3 endpoint names. Nil when the
/// certificate has no DER form.
public func sha256Fingerprint(of cert: NIOSSLCertificate) -> String? {
    guard let der = try? cert.toDERBytes() else { return nil }
    return SHA256.hash(data: der).map { b in
        let h = String(b, radix: 16)
        return h.count == 1 ? "0" + h : h
    }.joined(separator: ":")
}

/// A TCP connection (no Nagle) whose TLS handshake is awaited. `initialize` sets up the new
/// channel's pipeline and gets the promise to hand to a `HandshakeWaiter` (or to succeed at once
/// when the connection has no TLS). The future fails with the connect error, the handshake's
/// error, or `handshakeTimeout()` when no handshake completes within `timeout` of connecting (a
/// server that accepts and then says nothing); the channel is closed then. `timeout` bounds the
/// TCP connect too.
public func connectAwaitingHandshake(
    group: EventLoopGroup, host: String, port: Int, timeout: TimeAmount,
    handshakeTimeout: @escaping @Sendable () -> any Error,
    initialize: @escaping @Sendable (Channel, EventLoopPromise<Void>) throws -> Void
) -> EventLoopFuture<Channel> {
    let loop = group.next()
    let handshake = loop.makePromise(of: Void.self)
    let connected = ClientBootstrap(group: loop)
        .connectTimeout(timeout)
        .channelOption(.socketOption(.tcp_nodelay), value: 1)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try initialize(channel, handshake) }
        }
        .connect(host: host, port: port)
    connected.whenFailure { handshake.fail($0) }
    return connected.flatMap { ch in
        let timer = ch.eventLoop.scheduleTask(in: timeout) { handshake.fail(handshakeTimeout()) }
        return handshake.futureResult.map { _ -> Channel in
            timer.cancel()
            return ch
        }.flatMapErrorThrowing { e in
            timer.cancel()
            ch.close(promise: nil)
            throw e
        }
    }
}
