#!/usr/bin/env python3
"""QcowPress vs qemu-img on the same raw image, in one run.

Usage: bench/bench.py RAW_IMAGE [--out bench/results] [--quick] [--only NAME,...]

For every case it runs qemu-img convert and qcowpress convert on RAW_IMAGE and reports wall time,
output size, peak RSS, page-cache growth (/proc/meminfo Cached, caches dropped before each run when
root), producer stall and CPU efficiency ((codec CPU seconds / cores) / wall; 1.0 = the codec limit).
Writes results.md (Markdown table) and results.png (chart) into --out.
"""
import argparse, json, os, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QP = os.environ.get("QCOWPRESS_BIN") or os.path.join(ROOT, ".build", "release", "qcowpress")
CORES = os.cpu_count() or 1

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from restore_bench import steal_seconds, steal_note  # noqa: E402  (one definition)


def cached_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return 0


def drop_caches():
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def fincore_bytes(*paths):
    """Bytes of these files resident in the page cache (util-linux fincore)."""
    total = 0
    for p in paths:
        if not os.path.exists(p):
            continue
        r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", p], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            total += int(r.stdout.split()[0])
    return total


def run(cmd, dst, sync_after=False, src=None):
    if os.path.exists(dst):
        os.unlink(dst)
    drop_caches()
    c0 = cached_kib()
    t0 = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
    if sync_after:
        subprocess.run(["sync"], check=True)
    wall = time.monotonic() - t0
    c1 = cached_kib()
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    rss_kib = int(p.stderr.strip().splitlines()[-1])
    files_cache = fincore_bytes(src, dst) if src else 0
    summary = None
    if p.stdout.strip().startswith("{"):
        summary = json.loads(p.stdout)
    st = os.stat(dst)
    return {"wall": wall, "size": st.st_size, "alloc": st.st_blocks * 512, "rss": rss_kib * 1024,
            "cache": max(0, c1 - c0) * 1024, "files_cache": files_cache, "summary": summary}


def check(dst, raw):
    for args in (["check", dst], ["compare", "-f", "raw", "-F", "qcow2", raw, dst]):
        p = subprocess.run(["qemu-img"] + args, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"qemu-img {' '.join(args)} failed: {p.stdout}{p.stderr}")


def main():
    steal0, t0 = steal_seconds(), time.monotonic()
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--workdir", default=None, help="where outputs go (default: beside the image)")
    ap.add_argument("--only", default=None)
    ap.add_argument("--no-verify", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    work = a.workdir or os.path.dirname(os.path.abspath(a.raw))
    q = os.path.join(work, "bench-qemu.qcow2")
    d = os.path.join(work, "bench-qp.qcow2")
    raw = a.raw
    qp_common = [QP, "convert", "--force", "--output", "json"]
    cases = [
        # name, qemu-img command, qcowpress args, qemu sync_after
        ("zlib6 vs qemu -c", ["qemu-img", "convert", "-c", "-O", "qcow2", raw, q], ["-c"], False),
        ("zlib6 vs qemu -c -W -m 16", ["qemu-img", "convert", "-c", "-W", "-m", "16", "-O", "qcow2", raw, q], ["-c"], False),
        ("zstd3 vs qemu zstd -W -m 16", ["qemu-img", "convert", "-c", "-W", "-m", "16", "-O", "qcow2", "-o", "compression_type=zstd", raw, q], ["-c", "-o", "compression_type=zstd"], False),
        ("fast deflate (level 1) vs qemu -c -W -m 16", ["qemu-img", "convert", "-c", "-W", "-m", "16", "-O", "qcow2", raw, q], ["-c", "-o", "compression_level=1"], False),
        ("uncompressed (durable) vs qemu + sync", ["qemu-img", "convert", "-O", "qcow2", raw, q], [], True),
        ("zstd3 --memory-limit 16M vs qemu zstd -W -m 16", ["qemu-img", "convert", "-c", "-W", "-m", "16", "-O", "qcow2", "-o", "compression_type=zstd", raw, q], ["-c", "-o", "compression_type=zstd", "--memory-limit", "16M"], False),
        ("zstd3 --threads 1 vs qemu zstd -W -m 16", ["qemu-img", "convert", "-c", "-W", "-m", "16", "-O", "qcow2", "-o", "compression_type=zstd", raw, q], ["-c", "-o", "compression_type=zstd", "--threads", "1"], False),
    ]
    only = set(a.only.split(",")) if a.only else None
    rows = []
    qemu_cache = {}
    for name, qcmd, qpargs, qsync in cases:
        if only and not any(o in name for o in only):
            continue
        key = " ".join(qcmd)
        if key not in qemu_cache:
            qemu_cache[key] = run(qcmd, q, sync_after=qsync, src=raw)
            if not a.no_verify:
                check(q, raw)
        qr = qemu_cache[key]
        pr = run(qp_common + qpargs + [raw, d], d, src=raw)
        if not a.no_verify:
            check(d, raw)
        s = pr["summary"]
        eff = (s["codecSeconds"] / min(CORES, s["threads"])) / pr["wall"] if s["codecSeconds"] > 0 else None
        # Producer stall per reader thread (2 readers), and the share of it the disk caused
        # (the writer waiting for completions); the rest is back-pressure from the codec.
        rows.append({"case": name, "qemu": qr, "qp": pr, "eff": eff,
                     "stall": s["producerStallSeconds"] / 2 / pr["wall"],
                     "disk": s["diskBusySeconds"] / pr["wall"], "io": s["ioMode"]})
        print(f"{name}: qemu {qr['wall']:.2f}s qcowpress {pr['wall']:.2f}s ratio {pr['wall']/qr['wall']:.3f}", flush=True)
    for p in (q, d):
        if os.path.exists(p):
            os.unlink(p)

    mib = 1 << 20
    lines = [f"Source: `{raw}` ({os.stat(raw).st_size / mib:.0f} MiB virtual, "
             f"{os.stat(raw).st_blocks * 512 / mib:.0f} MiB allocated), {CORES} cores.", "",
             "| case | qemu-img s | qcowpress s | time ratio | size ratio | qemu RSS MiB | qp RSS MiB | qemu cache MiB (files) | qp cache MiB (files) | qp Cached growth MiB | CPU eff. | producer wait % | disk wait % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        qr, pr = r["qemu"], r["qp"]
        eff = f"{r['eff']:.2f}" if r["eff"] is not None else "–"
        lines.append(f"| {r['case']} | {qr['wall']:.2f} | {pr['wall']:.2f} | {pr['wall']/qr['wall']:.3f} | "
                     f"{pr['size']/qr['size']:.3f} | {qr['rss']/mib:.0f} | {pr['rss']/mib:.0f} | "
                     f"{qr['files_cache']/mib:.0f} | {pr['files_cache']/mib:.0f} | {pr['cache']/mib:.0f} | {eff} | "
                     f"{100*r['stall']:.1f} | {100*r['disk']:.2f} |")
    lines += ["", steal_note(steal0, t0)]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.5))
        names = [r["case"] for r in rows]
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], [r["qemu"]["wall"] for r in rows], height=0.4, label="qemu-img")
        ax.barh([i - 0.2 for i in y], [r["qp"]["wall"] for r in rows], height=0.4, label="qcowpress")
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (lower is better)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "results.png"), dpi=100)
    except ImportError:
        print("matplotlib missing: no chart (pip install matplotlib)")


if __name__ == "__main__":
    main()
