import NIOCore
import NIOPosix
import NIOSSL

/// One client: the fixed newstyle handshake, option haggling, then requests. Runs on the channel's
/// event loop; export I/O runs on the server's thread pool, several requests of a connection at
/// once (replies carry the request's cookie, so they may complete in any order).
///
/// Hostile input never allocates what the client asks for before it is checked: option data is
/// limited to ``NBDServerCore/maxOptionLength`` (longer closes the connection), reads to the
/// maximum block size (longer is an EINVAL reply), write payloads to the same (longer closes, as
/// the payload cannot be trusted to be skipped), and at most ``NBDServerCore/maxInFlight``
/// requests or ``NBDServerCore/maxInFlightBytes`` run at once (reading from the socket pauses
/// until one completes). A write blocks its pool thread for as long as its export makes it wait
/// (an encoder whose memory is used up), so a slow export stops the client: back-pressure.
///
/// An export is told when a client attaches (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`) and when that
/// client is gone with every request it sent done, and whether it ended with `NBD_CMD_DISC`.
/// Not Sendable: it lives on its channel's event loop; work on the pool comes back through
/// `NIOLoopBound` and `loop.execute`.
final class NBDConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Phase { case clientFlags, options, transmission, closing }
    let core: NBDServerCore
    var phase = Phase.clientFlags
    var input: ByteBuffer?
    var noZeroes = false
    var structured = false
    var baseAllocation = false
    var export: (any NBDExport)?
    var inFlight = 0
    var inFlightBytes = 0
    var context: ChannelHandlerContext?
    /// The export this client attached to, until it was told the client is gone.
    var attached: (any NBDExport)?
    var sentDisc = false
    var inactive = false
    /// TLS on this connection: none yet, the handshake after `NBD_OPT_STARTTLS`, or established
    /// (the client's certificate verified and its CN allowed).
    enum TLSState { case none, handshaking, established }
    var tls = TLSState.none
    /// The first certificate of the client's chain that verification refused (why, for the log).
    var refusedCertificate: NIOSSLCertificate?
    /// The client's address, for the log.
    var peer = "a client"
    /// Logged if the connection ends before transmission (a plaintext client told TLS is required).
    var pendingRefusal: String?
    var refusalLogged = false
    /// Refuses a client still negotiating when the handshake timeout passes.
    var handshakeTimer: Scheduled<Void>?

    init(core: NBDServerCore) { self.core = core }

    func channelActive(context: ChannelHandlerContext) {
        self.context = context
        core.connectionOpened()
        peer = Self.describe(context.channel.remoteAddress)
        startHandshakeTimer(context)
        var b = context.channel.allocator.buffer(capacity: 18)
        b.writeInteger(NBD.initMagic)
        b.writeInteger(NBD.optMagic)
        b.writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        context.writeAndFlush(wrapOutboundOut(b), promise: nil)
        context.read()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let pendingRefusal, !refusalLogged, phase != .transmission {
            refusalLogged = true
            core.log("\(peer): refused: \(pendingRefusal)")
        }
        handshakeTimer?.cancel()
        handshakeTimer = nil
        phase = .closing
        self.context = nil
        inactive = true
        core.connectionClosed()
        detachIfDone()
    }

    /// Tells the export its client is gone once the connection is closed and no request of it
    /// runs any more (a client may close right after `NBD_CMD_DISC`, before the replies).
    func detachIfDone() {
        guard inactive, inFlight == 0, let e = attached else { return }
        attached = nil
        e.clientDetached(sentDisc: sentDisc)
    }

    /// Whether another request may start: always when none runs, else within both limits.
    var canStartRequest: Bool {
        inFlight == 0 || (inFlight < NBDServerCore.maxInFlight && inFlightBytes < NBDServerCore.maxInFlightBytes)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if phase == .clientFlags || phase == .options { return refuse(context, negotiationFailure(error)) }
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if input == nil { input = bytes } else { input!.writeBuffer(&bytes) }
        process(context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
        readMore(context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable && phase == .transmission {
            process(context)
            context.flush()
            readMore(context)
        }
        context.fireChannelWritabilityChanged()
    }

    /// Asks the socket for more input when another request may start and the client reads its
    /// replies: a client that sends requests without reading replies stops being read, so the
    /// replies waiting for it stay within the high-water mark and the in-flight limits.
    func readMore(_ context: ChannelHandlerContext) {
        if phase != .closing && canStartRequest && context.channel.isWritable { context.read() }
    }

    /// Closes once every reply written so far has reached the socket (a close fails writes still
    /// pending).
    func closeAfterReplies(_ context: ChannelHandlerContext) {
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(channel.allocator.buffer(capacity: 0))).whenComplete { _ in channel.close(promise: nil) }
    }

    func close(_ context: ChannelHandlerContext) {
        phase = .closing
        input = nil
        context.close(promise: nil)
    }

    /// Consumes every complete message in the input.
    func process(_ context: ChannelHandlerContext) {
        while phase != .closing, var buf = input {
            let before = buf.readerIndex
            let progressed: Bool
            switch phase {
            case .clientFlags: progressed = clientFlags(context, &buf)
            case .options: progressed = option(context, &buf)
            case .transmission:
                // Replies wait in the channel beyond its high-water mark: no more requests until
                // the client has read them (channelWritabilityChanged goes on).
                guard canStartRequest, context.channel.isWritable else { return }
                progressed = request(context, &buf)
            case .closing: return
            }
            if phase == .closing { return }
            if buf.readableBytes == 0 { input = nil } else {
                if buf.readerIndex > 64 << 10 { buf.discardReadBytes() }
                input = buf
            }
            if !progressed || buf.readerIndex == before { return }
        }
    }
}
