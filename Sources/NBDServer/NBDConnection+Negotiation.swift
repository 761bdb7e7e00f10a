import NIOCore

/// The options phase: client flags, then options until one starts transmission (fixed newstyle).
extension NBDConnection {
    func clientFlags(_ context: ChannelHandlerContext, _ buf: inout ByteBuffer) -> Bool {
        guard let flags = buf.readInteger(as: UInt32.self) else { return false }
        guard flags & NBD.clientFlagFixedNewstyle != 0, flags & ~(NBD.clientFlagFixedNewstyle | NBD.clientFlagNoZeroes) == 0 else {
            refuse(context, "not a fixed-newstyle NBD client (client flags 0x\(String(flags, radix: 16)))")
            return false
        }
        noZeroes = flags & NBD.clientFlagNoZeroes != 0
        phase = .options
        return true
    }

    func option(_ context: ChannelHandlerContext, _ buf: inout ByteBuffer) -> Bool {
        guard buf.readableBytes >= 16 else { return false }
        let start = buf.readerIndex
        guard buf.getInteger(at: start, as: UInt64.self) == NBD.optMagic,
              let opt = buf.getInteger(at: start + 8, as: UInt32.self),
              let length = buf.getInteger(at: start + 12, as: UInt32.self) else {
            refuse(context, "not an NBD option (bad magic)")
            return false
        }
        guard length <= NBDServerCore.maxOptionLength else {
            // Not read, not allocated: the connection ends.
            refuse(context, "option of \(length) bytes (at most \(NBDServerCore.maxOptionLength))")
            return false
        }
        guard buf.readableBytes >= 16 + Int(length) else { return false }
        buf.moveReaderIndex(forwardBy: 16)
        var data = buf.readSlice(length: Int(length))!
        let before = tls
        handleOption(context, opt, &data)
        if before == .none && tls == .handshaking && buf.readableBytes > 0 {
            // The client may send nothing before the ACK: what it did is not taken as options.
            refuse(context, "sent data after NBD_OPT_STARTTLS before the TLS handshake")
            return false
        }
        return true
    }

    func reply(_ context: ChannelHandlerContext, _ opt: UInt32, _ type: NBD.OptionReply, _ body: (inout ByteBuffer) -> Void = { _ in }) {
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

    func replyError(_ context: ChannelHandlerContext, _ opt: UInt32, _ type: NBD.OptionReply, _ message: String) {
        reply(context, opt, type) { $0.writeString(message) }
    }

    func lookup(_ name: String) -> (any NBDExport)? {
        if let e = core.export(named: name) { return e }
        // The empty name is the default export when there is only one.
        let offered = core.offered
        if name.isEmpty && offered.count == 1 { return core.export(named: offered[0]) }
        return nil
    }

    func transmissionFlags(_ e: any NBDExport) -> UInt16 {
        var f = NBD.hasFlags
        if e.allowsMultipleConnections { f |= NBD.canMultiConn }
        if e.isReadOnly { f |= NBD.readOnly } else { f |= NBD.sendFlush | NBD.sendWriteZeroes | NBD.sendTrim }
        return f
    }

    func handleOption(_ context: ChannelHandlerContext, _ opt: UInt32, _ data: inout ByteBuffer) {
        guard tlsAllows(context, opt, &data) else { return context.flush() }
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
            break  // answered by tlsAllows
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
}
