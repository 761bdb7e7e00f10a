#!/bin/bash
# Peak RSS of a restore of N drives under --memory-limit (#30: the limit must hold for any number
# of drives, within the limit + a stated constant):
#   bench/memory_drives.sh QCOWPRESS_BINARY [WORKDIR] [LIMIT] [DRIVE_COUNTS...]
# Defaults: WORKDIR /var/tmp/qp-memdrives, LIMIT 32M, counts 1 64 200. For each N it makes (once,
# kept in WORKDIR) a PBS datastore with N drives of 8 MiB (two 4 MiB chunks: random, text and
# zeros; every drive distinct) with Tests/Support/pbs_datastore.py, and a VMA archive of the same
# drives with Tests/Support/make_vma.py; then runs `restore pbs --all` and `restore vma` (zstd,
# zstd's -c path costs the most workers' memory) under /usr/bin/time and prints one row per run:
# peak RSS (%M), the bound (the limit + 48 MiB), the exit status. A refusal ("at least NM is
# needed") is followed by a run at the size it names, which must complete within its bound.
set -euo pipefail
Q=$1; WORK=${2:-/var/tmp/qp-memdrives}; LIMIT=${3:-32M}; shift $(( $# < 3 ? $# : 3 )) || true
COUNTS=("$@"); [ ${#COUNTS[@]} -eq 0 ] && COUNTS=(1 64 200)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SNAP=vm/100/2026-11-20T10:00:00Z
mkdir -p "$WORK"

make_drives() {  # N DIR: N raw files of 8 MiB, each different
    python3 - "$1" "$2" <<'EOF'
import os, random, sys
n, d = int(sys.argv[1]), sys.argv[2]
os.makedirs(d, exist_ok=True)
text = b"the quick brown fox jumps over a lazy dog 0123456789\n"
for i in range(n):
    r = random.Random(i)
    with open(f"{d}/d{i}.raw", "wb") as f:
        for part in range(8):  # 1 MiB pieces: random, text or zeros
            k = r.randrange(3)
            f.write(r.randbytes(1 << 20) if k == 0 else
                    ((text + str(i).encode()) * 20000)[:1 << 20] if k == 1 else bytes(1 << 20))
EOF
}

printf '| command | drives | --memory-limit | exit | peak RSS MiB | bound MiB | within |\n|---|---|---|---|---|---|---|\n'
for n in "${COUNTS[@]}"; do
    ds=$WORK/ds$n; vma=$WORK/many$n.vma; raws=$WORK/raw$n
    if [ ! -d "$ds" ] || [ ! -f "$vma" ]; then
        make_drives "$n" "$raws"
        args=(); vargs=()
        for i in $(seq 0 $((n - 1))); do
            args+=(--drive "drive-scsi$i.img=$raws/d$i.raw"); vargs+=(--device "drive-scsi$i=$raws/d$i.raw")
        done
        rm -rf "$ds"
        python3 "$ROOT/Tests/Support/pbs_datastore.py" --datastore "$ds" --snapshot $SNAP --seed 1 "${args[@]}" > /dev/null
        python3 "$ROOT/Tests/Support/make_vma.py" "$vma" "${vargs[@]}" > /dev/null
        rm -rf "$raws"
    fi
    for cmd in pbs vma; do
        out=$WORK/out
        if [ $cmd = pbs ]; then
            run=("$Q" restore pbs --datastore "$ds" $SNAP --all "$out")
        else
            run=("$Q" restore vma "$vma" "$out")
        fi
        # A refusal must name a size that runs: that size is tried next.
        limit=$LIMIT
        while [ -n "$limit" ]; do
            rm -rf "$out"
            set +e
            /usr/bin/time -f %M -o "$WORK/rss" "${run[@]}" -c -o compression_type=zstd --memory-limit "$limit" > /dev/null 2> "$WORK/err"
            rc=$?
            set -e
            rss=$(( $(tail -1 "$WORK/rss") / 1024 )); b=$(( ${limit%M} + 48 ))
            ok=$([ $rc -eq 0 ] && [ $rss -le $b ] && echo yes || ([ $rc -eq 1 ] && echo refused || echo NO))
            printf '| restore %s | %d | %s | %d | %d | %d | %s |\n' $cmd "$n" "$limit" $rc $rss $b $ok
            [ $rc -eq 0 ] || sed 's/^/    /' "$WORK/err" | head -3
            prev=$limit; limit=$(grep -o 'at least [0-9]*M' "$WORK/err" | grep -o '[0-9]*M' || true)
            [ "$limit" != "$prev" ] || limit=""
        done
        rm -rf "$out"
    done
done
