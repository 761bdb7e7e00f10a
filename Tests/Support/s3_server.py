#!/usr/bin/env python3
"""A local S3-compatible server for QcowPress' tests and bench: moto (PyPI `moto[server]`) with
authentication enforced, in front of it a small WSGI layer that makes it behave like AWS where the
tests need it, counts requests and injects faults.

    python3 s3_server.py [--tls] [--load BUCKET/STORE=DIR[@REGION]]... [--delay-ms N]

prints one line on stdout once both ports accept connections:

    LISTENING <s3-port> <control-port> <fingerprint or -> <access-key-id>

and runs until killed.  The S3 port speaks HTTP/1.1 with keep-alive (HTTPS with --tls: a fresh
self-signed certificate for 127.0.0.1/localhost made by openssl; the fingerprint is its SHA-256 in
PBS's form, colon-separated lowercase hex).  Path-style addressing (http://127.0.0.1:PORT/BUCKET/KEY).

Identities (moto's IAM/STS, created in-process; moto checks every signature):
    AKIAQCOWPRESSTEST001 / qcowpress/Test+Secret/0123456789abcdefABCDEF   full S3 access
    AKIAQCOWPRESSNOBODY1 / nobody/Secret+0123456789abcdefABCDEFGHIJKL     no policy (AccessDenied)
    a session (STS AssumeRole on a role with S3 access): GET /session on the control port answers
    {"accessKeyID":"ASIA...","secretAccessKey":"...","sessionToken":"..."}

Layout loaded by --load (PBS 4's S3 backend, pbs-datastore's s3 module): every file of the local
datastore DIR becomes an object: `DIR/.chunks/XXXX/<digest>` -> `STORE/.chunks/XXXX/<digest>`,
everything else (snapshot directories, namespaces, group `owner` files) -> `STORE/.cnt/<relative
path>`.  Objects are put straight into moto's backend (no HTTP): a datastore of a few hundred MiB
loads in about a second.  The bucket is created in REGION (default us-west-1).

Control port (plain HTTP, no authentication, 127.0.0.1 only):
    GET  /count[?match=S]        (requests whose decoded path contains S) {"requests": N, "get": N, "head": N, "list": N, "chunkGets": N,
                                  "distinctChunks": N, "maxChunkGets": N, "faults": N}
    POST /reset                  counters to zero
    POST /fault?mode=503|500|drop&count=N[&match=SUBSTRING]
                                 the next N requests (whose key contains SUBSTRING) answer 503
                                 SlowDown / 500 InternalError, or have their connection closed
                                 without an answer
    POST /delay?ms=N             every S3 request waits N ms before it is answered (the bench's
                                 "50 ms per request")
    POST /load?bucket=B&store=S&dir=D[&region=R]    as --load
    POST /delete?bucket=B&key=K  removes an object
    POST /corrupt?bucket=B&key=K flips one byte in the middle of an object
    GET  /session                a fresh STS session (see above)

Where stock moto is not AWS (adapted here, never in the client under test):
  - moto checks a signature against the path it re-encodes itself from the decoded URL, so a key
    with ':' (every PBS snapshot time) or other reserved characters fails although it is signed as
    AWS specifies (canonical URI = the key URI-encoded once, '/' kept).  Patched below: the path
    moto signs is the percent-decoded path encoded once the AWS way.
  - moto accepts a request signed for any region; AWS answers 400 AuthorizationHeaderMalformed
    naming the bucket's region.  Done here for path-style requests.
"""

import argparse
import selectors
import types
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

os.environ.setdefault("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # every request authenticated
os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")

from moto import settings  # noqa: E402

settings.INITIAL_NO_AUTH_ACTION_COUNT = 0

from moto.iam import access_control  # noqa: E402
from moto.iam.models import iam_backends  # noqa: E402
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app  # noqa: E402
from moto.s3.models import s3_backends  # noqa: E402
from moto.sts.models import sts_backends  # noqa: E402
from werkzeug import serving  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

KEEP_ALIVE = False
ACCOUNT = "123456789012"
KEY_ID = "AKIAQCOWPRESSTEST001"
SECRET = "qcowpress/Test+Secret/0123456789abcdefABCDEF"
NOBODY_ID = "AKIAQCOWPRESSNOBODY1"
NOBODY_SECRET = "nobody/Secret+0123456789abcdefABCDEFGHIJKL"
S3_POLICY = json.dumps({"Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})

# --- moto adapted to AWS -------------------------------------------------------------------------

_original_create_aws_request = access_control.IAMRequestBase._create_aws_request


def _aws_create_aws_request(self):
    """The request moto re-signs, with the path encoded once as AWS does for S3 (RFC 3986
    unreserved characters kept, '/' kept, everything else %XX) whatever form moto holds it in."""
    request = _original_create_aws_request(self)
    if isinstance(self, access_control.S3IAMRequest):
        parts = urllib.parse.urlsplit(request.url)
        path = urllib.parse.quote(urllib.parse.unquote(parts.path), safe="/-_.~")
        # The query too reaches moto decoded (prefix=store/.cnt/): each name and value encoded once.
        pairs = [p.partition("=") for p in parts.query.split("&") if p]
        query = "&".join(urllib.parse.quote(urllib.parse.unquote(k), safe="-_.~") + "=" + urllib.parse.quote(urllib.parse.unquote(v), safe="-_.~")
                         for k, _, v in pairs)
        request.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, parts.fragment))
    return request


access_control.IAMRequestBase._create_aws_request = _aws_create_aws_request


def make_identities():
    iam = iam_backends[ACCOUNT]["aws"]
    for name, key_id, secret, policy in [("restore", KEY_ID, SECRET, S3_POLICY), ("nobody", NOBODY_ID, NOBODY_SECRET, None)]:
        iam.create_user(region_name="us-east-1", user_name=name, path="/", tags=[])
        key = iam.create_access_key(user_name=name)
        key.access_key_id = key_id
        key.secret_access_key = secret
        if policy:
            iam.put_user_policy(name, "s3", policy)
    trust = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "sts:AssumeRole"}]})
    iam.create_role(role_name="restore-role", assume_role_policy_document=trust, path="/",
                    permissions_boundary=None, description="", tags=[], max_session_duration="3600")
    iam.put_role_policy("restore-role", "s3", S3_POLICY)


