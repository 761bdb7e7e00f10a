#!/usr/bin/env python3
"""A small Proxmox Backup Server for QcowPress' tests: serves local datastore directories (as
pbs_datastore.py makes them) over HTTPS with the API calls a restore uses and the reader protocol
(HTTP/1.1 upgraded to HTTP/2 with the `h2` package). Test code only; see PBS-PROTOCOL-NOTES.md.

  python3 pbs_server.py --store NAME=DIR [--store ...] [--port 0] \
      [--token USER@REALM!NAME:SECRET] [--user USER@REALM:PASSWORD] [--no-access AUTHID] \
      [--latency-ms N] [--drop-after N [--drops K]] [--corrupt HEXDIGEST] [--cert C --key K]

Prints one line `LISTENING <port> <sha256 fingerprint of the certificate>` on stdout, then serves
until killed. Without --cert it makes a self-signed certificate with the openssl command.

Options for failure tests: --latency-ms delays every chunk answer (each on its own timer, so
requests in flight overlap as over a real link); --drop-after N closes a reader connection after it
served N chunks (at most --drops times in the whole run); --corrupt flips the last byte of that
chunk's blob when served (the client's CRC check must catch it); --no-access: that id logs in but
gets 403 for everything; --ticket-uses N: a ticket expires after N requests (401).
"""

import argparse
import hashlib
import heapq
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import h2.config
import h2.connection
import h2.events
import h2.settings

READER_PROTOCOL = "proxmox-backup-reader-protocol-v1"
LOG_LOCK = threading.Lock()


def log(line):
    """One line on stderr per reader session, chunk request and drop (the tests count them)."""
    with LOG_LOCK:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class State:
    def __init__(self, args):
        self.stores = {}
        for s in args.store:
            name, _, path = s.partition("=")
            self.stores[name] = path
        self.tokens = {}
        for t in args.token:
            ident, _, secret = t.rpartition(":")
            self.tokens[ident] = secret
        self.users = {}
        for u in args.user:
            ident, _, pw = u.partition(":")
            self.users[ident] = pw
        self.no_access = set(args.no_access)
        self.tickets = {}  # ticket -> [user, uses left or None]
        self.ticket_uses = args.ticket_uses
        self.latency = args.latency_ms / 1000.0
        self.drop_after = args.drop_after
        self.drops_left = args.drops
        self.corrupt = set(d.lower() for d in args.corrupt)
        self.lock = threading.Lock()
        self.chunks_served = 0

    def auth(self, headers):
        """The authenticated id, or None."""
        cookie = headers.get("cookie", "")
        for part in cookie.split(";"):
            k, _, v = part.strip().partition("=")
            if k == "PBSAuthCookie":
                t = urllib.parse.unquote(v)
                entry = self.tickets.get(t)
                if entry is None:
                    return None
                with self.lock:
                    if entry[1] is not None:
                        if entry[1] <= 0:
                            return None  # expired, as a real ticket after two hours
                        entry[1] -= 1
                return entry[0]
        a = headers.get("authorization", "")
        if a.startswith("PBSAPIToken") and len(a) > 11 and a[11] in " =":
            ident, _, secret = a[12:].partition(":")
            secret = urllib.parse.unquote(secret)
            if ident in self.tokens and self.tokens[ident] == secret:
                return ident
        return None


def snapshot_dir(root, ns, btype, bid, btime):
    d = root
    if ns:
        for c in ns.split("/"):
            d = os.path.join(d, "ns", c)
    t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(btime)))
    return os.path.join(d, btype, bid, t)


