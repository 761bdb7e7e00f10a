#!/usr/bin/env python3
"""nbd_hostile.py SOCKET EXPORT SIZE - a misbehaving NBD client for QcowPress's server tests.

Each case opens its own connection, does something a well-behaved client would not, and checks
that the server answers with an error reply or closes that connection, then that a fresh
connection still reads correctly. Prints one line per case: "ok NAME" or "FAIL NAME: why", and
exits 1 if any case failed. Follows the NBD project's doc/proto.md.
"""
import socket, struct, sys, time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ = 0x25609513
SIMPLE = 0x67446698
STRUCT = 0x668E33EF
OPT_GO, OPT_LIST, OPT_SR, OPT_SET_META = 7, 3, 8, 10
EINVAL, EPERM = 22, 1


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def recvn(s, n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return bytes(b)


def greet(s):
    magic, opt, flags = struct.unpack(">QQH", recvn(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT, "bad greeting"
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes


def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    replies = []
    while True:
        magic, o, typ, ln = struct.unpack(">QIII", recvn(s, 20))
        assert magic == REPLY_MAGIC and o == opt, "bad option reply"
        replies.append((typ, recvn(s, ln)))
        if typ == 1 or typ & 0x80000000:
            return replies


def go(s, name, structured=True):
    greet(s)
    if structured:
        option(s, OPT_SR)
        q = b"base:allocation"
        option(s, OPT_SET_META, struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q)
    r = option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    assert r[-1][0] == 1, "GO refused: %r" % (r,)


def request(s, typ, offset, length, cookie=7, flags=0, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQ, flags, typ, cookie, offset, length) + payload)


def structured_reply(s):
    """Returns (error or 0, data of OFFSET_DATA chunks) of one reply, through its DONE chunk."""
    err, data = 0, b""
    while True:
        magic, flags, typ, cookie, ln = struct.unpack(">IHHQI", recvn(s, 20))
        assert magic == STRUCT, "not a structured reply: %x" % magic
        body = recvn(s, ln)
        if typ & 0x8000:
            err = struct.unpack(">I", body[:4])[0]
        elif typ == 1:
            data += body[8:]
        if flags & 1:
            return err, data


def expect_closed(s):
    try:
        s.settimeout(5)
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def good_read(path, name, size, expect):
    s = connect(path)
    go(s, name)
    n = min(size, 65536)
    request(s, 0, 0, n)
    err, data = structured_reply(s)
    request(s, 2, 0, 0)
    s.close()
    return err == 0 and data == expect[:n]


def main():
    path, name, size = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
    s = connect(path)
    go(s, name)
    request(s, 0, 0, min(size, 65536))
    err, first = structured_reply(s)
    s.close()
    assert err == 0

    failed = 0

    def case(label, fn):
        nonlocal failed
        try:
            why = fn()
        except Exception as e:  # noqa: BLE001 - any surprise is a failure of the case
            why = "%s: %s" % (type(e).__name__, e)
        if why is None and not good_read(path, name, size, first):
            why = "the next connection did not read right"
        if why is None:
            print("ok", label)
        else:
            failed += 1
            print("FAIL %s: %s" % (label, why))

    def garbage():
        s = connect(path)
        recvn(s, 18)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        return None if expect_closed(s) else "still open after garbage"

    def huge_option():
        s = connect(path)
        greet(s)
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_LIST, 0xFFFFFFF0) + b"x" * 1000)
        return None if expect_closed(s) else "still open after a 4 GiB option length"

    def unknown_option():
        s = connect(path)
        greet(s)
        r = option(s, 999, b"abc")
        s.close()
        return None if r[-1][0] == 0x80000001 else "expected NBD_REP_ERR_UNSUP, got %r" % (r,)

    def unknown_export():
        s = connect(path)
        greet(s)
        r = option(s, OPT_GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
        s.close()
        return None if r[-1][0] == 0x80000006 else "expected NBD_REP_ERR_UNKNOWN, got %r" % (r,)

    def malformed_go():
        s = connect(path)
        greet(s)
        r = option(s, OPT_GO, struct.pack(">I", 1000) + b"x")
        s.close()
        return None if r[-1][0] == 0x80000003 else "expected NBD_REP_ERR_INVALID, got %r" % (r,)

    def err_case(typ, offset, length, want, flags=0, payload=b""):
        def run():
            s = connect(path)
            go(s, name)
            request(s, typ, offset, length, flags=flags, payload=payload)
            err, _ = structured_reply(s)
            # The same connection still works.
            request(s, 0, 0, 512, cookie=8)
            err2, data = structured_reply(s)
            s.close()
            if err != want:
                return "error %d, expected %d" % (err, want)
            if err2 != 0 or data != first[:512]:
                return "the connection did not recover"
            return None
        return run

    def mid_request():
        s = connect(path)
        go(s, name)
        s.sendall(struct.pack(">IHHQ", REQ, 0, 0, 9)[:14])
        s.close()
        # No wait: a server that the half request hurts fails the next cases' reads.
        return None

    def bad_magic():
        s = connect(path)
        go(s, name)
        s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
        return None if expect_closed(s) else "still open after a bad request magic"

    def huge_write():
        s = connect(path)
        go(s, name)
        request(s, 1, 0, 0xFFFFFFFF, payload=b"y" * 4096)
        return None if expect_closed(s) else "still open after a 4 GiB write header"

    def unread_replies():
        # 64 reads of up to 8 MiB sent at once, none of their replies ever read: the server stops
        # taking requests while replies wait (the caller checks its peak RSS). The event waited
        # for is that stop: more requests, sent without blocking, fill the socket's buffers once
        # the server no longer reads them.
        s = connect(path)
        go(s, name)
        n = min(size, 8 << 20)
        s.sendall(b"".join(struct.pack(">IHHQQI", REQ, 0, 0, c, 0, n) for c in range(64)))
        s.setblocking(False)
        more = b"".join(struct.pack(">IHHQQI", REQ, 0, 0, 64 + c, 0, 4096) for c in range(256))
        deadline = time.monotonic() + 60
        stopped = False
        while not stopped and time.monotonic() < deadline:
            try:
                s.send(more)
            except BlockingIOError:
                stopped = True
        s.close()
        return None if stopped else "the server kept taking requests while its replies went unread"

    case("garbage instead of client flags", garbage)
    case("option length near 4 GiB", huge_option)
    case("unknown option", unknown_option)
    case("unknown export", unknown_export)
    case("malformed NBD_OPT_GO", malformed_go)
    case("read past the end", err_case(0, size - 512, 4096, EINVAL))
    case("read with an overflowing offset", err_case(0, 2**64 - 512, 4096, EINVAL))
    case("64 MiB read", err_case(0, 0, 64 << 20, EINVAL))
    case("unknown command", err_case(42, 0, 512, EINVAL))
    case("write on a read-only export", err_case(1, 0, 512, EPERM, payload=b"z" * 512))
    case("write zeroes on a read-only export", err_case(6, 0, 512, EPERM))
    case("block status past the end", err_case(7, size, 512, EINVAL))
    case("disconnect in the middle of a request", mid_request)
    case("bad request magic", bad_magic)
    case("write header announcing 4 GiB", huge_write)
    case("requests whose replies are never read", unread_replies)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
