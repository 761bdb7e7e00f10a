#!/usr/bin/env python3
"""Peak memory of QcowPress under its --memory-limit, where it used to escape it.

Usage: bench/memory_bench.py [RAW_IMAGE] [--work DIR] [--devices 64]

Cases (peak RSS by /usr/bin/time %M, the whole process):
  - `restore vma` of an archive with DEVICES drives (16 MiB each: data, text, zeros), zstd,
    --memory-limit 32M; and 16M, which cannot hold DEVICES images' smallest write buffers and
    must be refused with one line.
  - `convert --threads 256` (zstd) of RAW_IMAGE (default: a generated 512 MiB image) at 64M and
    at the default 256M.
The bound checked is budget + 32 MiB (the runtime, libraries, reader buffers).
"""
import argparse, os, random, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QP = os.environ.get("QCOWPRESS_BIN") or os.path.join(ROOT, ".build", "release", "qcowpress")
MAKE_VMA = os.path.join(ROOT, "Tests", "Support", "make_vma.py")


def run(cmd):
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
    rss_kib = int(p.stderr.strip().splitlines()[-1])
    return p.returncode, rss_kib * 1024, p.stderr.strip().splitlines()[:-1]


def device(path, size, seed):
    rnd = random.Random(seed)
    words = b"the quick brown fox jumps over a lazy dog 0123456789\n"
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            kind = rnd.randrange(3)
            if kind == 0:
                f.write(rnd.randbytes(n))
            elif kind == 1:
                f.write((words * (n // len(words) + 1))[:n])
            else:
                f.write(bytes(n))
            left -= n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw", nargs="?")
    ap.add_argument("--work", default=None)
    ap.add_argument("--devices", type=int, default=64)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="qp-mem-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    rows = []

    archive = os.path.join(work, "many.vma")
    if not os.path.exists(archive):
        devs = []
        for i in range(a.devices):
            p = os.path.join(work, f"d{i}.raw")
            device(p, 16 << 20, i)
            devs += ["--device", f"drive-scsi{i}={p}"]
        subprocess.run([sys.executable, MAKE_VMA, archive] + devs, check=True, capture_output=True)
        for i in range(a.devices):
            os.unlink(os.path.join(work, f"d{i}.raw"))
    for limit in ["32M", "16M"]:
        out = os.path.join(work, f"out-{limit}")
        subprocess.run(["rm", "-rf", out])
        rc, rss, err = run([QP, "restore", "vma", archive, out, "-c", "-o", "compression_type=zstd", "--memory-limit", limit])
        rows.append((f"restore vma, {a.devices} drives, zstd", limit, rc, rss, err))
        subprocess.run(["rm", "-rf", out])

    raw = a.raw
    if raw is None:
        raw = os.path.join(work, "src.raw")
        if not os.path.exists(raw):
            device(raw, 512 << 20, 99)
    for limit in ["64M", "256M"]:
        dst = os.path.join(work, "t.qcow2")
        if os.path.exists(dst):
            os.unlink(dst)
        rc, rss, err = run([QP, "convert", "-c", "-o", "compression_type=zstd", "--threads", "256", "--memory-limit", limit, raw, dst])
        rows.append((f"convert --threads 256, zstd, {os.path.basename(raw)}", limit, rc, rss, err))
        if os.path.exists(dst):
            os.unlink(dst)

    print("| case | --memory-limit | exit | peak RSS MiB | bound (limit + 32) MiB | within | stderr |")
    print("|---|---|---|---|---|---|---|")
    for name, limit, rc, rss, err in rows:
        bound = int(limit[:-1]) + 32
        ok = "yes" if rc == 0 and rss <= bound << 20 else ("refused" if rc == 1 else "NO")
        msg = (err[0] if err else "")[:110]
        print(f"| {name} | {limit} | {rc} | {rss / 2**20:.0f} | {bound} | {ok} | {msg} |")


if __name__ == "__main__":
    main()