def read_request(sock, buf):
    """One HTTP/1.1 request: (method, target, headers, body, leftover)."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        data = sock.recv(65536)
        if not data:
            return None
        rest += data
    return method, target, headers, rest[:n], rest[n:]


def respond(sock, status, body, ctype="application/json;charset=UTF-8", extra=()):
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}.get(status, "X")
    if isinstance(body, str):
        body = body.encode()
    head = "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (status, reason, ctype, len(body))
    for k, v in extra:
        head += "%s: %s\r\n" % (k, v)
    sock.sendall(head.encode() + b"\r\n" + body)


def serve_connection(state, raw, ctx):
    try:
        sock = ctx.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError):
        raw.close()
        return
    try:
        buf = b""
        while True:
            req = read_request(sock, buf)
            if req is None:
                return
            method, target, headers, body, buf = req
            url = urllib.parse.urlsplit(target)
            q = dict(urllib.parse.parse_qsl(url.query))
            path = url.path
            if method == "POST" and path == "/api2/json/access/ticket":
                if headers.get("content-type", "").startswith("application/json"):
                    p = json.loads(body or b"{}")
                else:
                    p = dict(urllib.parse.parse_qsl(body.decode()))
                user, pw = p.get("username"), p.get("password")
                if user in state.users and state.users[user] == pw:
                    ticket = "PBS:%s:%s" % (user, secrets.token_hex(8))
                    state.tickets[ticket] = [user, state.ticket_uses]
                    log("LOGIN %s" % user)
                    respond(sock, 200, json.dumps({"data": {"username": user, "ticket": ticket,
                                                            "CSRFPreventionToken": secrets.token_hex(8)}}))
                else:
                    respond(sock, 401, "permission check failed.")
                return
            who = state.auth(headers)
            if who is None:
                respond(sock, 401, "authentication failed - invalid credentials")
                return
            if who in state.no_access:
                respond(sock, 403, "permission check failed.")
                return
            parts = path.strip("/").split("/")
            if method == "GET" and len(parts) == 6 and parts[:4] == ["api2", "json", "admin", "datastore"] and parts[5] == "snapshots":
                root = state.stores.get(parts[4])
                if root is None:
                    respond(sock, 400, "no such datastore '%s'" % parts[4])
                    return
                d = root
                if q.get("ns"):
                    for c in q["ns"].split("/"):
                        d = os.path.join(d, "ns", c)
                gdir = os.path.join(d, q.get("backup-type", ""), q.get("backup-id", ""))
                items = []
                if os.path.isdir(gdir):
                    for t in sorted(os.listdir(gdir)):
                        if os.path.exists(os.path.join(gdir, t, "index.json.blob")):
                            epoch = int(time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone)
                            items.append({"backup-type": q["backup-type"], "backup-id": q["backup-id"],
                                          "backup-time": epoch, "files": [], "protected": False})
                respond(sock, 200, json.dumps({"data": items}))
                return
            if method == "GET" and path == "/api2/json/reader":
                if headers.get("upgrade") != READER_PROTOCOL:
                    respond(sock, 400, "invalid protocol name")
                    return
                root = state.stores.get(q.get("store", ""))
                if root is None:
                    respond(sock, 400, "no such datastore '%s'" % q.get("store"))
                    return
                try:
                    sdir = snapshot_dir(root, q.get("ns"), q["backup-type"], q["backup-id"], q["backup-time"])
                except (KeyError, ValueError):
                    respond(sock, 400, "parameter verification errors")
                    return
                if not os.path.isdir(sdir):
                    respond(sock, 400, "snapshot %s/%s/%s does not exist." % (q["backup-type"], q["backup-id"], os.path.basename(sdir)))
                    return
                log("READER %s" % sdir)
                sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: %s\r\n\r\n" % READER_PROTOCOL).encode())
                Reader(state, sock, root, sdir, buf).run()
                return
            respond(sock, 404, "Path '%s' not found." % path)
            return
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


class Reader:
    """The HTTP/2 side: download, chunk; chunk answers delayed by --latency-ms each."""

    # As the PBS server (src/api2/reader/mod.rs): 32 MiB windows, 4 MiB frames.
    WINDOW = 32 << 20

    def __init__(self, state, sock, root, sdir, leftover):
        self.state, self.sock, self.root, self.sdir = state, sock, root, sdir
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.leftover = leftover
        self.registered = set()
        self.pending = {}  # stream id -> remaining body (flow control)
        self.timers = []  # (due, seq, stream id, status, body, is_chunk)
        self.seq = 0
        self.served = 0

    def run(self):
        c = self.conn
        c.initiate_connection()
        c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.WINDOW,
                           h2.settings.SettingCodes.MAX_FRAME_SIZE: 4 << 20})
        c.increment_flow_control_window(self.WINDOW - 65535)
        self.flush()
        if self.leftover:
            self.handle(c.receive_data(self.leftover))
        while True:
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, sid, status, body, is_chunk = heapq.heappop(self.timers)
                self.start_response(sid, status, body, is_chunk)
            self.send_pending()
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else 1.0
            if self.sock.pending() == 0:
                self.sock.settimeout(timeout if timeout > 0 else 0.0001)
            try:
                data = self.sock.recv(1 << 20)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            finally:
                # Sends block until done: a timeout left from recv would cut a large answer short.
                self.sock.settimeout(None)
            if not data:
                return
            self.handle(c.receive_data(data))

    def flush(self):
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def handle(self, events):
        for e in events:
            if isinstance(e, h2.events.RequestReceived):
                self.request(e.stream_id, dict(e.headers))
            elif isinstance(e, h2.events.ConnectionTerminated):
                raise OSError("closed")
        self.send_pending()
        self.flush()

    def request(self, sid, headers):
        url = urllib.parse.urlsplit(headers.get(":path", "/"))
        q = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/download":
            name = q.get("file-name", "")
            path = os.path.join(self.sdir, name)
            if "/" in name or not os.path.isfile(path):
                self.schedule(sid, 400, ("unable to open %s" % name).encode(), False, 0)
                return
            data = open(path, "rb").read()
            if name.endswith(".fidx"):
                for i in range(4096, len(data), 32):
                    self.registered.add(data[i:i + 32].hex())
            self.schedule(sid, 200, data, False, 0)
        elif url.path == "/chunk":
            digest = q.get("digest", "").lower()
            log("CHUNK %s" % digest)
            if digest not in self.registered:
                self.schedule(sid, 401, ("download chunk %s not allowed" % digest).encode(), False, 0)
                return
            path = os.path.join(self.root, ".chunks", digest[:4], digest)
            try:
                data = open(path, "rb").read()
            except OSError as err:
                self.schedule(sid, 400, ("reading file %r failed: %s" % (path, err)).encode(), False, 0)
                return
            if digest in self.state.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 0x55])
            self.schedule(sid, 200, data, True, self.state.latency)
        else:
            self.schedule(sid, 404, b"not found", False, 0)

    def schedule(self, sid, status, body, is_chunk, delay):
        self.seq += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self.seq, sid, status, body, is_chunk))

    def start_response(self, sid, status, body, is_chunk):
        ctype = "application/octet-stream" if status == 200 else "application/json;charset=UTF-8"
        self.conn.send_headers(sid, [(":status", str(status)), ("content-type", ctype), ("content-length", str(len(body)))])
        self.pending[sid] = [memoryview(body), is_chunk]
        self.flush()

    def send_pending(self):
        c = self.conn
        for sid in list(self.pending):
            view, is_chunk = self.pending[sid]
            while len(view) > 0:
                n = min(c.local_flow_control_window(sid), c.max_outbound_frame_size, len(view))
                if n <= 0:
                    break
                c.send_data(sid, view[:n].tobytes())
                view = view[n:]
                self.pending[sid][0] = view
                self.flush()
            if len(view) == 0:
                c.end_stream(sid)
                del self.pending[sid]
                self.flush()
                if is_chunk:
                    self.served += 1
                    self.maybe_drop()

    def maybe_drop(self):
        s = self.state
        if s.drop_after is None or self.served < s.drop_after:
            return
        with s.lock:
            if s.drops_left <= 0:
                return
            s.drops_left -= 1
        log("DROP after %d chunks" % self.served)
        # An abrupt end: no GOAWAY, no TLS close_notify, as when a link or the server dies.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise OSError("dropped on purpose")


def make_cert(dirname):
    cert, key = os.path.join(dirname, "cert.pem"), os.path.join(dirname, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=pbs-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", action="append", default=[], required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", action="append", default=[])
    ap.add_argument("--user", action="append", default=[])
    ap.add_argument("--no-access", action="append", default=[])
    ap.add_argument("--latency-ms", type=float, default=0)
    ap.add_argument("--drop-after", type=int)
    ap.add_argument("--drops", type=int, default=1)
    ap.add_argument("--corrupt", action="append", default=[])
    ap.add_argument("--ticket-uses", type=int, help="a ticket is accepted this many times, then refused (expired)")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    state = State(args)
    tmp = None
    if args.cert:
        cert, key = args.cert, args.key
    else:
        tmp = tempfile.mkdtemp(prefix="pbs-server-")
        cert, key = make_cert(tmp)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    der = ssl.PEM_cert_to_DER_cert(open(cert).read())
    fp = ":".join("%02x" % b for b in hashlib.sha256(der).digest())
    if tmp:
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(64)
    print("LISTENING %d %s" % (srv.getsockname()[1], fp), flush=True)
    while True:
        raw, _ = srv.accept()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve_connection, args=(state, raw, ctx), daemon=True).start()


if __name__ == "__main__":
    main()
