#!/usr/bin/env python3
"""Backup of a running disk by QEMU's own backup job: into `qcowpress export --nbd-sink` vs QEMU's
native compressed backup, in the same run.

Usage: bench/backup_bench.py DISK.raw [--size 1G] [--rounds 3] [--workdir DIR] [--out FILE]

The first SIZE bytes of DISK (bench/make-image.sh makes a realistic one) are copied (holes kept)
into WORKDIR/src.raw and opened by one qemu-storage-daemon as node `src` (what a VM's disk is).
Each round runs, alternating which goes first:
  sink    qcowpress export --nbd-sink (zstd level 3, its defaults); blockdev-add of an nbd node
          on the socket, blockdev-backup sync=full into it, blockdev-del (NBD_CMD_DISC); timed
          from blockdev-backup until qcowpress has exited (image fsynced and renamed).
  native  qemu-img create -f qcow2 -o compression_type=zstd; blockdev-add of that qcow2 with
          cache.direct=on; blockdev-backup sync=full compress=true; blockdev-del (which flushes);
          timed from blockdev-backup until blockdev-del returned.
The source is read into the page cache before every run (both read the same cached source).
Both images are checked with qemu-img check and compared with the source. Prints a Markdown table
(time and size of each, ratios sink/native, medians) and writes it to --out when given.
"""
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QP = os.environ.get("QCOWPRESS_BIN") or os.path.join(ROOT, ".build", "release", "qcowpress")


sys.path.insert(0, os.path.join(ROOT, "Tests", "Support"))
from qmp_run import QMP  # noqa: E402  (the tests' QMP client, one definition)


def call(q, name, **args):
    """One QMP command with keyword arguments."""
    return q.cmd({"execute": name, "arguments": args})


def parse_size(s):
    units = {"K": 10, "M": 20, "G": 30}
    return int(s[:-1]) << units[s[-1].upper()] if s[-1].upper() in units else int(s)


def copy_head(src, dst, size, block=1 << 20):
    """The first `size` bytes of src, all-zero blocks left as holes."""
    zero = bytes(block)
    with open(src, "rb") as i, open(dst, "wb") as o:
        o.truncate(size)
        left = size
        while left > 0:
            b = i.read(min(block, left))
            if not b:
                break
            if b != zero[:len(b)]:
                o.write(b)
            else:
                o.seek(len(b), 1)
            left -= len(b)


def warm(path):
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def verify(img, src):
    for args in (["check", img], ["compare", "-U", "-f", "raw", "-F", "qcow2", src, img]):
        p = subprocess.run(["qemu-img"] + args, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"qemu-img {' '.join(args)}: {p.stdout}{p.stderr}")


def run_sink(q, work, src, size, n):
    sock = os.path.join(work, "sink.sock")
    dst = os.path.join(work, "sink.qcow2")
    if os.path.exists(dst):
        os.unlink(dst)
    err = open(os.path.join(work, "sink.err"), "w")
    p = subprocess.Popen([QP, "export", "--nbd-sink", sock, "--size", str(size), "--output", "json", dst],
                         stdout=subprocess.PIPE, stderr=err, text=True)
    line = p.stdout.readline()  # JSON lines: {"export","uri"}, then the summary
    url = json.loads(line).get("uri", "") if line.startswith("{") else ""
    if not url.startswith("nbd+unix://"):
        sys.exit(f"qcowpress did not start: {open(err.name).read()}")
    node, job = f"sink{n}", f"jsink{n}"
    call(q, "blockdev-add", driver="nbd", **{"node-name": node}, export="backup", server={"type": "unix", "path": sock})
    warm(src)
    t0 = time.monotonic()
    call(q, "blockdev-backup", **{"job-id": job}, device="src", target=node, sync="full")
    q.wait_job(job)
    t_job = time.monotonic() - t0
    call(q, "blockdev-del", **{"node-name": node})
    out = p.stdout.read()
    rc = p.wait()
    wall = time.monotonic() - t0
    if rc != 0:
        sys.exit(f"qcowpress exit {rc}: {open(err.name).read()}")
    summary = json.loads(out.strip().splitlines()[-1])
    return {"wall": wall, "job": t_job, "size": os.stat(dst).st_size, "dst": dst,
            "rss": summary["image"]["peakRSSBytes"], "requests": summary["nbd"]["writeRequests"]}


