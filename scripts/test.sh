#!/usr/bin/env bash
# Runs the whole test suite (unit, property, end-to-end through the binary, fault injection).
# `bash scripts/test.sh --tag TAG` runs only the suites and tests tagged TAG (fast, e2e, nbd, pbs,
# faults, property; Tests/*/Tags.swift) and skips the documentation build; other arguments go to
# `swift test` as they are (`--filter REGEX` picks tests by name).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=""
if [ "${1:-}" = "--tag" ]; then
    tag=${2:?"--tag needs a tag: fast, e2e, nbd, pbs, faults or property"}
    shift 2
    # Swift Testing 6.3's `swift test` filters by name only (no `tag:` filter yet), so the tag
    # becomes a name filter: every @Suite or @Test whose .tags(...) names it.
    names=$(perl -0777 -ne 'while (/\@(Suite|Test)\(\s*\.tags\(([^)]*)\)[^{]*?\b(?:struct|func)\s+(\w+)/gs) {
            my ($kind, $tags, $name) = ($1, $2, $3);
            print $kind eq "Suite" ? "\\.$name/\n" : "/$name\\(\n" if $tags =~ /\.\Q'"$tag"'\E\b/ }' Tests/*/*.swift Tests/*/*/*.swift 2>/dev/null | sort -u | paste -sd'|')
    [ -n "$names" ] || { echo "no suite or test is tagged $tag" >&2; exit 1; }
    set -- --filter "$names" "$@"
fi
bash scripts/bootstrap.sh
swift build --build-tests
swift test --skip-build --parallel --num-workers 2 "$@"
[ -z "$tag" ] || exit 0
# The library's documentation must build without warnings.
docs=$(swift package generate-documentation --target QcowPress 2>&1) || { echo "$docs"; exit 1; }
if echo "$docs" | grep -v "Source files for target" | grep -q "warning:"; then
    echo "$docs" | grep "warning:"
    echo "documentation has warnings" >&2
    exit 1
fi
echo "documentation: built without warnings"
