#!/bin/bash
# PBS restore against its compute limit, caches dropped before each run (root):
#   bench/pbs_limit.sh QCOWPRESS_BINARY DATASTORE [OUT.qcow2]
# DATASTORE holds vm/100/2026-11-20T10:00:00Z drive-scsi0.img (Tests/Support/pbs_datastore.py makes
# one from a raw disk). Prints the single-loader verify-only time, the restore's, and
# (verify / cores) / restore: the share of the compute limit the restore reaches.
set -euo pipefail
Q=$1; DS=$2; OUT=${3:-/tmp/pbs_limit.qcow2}; S=vm/100/2026-11-20T10:00:00Z
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
drop; t0=$(now); "$Q" restore pbs --datastore "$DS" "$S" --verify-only --loaders 1 > /dev/null; t1=$(now)
v=$(echo "$t1 - $t0" | bc)
rm -f "$OUT"; drop; t0=$(now); "$Q" restore pbs --datastore "$DS" "$S" drive-scsi0.img "$OUT" > /dev/null; t1=$(now)
r=$(echo "$t1 - $t0" | bc)
echo "verify-only (1 loader) $v s, restore $r s, limit share $(echo "scale=3; $v / $(nproc) / $r" | bc)"
rm -f "$OUT"
