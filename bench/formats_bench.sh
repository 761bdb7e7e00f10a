#!/bin/bash
# Image formats in (#31): the bench disk made into each format by qemu-img, then converted to a
# zstd-compressed qcow2 by qcowpress and by qemu-img (-c -o compression_type=zstd -W -m 16, then
# sync: qcowpress's output is durable when it exits), side by side in one run, caches dropped
# before each conversion (when root). Every result is checked with qemu-img compare against the raw.
#   bench/formats_bench.sh [QCOWPRESS_BINARY [RAW]]
# Environment: WORK (directory for sources and outputs, default /work/formats-bench; the format
# copies of RAW are kept there between runs), FORMATS (default "raw vmdk-stream").
# Prints one markdown row per format: seconds for qcowpress and qemu-img, and their ratio.
# Adding a format: one line in make_source (and its name in FORMATS).
set -euo pipefail
Q=${1:-/work/benchbuild/release/qcowpress}
RAW=${2:-/work/bench-disk.raw}
WORK=${WORK:-/work/formats-bench}
FORMATS=${FORMATS:-raw vmdk-stream}
mkdir -p "$WORK"
now() { date +%s.%N; }
secs() { echo "scale=2; ($2 - $1) / 1" | bc; }
drop() { sync; [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches || true; }

# make_source FORMAT -> prints the path of RAW in that format (made once, reused while newer than RAW).
make_source() {
    local f=$1 out
    case $f in
        raw) echo "$RAW"; return ;;
        vmdk-stream) out=$WORK/src-stream.vmdk; opts=(-O vmdk -o subformat=streamOptimized) ;;
        vmdk-sparse) out=$WORK/src-sparse.vmdk; opts=(-O vmdk -o subformat=monolithicSparse) ;;
        vhdx) out=$WORK/src-dynamic.vhdx; opts=(-O vhdx -o subformat=dynamic) ;;
        vhdx-fixed) out=$WORK/src-fixed.vhdx; opts=(-O vhdx -o subformat=fixed) ;;
        vhd) out=$WORK/src-dynamic.vhd; opts=(-O vpc -o subformat=dynamic,force_size=on) ;;
        vdi) out=$WORK/src-dynamic.vdi; opts=(-O vdi -o static=off) ;;
        *) echo "unknown format $f" >&2; exit 2 ;;
    esac
    if [ ! -f "$out" ] || [ "$out" -ot "$RAW" ]; then
        qemu-img convert "${opts[@]}" "$RAW" "$out.part" && mv "$out.part" "$out"
    fi
    echo "$out"
}

echo "| source | size on disk | qcowpress convert -c zstd (s) | qemu-img convert -c zstd -W -m 16 + sync (s) | ratio |"
echo "|---|---|---|---|---|"
for f in $FORMATS; do
    src=$(make_source "$f")
    rm -f "$WORK/qp.qcow2" "$WORK/q.qcow2"
    drop; t0=$(now)
    "$Q" convert -c -o compression_type=zstd "$src" "$WORK/qp.qcow2"
    t1=$(now)
    drop; t2=$(now)
    qemu-img convert -c -O qcow2 -o compression_type=zstd -W -m 16 "$src" "$WORK/q.qcow2"; sync
    t3=$(now)
    for img in qp q; do
        qemu-img compare -q -f raw -F qcow2 "$RAW" "$WORK/$img.qcow2" || { echo "$f: $img.qcow2 differs from $RAW" >&2; exit 1; }
    done
    a=$(secs "$t0" "$t1"); b=$(secs "$t2" "$t3")
    echo "| $f | $(du -h "$src" | cut -f1) | $a | $b | $(echo "scale=2; $a / $b" | bc) |"
done
rm -f "$WORK/qp.qcow2" "$WORK/q.qcow2"
