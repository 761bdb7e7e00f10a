import NIOCore

/// Reply encoding: simple replies, or structured replies of one chunk.
extension NBDConnection {
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
}
