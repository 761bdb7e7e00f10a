#!/bin/bash
# OVA import (#31): an OVA of two streamOptimized VMDKs (the bench disk, 3 GiB, and a second disk
# of 1 GiB cut from it at 1 GiB; SHA-256 manifest, pax tar by Tests/Support/make_ova.py) into
# qcow2s, side by side in one run:
#   qcowpress convert -c VM.ova OUTDIR           (reads the tar in place; checks the manifest)
#   tar xf VM.ova -C STAGE; qemu-img convert -c -W -m 16 -O qcow2 each disk; sync
#                                                (Proxmox's way: unpack, then convert; no digest check)
# Caches are dropped before each (when root). Every image is checked with qemu-img compare against
# its raw. Staged bytes = bytes the run wrote (/proc/PID/io write_bytes of the shell that ran it,
# children included) minus the bytes of its final qcow2s.
#   bench/ova_bench.sh [QCOWPRESS_BINARY [RAW]]
# Environment: WORK (default /work/ova-bench; the VMDKs and the OVA are kept there between runs),
# MF (sha256, sha1 or none; default sha256), QP_ARGS / Q_ARGS (extra qcowpress / qemu-img convert
# arguments, e.g. "-o compression_type=zstd" for both).
# The machine's load matters: on a shared machine compare the CPU seconds too (load-independent).
set -euo pipefail
Q=${1:-/work/benchbuild/release/qcowpress}
RAW=${2:-/work/bench-disk.raw}
WORK=${WORK:-/work/ova-bench}
MF=${MF:-sha256}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
now() { date +%s.%N; }
secs() { echo "scale=2; ($2 - $1) / 1" | bc; }
drop() { sync; [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches || true; }
# Runs "$@" in a shell and prints the bytes it (and its children) wrote; its wall and CPU seconds
# (user + system, children included) go to $WORK/time.
written() { /usr/bin/time -f "%e %U %S" -o "$WORK/time" bash -c '"$@" >&2; awk "/^write_bytes/ {print \$2}" /proc/$$/io' _ "$@"; }
cpu() { awk '{printf "%.1f", $2 + $3}' "$WORK/time"; }

if [ ! -f "$WORK/disk2.raw" ] || [ "$WORK/disk2.raw" -ot "$RAW" ]; then
    dd if="$RAW" of="$WORK/disk2.raw" bs=1M skip=1024 count=1024 conv=sparse status=none
fi
for i in 1 2; do
    src=$RAW; [ $i = 2 ] && src=$WORK/disk2.raw
    if [ ! -f "$WORK/disk$i.vmdk" ] || [ "$WORK/disk$i.vmdk" -ot "$src" ]; then
        qemu-img convert -O vmdk -o subformat=streamOptimized "$src" "$WORK/disk$i.vmdk.part" && mv "$WORK/disk$i.vmdk.part" "$WORK/disk$i.vmdk"
    fi
done
OVA=$WORK/vm-$MF.ova
if [ ! -f "$OVA" ] || [ "$OVA" -ot "$WORK/disk1.vmdk" ]; then
    python3 "$HERE/../Tests/Support/make_ova.py" "$OVA" --mf "$MF" \
        --disk "disk1.vmdk=$WORK/disk1.vmdk:$(stat -c %s "$RAW")" --disk "disk2.vmdk=$WORK/disk2.vmdk:$(stat -c %s "$WORK/disk2.raw")"
fi

rm -rf "$WORK/qp" "$WORK/stage" "$WORK/q"
drop; t0=$(now)
qp_written=$(written "$Q" convert -c ${QP_ARGS:-} "$OVA" "$WORK/qp")
t1=$(now)
qp_cpu=$(cpu)
qp_out=$(( $(stat -c %s "$WORK/qp/disk1.qcow2") + $(stat -c %s "$WORK/qp/disk2.qcow2") + $(stat -c %s "$WORK/qp/vm.json") ))

drop; t2=$(now)
q_written=$(written bash -c "mkdir -p '$WORK/stage' '$WORK/q' && tar xf '$OVA' -C '$WORK/stage' && echo tar-done \$(date +%s.%N) >&2 &&
    qemu-img convert -c ${Q_ARGS:-} -W -m 16 -O qcow2 '$WORK/stage/disk1.vmdk' '$WORK/q/disk1.qcow2' &&
    qemu-img convert -c ${Q_ARGS:-} -W -m 16 -O qcow2 '$WORK/stage/disk2.vmdk' '$WORK/q/disk2.qcow2' && sync" 2> "$WORK/q.log")
t3=$(now)
q_cpu=$(cpu)
q_out=$(( $(stat -c %s "$WORK/q/disk1.qcow2") + $(stat -c %s "$WORK/q/disk2.qcow2") ))
staged=$(du -sb "$WORK/stage" | cut -f1)
ttar=$(awk '/tar-done/ {print $2}' "$WORK/q.log")

for out in qp q; do
    qemu-img compare -q -f raw -F qcow2 "$RAW" "$WORK/$out/disk1.qcow2" || { echo "$out/disk1.qcow2 differs" >&2; exit 1; }
    qemu-img compare -q -f raw -F qcow2 "$WORK/disk2.raw" "$WORK/$out/disk2.qcow2" || { echo "$out/disk2.qcow2 differs" >&2; exit 1; }
done
a=$(secs "$t0" "$t1"); b=$(secs "$t2" "$t3")
echo "| OVA ($(du -h "$OVA" | cut -f1), manifest $MF) | qcowpress convert -c ${QP_ARGS:-} | tar x + qemu-img convert -c ${Q_ARGS:-} -W -m 16 ×2 + sync | ratio |"
echo "|---|---|---|---|"
echo "| wall (s) | $a | $b (tar x $(secs "$t2" "$ttar")) | $(echo "scale=2; $a / $b" | bc) |"
echo "| CPU user+sys (s) | $qp_cpu | $q_cpu | $(echo "scale=2; $qp_cpu / $q_cpu" | bc) |"
echo "| bytes written | $qp_written (outputs $qp_out: staged $(( qp_written > qp_out ? qp_written - qp_out : 0 ))) | $q_written (outputs $q_out, unpacked $staged) | |"
rm -rf "$WORK/qp" "$WORK/stage" "$WORK/q"
