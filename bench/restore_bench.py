#!/usr/bin/env python3
"""Restore and reader throughput: PBS, VMA and qcow2 sources, against qemu-img in the same run.

Usage: bench/restore_bench.py RAW_IMAGE [--work DIR]
Builds (once, in --work) a PBS datastore and a VMA archive of RAW_IMAGE with the test-data writers
(Tests/Support), and a zlib-compressed qcow2 with qemu-img, then measures:
  PBS:   single-thread verify (read + CRC + zstd decode + SHA-256: the compute limit), restore to
         uncompressed and to zstd qcow2; ratio = (single-thread time / cores) / restore time.
  VMA:   restore of the .vma and .vma.zst to uncompressed and zstd qcow2, MB/s of archive, beside
         qemu-img convert of the raw disk (+ sync) and qemu-img convert -c zstd -W -m 16.
  qcow2: recompress (zlib qcow2 -> zstd qcow2) and qcow2 -> raw, against qemu-img convert.
Writes a Markdown table to bench/results/restore.md.
"""
import argparse, json, os, shutil, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QP = os.path.join(ROOT, ".build", "release", "qcowpress")
CORES = os.cpu_count() or 1
SNAP = "vm/100/2026-11-20T10:00:00Z"


def drop():
    subprocess.run(["sync"])
    try:
        open("/proc/sys/vm/drop_caches", "w").write("3\n")
    except OSError:
        pass


def steal_seconds():
    """CPU seconds the hypervisor has taken from this VM so far, all cores (/proc/stat "steal"):
    on a shared host a run that lost much of its time to it measured the host, not the code."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def steal_note(since, started):
    """One line: the steal since `since` against the cores' time since `started` (monotonic)."""
    stolen, span = steal_seconds() - since, (time.monotonic() - started) * CORES
    return f"Steal during the bench: {stolen:.1f} s of {span:.0f} core-seconds ({100 * stolen / max(span, 1e-9):.1f} %)."


def timed(cmd, sync=False):
    drop()
    t = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if sync:
        subprocess.run(["sync"])
    dt = time.monotonic() - t
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return dt, p.stdout


def main():
    steal0, t0 = steal_seconds(), time.monotonic()
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    raw = os.path.abspath(a.raw)
    work = a.work or os.path.join(os.path.dirname(raw), "restore-bench")
    os.makedirs(work, exist_ok=True)
    ds, vma, vmaz, zq = (os.path.join(work, n) for n in ("pbs", "disk.vma", "disk.vma.zst", "disk-zlib.qcow2"))
    if not os.path.exists(ds):
        subprocess.run([sys.executable, os.path.join(ROOT, "Tests/Support/pbs_datastore.py"), "--datastore", ds,
                        "--snapshot", SNAP, "--drive", f"drive-scsi0.img={raw}"], check=True, stdout=subprocess.DEVNULL)
    if not os.path.exists(vma):
        subprocess.run([sys.executable, os.path.join(ROOT, "Tests/Support/make_vma.py"), vma, "--device", f"drive-scsi0={raw}"],
                       check=True, stdout=subprocess.DEVNULL)
    if not os.path.exists(vmaz):
        subprocess.run(["zstd", "-q", "-T0", "-3", vma, "-o", vmaz], check=True)
    if not os.path.exists(zq):
        subprocess.run(["qemu-img", "convert", "-c", "-W", "-m", "16", "-O", "qcow2", raw, zq], check=True)
    out = os.path.join(work, "out.qcow2")
    outdir = os.path.join(work, "vmaout")
    size = os.stat(raw).st_size
    mb = 1e6
    rows = []

    def clean():
        for p in (out, out + ".raw"):
            if os.path.exists(p):
                os.unlink(p)
        shutil.rmtree(outdir, ignore_errors=True)

    # PBS
    v1, s = timed([QP, "restore", "pbs", "--datastore", ds, SNAP, "--verify-only", "--loaders", "1", "--output", "json"])
    vinfo = json.loads(s)
    chunk_bytes = vinfo["bytes"]
    limit = v1 / CORES
    for label, extra in (("uncompressed", []), ("zstd", ["-c", "-o", "compression_type=zstd"])):
        clean()
        dt, _ = timed([QP, "restore", "pbs", "--datastore", ds, SNAP, "drive-scsi0.img", out] + extra)
        rows.append((f"PBS restore → {label} qcow2", dt, f"{size/dt/mb:.0f} MB/s of image, {chunk_bytes/dt/mb:.0f} MB/s of chunk data",
                     f"compute limit {limit:.2f} s (single-thread verify {v1:.2f} s / {CORES}): {limit/dt:.2f} of it"))
    # VMA
    q1, _ = timed(["qemu-img", "convert", "-O", "qcow2", raw, out], sync=True); clean()
    q2, _ = timed(["qemu-img", "convert", "-c", "-W", "-m", "16", "-o", "compression_type=zstd", "-O", "qcow2", raw, out]); clean()
    for arch in (vma, vmaz):
        asize = os.stat(arch).st_size
        for label, extra, ref in (("uncompressed", [], q1), ("zstd", ["-c", "-o", "compression_type=zstd"], q2)):
            clean()
            dt, _ = timed([QP, "restore", "vma", arch, outdir] + extra)
            rows.append((f"VMA restore {os.path.basename(arch)} → {label}", dt, f"{asize/dt/mb:.0f} MB/s of archive, {size/dt/mb:.0f} MB/s of disk",
                         f"qemu-img convert of the raw disk{' (+sync)' if not extra else ' -c zstd -W -m 16'}: {ref:.2f} s, ratio {dt/ref:.2f}"))
    # qcow2 reader
    clean()
    qa, _ = timed(["qemu-img", "convert", "-c", "-W", "-m", "16", "-o", "compression_type=zstd", "-O", "qcow2", zq, out]); clean()
    pa, _ = timed([QP, "convert", "-c", "-o", "compression_type=zstd", zq, out]); clean()
    rows.append(("qcow2 zlib → zstd recompress", pa, f"{size/pa/mb:.0f} MB/s of image", f"qemu-img -W -m 16: {qa:.2f} s, ratio {pa/qa:.2f}"))
    qb, _ = timed(["qemu-img", "convert", "-O", "raw", zq, out + ".raw"], sync=True); clean()
    pb, _ = timed([QP, "convert", "-O", "raw", zq, out + ".raw"]); clean()
    rows.append(("qcow2 zlib → raw", pb, f"{size/pb/mb:.0f} MB/s of image", f"qemu-img + sync: {qb:.2f} s, ratio {pb/qb:.2f}"))
    clean()
    lines = [f"Source `{raw}` ({size/2**20:.0f} MiB), {CORES} cores. PBS: {vinfo['chunks']} distinct non-zero 4 MiB chunks.", "",
             "| case | seconds | throughput | reference |", "|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]} | {r[3]} |" for r in rows]
    lines += ["", steal_note(steal0, t0)]
    md = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    open(os.path.join(ROOT, "bench", "results", "restore.md"), "w").write(md)
    print(md)


if __name__ == "__main__":
    main()