def run_native(q, work, src, size, n):
    dst = os.path.join(work, "native.qcow2")
    if os.path.exists(dst):
        os.unlink(dst)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", dst, str(size)], check=True)
    node, job = f"nat{n}", f"jnat{n}"
    call(q, "blockdev-add", driver="qcow2", **{"node-name": node}, cache={"direct": True},
          file={"driver": "file", "filename": dst, "cache": {"direct": True}})
    warm(src)
    t0 = time.monotonic()
    call(q, "blockdev-backup", **{"job-id": job}, device="src", target=node, sync="full", compress=True)
    q.wait_job(job)
    t_job = time.monotonic() - t0
    call(q, "blockdev-del", **{"node-name": node})
    wall = time.monotonic() - t0
    return {"wall": wall, "job": t_job, "size": os.stat(dst).st_size, "dst": dst}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("disk")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    size = parse_size(a.size)
    work = a.workdir or os.path.join(os.path.dirname(os.path.abspath(a.disk)), "backup-bench")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "src.raw")
    copy_head(a.disk, src, size)
    qmp = os.path.join(work, "qmp.sock")
    qsd = subprocess.Popen(["qemu-storage-daemon", "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp",
                            "--monitor", "chardev=qmp", "--blockdev", f"driver=file,node-name=src-file,filename={src}",
                            "--blockdev", "driver=raw,node-name=src,file=src-file"],
                           stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "qsd.err"), "w"))
    rows = []
    try:
        # QMP connects once (Tests/Support/qmp_run.py): wait for the daemon's socket first.
        for _ in range(500):
            if os.path.exists(qmp) or qsd.poll() is not None:
                break
            time.sleep(0.01)
        q = QMP(qmp)
        for n in range(a.rounds):
            order = [run_sink, run_native] if n % 2 == 0 else [run_native, run_sink]
            r = {}
            for f in order:
                r[f.__name__] = f(q, work, src, size, n)
                verify(r[f.__name__]["dst"], src)
            s, nat = r["run_sink"], r["run_native"]
            rows.append((s, nat))
            print(f"round {n + 1}: sink {s['wall']:.2f}s {s['size'] / 2**20:.1f} MiB, native {nat['wall']:.2f}s "
                  f"{nat['size'] / 2**20:.1f} MiB: time {s['wall'] / nat['wall']:.3f}x size {s['size'] / nat['size']:.3f}x", flush=True)
    finally:
        qsd.kill()
        qsd.wait()
    mib = 1 << 20
    allocated = os.stat(src).st_blocks * 512
    lines = [f"Source: first {size / mib:.0f} MiB of `{a.disk}` ({allocated / mib:.0f} MiB allocated), "
             f"{os.cpu_count()} cores, QEMU {subprocess.run(['qemu-img', '--version'], capture_output=True, text=True).stdout.split()[2]}.", "",
             "| round | sink s (job s) | native s (job s) | time ratio | sink MiB | native MiB | size ratio | sink RSS MiB | sink write requests |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, (s, nat) in enumerate(rows):
        lines.append(f"| {i + 1} | {s['wall']:.2f} ({s['job']:.2f}) | {nat['wall']:.2f} ({nat['job']:.2f}) | "
                     f"{s['wall'] / nat['wall']:.3f} | {s['size'] / mib:.1f} | {nat['size'] / mib:.1f} | "
                     f"{s['size'] / nat['size']:.3f} | {s['rss'] / mib:.0f} | {s['requests']} |")
    ms = statistics.median(s["wall"] for s, _ in rows)
    mn = statistics.median(nat["wall"] for _, nat in rows)
    lines.append(f"| median | {ms:.2f} | {mn:.2f} | {ms / mn:.3f} | | | {rows[0][0]['size'] / rows[0][1]['size']:.3f} | | |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
