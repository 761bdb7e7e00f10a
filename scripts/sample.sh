#!/usr/bin/env bash
# Makes a small mixed raw disk (zeros, text, random data, an unaligned tail), converts it to a
# zstd-compressed qcow2 with qcowpress, and lets qemu-img judge the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
swift build -c release >/dev/null
mkdir -p sample
python3 - <<'PY'
import os, random
random.seed(7)
with open("sample/disk.raw", "wb") as f:
    for i in range(48):
        kind = i % 4
        if kind == 0: f.write(bytes(1 << 20))
        elif kind == 1: f.write(os.urandom(1 << 20))
        else: f.write(bytes(random.choice(b"ACGT \n") for _ in range(1 << 20)))
    f.write(b"unaligned tail" * 100)
PY
.build/release/qcowpress convert -c -o compression_type=zstd --force --output json sample/disk.raw sample/disk.qcow2
qemu-img check sample/disk.qcow2
qemu-img compare sample/disk.raw sample/disk.qcow2
ls -ls sample/disk.raw sample/disk.qcow2
