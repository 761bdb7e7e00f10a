#!/usr/bin/env python3
"""Restore from a Proxmox Backup Server against the same restore from the datastore directory.

Usage: bench/remote_bench.py RAW_IMAGE [--work DIR] [--runs N] [--latency-ms 50]
Builds (once, in --work) a PBS datastore of RAW_IMAGE (4 MiB chunks, as PBS writes) with
Tests/Support/pbs_datastore.py, serves it with Tests/Support/pbs_server.py (HTTPS + HTTP/2 on
127.0.0.1, the test server) with 0 ms and with --latency-ms added to every chunk answer, and times
`restore pbs` to zstd and to uncompressed qcow2 from the directory, from the server at 0 ms and at
the added latency (median of --runs, caches dropped before each). Every image is compared with
`qemu-img compare`. The test server runs on the same cores as the restore (Python: TLS, HTTP/2
framing), so the remote column carries its CPU too. Writes bench/results/remote.md.
"""
import argparse, os, statistics, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbs_bench import ROOT, ListeningServer, check_same, datastore, restore  # noqa: E402  (shared with s3_bench.py)

TOKEN, SECRET = "root@pam!bench", "bench-secret"


class Server(ListeningServer):
    def __init__(self, ds, latency, work):
        super().__init__([sys.executable, os.path.join(ROOT, "Tests/Support/pbs_server.py"), "--store", "store=" + ds,
                          "--token", "%s:%s" % (TOKEN, SECRET), "--latency-ms", str(latency)],
                         os.path.join(work, "server-%d.log" % latency))
        self.port, self.fingerprint = int(self.fields[0]), self.fields[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--work")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--latency-ms", type=int, default=50)
    a = ap.parse_args()
    raw = os.path.abspath(a.raw)
    work = a.work or os.path.join(os.path.dirname(raw), "remote-bench")
    os.makedirs(work, exist_ok=True)
    ds = datastore(work, raw)
    size = os.path.getsize(raw)
    dst = os.path.join(work, "out.qcow2")
    rows = []
    for codec_name, codec in [("zstd", ["-c", "-o", "compression_type=zstd"]), ("uncompressed", [])]:
        times = {}
        times["directory"] = [restore(["--datastore", ds] + codec, dst)[0] for _ in range(a.runs)]
        for latency in (0, a.latency_ms):
            srv = Server(ds, latency, work)
            try:
                env = {"PBS_PASSWORD": SECRET, "PBS_FINGERPRINT": srv.fingerprint}
                repo = "%s@127.0.0.1:%d:store" % (TOKEN, srv.port)
                times["server %d ms" % latency] = [restore(["--repository", repo] + codec, dst, env)[0] for _ in range(a.runs)]
                check_same(raw, dst, "server %d ms" % latency)
            finally:
                srv.stop()
        base = statistics.median(times["server 0 ms"])
        local = statistics.median(times["directory"])
        for k, v in times.items():
            m = statistics.median(v)
            rows.append((codec_name, k, m, size / m / 1e6, m / base, m / local, " / ".join("%.2f" % x for x in v)))
    out = ["| codec | source | median s | MB/s (guest) | vs server 0 ms | vs directory | runs s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append("| %s | %s | %.2f | %.0f | %.2f | %.2f | %s |" % r)
    text = "\n".join(out) + "\n"
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    open(os.path.join(ROOT, "bench", "results", "remote.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
