#!/usr/bin/env bash
# Installs the Debian packages QcowPress needs, only when something is missing.
# C libraries: liburing, libzstd, zlib, ISA-L (fast deflate); qemu-utils is the test oracle and
# libnbd-bin (nbdinfo, nbdcopy) and qemu-system-common (qemu-storage-daemon) the NBD and QMP peers
# of the serve and live-restore tests; dpkg-dev gives scripts/package.sh dpkg-shlibdeps (the
# .deb's Depends); zstd (the command) packs the tests' .vma.zst archives.
set -euo pipefail
need=()
for pkg in liburing-dev libzstd-dev zlib1g-dev libisal-dev qemu-utils pkg-config libnbd-bin qemu-system-common dpkg-dev zstd; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "bootstrap: installing ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The Proxmox Backup Server test server (Tests/Support/pbs_server.py) speaks HTTP/2 through the `h2`
# package from PyPI; openssl makes its certificates.
command -v openssl >/dev/null 2>&1 || { SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"; $SUDO apt-get install -y -qq openssl >/dev/null; }
if ! python3 -c 'import h2' 2>/dev/null; then
    echo "bootstrap: installing the python h2 package" >&2
    python3 -m pip install --quiet --user h2 2>/dev/null \
        || python3 -m pip install --quiet --user --break-system-packages h2
fi
# The S3 test server (Tests/Support/s3_server.py, PBS on object storage) is moto from PyPI with its
# server extra; boto3 (botocore) is the reference signer of the S3 client's tests.
# s3_server.py adapts moto 5.2's signature check (keys with ':'), so the version is held to 5.2.x.
if ! python3 -c 'import moto.server, boto3, moto; assert moto.__version__.startswith("5.2.")' 2>/dev/null; then
    echo "bootstrap: installing the python moto[server] 5.2 and boto3 packages" >&2
    python3 -m pip install --quiet --user 'moto[server]>=5.2,<5.3' boto3 2>/dev/null \
        || python3 -m pip install --quiet --user --break-system-packages 'moto[server]>=5.2,<5.3' boto3
fi
