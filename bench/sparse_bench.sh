#!/bin/bash
# Cost follows the data (#30): 64 MiB of random data in a sparse raw of 1 TiB and 16 TiB (ext4)
# and 64 TiB (tmpfs: ext4 stops at 16 TiB), converted with -c and the result exported, each
# against qemu-img in the same run:
#   bench/sparse_bench.sh [QCOWPRESS_BINARY [SIZES...]]    (sizes: 1T 16T 64T by default)
# Environment: WORK (ext4 directory, default /work/sparse-bench), SHM (tmpfs directory, default
# /dev/shm/qp-sparse-bench). Outputs always go to WORK (tmpfs refuses O_DIRECT). Prints one
# markdown row per size: seconds for qcowpress convert -c / qemu-img convert -c, qcowpress export
# / qemu-img convert -c -o compression_type=zstd of the same result; every image is compared
# with qemu-img compare.
set -euo pipefail
Q=${1:-/work/benchbuild/release/qcowpress}
shift || true
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(1T 16T 64T)
WORK=${WORK:-/work/sparse-bench}
SHM=${SHM:-/dev/shm/qp-sparse-bench}
mkdir -p "$WORK" "$SHM"
trap 'rm -rf "$WORK" "$SHM"' EXIT
now() { date +%s.%N; }
secs() { echo "scale=2; ($2 - $1) / 1" | bc; }

head -c $((64 << 20)) /dev/urandom > "$WORK/random"
echo "| size (source on) | qcowpress convert -c | qemu-img convert -c | qcowpress export | qemu-img convert -c zstd |"
echo "|---|---|---|---|---|"
for s in "${SIZES[@]}"; do
    case $s in
        1T) bytes=$((1 << 40)); dir=$WORK; fs=ext4 ;;
        # ext4's largest file is 16 TiB less one block.
        16T) bytes=$(((16 << 40) - (1 << 20))); dir=$WORK; fs=ext4 ;;
        64T) bytes=$((64 << 40)); dir=$SHM; fs=tmpfs ;;
        *) echo "size $s: use 1T, 16T or 64T" >&2; exit 2 ;;
    esac
    src=$dir/src.raw
    rm -f "$src"; truncate -s "$bytes" "$src"
    # 8 pieces of 8 MiB spread over the image, none cluster-aligned.
    for i in 0 1 2 3 4 5 6 7; do
        at=$(( (bytes / 8) * i + i * 12345 * 512 ))
        dd if="$WORK/random" of="$src" bs=1M skip=$((i << 23)) count=$((8 << 20)) iflag=skip_bytes,count_bytes \
           oflag=seek_bytes seek=$at conv=notrunc status=none
    done
    rm -f "$WORK"/*.qcow2
    t0=$(now); "$Q" convert -c "$src" "$WORK/qp.qcow2"; t1=$(now)
    qemu-img convert -c -O qcow2 "$src" "$WORK/q.qcow2"; t2=$(now)
    "$Q" export "$WORK/qp.qcow2" "$WORK/qpe.qcow2"; t3=$(now)
    qemu-img convert -c -O qcow2 -o compression_type=zstd "$WORK/qp.qcow2" "$WORK/qe.qcow2"; t4=$(now)
    for img in qp q qpe qe; do
        qemu-img compare -q -f raw -F qcow2 "$src" "$WORK/$img.qcow2" || { echo "$img.qcow2 differs from the source" >&2; exit 1; }
    done
    echo "| $s ($fs) | $(secs "$t0" "$t1") | $(secs "$t1" "$t2") | $(secs "$t2" "$t3") | $(secs "$t3" "$t4") |"
    rm -f "$src"
done
