#!/usr/bin/env bash
# Builds dist/qcowpress_VERSION_ARCH.deb: a qcowpress that runs on a Debian host without a Swift
# toolchain.
#   /usr/bin/qcowpress                                  release build, Swift runtime and Foundation
#                                                       linked in (--static-swift-stdlib), stripped
#   /usr/share/man/man1/qcowpress.1.gz                  swift-argument-parser's manual generator
#   /usr/share/bash-completion/completions/qcowpress    qcowpress --generate-completion-script bash
#   /usr/share/zsh/vendor-completions/_qcowpress        ... zsh
#   /usr/share/fish/vendor_completions.d/qcowpress.fish ... fish
# Depends: what dpkg-shlibdeps finds the binary links (liburing, libzstd, zlib, ISA-L, libc, ...).
# The version is the binary's own `qcowpress --version` (Sources/qcowpress/Qcowpress.swift).
#
# Incremental: the build lives in its own scratch path (QCOWPRESS_PKG_SCRATCH, default .build-pkg)
# so it neither disturbs nor is disturbed by the debug build in .build; a second run rebuilds only
# what changed. Prints the path of the .deb on stdout (everything else goes to stderr).
#
# QCOWPRESS_PKG_CONFIG=debug (the test suite's PackageTests) builds the same package from a static
# debug build into $scratch/dist, gzip-compressed: the script's every step runs, at a fraction of
# the cold release build's cost (measured in bench/RESULTS.md, stop 25), and the user's dist/ is
# never touched by a test.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${QCOWPRESS_PKG_CONFIG:-release}
[ "$config" = release ] || [ "$config" = debug ] || { echo "package.sh: QCOWPRESS_PKG_CONFIG=$config: release or debug" >&2; exit 1; }
scratch=$(realpath -m "${QCOWPRESS_PKG_SCRATCH:-.build-pkg}")
fail() { echo "package.sh: $*" >&2; exit 1; }

bash scripts/bootstrap.sh
# One run at a time per scratch path (two test processes may ask at once): the staging directory
# and the .deb are rewritten below.
mkdir -p "$scratch"
exec 9>"$scratch/package.lock"
flock 9
for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
    command -v "$tool" >/dev/null || fail "$tool not found (apt-get install dpkg-dev binutils gzip)"
done
arch=$(dpkg --print-architecture)

# One set of flags for the build and for its bin path: any difference would make SwiftPM rebuild
# everything (-static-stdlib is in every compile command, not only the link).
flags=(-c "$config" --static-swift-stdlib --scratch-path "$scratch")
echo "package.sh: building qcowpress (${flags[*]})" >&2
swift build "${flags[@]}" --product qcowpress >&2 || fail "swift build ${flags[*]} failed"
bin="$(swift build "${flags[@]}" --show-bin-path)/qcowpress"
[ -x "$bin" ] || fail "$bin was not built"

