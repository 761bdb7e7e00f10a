#!/usr/bin/env bash
# Runs every fuzz target of qcowpress-fuzz for SECONDS each (default 10), or until RUNS executions.
# Usage: fuzz/run.sh [SECONDS] [RUNS] [TARGET...]
# A crash leaves fuzz-crash-TARGET.bin in the current directory and makes this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
runs=${2:-}
shift $(( $# > 2 ? 2 : $# )) || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(qcow2-header qcow2-entries qcow2-image fidx blob manifest keyfile vma vmdk vmdk-stream vhdx vhd vdi ova-tar ovf s3-xml image-tools)
bin=${QCOWPRESS_FUZZ:-.build/release/qcowpress-fuzz}
[ -x "$bin" ] || swift build -c release --product qcowpress-fuzz >/dev/null
for t in "${targets[@]}"; do
    extra=()
    [ -n "$runs" ] && extra=(--runs "$runs")
    "$bin" "$t" "Fixtures/fuzz/$t" --seconds "$secs" "${extra[@]}"
done
