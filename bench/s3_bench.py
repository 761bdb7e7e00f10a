#!/usr/bin/env python3
"""Restore from a PBS datastore on S3 (the local moto server) against the same restore from the
datastore directory, and with 50 ms added to every S3 request.

Usage: bench/s3_bench.py RAW_IMAGE [--work DIR] [--runs N] [--delay-ms 50] [--streams N]
Builds (once, in --work) a PBS datastore of RAW_IMAGE (4 MiB chunks, as PBS writes) with
Tests/Support/pbs_datastore.py, loads it into Tests/Support/s3_server.py (moto, signatures checked,
HTTP on 127.0.0.1, kept-alive connections) as s3://bench/store, and times `restore pbs` to zstd
qcow2 from the directory, from S3 at 0 ms and at --delay-ms per request (median of --runs, page
cache dropped before each). Per run: requests per chunk counted at the server (chunk GETs /
distinct chunks), peak RSS of qcowpress (wait4's ru_maxrss), and the server's CPU seconds (moto
runs in Python on the same 2 cores: when it is the bottleneck, its CPU says so). Every image is
compared with `qemu-img compare`. Writes bench/results/s3.md.
"""
import argparse, json, os, statistics, sys, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbs_bench import ROOT, ListeningServer, check_same, datastore, restore  # noqa: E402  (shared with remote_bench.py)

KEY_ID, SECRET = "AKIAQCOWPRESSTEST001", "qcowpress/Test+Secret/0123456789abcdefABCDEF"
ZSTD = ["-c", "-o", "compression_type=zstd"]


class Server(ListeningServer):
    def __init__(self, ds, work):
        super().__init__(["/usr/bin/python3", os.path.join(ROOT, "Tests/Support/s3_server.py"), "--load", "bench/store=" + ds],
                         os.path.join(work, "s3-server.log"))
        self.port, self.control_port = int(self.fields[0]), int(self.fields[1])

    def control(self, route, method="POST"):
        req = urllib.request.Request("http://127.0.0.1:%d/%s" % (self.control_port, route), method=method)
        return json.load(urllib.request.urlopen(req))

    def cpu(self):
        with open("/proc/%d/stat" % self.p.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--work")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--delay-ms", type=int, default=50)
    ap.add_argument("--streams", type=int)
    a = ap.parse_args()
    raw = os.path.abspath(a.raw)
    work = a.work or os.path.join(os.path.dirname(raw), "s3-bench")
    os.makedirs(work, exist_ok=True)
    ds = datastore(work, raw)
    size = os.path.getsize(raw)
    dst = os.path.join(work, "out.qcow2")
    t = time.monotonic()
    srv = Server(ds, work)
    load_s = time.monotonic() - t
    rows = []
    try:
        env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": ""}
        s3 = ["--s3", "s3://bench/store", "--endpoint", "http://127.0.0.1:%d" % srv.port, "--path-style"]
        if a.streams:
            s3 += ["--streams", str(a.streams)]
        runs = [("directory", ["--datastore", ds], None, 0), ("s3 0 ms", s3, env, 0), ("s3 %d ms" % a.delay_ms, s3, env, a.delay_ms)]
        # Sources interleaved run by run: on a shared machine the load drifts, and each round sees
        # the same drift for all three.
        results = {name: [] for name, _, _, _ in runs}
        for _ in range(a.runs):
            for name, args, e, delay in runs:
                if e is not None:
                    srv.control("delay?ms=%d" % delay)
                    srv.control("reset")
                cpu0 = srv.cpu()
                dt, rss = restore(args + ZSTD, dst, e)
                cpu = srv.cpu() - cpu0
                per_chunk = None
                if e is not None:
                    c = srv.control("count?match=store/.chunks/", method="GET")
                    per_chunk = c["chunkGets"] / max(1, c["distinctChunks"])
                results[name].append((dt, rss, per_chunk, cpu if e is not None else None))
                check_same(raw, dst, name)
        # Ratios paired round by round (same machine load), then their median.
        def ratio(name, base):
            return statistics.median(x[0] / y[0] for x, y in zip(results[name], results[base]))
        for name, one in results.items():
            m = statistics.median(r[0] for r in one)
            per = [r[2] for r in one if r[2] is not None]
            cpu = [r[3] for r in one if r[3] is not None]
            rows.append("| %s | %.2f | %.0f | %.2f | %.2f | %s | %.0f | %s | %s |" % (
                name, m, size / m / 1e6, ratio(name, "directory"), ratio(name, "s3 0 ms"), "%.2f" % max(per) if per else "-",
                max(r[1] for r in one), "%.1f" % statistics.median(cpu) if cpu else "-", " / ".join("%.2f" % r[0] for r in one)))
    finally:
        srv.stop()
    head = ["%s: %d MiB, 4 MiB chunks, zstd qcow2; moto loaded the datastore in %.1f s; %d rounds (sources interleaved), "
            "page cache dropped before each; load average at the end %s" % (os.path.basename(raw), size >> 20, load_s, a.runs,
                                                                            " ".join(open("/proc/loadavg").read().split()[:3])), "",
            "| source | median s | MB/s (guest) | vs directory (paired) | vs s3 0 ms (paired) | requests/chunk (max) | peak RSS MiB | server CPU s | runs s |",
            "|---|---|---|---|---|---|---|---|---|"]
    text = "\n".join(head + rows) + "\n"
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    open(os.path.join(ROOT, "bench", "results", "s3.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