version=$("$bin" --version) || fail "$bin --version failed"
[[ "$version" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || fail "'$bin --version' printed '$version', not a Debian version"
linked=$(ldd "$bin") || fail "ldd $bin failed"
if grep -q 'libswift\|libFoundation\|libdispatch' <<<"$linked"; then
    fail "$bin links the Swift runtime dynamically: $(grep -o 'lib\(swift\|Foundation\|dispatch\)[^ ]*' <<<"$linked" | tr '\n' ' ')"
fi

# Staged as dpkg-shlibdeps expects a package: debian/control and the tree in debian/qcowpress.
work="$scratch/deb"
root="$work/debian/qcowpress"
rm -rf "$work"
mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/man/man1" "$root/usr/share/doc/qcowpress" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d"
install -m 0755 "$bin" "$root/usr/bin/qcowpress"
strip --strip-unneeded "$root/usr/bin/qcowpress"

# The manual: swift-argument-parser's manual generator (the `generate-manual` tool behind its
# GenerateManual plugin, from the same checkout), run on the binary above: it reads `qcowpress
# --experimental-dump-help`. Not through `swift package plugin generate-manual`: the plugin
# rebuilds every product with its own flags, and `swift package` takes no --static-swift-stdlib
# (which is in every compile command), so it would recompile the whole package and relink
# qcowpress over the static one.
echo "package.sh: generating the manual (swift-argument-parser's generate-manual)" >&2
parser="$scratch/checkouts/swift-argument-parser"
[ -f "$parser/Tools/generate-manual/GenerateManual.swift" ] || fail "$parser has no Tools/generate-manual"
swift build --package-path "$parser" --scratch-path "$scratch/generate-manual" --product generate-manual >&2 \
    || fail "building swift-argument-parser's generate-manual failed"
generator="$(swift build --package-path "$parser" --scratch-path "$scratch/generate-manual" --show-bin-path)/generate-manual"
# Dated by the last commit, so the same sources give the same page.
date=$(git log -1 --format=%cs 2>/dev/null || date -u +%F)
rm -rf "$work.man" && mkdir -p "$work.man"
"$generator" "$bin" --date "$date" --output-directory "$work.man" >&2 || fail "generate-manual $bin failed"
manual="$work.man/qcowpress.1"
[ -s "$manual" ] || fail "generate-manual wrote no $manual"
gzip -9n < "$manual" > "$root/usr/share/man/man1/qcowpress.1.gz"

"$bin" --generate-completion-script bash > "$root/usr/share/bash-completion/completions/qcowpress"
"$bin" --generate-completion-script zsh > "$root/usr/share/zsh/vendor-completions/_qcowpress"
"$bin" --generate-completion-script fish > "$root/usr/share/fish/vendor_completions.d/qcowpress.fish"
for f in "$root"/usr/share/{bash-completion/completions/qcowpress,zsh/vendor-completions/_qcowpress,fish/vendor_completions.d/qcowpress.fish}; do
    [ -s "$f" ] || fail "$f is empty"
done
cp README.md "$root/usr/share/doc/qcowpress/README.md"

# Depends: the packages holding the shared libraries the binary links, with the minimum versions
# their symbols files require.
cat > "$work/debian/control" <<EOF
Source: qcowpress

Package: qcowpress
Architecture: any
EOF
shlog="$work/shlibdeps.log"
shlibs=$(cd "$work" && dpkg-shlibdeps -O -e debian/qcowpress/usr/bin/qcowpress 2>"$shlog") \
    || fail "dpkg-shlibdeps failed on $root/usr/bin/qcowpress: $(cat "$shlog")"
deps=$(sed -n 's/^shlibs:Depends=//p' <<<"$shlibs")
[ -n "$deps" ] || fail "dpkg-shlibdeps found no dependencies for $root/usr/bin/qcowpress: $shlibs $(cat "$shlog")"

# Installed-Size as dpkg-gencontrol counts it: each file's size in KiB rounded up, 1 per directory
# (du would count filesystem blocks, which vary from run to run and defeat the reuse below).
size_kb=$(cd "$root" && find usr \( -type f -printf '%s\n' \) -o \( -type d -printf '1024\n' \) \
    | awk '{ kb += int(($1 + 1023) / 1024) } END { print kb }')
cat > "$root/DEBIAN/control" <<EOF
Package: qcowpress
Version: $version
Architecture: $arch
Maintainer: QcowPress maintainers <maintainers@users.noreply.h-seed-64415c27.example>
Installed-Size: $size_kb
Depends: $deps
Recommends: qemu-utils
Section: admin
Priority: optional
Description: write qcow2 disk images fast
 QcowPress converts raw and qcow2 images to qcow2 (zlib, ISA-L deflate or zstd
 compressed, on every core, written with O_DIRECT through io_uring), restores
 Proxmox Backup Server snapshots and vzdump VMA archives into qcow2, exports
 full and incremental compressed backups, and checks images as qemu-img does.
 The Swift runtime is linked in: no Swift toolchain is needed.
EOF
(cd "$root" && find usr -type f -print0 | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"

dist=dist compression=(-Zxz)
[ "$config" = release ] || { dist="$scratch/dist"; compression=(-Zgzip -z1); }
mkdir -p "$dist"
deb="$dist/qcowpress_${version}_${arch}.deb"
# xz-compressing the 60 MB binary is most of a warm run (~40 s of CPU): a .deb whose control file
# and md5sums match what was just staged already holds exactly these files, so it is kept.
if [ -f "$deb" ] && cmp -s <(dpkg-deb --info "$deb" control 2>/dev/null) "$root/DEBIAN/control" \
        && cmp -s <(dpkg-deb --info "$deb" md5sums 2>/dev/null) "$root/DEBIAN/md5sums"; then
    echo "package.sh: $deb is up to date" >&2
else
    rm -f "$deb"
    dpkg-deb --root-owner-group "${compression[@]}" --build "$root" "$deb" >&2 || fail "dpkg-deb --build failed"
fi
echo "package.sh: $deb ($(du -h "$deb" | cut -f1)), Depends: $deps" >&2
echo "$deb"