def new_session():
    sts = sts_backends[ACCOUNT]["aws"]
    role = sts.assume_role(region_name="us-east-1", role_session_name="qcowpress-test",
                           role_arn=f"arn:aws:iam::{ACCOUNT}:role/restore-role", policy="", duration=3600, external_id="")
    return {"accessKeyID": role.access_key_id, "secretAccessKey": role.secret_access_key, "sessionToken": role.session_token}


# --- loading a datastore -------------------------------------------------------------------------

def backend():
    return s3_backends[ACCOUNT]["aws"]


def ensure_bucket(bucket, region):
    b = backend()
    if bucket not in b.buckets:
        b.create_bucket(bucket, region)


def object_key(store, rel):
    """A datastore file's object key, as PBS 4's S3 backend names it."""
    if rel.startswith(".chunks/"):
        return f"{store}/{rel}"
    return f"{store}/.cnt/{rel}"


def load(bucket, store, directory, region="us-west-1"):
    ensure_bucket(bucket, region)
    n = 0
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(root, f)
            rel = os.path.relpath(path, directory)
            if rel.startswith(".lock") or rel.endswith(".lock"):
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            backend().put_object(bucket, object_key(store, rel), data)
            n += 1
    return n


# --- the front: counters, faults, delay, region check ---------------------------------------------

class State:
    def __init__(self, delay_ms=0):
        self.lock = threading.Lock()
        self.delay = delay_ms / 1000.0
        self.faults = []  # [mode, remaining, match]
        self.reset()

    def reset(self):
        with self.lock:
            self.log = []  # (kind, decoded path, faulted)

    def counts(self, match=""):
        """Counters over the requests whose decoded path contains `match` (tests share a server:
        each looks at its own datastore)."""
        with self.lock:
            log = [e for e in self.log if match in e[1]]
        per_chunk = {}
        for kind, path, _ in log:
            if kind == "get" and "/.chunks/" in path:
                per_chunk[path] = per_chunk.get(path, 0) + 1
        return {"requests": len(log), "get": sum(1 for e in log if e[0] == "get"),
                "head": sum(1 for e in log if e[0] == "head"), "list": sum(1 for e in log if e[0] == "list"),
                "chunkGets": sum(per_chunk.values()), "distinctChunks": len(per_chunk),
                "maxChunkGets": max(per_chunk.values(), default=0), "faults": sum(1 for e in log if e[2])}

    def record(self, method, path, query):
        """Counts one S3 request; returns the fault to inject, if any."""
        if method == "HEAD":
            kind = "head"
        elif method == "GET" and ("list-type" in query or path.rstrip("/").count("/") <= 1):
            kind = "list"
        else:
            kind = method.lower()
        with self.lock:
            fault = None
            for f in self.faults:
                if f[1] > 0 and (not f[2] or f[2] in path):
                    f[1] -= 1
                    fault = f[0]
                    break
            self.log.append((kind, path, fault is not None))
            return fault


def s3_error(start_response, status, code, message, extra=""):
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"{extra}<RequestId>qcowpress-test</RequestId></Error>").encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


