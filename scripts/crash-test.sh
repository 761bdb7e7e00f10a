#!/usr/bin/env bash
# Kills conversions with SIGKILL at random moments and checks crash consistency:
#   - DST either does not exist, or is complete (the kill came after the rename) and clean;
#   - a leftover temporary file never looks like an image (qemu-img refuses it: header is zero);
#   - a rerun succeeds and equals the source.
# Usage: scripts/crash-test.sh [KILLS=100] [SEED=1] [SIZE_MB=256]
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-100}
seed=${2:-1}
size=${3:-256}
bin=${QCOWPRESS_BIN:-.build/debug/qcowpress}
[ -x "$bin" ] || swift build >/dev/null
work=$(mktemp -d /tmp/qp-crash.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 - "$work/src.raw" "$size" <<'PY'
import os, random, sys
random.seed(5)
path, mb = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for i in range(mb):
        k = i % 4
        if k == 0: f.write(bytes(1 << 20))
        elif k == 1: f.write(os.urandom(1 << 20))
        else: f.write(bytes(random.choice(b"ACGT \n") for _ in range(1 << 16)) * 16)
PY
RANDOM=$seed
killed=0; complete=0
for i in $(seq 1 "$kills"); do
    dst="$work/dst.qcow2"
    rm -f "$dst"
    "$bin" convert -c --threads 2 "$work/src.raw" "$dst" 2>/dev/null &
    pid=$!
    # 0–1.2 s: before, during and (sometimes) after the work.
    sleep "$((RANDOM % 2)).$(printf %03d $((RANDOM % 1000)))"
    [ $((RANDOM % 5)) -eq 0 ] && sleep 0.2
    kill -9 "$pid" 2>/dev/null && killed=$((killed + 1)) || true
    wait "$pid" 2>/dev/null || true
    if [ -e "$dst" ]; then
        qemu-img check -q "$dst" || { echo "kill $i: DST exists but is not clean"; exit 1; }
        qemu-img compare -q "$work/src.raw" "$dst" || { echo "kill $i: DST exists but differs"; exit 1; }
        complete=$((complete + 1))
    fi
    for t in "$work"/.dst.qcow2.qcowpress-*.tmp; do
        [ -e "$t" ] || continue
        if qemu-img info -f qcow2 "$t" >/dev/null 2>&1; then echo "kill $i: temporary file $t looks like a qcow2 image"; exit 1; fi
        rm -f "$t"
    done
done
"$bin" convert -c -o compression_type=zstd --force "$work/src.raw" "$work/dst.qcow2"
qemu-img compare -q "$work/src.raw" "$work/dst.qcow2"
echo "crash test: $kills runs ($killed killed mid-run, $complete had finished), DST never incomplete, rerun good"
