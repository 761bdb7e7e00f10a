#!/usr/bin/env bash
# Runs the whole test suite (unit, property, end-to-end through the binary, fault injection).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
swift build --build-tests
swift test --skip-build --parallel --num-workers 2 "$@"
