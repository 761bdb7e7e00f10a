import Crypto
import NIOCore
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
