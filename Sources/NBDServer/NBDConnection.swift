import NIOCore
import NIOPosix

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
final class NBDConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Phase { case clientFlags, options, transmission, closing }
    let core: NBDServerCore
    private var phase = Phase.clientFlags
    private var input: ByteBuffer?
    private var noZeroes = false
    private var structured = false
    private var baseAllocation = false
    private var export: (any NBDExport)?
    private var inFlight = 0
    private var inFlightBytes = 0
    private var context: ChannelHandlerContext?
    /// The export this client attached to, until it was told the client is gone.
    private var attached: (any NBDExport)?
    private var sentDisc = false
    private var inactive = false

    init(core: NBDServerCore) { self.core = core }

    func channelActive(context: ChannelHandlerContext) {
        self.context = context
        core.connectionOpened()
        var b = context.channel.allocator.buffer(capacity: 18)
        b.writeInteger(NBD.initMagic)
        b.writeInteger(NBD.optMagic)
        b.writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        context.writeAndFlush(wrapOutboundOut(b), promise: nil)
        context.read()
    }

    func channelInactive(context: ChannelHandlerContext) {
        phase = .closing
        self.context = nil
        inactive = true
        core.connectionClosed()
        detachIfDone()
    }

    /// Tells the export its client is gone once the connection is closed and no request of it
    /// runs any more (a client may close right after `NBD_CMD_DISC`, before the replies).
    private func detachIfDone() {
        guard inactive, inFlight == 0, let e = attached else { return }
        attached = nil
        e.clientDetached(sentDisc: sentDisc)
    }

    /// Whether another request may start: always when none runs, else within both limits.
    private var canStartRequest: Bool {
        inFlight == 0 || (inFlight < NBDServerCore.maxInFlight && inFlightBytes < NBDServerCore.maxInFlightBytes)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
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
    private func readMore(_ context: ChannelHandlerContext) {
        if phase != .closing && canStartRequest && context.channel.isWritable { context.read() }
    }

    /// Closes once every reply written so far has reached the socket (a close fails writes still
    /// pending).
    private func closeAfterReplies(_ context: ChannelHandlerContext) {
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(channel.allocator.buffer(capacity: 0))).whenComplete { _ in channel.close(promise: nil) }
    }

    private func close(_ context: ChannelHandlerContext) {
        phase = .closing
        input = nil
        context.close(promise: nil)
    }

    /// Consumes every complete message in the input.
    private func process(_ context: ChannelHandlerContext) {
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

    // MARK: - negotiation

    private func clientFlags(_ context: ChannelHandlerContext, _ buf: inout ByteBuffer) -> Bool {
        guard let flags = buf.readInteger(as: UInt32.self) else { return false }
        guard flags & NBD.clientFlagFixedNewstyle != 0, flags & ~(NBD.clientFlagFixedNewstyle | NBD.clientFlagNoZeroes) == 0 else {
            close(context)
            return false
        }
        noZeroes = flags & NBD.clientFlagNoZeroes != 0
        phase = .options
        return true
    }

    private func option(_ context: ChannelHandlerContext, _ buf: inout ByteBuffer) -> Bool {
        guard buf.readableBytes >= 16 else { return false }
        let start = buf.readerIndex
        guard buf.getInteger(at: start, as: UInt64.self) == NBD.optMagic,
              let opt = buf.getInteger(at: start + 8, as: UInt32.self),
              let length = buf.getInteger(at: start + 12, as: UInt32.self) else {
            close(context)
            return false
        }
        guard length <= NBDServerCore.maxOptionLength else {
            // Not read, not allocated: the connection ends.
            close(context)
            return false
        }
        guard buf.readableBytes >= 16 + Int(length) else { return false }
        buf.moveReaderIndex(forwardBy: 16)
        var data = buf.readSlice(length: Int(length))!
        handleOption(context, opt, &data)
        return true
    }

    private func reply(_ context: ChannelHandlerContext, _ opt: UInt32, _ type: NBD.OptionReply, _ body: (inout ByteBuffer) -> Void = { _ in }) {
        var payload = context.channel.allocator.buffer(capacity: 64)
        body(&payload)
        var b = context.channel.allocator.buffer(capacity: 20 + payload.readableBytes)
        b.writeInteger(NBD.optReplyMagic)
        b.writeInteger(opt)
        b.writeInteger(type.rawValue)
        b.writeInteger(UInt32(payload.readableBytes))
        b.writeBuffer(&payload)
        context.write(wrapOutboundOut(b), promise: nil)
    }

    private func replyError(_ context: ChannelHandlerContext, _ opt: UInt32, _ type: NBD.OptionReply, _ message: String) {
        reply(context, opt, type) { $0.writeString(message) }
    }

    private func lookup(_ name: String) -> (any NBDExport)? {
        if let e = core.export(named: name) { return e }
        // The empty name is the default export when there is only one.
        let offered = core.offered
        if name.isEmpty && offered.count == 1 { return core.export(named: offered[0]) }
        return nil
    }

    private func transmissionFlags(_ e: any NBDExport) -> UInt16 {
        var f = NBD.hasFlags
        if e.allowsMultipleConnections { f |= NBD.canMultiConn }
        if e.isReadOnly { f |= NBD.readOnly } else { f |= NBD.sendFlush | NBD.sendWriteZeroes | NBD.sendTrim }
        return f
    }

    private func handleOption(_ context: ChannelHandlerContext, _ opt: UInt32, _ data: inout ByteBuffer) {
        switch NBD.Option(rawValue: opt) {
        case .exportName:
            let name = data.readString(length: data.readableBytes) ?? ""
            guard let e = lookup(name) else {
                close(context)
                return
            }
            do throws(NBDError) { try e.clientAttached() } catch {
                close(context)
                return
            }
            attached = e
            var b = context.channel.allocator.buffer(capacity: 134)
            b.writeInteger(e.size)
            b.writeInteger(transmissionFlags(e))
            if !noZeroes { b.writeRepeatingByte(0, count: 124) }
            context.writeAndFlush(wrapOutboundOut(b), promise: nil)
            export = e
            phase = .transmission
        case .abort:
            reply(context, opt, .ack)
            context.flush()
            close(context)
        case .list:
            guard data.readableBytes == 0 else { return replyError(context, opt, .errInvalid, "NBD_OPT_LIST takes no data") }
            for name in core.offered {
                reply(context, opt, .server) { b in
                    b.writeInteger(UInt32(name.utf8.count))
                    b.writeString(name)
                }
            }
            reply(context, opt, .ack)
        case .startTLS:
            replyError(context, opt, .errUnsupported, "TLS is not offered")
        case .info, .go:
            guard let nameLength = data.readInteger(as: UInt32.self), Int(nameLength) <= data.readableBytes,
                  let name = data.readString(length: Int(nameLength)), let count = data.readInteger(as: UInt16.self),
                  data.readableBytes == Int(count) * 2 else {
                return replyError(context, opt, .errInvalid, "malformed NBD_OPT_INFO/GO")
            }
            guard let e = lookup(name) else { return replyError(context, opt, .errUnknown, "no export named '\(name)'") }
            let go = NBD.Option(rawValue: opt) == .go
            if go {
                do throws(NBDError) { try e.clientAttached() } catch {
                    return replyError(context, opt, .errShutdown, error.message)
                }
                attached = e
            }
            reply(context, opt, .info) { b in
                b.writeInteger(NBD.infoExport)
                b.writeInteger(e.size)
                b.writeInteger(transmissionFlags(e))
            }
            // Block sizes (sent unasked too: clients that do not ask may ignore them).
            reply(context, opt, .info) { b in
                b.writeInteger(NBD.infoBlockSize)
                b.writeInteger(UInt32(1))
                b.writeInteger(UInt32(e.preferredBlockSize))
                b.writeInteger(UInt32(NBDServerCore.maxRequest))
            }
            reply(context, opt, .ack)
            if go {
                export = e
                phase = .transmission
            }
        case .structuredReply:
            guard data.readableBytes == 0 else { return replyError(context, opt, .errInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data") }
            structured = true
            reply(context, opt, .ack)
        case .listMetaContext, .setMetaContext:
            let set = NBD.Option(rawValue: opt) == .setMetaContext
            if set && !structured { return replyError(context, opt, .errInvalid, "structured replies first") }
            guard let nameLength = data.readInteger(as: UInt32.self), Int(nameLength) <= data.readableBytes,
                  let name = data.readString(length: Int(nameLength)), let count = data.readInteger(as: UInt32.self),
                  Int(count) <= data.readableBytes / 4 else {
                return replyError(context, opt, .errInvalid, "malformed meta context request")
            }
            var queries: [String] = []
            for _ in 0..<count {
                guard let n = data.readInteger(as: UInt32.self), Int(n) <= data.readableBytes, let q = data.readString(length: Int(n)) else {
                    return replyError(context, opt, .errInvalid, "malformed meta context query")
                }
                queries.append(q)
            }
            guard data.readableBytes == 0 else { return replyError(context, opt, .errInvalid, "trailing bytes in meta context request") }
            guard lookup(name) != nil else { return replyError(context, opt, .errUnknown, "no export named '\(name)'") }
            let match = queries.isEmpty ? !set : queries.contains { $0 == NBD.baseAllocation || (!set && $0 == "base:") }
            if match {
                reply(context, opt, .metaContext) { b in
                    b.writeInteger(NBD.baseAllocationID)
                    b.writeString(NBD.baseAllocation)
                }
            }
            if set { baseAllocation = match }
            reply(context, opt, .ack)
        case nil:
            replyError(context, opt, .errUnsupported, "option \(opt) is not supported")
        }
        context.flush()
    }

    // MARK: - transmission

    private func request(_ context: ChannelHandlerContext, _ buf: inout ByteBuffer) -> Bool {
        guard buf.readableBytes >= 28 else { return false }
        let s = buf.readerIndex
        guard buf.getInteger(at: s, as: UInt32.self) == NBD.requestMagic,
              let flags = buf.getInteger(at: s + 4, as: UInt16.self),
              let type = buf.getInteger(at: s + 6, as: UInt16.self),
              let cookie = buf.getInteger(at: s + 8, as: UInt64.self),
              let offset = buf.getInteger(at: s + 16, as: UInt64.self),
              let length = buf.getInteger(at: s + 24, as: UInt32.self),
              let export else {
            close(context)
            return false
        }
        let command = NBD.Command(rawValue: type)
        var payload: ByteBuffer? = nil
        if command == .write {
            guard Int(length) <= NBDServerCore.maxRequest else {
                close(context)  // a payload this large is not read
                return false
            }
            guard buf.readableBytes >= 28 + Int(length) else { return false }
            buf.moveReaderIndex(forwardBy: 28)
            payload = buf.readSlice(length: Int(length))
        } else {
            buf.moveReaderIndex(forwardBy: 28)
        }
        core.countRequest()
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        let inRange = !overflow && end <= export.size
        switch command {
        case .disc:
            sentDisc = true
            phase = .closing
            input = nil
            if inFlight == 0 { closeAfterReplies(context) }
            return false
        case .read:
            guard inRange else { return error(context, cookie, NBD.EINVAL, "read beyond the end of the export") }
            guard Int(length) <= NBDServerCore.maxRequest else { return error(context, cookie, NBD.EINVAL, "read longer than \(NBDServerCore.maxRequest) bytes") }
            let structured = self.structured
            if let data = export.readNow(at: offset, count: Int(length)) {
                // At hand (cached): answered here, without the pool's hand-off and wake-ups.
                context.write(wrapOutboundOut(Self.readHeader(cookie, offset, length, structured: structured)), promise: nil)
                context.write(wrapOutboundOut(data), promise: nil)
                return true
            }
            // Not at hand yet: the export hands it over when it has it (a load to wait for costs no
            // pool thread), or the pool reads it.
            beginRequest(bytes: Int(length))
            let loop = context.eventLoop
            let core = self.core
            core.handOverStarted()
            let accepted = export.read(at: offset, count: Int(length)) { result in
                let reply = result.map { Reply(Self.readHeader(cookie, offset, length, structured: structured), $0) }
                loop.execute { self.complete(cookie, bytes: Int(length), reply, structured: structured) }
                core.handOverEnded()
            }
            if accepted { return true }
            core.handOverEnded()
            endRequest(bytes: Int(length))
            run(context, cookie, bytes: Int(length)) { () throws(NBDError) -> Reply in
                let head = Self.readHeader(cookie, offset, length, structured: structured)
                if let data = try export.readBuffer(at: offset, count: Int(length)) { return Reply(head, data) }
                var b = head
                var failure: NBDError?
                b.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(length)) { p in
                    do throws(NBDError) {
                        try export.read(at: offset, count: Int(length), into: UnsafeMutableRawBufferPointer(rebasing: p[0..<Int(length)]))
                    } catch {
                        failure = error
                    }
                    return Int(length)
                }
                if let failure { throw failure }
                return Reply(b)
            }
        case .blockStatus:
            guard structured && baseAllocation else { return error(context, cookie, NBD.EINVAL, "block status needs structured replies and base:allocation") }
            guard inRange, length > 0 else { return error(context, cookie, NBD.EINVAL, "block status beyond the end of the export") }
            let one = flags & NBD.cmdFlagReqOne != 0
            run(context, cookie) { () throws(NBDError) -> Reply in
                var extents = try export.blockStatus(at: offset, length: UInt64(length))
                if one { extents = Array(extents.prefix(1)) }
                var b = Self.header(cookie, type: NBD.replyBlockStatus, length: UInt32(4 + 8 * extents.count),
                                    structured: true, capacity: 24 + 8 * extents.count)
                b.writeInteger(NBD.baseAllocationID)
                var left = UInt64(length)
                for x in extents where left > 0 {
                    let n = min(x.length, left)
                    b.writeInteger(UInt32(n))
                    b.writeInteger(x.flags)
                    left -= n
                }
                return Reply(b)
            }
        case .write:
            guard !export.isReadOnly else { return error(context, cookie, NBD.EPERM, "read-only export") }
            guard inRange else { return error(context, cookie, NBD.ENOSPC, "write beyond the end of the export") }
            let data = payload!
            run(context, cookie, bytes: Int(length)) { () throws(NBDError) -> Reply in
                try data.withUnsafeReadableBytes { (p) throws(NBDError) in try export.write(at: offset, p) }
                return Reply(Self.done(cookie, structured: self.structured))
            }
        case .writeZeroes, .trim:
            guard !export.isReadOnly else { return error(context, cookie, NBD.EPERM, "read-only export") }
            guard inRange else { return error(context, cookie, NBD.ENOSPC, "write beyond the end of the export") }
            run(context, cookie) { () throws(NBDError) -> Reply in
                try export.writeZeroes(at: offset, length: UInt64(length))
                return Reply(Self.done(cookie, structured: self.structured))
            }
        case .flush:
            run(context, cookie) { () throws(NBDError) -> Reply in
                try export.flush()
                return Reply(Self.done(cookie, structured: self.structured))
            }
        case .cache:
            return error(context, cookie, 0, "")
        case nil:
            return error(context, cookie, NBD.EINVAL, "unknown command \(type)")
        }
        return true
    }

    /// A reply: its header (or all of it) and the data a read sends as is.
    struct Reply {
        var head: ByteBuffer
        var data: ByteBuffer?
        init(_ head: ByteBuffer, _ data: ByteBuffer? = nil) {
            self.head = head
            self.data = data
        }
    }

    /// The header of a reply: a structured reply's one chunk (`type`, flagged done, `length` bytes
    /// of payload to follow), or a simple reply (success; a read's data follows).
    static func header(_ cookie: UInt64, type: UInt16, length: UInt32, structured: Bool, capacity: Int = 20) -> ByteBuffer {
        var b = ByteBufferAllocator().buffer(capacity: capacity)
        if structured {
            b.writeInteger(NBD.structuredReplyMagic)
            b.writeInteger(NBD.replyFlagDone)
            b.writeInteger(type)
            b.writeInteger(cookie)
            b.writeInteger(length)
        } else {
            b.writeInteger(NBD.simpleReplyMagic)
            b.writeInteger(UInt32(0))
            b.writeInteger(cookie)
        }
        return b
    }

    /// The header of a read's reply carrying `length` bytes of data (one structured data chunk, or
    /// a simple reply); the data follows as a buffer of its own or is appended to this one.
    static func readHeader(_ cookie: UInt64, _ offset: UInt64, _ length: UInt32, structured: Bool) -> ByteBuffer {
        var b = header(cookie, type: NBD.replyOffsetData, length: 8 + length, structured: structured, capacity: 32)
        if structured { b.writeInteger(offset) }
        return b
    }

    /// A reply with no data: success.
    static func done(_ cookie: UInt64, structured: Bool) -> ByteBuffer {
        header(cookie, type: NBD.replyNone, length: 0, structured: structured)
    }

    static func errorReply(_ cookie: UInt64, _ code: UInt32, _ message: String, structured: Bool) -> ByteBuffer {
        if code == 0 { return done(cookie, structured: structured) }
        guard structured else {
            var b = ByteBufferAllocator().buffer(capacity: 16)
            b.writeInteger(NBD.simpleReplyMagic)
            b.writeInteger(code)
            b.writeInteger(cookie)
            return b
        }
        let msg = String(message.utf8.prefix(4096)) ?? ""
        var b = header(cookie, type: NBD.replyError, length: UInt32(6 + msg.utf8.count), structured: true, capacity: 32 + msg.utf8.count)
        b.writeInteger(code)
        b.writeInteger(UInt16(msg.utf8.count))
        b.writeString(msg)
        return b
    }

    private func error(_ context: ChannelHandlerContext, _ cookie: UInt64, _ code: UInt32, _ message: String) -> Bool {
        context.write(wrapOutboundOut(Self.errorReply(cookie, code, message, structured: structured)), promise: nil)
        return true
    }

    /// Runs `work` on the thread pool and writes its reply (or its error) on the event loop.
    /// `bytes`: what the request holds while it runs (its payload or its reply's data).
    private func run(_ context: ChannelHandlerContext, _ cookie: UInt64, bytes: Int = 0,
                     _ work: @escaping @Sendable () throws(NBDError) -> Reply) {
        beginRequest(bytes: bytes)
        let loop = context.eventLoop
        let structured = self.structured
        core.pool.submit { state in
            let result: Result<Reply, NBDError>
            if case .active = state {
                do throws(NBDError) { result = .success(try work()) } catch { result = .failure(error) }
            } else {
                result = .failure(NBDError(NBD.ESHUTDOWN, "server shutting down"))
            }
            loop.execute { self.complete(cookie, bytes: bytes, result, structured: structured) }
        }
    }

    /// A request starts running (counted against the connection's limits) or ends.
    private func beginRequest(bytes: Int) {
        inFlight += 1
        inFlightBytes += bytes
    }
    private func endRequest(bytes: Int) {
        inFlight -= 1
        inFlightBytes -= bytes
    }

    private func complete(_ cookie: UInt64, bytes: Int, _ result: Result<Reply, NBDError>, structured: Bool) {
        endRequest(bytes: bytes)
        guard let context else {
            detachIfDone()
            return
        }
        switch result {
        case .success(let r):
            context.write(wrapOutboundOut(r.head), promise: nil)
            if let d = r.data { context.write(wrapOutboundOut(d), promise: nil) }
        case .failure(let e): context.write(wrapOutboundOut(Self.errorReply(cookie, e.code, e.message, structured: structured)), promise: nil)
        }
        if phase == .closing {
            if inFlight == 0 { closeAfterReplies(context) } else { context.flush() }
            return
        }
        // Requests that waited for a free slot, then more from the socket.
        process(context)
        context.flush()
        readMore(context)
    }
}
