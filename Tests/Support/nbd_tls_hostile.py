#!/usr/bin/env python3
"""nbd_tls_hostile.py HOST PORT CERTDIR - clients that misbehave before or during NBD_OPT_STARTTLS, for a
QcowPress server started with --tls-creds.

All cases run at once, each on its own connection. Each waits until the server closes its
connection (or 30 s pass) and prints one line: "NAME: REPLY closed after SECONDS" (REPLY is the
option reply type the server sent, or "-"). The caller judges the lines. Follows the NBD project's
doc/proto.md. CERTDIR: a client certificate the server must refuse (client-cert.pem,
client-key.pem), presented whatever CA names the server asks for ("foreign-cert").
"""
import os, socket, ssl, struct, sys, threading, time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
OPT_EXPORT_NAME, OPT_STARTTLS, OPT_GO = 1, 5, 7
FIXED_NEWSTYLE, NO_ZEROES = 1, 2


def option(opt, data=b""):
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def recvn(s, n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError()
        b += c
    return bytes(b)


def reply_type(s):
    magic, opt, rtype, length = struct.unpack(">QIII", recvn(s, 20))
    assert magic == REPLY_MAGIC, "bad reply magic"
    recvn(s, length)
    return "0x%x" % rtype


def until_closed(s):
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass


def case(name, host, port, out):
    start = time.monotonic()
    s = socket.create_connection((host, port))
    s.settimeout(30)
    got = "-"
    try:
        recvn(s, 18)
        if name == "silent":
            pass  # connects, reads the greeting, says nothing
        elif name == "flags-only":
            s.sendall(struct.pack(">I", FIXED_NEWSTYLE | NO_ZEROES))
        elif name == "bad-flags":
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        elif name == "bad-magic":
            s.sendall(struct.pack(">I", FIXED_NEWSTYLE) + b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"x" * 64)
        elif name == "plaintext-go":
            name_bytes = b"disk.raw"
            s.sendall(struct.pack(">I", FIXED_NEWSTYLE) + option(OPT_GO, struct.pack(">I", len(name_bytes)) + name_bytes + struct.pack(">H", 0)))
            got = reply_type(s)
        elif name == "export-name":
            s.sendall(struct.pack(">I", FIXED_NEWSTYLE) + option(OPT_EXPORT_NAME, b"disk.raw"))
        elif name == "starttls-stall":
            s.sendall(struct.pack(">I", FIXED_NEWSTYLE) + option(OPT_STARTTLS))
            got = reply_type(s)  # the ACK, then no ClientHello
        elif name == "starttls-garbage":
            s.sendall(struct.pack(">I", FIXED_NEWSTYLE) + option(OPT_STARTTLS))
            got = reply_type(s)
            s.sendall(bytes(range(256)) * 4)
        elif name == "starttls-injection":
            # Options in plaintext right behind STARTTLS, before the handshake: never obeyed.
            s.sendall(struct.pack(">I", FIXED_NEWSTYLE) + option(OPT_STARTTLS) + option(OPT_GO, b"\0\0\0\0\0\0"))
            got = reply_type(s)
        elif name == "foreign-cert":
            s.sendall(struct.pack(">I", FIXED_NEWSTYLE) + option(OPT_STARTTLS))
            got = reply_type(s)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.load_cert_chain(os.path.join(CERTDIR, "client-cert.pem"), os.path.join(CERTDIR, "client-key.pem"))
            s = ctx.wrap_socket(s)
            s.sendall(option(OPT_GO, b"\0\0\0\0\0\0"))
        until_closed(s)
    except (EOFError, OSError, AssertionError):
        pass
    finally:
        s.close()
    out.append("%s: %s closed after %.1f" % (name, got, time.monotonic() - start))


def main():
    global CERTDIR
    host, port, CERTDIR = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    names = ["foreign-cert", "silent", "flags-only", "bad-flags", "bad-magic", "plaintext-go", "export-name",
             "starttls-stall", "starttls-garbage", "starttls-injection"]
    out = []
    threads = [threading.Thread(target=case, args=(n, host, port, out)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\n".join(sorted(out)))
    sys.stdout.flush()


main()