def front(app, state):
    def wsgi(environ, start_response):
        raw = environ.get("REQUEST_URI") or environ.get("RAW_URI") or environ.get("PATH_INFO", "")
        path = urllib.parse.unquote(raw.split("?", 1)[0])
        query = environ.get("QUERY_STRING", "")
        fault = state.record(environ["REQUEST_METHOD"], path, query)
        if state.delay:
            time.sleep(state.delay)
        if fault == "drop":
            sock = environ.get("werkzeug.socket")
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            raise ConnectionResetError("fault injected: connection dropped")
        if fault == "503":
            return s3_error(start_response, "503 Slow Down", "SlowDown", "Please reduce your request rate.")
        if fault == "500":
            return s3_error(start_response, "500 Internal Server Error", "InternalError", "We encountered an internal error. Please try again.")
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if not auth.startswith("AWS4-HMAC-SHA256 "):  # moto answers 500 (a KeyError); AWS 403
            return s3_error(start_response, "403 Forbidden", "AccessDenied", "Access Denied")
        # AWS refuses a request signed for another region than the bucket's.
        cred = auth.partition("Credential=")[2].partition(",")[0].split("/")
        bucket = path.lstrip("/").split("/", 1)[0]
        if len(cred) >= 3 and bucket:
            b = backend().buckets.get(bucket)
            if b is not None and b.region_name != cred[2]:
                return s3_error(start_response, "400 Bad Request", "AuthorizationHeaderMalformed",
                                f"The authorization header is malformed; the region '{cred[2]}' is wrong; expecting '{b.region_name}'",
                                f"<Region>{b.region_name}</Region>")
        return app(environ, start_response)
    return wsgi


def control(state):
    def wsgi(environ, start_response):
        q = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        route = environ.get("PATH_INFO", "")
        try:
            if route == "/count":
                out = state.counts(q.get("match", ""))
            elif route == "/reset":
                state.reset()
                out = {}
            elif route == "/fault":
                with state.lock:
                    state.faults.append([q["mode"], int(q.get("count", "1")), q.get("match", "")])
                out = {}
            elif route == "/delay":
                state.delay = int(q["ms"]) / 1000.0
                out = {}
            elif route == "/load":
                out = {"objects": load(q["bucket"], q["store"], q["dir"], q.get("region", "us-west-1"))}
            elif route == "/delete":
                backend().delete_object(q["bucket"], q["key"])
                out = {}
            elif route == "/corrupt":
                key = backend().get_object(q["bucket"], q["key"])
                data = bytearray(key.value)
                data[len(data) // 2] ^= 0x55
                backend().put_object(q["bucket"], q["key"], bytes(data))
                out = {}
            elif route == "/session":
                out = new_session()
            else:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"unknown control path\n"]
        except Exception as e:  # noqa: BLE001 - reported to the test as one line
            body = f"{type(e).__name__}: {e}\n".encode()
            start_response("500 Internal Server Error", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        body = json.dumps(out).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return wsgi


class _NoDrain:
    """werkzeug's run_wsgi reads whatever arrives within 10 ms of an answer and throws it away
    (serving.py: "If we supported keep-alive connections, this naive approach would break by
    reading the next request line"): with keep-alive, a selector that never reports data."""

    def register(self, *a, **k):
        pass

    def select(self, timeout=None):
        return []


def self_signed(directory):
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(cert) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    fp = hashlib.sha256(der).hexdigest()
    return cert, key, ":".join(fp[i:i + 2] for i in range(0, len(fp), 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--load", action="append", default=[], metavar="BUCKET/STORE=DIR[@REGION]")
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--no-keep-alive", action="store_true", help="close the connection after every answer (werkzeug's way)")
    ap.add_argument("--exit-on-eof", action="store_true", help="exit when stdin reaches EOF (the test that started it is gone)")
    args = ap.parse_args()

    from werkzeug.serving import WSGIRequestHandler

    class Handler(WSGIRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_request(self, *a, **k):
            pass

        def send_header(self, keyword, value):
            # werkzeug closes every connection ("Connection: close"), and after each answer drains
            # what the client sent next (which would swallow the next request of a kept connection:
            # switched off below). S3 GET/HEAD requests have no body, so their connections stay open
            # as on AWS (the client's pool is exercised; no TCP/TLS handshake per request).
            if KEEP_ALIVE and keyword.lower() == "connection" and value.lower() == "close" and self.command in ("GET", "HEAD"):
                return
            super().send_header(keyword, value)


    global KEEP_ALIVE
    KEEP_ALIVE = not args.no_keep_alive
    if KEEP_ALIVE:
        serving.selectors = types.SimpleNamespace(DefaultSelector=_NoDrain, EVENT_READ=selectors.EVENT_READ)
    make_identities()
    for spec in args.load:
        target, _, rest = spec.partition("=")
        directory, _, region = rest.partition("@")
        bucket, _, store = target.partition("/")
        load(bucket, store, directory, region or "us-west-1")

    state = State(args.delay_ms)
    ssl_context = None
    fingerprint = "-"
    tmp = tempfile.mkdtemp(prefix="s3_server.")
    if args.tls:
        cert, key, fingerprint = self_signed(tmp)
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(cert, key)
    app = front(DomainDispatcherApplication(create_backend_app), state)
    s3 = make_server("127.0.0.1", args.port, app, threaded=True, request_handler=Handler, ssl_context=ssl_context)
    s3.daemon_threads = True
    ctl = make_server("127.0.0.1", 0, control(state), threaded=True, request_handler=Handler)
    ctl.daemon_threads = True
    for srv in (s3, ctl):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    if args.exit_on_eof:
        def watch():
            sys.stdin.buffer.read()
            os._exit(0)
        threading.Thread(target=watch, daemon=True).start()
    print(f"LISTENING {s3.server_port} {ctl.server_port} {fingerprint} {KEY_ID}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)


if __name__ == "__main__":
    sys.exit(main())
