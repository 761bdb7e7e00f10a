import NIOCore
import NIOPosix

/// The transmission phase: requests, run at once or on the pool, and their replies.
extension NBDConnection {
    func request(_ context: ChannelHandlerContext, _ buf: inout ByteBuffer) -> Bool {
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
            guard buf.readableBytes >= 28 + Int(length) else {
                // Room for the whole request now: the reads that bring the rest are appended
                // without the buffer growing (and being copied) several times on the way.
                buf.reserveCapacity(minimumWritableBytes: 28 + Int(length) - buf.readableBytes)
                return false
            }
            buf.moveReaderIndex(forwardBy: 28)
            payload = buf.readSlice(length: Int(length))
        } else {
            buf.moveReaderIndex(forwardBy: 28)
        }
        core.countRequest()
        // Work on the pool reads these, never the handler (which lives on the event loop).
        let structured = self.structured
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
            let me = NIOLoopBound(self, eventLoop: loop)
            let core = self.core
            core.handOverStarted()
            let accepted = export.read(at: offset, count: Int(length)) { result in
                let reply = result.map { Reply(Self.readHeader(cookie, offset, length, structured: structured), $0) }
                loop.execute { me.value.complete(cookie, bytes: Int(length), reply, structured: structured) }
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
                return Reply(Self.done(cookie, structured: structured))
            }
        case .writeZeroes, .trim:
            guard !export.isReadOnly else { return error(context, cookie, NBD.EPERM, "read-only export") }
            guard inRange else { return error(context, cookie, NBD.ENOSPC, "write beyond the end of the export") }
            run(context, cookie) { () throws(NBDError) -> Reply in
                try export.writeZeroes(at: offset, length: UInt64(length))
                return Reply(Self.done(cookie, structured: structured))
            }
        case .flush:
            run(context, cookie) { () throws(NBDError) -> Reply in
                try export.flush()
                return Reply(Self.done(cookie, structured: structured))
            }
        case .cache:
            return error(context, cookie, 0, "")
        case nil:
            return error(context, cookie, NBD.EINVAL, "unknown command \(type)")
        }
        return true
    }

    func error(_ context: ChannelHandlerContext, _ cookie: UInt64, _ code: UInt32, _ message: String) -> Bool {
        context.write(wrapOutboundOut(Self.errorReply(cookie, code, message, structured: structured)), promise: nil)
        return true
    }

    /// Runs `work` on the thread pool and writes its reply (or its error) on the event loop.
    /// `bytes`: what the request holds while it runs (its payload or its reply's data).
    func run(_ context: ChannelHandlerContext, _ cookie: UInt64, bytes: Int = 0,
                     _ work: @escaping @Sendable () throws(NBDError) -> Reply) {
        beginRequest(bytes: bytes)
        let loop = context.eventLoop
        let structured = self.structured
        let me = NIOLoopBound(self, eventLoop: loop)
        core.pool.submit { state in
            let result: Result<Reply, NBDError>
            if case .active = state {
                do throws(NBDError) { result = .success(try work()) } catch { result = .failure(error) }
            } else {
                result = .failure(NBDError(NBD.ESHUTDOWN, "server shutting down"))
            }
            loop.execute { me.value.complete(cookie, bytes: bytes, result, structured: structured) }
        }
    }

    /// A request starts running (counted against the connection's limits) or ends.
    func beginRequest(bytes: Int) {
        inFlight += 1
        inFlightBytes += bytes
    }
    func endRequest(bytes: Int) {
        inFlight -= 1
        inFlightBytes -= bytes
    }

    func complete(_ cookie: UInt64, bytes: Int, _ result: Result<Reply, NBDError>, structured: Bool) {
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
