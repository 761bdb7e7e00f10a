#!/usr/bin/env bash
# Builds a realistic VM-disk-like raw image: an ext4 file system of SIZE (default 3G) populated
# with real files (binaries, libraries, text, docs) from this machine, ~1.5 GB used.
# Usage: bench/make-image.sh OUT.raw [SIZE]
set -euo pipefail
out=${1:?usage: make-image.sh OUT.raw [SIZE]}
size=${2:-3G}
stage=$(mktemp -d /tmp/qp-stage.XXXXXX)
trap 'rm -rf "$stage"' EXIT
# Hard links: no copy, just a directory tree for mkfs.ext4 -d.
for d in /usr/lib/x86_64-linux-gnu /usr/share /usr/bin /usr/include /usr/lib/python3; do
    [ -d "$d" ] && mkdir -p "$stage$(dirname "$d")" && cp -al "$d" "$stage$d" 2>/dev/null || true
done
rm -f "$out"
truncate -s "$size" "$out"
mkfs.ext4 -q -F -d "$stage" "$out"
echo "$out: $(du -h --apparent-size "$out" | cut -f1) virtual, $(du -h "$out" | cut -f1) allocated"
