#!/usr/bin/env bash
# Runs the whole test suite (unit, property, end-to-end through the binary, fault injection).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
swift build --build-tests
swift test --skip-build --parallel --num-workers 2 "$@"
# The library's documentation must build without warnings.
docs=$(swift package generate-documentation --target QcowPress 2>&1) || { echo "$docs"; exit 1; }
if echo "$docs" | grep -v "Source files for target" | grep -q "warning:"; then
    echo "$docs" | grep "warning:"
    echo "documentation has warnings" >&2
    exit 1
fi
echo "documentation: built without warnings"
