#!/usr/bin/env python3
"""nbd_write_client.py SOCKET EXPORT OP... - a small NBD client that writes, for the sink tests.

Negotiates fixed newstyle with structured replies and NBD_OPT_GO, prints the export's size,
transmission flags and preferred block size, then runs the OPs in order, one request at a time
unless grouped with '+' (requests of a group are all sent before any reply is read: several in
flight). Prints one line per request: "ok" or "err N" (the NBD error number).
  w:OFFSET:LENGTH:BYTE   NBD_CMD_WRITE of LENGTH bytes of BYTE (0x5a or 90)
  z:OFFSET:LENGTH        NBD_CMD_WRITE_ZEROES
  t:OFFSET:LENGTH        NBD_CMD_TRIM
  f                      NBD_CMD_FLUSH
  r:OFFSET:LENGTH        NBD_CMD_READ (the sink refuses it)
  disc                   NBD_CMD_DISC, then close
  drop                   close the socket without NBD_CMD_DISC
  hold                   wait until the server closes the connection
  stream:OFFSET:TOTAL:SIZE  TOTAL bytes of random data in SIZE-byte writes, sent by one thread
                         as fast as the socket takes them while another reads the replies;
                         prints "ok N" (N replies, all successful) or "err ..."
"""
import os, socket, struct, sys, threading

# The protocol constants and option exchange are nbd_hostile.py's (one definition).
from nbd_hostile import IHAVEOPT, NBDMAGIC, OPT_GO, OPT_SR, REQ, STRUCT, option, recvn  # noqa: E402

CMD = {"r": 0, "w": 1, "disc": 2, "f": 3, "t": 4, "z": 6}


def reply(s):
    """Error number (0 = ok) and cookie of one structured reply, through its DONE chunk."""
    err = 0
    while True:
        magic, flags, typ, cookie, ln = struct.unpack(">IHHQI", recvn(s, 20))
        assert magic == STRUCT, "not a structured reply: %x" % magic
        body = recvn(s, ln)
        if typ & 0x8000:
            err = struct.unpack(">I", body[:4])[0]
        if flags & 1:
            return err, cookie


def main():
    path, name, ops = sys.argv[1], sys.argv[2].encode(), sys.argv[3:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    magic, opt, _ = struct.unpack(">QQH", recvn(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT, "bad greeting"
    s.sendall(struct.pack(">I", 3))
    option(s, OPT_SR)
    # Ask for NBD_INFO_BLOCK_SIZE (3).
    r = option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3))
    if r[-1][0] != 1:
        print("refused %x %s" % (r[-1][0], r[-1][1].decode(errors="replace")))
        return
    size = flags = preferred = None
    for typ, data in r:
        if typ == 3 and struct.unpack(">H", data[:2])[0] == 0:
            size, flags = struct.unpack(">QH", data[2:12])
        if typ == 3 and struct.unpack(">H", data[:2])[0] == 3:
            preferred = struct.unpack(">III", data[2:14])[1]
    print("size %d flags 0x%x preferred %d" % (size, flags, preferred))
    sys.stdout.flush()
    cookie = 0
    for group in ops:
        sent = []
        for op in group.split("+"):
            parts = op.split(":")
            if parts[0] == "drop":
                s.close()
                return
            if parts[0] == "stream":
                off, total, size = (int(x, 0) for x in parts[1:4])
                n = (total + size - 1) // size
                def send():
                    for k in range(n):
                        ln = min(size, total - k * size)
                        s.sendall(struct.pack(">IHHQQI", REQ, 0, 1, 1000 + k, off + k * size, ln) + os.urandom(ln))
                t = threading.Thread(target=send)
                t.start()
                errors = sum(1 for _ in range(n) if reply(s)[0] != 0)
                t.join()
                print("ok %d" % n if errors == 0 else "err %d of %d" % (errors, n))
                sys.stdout.flush()
                break
            if parts[0] == "hold":
                s.settimeout(None)
                while s.recv(65536):
                    pass
                s.close()
                return
            cookie += 1
            off = int(parts[1], 0) if len(parts) > 1 else 0
            ln = int(parts[2], 0) if len(parts) > 2 else 0
            payload = bytes([int(parts[3], 0)]) * ln if parts[0] == "w" else b""
            s.sendall(struct.pack(">IHHQQI", REQ, 0, CMD[parts[0]], cookie, off, ln) + payload)
            if parts[0] == "disc":
                s.close()
                return
            sent.append(cookie)
        got = {}
        for _ in sent:
            err, c = reply(s)
            got[c] = err
        for c in sent:
            print("ok" if got[c] == 0 else "err %d" % got[c])
        sys.stdout.flush()
    s.close()


if __name__ == "__main__":
    main()
