#!/usr/bin/env python3
"""Generate Proxmox Backup Server (PBS) local datastore directories from raw
disk images, laid out the way a QEMU/PVE VM backup to PBS leaves them on disk.

Test-data generator for QcowPress' `restore pbs`.  The formats are documented
(with the proxmox-backup source files they were checked against) in
PBS-FORMAT-NOTES.md next to this script.

Examples
--------
  # plain (zstd-compressed) VM backup with two drives in namespace "lab"
  python3 pbs_datastore.py --datastore /tmp/ds --ns lab \
      --snapshot vm/100/2026-11-20T10:00:00Z \
      --drive drive-scsi0.img=disk0.raw --drive drive-virtio1.img=disk1.raw

  # create a password-protected key file, back up encrypted with it
  python3 pbs_datastore.py --datastore /tmp/ds --snapshot vm/100/2026-11-20T10:00:00Z \
      --drive drive-scsi0.img=disk0.raw --make-key /tmp/key.json --kdf scrypt --password hunter22

  # back up with an existing key file, then damage one chunk
  python3 pbs_datastore.py --datastore /tmp/ds --snapshot vm/100/2026-11-20T11:00:00Z \
      --drive drive-scsi0.img=disk0.raw --encrypt-keyfile /tmp/key.json --password hunter22 \
      --corrupt chunk-crc

  # read a snapshot back with the built-in independent reader
  python3 pbs_datastore.py --datastore /tmp/ds --snapshot vm/100/2026-11-20T10:00:00Z --verify \
      [--encrypt-keyfile key.json --password PW] [--restore-to OUTDIR]

  python3 pbs_datastore.py --selftest
  python3 pbs_datastore.py --list-corrupt-modes

Needs: python3 (>= 3.8), `cryptography` (only for encryption / key files),
zstd via the `zstandard` module or, failing that, the `zstd` binary
(neither is needed with --no-compress ... except that real QEMU backups always
compress the all-zero chunk and the manifest; without any zstd those fall back
to uncompressed blobs and a warning is printed).
"""

import argparse
import base64
import calendar
import hashlib
import hmac
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

# ---------------------------------------------------------------------------
# Constants (pbs-datastore/src/file_formats.rs, pbs-tools/src/crypt_config.rs)
# ---------------------------------------------------------------------------

# sha256(b"Proxmox Backup uncompressed blob v1.0")[0..8] etc.
UNCOMPRESSED_BLOB_MAGIC = bytes([66, 171, 56, 7, 190, 131, 112, 161])      # 42ab3807be8370a1
COMPRESSED_BLOB_MAGIC = bytes([49, 185, 88, 66, 111, 182, 163, 127])       # 31b958426fb6a37f
ENCRYPTED_BLOB_MAGIC = bytes([123, 103, 133, 190, 34, 45, 76, 240])        # 7b6785be222d4cf0
ENCR_COMPR_BLOB_MAGIC = bytes([230, 89, 27, 191, 11, 191, 216, 11])        # e6591bbf0bbfd80b
FIXED_SIZED_CHUNK_INDEX_MAGIC = bytes([47, 127, 65, 237, 145, 253, 15, 205])  # 2f7f41ed91fd0fcd
DYNAMIC_SIZED_CHUNK_INDEX_MAGIC = bytes([28, 145, 78, 165, 25, 186, 179, 205])  # 1c914ea519bab3cd

# sha256(b"Proxmox Backup Encryption Key Fingerprint")
FINGERPRINT_INPUT = bytes([
    110, 208, 239, 119, 71, 31, 255, 77, 85, 199, 168, 254, 74, 157, 182, 33, 97, 64, 127, 19, 76,
    114, 93, 223, 48, 153, 45, 37, 236, 69, 237, 38,
])

BLOB_HEADER_LEN = 12            # magic(8) + crc32 LE(4)
ENCRYPTED_BLOB_HEADER_LEN = 44  # + iv(16) + tag(16)
FIDX_HEADER_LEN = 4096
MAX_BLOB_SIZE = 128 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024  # PBS server hard-codes 4 MiB for fixed indexes

MANIFEST_BLOB_NAME = "index.json.blob"
CONFIG_BLOB_NAME = "qemu-server.conf.blob"

SNAPSHOT_RE = re.compile(
    r"^(host|vm|ct)/([A-Za-z0-9_][A-Za-z0-9._\-]*)/"
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z)$")
NS_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._\-]*$")

CORRUPT_MODES = {
    "chunk-crc": "flip the last byte of a data chunk's payload (CRC32 no longer matches)",
    "chunk-digest": "replace a data chunk by a valid blob (good CRC, good tag) of different content",
    "chunk-zstd": "replace a data chunk's payload by garbage that is not zstd (CRC recomputed, compressed magic)",
    "chunk-tag": "flip a byte of an encrypted chunk's GCM tag (CRC still valid: it does not cover iv/tag)",
    "chunk-iv": "flip a byte of an encrypted chunk's IV (CRC still valid)",
    "chunk-truncated": "truncate a data chunk file to 6 bytes (shorter than any blob header)",
    "chunk-empty": "truncate a data chunk file to 0 bytes",
    "blob-magic": "overwrite the magic of a data chunk with an unknown value",
    "missing-chunk": "delete a referenced data chunk",
    "missing-zero-chunk": "delete the all-zero chunk",
    "fidx-magic": "damage the magic of the first .fidx",
    "fidx-csum": "flip a byte of index_csum in the first .fidx header",
    "fidx-size": "add chunk_size to the size field of the first .fidx header (file length no longer fits)",
    "fidx-digest": "point one digest of the first .fidx at another existing chunk, fixing index_csum "
                   "(only the manifest csum can detect it)",
    "truncated-fidx": "cut the last 16 bytes off the first .fidx",
    "missing-fidx": "delete the first .fidx (still listed in the manifest)",
    "manifest-csum": "wrong csum for the first .fidx in the manifest (re-signed if signed)",
    "manifest-size": "wrong size for the first .fidx in the manifest (re-signed if signed)",
    "manifest-signature": "flip the manifest signature (needs a key: encrypt or sign-only)",
    "manifest-crc": "flip a byte in the manifest blob payload (CRC mismatch)",
    "manifest-json": "manifest blob is valid but contains invalid JSON",
    "blob-csum": "flip a byte in qemu-server.conf.blob and fix its CRC (only the manifest csum detects it)",
    "config-crc": "flip a byte in the qemu-server.conf.blob payload (CRC mismatch)",
    "wrong-key": "encrypt with a different random key; the named key file is left as is",
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

class Rng:
    """Random bytes: os.urandom by default, deterministic with a seed."""

    def __init__(self, seed=None):
        self._r = random.Random(seed) if seed is not None else None

    def bytes(self, n):
        if self._r is None:
            return os.urandom(n)
        return bytes(self._r.getrandbits(8) for _ in range(n))


class Zstd:
    """zstd level 1, through the zstandard module or the zstd binary."""

    def __init__(self):
        self.mod = None
        self.binary = None
        try:
            if os.environ.get("PBS_DATASTORE_ZSTD_BINARY"):  # force the zstd CLI path (testing)
                raise ImportError
            import zstandard  # noqa: F401
            self.mod = zstandard
        except ImportError:
            self.binary = shutil.which("zstd")

    @property
    def available(self):
        return self.mod is not None or self.binary is not None

    def compress_stream(self, data):
        """Like zstd::stream::copy_encode(data, out, 1): frame without content size."""
        if self.mod is not None:
            obj = self.mod.ZstdCompressor(level=1).compressobj()
            return obj.compress(data) + obj.flush()
        return subprocess.run([self.binary, "-1", "-q", "-c", "--no-check"], input=data,
                              stdout=subprocess.PIPE, check=True).stdout

    def compress_bulk(self, data):
        """Like zstd::bulk::compress(data, 1): frame with content size."""
        if self.mod is not None:
            return self.mod.ZstdCompressor(level=1, write_content_size=True).compress(data)
        return subprocess.run([self.binary, "-1", "-q", "-c", "--no-check",
                               "--stream-size=%d" % len(data)], input=data,
                              stdout=subprocess.PIPE, check=True).stdout

    def decompress(self, data):
        if self.mod is not None:
            obj = self.mod.ZstdDecompressor().decompressobj()
            out = obj.decompress(data)
            if not getattr(obj, "eof", True):
                raise ValueError("truncated zstd frame")
            return out
        p = subprocess.run([self.binary, "-d", "-q", "-c"], input=data,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode != 0:
            raise ValueError("zstd -d failed: %s" % p.stderr.decode(errors="replace").strip())
        return p.stdout


ZSTD = Zstd()


def _aesgcm():
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        sys.exit("error: the 'cryptography' package is needed for encryption (pip install cryptography)")
    return AESGCM


def pbkdf2_sha256(password, salt, iterations, length=32):
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations, length)


def scrypt32(password, salt, n, r, p):
    try:
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)
    except ImportError:
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=1025 * 1024 * 1024, dklen=32)


def fingerprint_str(fp):
    return ":".join("%02x" % b for b in fp)


def epoch_to_rfc3339_utc(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def epoch_to_rfc3339_offset(epoch):
    """proxmox_time::epoch_to_rfc3339 (local time + ±HH:MM); we always use UTC (+00:00)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(epoch))


def parse_rfc3339(s):
    m = re.match(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(Z|([+-])(\d\d):(\d\d))$", s)
    if not m:
        raise ValueError("bad RFC3339 time %r" % s)
    epoch = calendar.timegm(tuple(int(m.group(i)) for i in range(1, 7)) + (0, 0, 0))
    if m.group(7) != "Z":
        off = int(m.group(9)) * 3600 + int(m.group(10)) * 60
        epoch = epoch - off if m.group(8) == "+" else epoch + off
    return epoch


def canonical_json(value):
    """proxmox_serde::json::to_canonical_json: sorted keys, no whitespace, null is an error."""
    def check(v):
        if v is None:
            raise ValueError("got unexpected null value")
        if isinstance(v, dict):
            for x in v.values():
                check(x)
        elif isinstance(v, list):
            for x in v:
                check(x)
    check(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def ns_relpath(ns):
    """BackupNamespace 'a/b' -> 'ns/a/ns/b' ('' -> '')."""
    if not ns:
        return ""
    parts = [p for p in ns.strip("/").split("/") if p]
    for p in parts:
        if not NS_COMPONENT_RE.match(p):
            raise ValueError("invalid namespace component %r" % p)
    if len(parts) > 7:
        raise ValueError("namespace too deep (max depth 7)")
    return "/".join("ns/" + p for p in parts)


def parse_snapshot(s):
    m = SNAPSHOT_RE.match(s)
    if not m:
        raise ValueError("snapshot must look like vm/100/2026-11-20T10:00:00Z, got %r" % s)
    btype, bid, tstr = m.groups()
    return btype, bid, parse_rfc3339(tstr), tstr


# ---------------------------------------------------------------------------
# CryptConfig (pbs-tools/src/crypt_config.rs)
# ---------------------------------------------------------------------------

class CryptConfig:
    def __init__(self, enc_key):
        if len(enc_key) != 32:
            raise ValueError("key must be 32 bytes")
        self.enc_key = bytes(enc_key)
        self.id_key = pbkdf2_sha256(self.enc_key, b"_id_key", 10, 32)

    def compute_digest(self, data):
        h = hashlib.sha256()
        h.update(data)
        h.update(self.id_key)  # appended, not prepended
        return h.digest()

    def compute_auth_tag(self, data):
        return hmac.new(self.id_key, data, hashlib.sha256).digest()

    def fingerprint(self):
        return self.compute_digest(FINGERPRINT_INPUT)

    def encrypt(self, iv, data):
        out = _aesgcm()(self.enc_key).encrypt(iv, data, None)  # empty AAD
        return out[:-16], out[-16:]  # ciphertext, tag

    def decrypt(self, iv, tag, ciphertext):
        return _aesgcm()(self.enc_key).decrypt(iv, ciphertext + tag, None)


# ---------------------------------------------------------------------------
# Key files (pbs-key-config/src/lib.rs)
# ---------------------------------------------------------------------------

def make_key_config(raw_key, kdf, password, rng, created, scrypt_n=65536, pbkdf2_iter=65535, hint=None):
    """Returns the key file text exactly as KeyConfig::store writes it (compact serde JSON)."""
    cc = CryptConfig(raw_key)
    if kdf == "none":
        kdf_obj = None
        data = bytes(raw_key)
    else:
        if password is None:
            raise ValueError("--password is needed for kdf %s" % kdf)
        pw = password.encode()
        if len(pw) < 5:
            raise ValueError("PBS refuses passphrases shorter than 5 bytes")
        salt = rng.bytes(32)
        if kdf == "scrypt":
            kdf_obj = {"Scrypt": {"n": scrypt_n, "r": 8, "p": 1, "salt": base64.b64encode(salt).decode()}}
            derived = scrypt32(pw, salt, scrypt_n, 8, 1)
        elif kdf == "pbkdf2":
            kdf_obj = {"PBKDF2": {"iter": pbkdf2_iter, "salt": base64.b64encode(salt).decode()}}
            derived = pbkdf2_sha256(pw, salt, pbkdf2_iter)
        else:
            raise ValueError("unknown kdf %r" % kdf)
        iv = rng.bytes(16)
        out = _aesgcm()(derived).encrypt(iv, bytes(raw_key), None)
        data = iv + out[-16:] + out[:-16]  # iv(16) || tag(16) || encrypted key(32)
    obj = {
        "kdf": kdf_obj,
        "created": epoch_to_rfc3339_offset(created),
        "modified": epoch_to_rfc3339_offset(created),
        "data": base64.b64encode(data).decode(),
        "fingerprint": fingerprint_str(cc.fingerprint()),
    }
    if hint is not None:
        obj["hint"] = hint
    return json.dumps(obj, separators=(",", ":"))


def load_key_config(path, password):
    """Decrypt a PBS key file -> raw 32 byte key (writer side)."""
    with open(path) as f:
        cfg = json.load(f)
    raw = base64.b64decode(cfg["data"])
    kdf = cfg.get("kdf")
    if kdf is None:
        key = raw
    else:
        if password is None:
            raise ValueError("key file %s is password protected: give --password" % path)
        (name, params), = kdf.items()
        salt = base64.b64decode(params["salt"])
        if name == "Scrypt":
            derived = scrypt32(password.encode(), salt, params["n"], params["r"], params["p"])
        elif name == "PBKDF2":
            derived = pbkdf2_sha256(password.encode(), salt, params["iter"])
        else:
            raise ValueError("unknown kdf %r" % name)
        key = _aesgcm()(derived).decrypt(raw[0:16], raw[32:] + raw[16:32], None)
    if len(key) != 32:
        raise ValueError("key has wrong length")
    fp = cfg.get("fingerprint")
    if fp is not None and fp.replace(":", "") != CryptConfig(key).fingerprint().hex():
        raise ValueError("key file fingerprint does not match key")
    return key


# ---------------------------------------------------------------------------
# DataBlob encoding (pbs-datastore/src/data_blob.rs DataBlob::encode)
# ---------------------------------------------------------------------------

def encode_blob(data, crypt, compress, rng):
    if len(data) > MAX_BLOB_SIZE:
        raise ValueError("data blob too large")
    if compress and not ZSTD.available:
        warn_once("no zstd available (pip install zstandard): writing uncompressed blobs")
        compress = False
    if crypt is not None:
        payload, magic = data, ENCRYPTED_BLOB_MAGIC
        if compress:
            c = ZSTD.compress_bulk(data)
            if len(c) < len(data):  # only if shorter
                payload, magic = c, ENCR_COMPR_BLOB_MAGIC
        iv = rng.bytes(16)
        ct, tag = crypt.encrypt(iv, payload)
        crc = zlib.crc32(ct) & 0xffffffff  # CRC covers only what follows the 44-byte header
        return magic + struct.pack("<I", crc) + iv + tag + ct
    if compress:
        c = ZSTD.compress_stream(data)
        if len(c) < len(data):
            return COMPRESSED_BLOB_MAGIC + struct.pack("<I", zlib.crc32(c) & 0xffffffff) + c
    return UNCOMPRESSED_BLOB_MAGIC + struct.pack("<I", zlib.crc32(data) & 0xffffffff) + data


def encode_raw_blob(magic, payload, crypt=None, rng=None):
    """Assemble a blob with given magic around payload (used by corruptions)."""
    if magic in (ENCRYPTED_BLOB_MAGIC, ENCR_COMPR_BLOB_MAGIC):
        iv = rng.bytes(16)
        ct, tag = crypt.encrypt(iv, payload)
        return magic + struct.pack("<I", zlib.crc32(ct) & 0xffffffff) + iv + tag + ct
    return magic + struct.pack("<I", zlib.crc32(payload) & 0xffffffff) + payload


def refresh_crc(raw):
    hl = ENCRYPTED_BLOB_HEADER_LEN if raw[:8] in (ENCRYPTED_BLOB_MAGIC, ENCR_COMPR_BLOB_MAGIC) else BLOB_HEADER_LEN
    return raw[:8] + struct.pack("<I", zlib.crc32(raw[hl:]) & 0xffffffff) + raw[12:]


_warned = set()


def warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        print("warning: " + msg, file=sys.stderr)


# ---------------------------------------------------------------------------
# Manifest (pbs-datastore/src/manifest.rs)
# ---------------------------------------------------------------------------

def manifest_signature(manifest, crypt):
    signed = {k: v for k, v in manifest.items() if k not in ("unprotected", "signature")}
    return crypt.compute_auth_tag(canonical_json(signed)).hex()


def manifest_text(manifest):
    """serde_json::to_value (sorted map keys) + to_string_pretty, as the server's update_manifest writes it."""
    return json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------

class ChunkStore:
    def __init__(self, root, all_chunk_dirs=False):
        self.root = root
        self.chunk_dir = os.path.join(root, ".chunks")
        os.makedirs(self.chunk_dir, exist_ok=True)
        lock = os.path.join(root, ".lock")
        if not os.path.exists(lock):
            open(lock, "wb").close()
        if all_chunk_dirs:
            for i in range(65536):
                os.makedirs(os.path.join(self.chunk_dir, "%04x" % i), exist_ok=True)

    def chunk_path(self, digest):
        h = digest.hex()
        return os.path.join(self.chunk_dir, h[:4], h)

    def insert_chunk(self, digest, raw):
        """ChunkStore::insert_chunk: returns (is_duplicate, stored size)."""
        path = self.chunk_path(digest)
        if os.path.isfile(path):
            old = os.path.getsize(path)
            if old == len(raw):
                return True, old
            if old != 0:
                with open(path, "rb") as f:
                    old_magic = f.read(8)
                encrypted = raw[:8] in (ENCRYPTED_BLOB_MAGIC, ENCR_COMPR_BLOB_MAGIC)
                if encrypted:
                    if old_magic in (UNCOMPRESSED_BLOB_MAGIC, COMPRESSED_BLOB_MAGIC):
                        raise ValueError("Overwriting unencrypted chunk with encrypted chunk not allowed")
                    return True, old
                if old < len(raw):
                    return True, old
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp_chunk"
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
        return False, len(raw)


def default_vm_config(drives, btype, bid):
    lines = ["boot: order=%s" % drives[0][0].replace("drive-", "").replace(".img", "") if drives else "boot: ",
             "cores: 2", "memory: 2048", "name: qcowpress-test-%s" % bid, "ostype: l26",
             "scsihw: virtio-scsi-single"]
    for name, path in drives:
        dev = name.replace("drive-", "").replace(".img", "")
        size = os.path.getsize(path)
        lines.append("%s: local-lvm:vm-%s-disk-%s,size=%dK" % (dev, bid, dev, (size + 1023) // 1024))
    lines.sort()
    return ("\n".join(lines) + "\n").encode()


def build_snapshot(datastore, snapshot, drives, ns="", chunk_size=DEFAULT_CHUNK_SIZE, key=None,
                   crypt_mode=None, compress=True, rng=None, config_data=None, owner="root@pam",
                   all_chunk_dirs=False, ctime=None, force=False, log=print):
    """Create one snapshot. drives: list of (archive name 'drive-scsi0.img', raw path).
    key: raw 32 byte key or None. crypt_mode: 'none' | 'encrypt' | 'sign-only'."""
    rng = rng or Rng()
    btype, bid, btime, tstr = parse_snapshot(snapshot)
    if crypt_mode is None:
        crypt_mode = "encrypt" if key is not None else "none"
    if crypt_mode != "none" and key is None:
        raise ValueError("crypt mode %s needs a key" % crypt_mode)
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError("chunk size must be a power of two")
    if chunk_size != DEFAULT_CHUNK_SIZE:
        warn_once("chunk size %d: a real PBS server always writes 4 MiB fixed-index chunks" % chunk_size)
    crypt = CryptConfig(key) if key is not None else None
    data_crypt = crypt if crypt_mode == "encrypt" else None

    store = ChunkStore(datastore, all_chunk_dirs)
    nsrel = ns_relpath(ns)
    group_dir = os.path.join(datastore, nsrel, btype, bid) if nsrel else os.path.join(datastore, btype, bid)
    snap_dir = os.path.join(group_dir, tstr)
    if os.path.exists(snap_dir):
        if not force:
            raise ValueError("snapshot directory %s already exists (use --force)" % snap_dir)
        shutil.rmtree(snap_dir)
    os.makedirs(snap_dir)
    owner_path = os.path.join(group_dir, "owner")
    if not os.path.exists(owner_path):
        with open(owner_path, "w") as f:
            f.write(owner + "\n")

    names = set()
    norm_drives = []
    for name, path in drives:
        if not name.endswith(".img"):
            name += ".img"
        if name in names:
            raise ValueError("duplicate drive %s" % name)
        names.add(name)
        if os.path.getsize(path) == 0:
            raise ValueError("drive %s is empty: PBS cannot store a zero-length fixed index" % name)
        norm_drives.append((name, path))

    files = []
    info = {"snap_dir": snap_dir, "group_dir": group_dir, "crypt": crypt, "data_crypt": data_crypt,
            "crypt_mode": crypt_mode, "chunk_size": chunk_size, "drives": [], "compress": compress,
            "store": store, "btype": btype, "bid": bid, "btime": btime}
    stats = {"count": 0, "size": 0, "compressed_size": 0, "duplicates": 0}

    # 1) config blob (add_config: compress flag, encrypted iff crypt-mode encrypt)
    if config_data is None:
        config_data = default_vm_config(norm_drives, btype, bid)
    raw = encode_blob(config_data, data_crypt, compress, rng)
    cpath = os.path.join(snap_dir, CONFIG_BLOB_NAME)
    with open(cpath, "wb") as f:
        f.write(raw)
    files.append({"filename": CONFIG_BLOB_NAME, "crypt-mode": crypt_mode, "size": len(raw),
                  "csum": hashlib.sha256(raw).hexdigest()})
    info["config_path"] = cpath
    info["config_data"] = config_data

    # 2) images
    known = set()
    zero_digest = None
    for name, path in norm_drives:
        size = os.path.getsize(path)
        # register_zero_chunk: always uploaded, always compress=true
        zero = bytes(chunk_size)
        zdig = data_crypt.compute_digest(zero) if data_crypt else hashlib.sha256(zero).digest()
        zraw = encode_blob(zero, data_crypt, True, rng)
        dup, csize = store.insert_chunk(zdig, zraw)
        stats["count"] += 1
        stats["size"] += chunk_size
        stats["compressed_size"] += csize
        stats["duplicates"] += int(dup)
        zero_digest = zdig

        digests = []
        n_chunks = (size + chunk_size - 1) // chunk_size
        with open(path, "rb") as f:
            for i in range(n_chunks):
                data = f.read(chunk_size)
                if len(data) == chunk_size and data.count(0) == chunk_size:
                    digests.append(zdig)  # null-data write -> zero chunk, not uploaded again
                    continue
                dig = data_crypt.compute_digest(data) if data_crypt else hashlib.sha256(data).digest()
                if dig not in known:
                    craw = encode_blob(data, data_crypt, compress, rng)
                    dup, csize = store.insert_chunk(dig, craw)
                    stats["count"] += 1
                    stats["size"] += len(data)
                    stats["compressed_size"] += csize
                    stats["duplicates"] += int(dup)
                    known.add(dig)
                digests.append(dig)
        body = b"".join(digests)
        index_csum = hashlib.sha256(body).digest()
        uuid = bytearray(rng.bytes(16))
        uuid[6] = (uuid[6] & 0x0f) | 0x40  # v4 like proxmox_uuid::Uuid::generate
        uuid[8] = (uuid[8] & 0x3f) | 0x80
        hdr = (FIXED_SIZED_CHUNK_INDEX_MAGIC + bytes(uuid) +
               struct.pack("<q", btime if ctime is None else ctime) + index_csum +
               struct.pack("<QQ", size, chunk_size))
        hdr += bytes(FIDX_HEADER_LEN - len(hdr))
        fname = name + ".fidx"
        fpath = os.path.join(snap_dir, fname)
        with open(fpath, "wb") as f:
            f.write(hdr)
            f.write(body)
        files.append({"filename": fname, "crypt-mode": crypt_mode, "size": size, "csum": index_csum.hex()})
        info["drives"].append({"name": name, "fidx": fname, "fidx_path": fpath, "raw_path": path,
                               "size": size, "digests": digests})
        log("  %s: %d bytes, %d chunks (%d distinct)" % (fname, size, n_chunks, len(set(digests))))
    info["zero_digest"] = zero_digest

    # 3) manifest (client: BackupManifest::to_string; server: update_manifest adds chunk_upload_stats)
    manifest = {"backup-type": btype, "backup-id": bid, "backup-time": btime, "files": files,
                "unprotected": {}, "signature": None}
    if crypt is not None:
        manifest["signature"] = manifest_signature(manifest, crypt)
        manifest["unprotected"]["key-fingerprint"] = fingerprint_str(crypt.fingerprint())
    manifest["unprotected"]["chunk_upload_stats"] = stats
    write_manifest(snap_dir, manifest, rng)
    info["manifest"] = manifest
    info["manifest_path"] = os.path.join(snap_dir, MANIFEST_BLOB_NAME)
    return info


def write_manifest(snap_dir, manifest, rng, text=None):
    if text is None:
        text = manifest_text(manifest)
    raw = encode_blob(text.encode(), None, True, rng)  # manifest is never encrypted
    with open(os.path.join(snap_dir, MANIFEST_BLOB_NAME), "wb") as f:
        f.write(raw)


# ---------------------------------------------------------------------------
# Corruptions
# ---------------------------------------------------------------------------

def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xff]))


def _target_chunk(info):
    d0 = info["drives"][0]
    for i, dig in enumerate(d0["digests"]):
        if dig != info["zero_digest"]:
            return i, dig
    return 0, d0["digests"][0]


def apply_corruption(info, mode, rng):
    """Damage the snapshot described by info. Returns a description."""
    store = info["store"]
    d0 = info["drives"][0]
    idx, dig = _target_chunk(info)
    cpath = store.chunk_path(dig)
    data_crypt = info["data_crypt"]
    rel = lambda p: os.path.relpath(p, store.root)  # noqa: E731

    def resign_and_write():
        m = info["manifest"]
        if m.get("signature") is not None and info["crypt"] is not None:
            m["signature"] = manifest_signature(m, info["crypt"])
        write_manifest(info["snap_dir"], m, rng)

    if mode == "chunk-crc":
        size = os.path.getsize(cpath)
        _flip(cpath, size - 1)
        return "flipped last byte of chunk %s (index %d of %s)" % (rel(cpath), idx, d0["fidx"])
    if mode == "chunk-digest":
        with open(d0["raw_path"], "rb") as f:
            f.seek(idx * info["chunk_size"])
            data = bytearray(f.read(info["chunk_size"]))
        data[0] ^= 0xff
        raw = encode_blob(bytes(data), data_crypt, info["compress"], rng)
        with open(cpath, "wb") as f:
            f.write(raw)
        return "replaced chunk %s by a valid blob of different content" % rel(cpath)
    if mode == "chunk-zstd":
        garbage = b"\x00this is not a zstd frame\x00" * 4
        magic = ENCR_COMPR_BLOB_MAGIC if data_crypt else COMPRESSED_BLOB_MAGIC
        with open(cpath, "wb") as f:
            f.write(encode_raw_blob(magic, garbage, data_crypt, rng))
        return "replaced payload of chunk %s by non-zstd garbage (valid CRC)" % rel(cpath)
    if mode in ("chunk-tag", "chunk-iv"):
        if data_crypt is None:
            raise ValueError("%s needs an encrypted backup" % mode)
        _flip(cpath, 28 if mode == "chunk-tag" else 12)
        return "flipped a byte of the GCM %s of chunk %s (CRC still valid)" % (mode[6:], rel(cpath))
    if mode in ("chunk-truncated", "chunk-empty"):
        with open(cpath, "r+b") as f:
            f.truncate(6 if mode == "chunk-truncated" else 0)
        return "truncated chunk %s" % rel(cpath)
    if mode == "blob-magic":
        with open(cpath, "r+b") as f:
            f.write(b"\xde\xad\xbe\xef\xde\xad\xbe\xef")
        return "overwrote magic of chunk %s" % rel(cpath)
    if mode == "missing-chunk":
        os.remove(cpath)
        return "deleted chunk %s" % rel(cpath)
    if mode == "missing-zero-chunk":
        p = store.chunk_path(info["zero_digest"])
        os.remove(p)
        return "deleted zero chunk %s" % rel(p)
    if mode == "fidx-magic":
        _flip(d0["fidx_path"], 0)
        return "damaged magic of %s" % rel(d0["fidx_path"])
    if mode == "fidx-csum":
        _flip(d0["fidx_path"], 32)
        return "flipped index_csum byte in %s" % rel(d0["fidx_path"])
    if mode == "fidx-size":
        with open(d0["fidx_path"], "r+b") as f:
            f.seek(64)
            f.write(struct.pack("<Q", d0["size"] + info["chunk_size"]))
        return "header size of %s set to %d" % (rel(d0["fidx_path"]), d0["size"] + info["chunk_size"])
    if mode == "fidx-digest":
        digs = list(d0["digests"])
        others = [d for d in set(sum((d["digests"] for d in info["drives"]), [])) if d != digs[idx]]
        if not others:
            others = [info["zero_digest"]] if info["zero_digest"] != digs[idx] else []
        if not others:
            raise ValueError("fidx-digest needs at least two distinct chunks")
        digs[idx] = sorted(others)[0]
        body = b"".join(digs)
        with open(d0["fidx_path"], "r+b") as f:
            f.seek(32)
            f.write(hashlib.sha256(body).digest())
            f.seek(FIDX_HEADER_LEN)
            f.write(body)
        return "entry %d of %s now points at chunk %s (index_csum fixed, manifest csum stale)" % (
            idx, rel(d0["fidx_path"]), digs[idx].hex())
    if mode == "truncated-fidx":
        with open(d0["fidx_path"], "r+b") as f:
            f.truncate(os.path.getsize(d0["fidx_path"]) - 16)
        return "cut 16 bytes off %s" % rel(d0["fidx_path"])
    if mode == "missing-fidx":
        os.remove(d0["fidx_path"])
        return "deleted %s" % rel(d0["fidx_path"])
    if mode in ("manifest-csum", "manifest-size"):
        for fi in info["manifest"]["files"]:
            if fi["filename"] == d0["fidx"]:
                if mode == "manifest-csum":
                    fi["csum"] = ("%02x" % (int(fi["csum"][:2], 16) ^ 0xff)) + fi["csum"][2:]
                else:
                    fi["size"] += 1
        resign_and_write()
        return "manifest %s of %s changed%s" % (mode[9:], d0["fidx"],
                                                 " (re-signed)" if info["manifest"].get("signature") else "")
    if mode == "manifest-signature":
        m = info["manifest"]
        if not m.get("signature"):
            raise ValueError("manifest-signature needs a signed manifest (a key)")
        m["signature"] = ("%02x" % (int(m["signature"][:2], 16) ^ 0xff)) + m["signature"][2:]
        write_manifest(info["snap_dir"], m, rng)
        return "flipped manifest signature"
    if mode == "manifest-crc":
        _flip(info["manifest_path"], os.path.getsize(info["manifest_path"]) - 1)
        return "flipped last byte of %s" % rel(info["manifest_path"])
    if mode == "manifest-json":
        write_manifest(info["snap_dir"], None, rng, text=manifest_text(info["manifest"])[:-7])
        return "manifest blob now holds truncated JSON"
    if mode == "blob-csum":
        with open(info["config_path"], "rb") as f:
            raw = bytearray(f.read())
        raw[-1] ^= 0xff
        with open(info["config_path"], "wb") as f:
            f.write(refresh_crc(bytes(raw)))
        return "flipped last byte of %s, CRC fixed" % rel(info["config_path"])
    if mode == "config-crc":
        _flip(info["config_path"], os.path.getsize(info["config_path"]) - 1)
        return "flipped last byte of %s" % rel(info["config_path"])
    raise ValueError("unknown corrupt mode %r (see --list-corrupt-modes)" % mode)


# ---------------------------------------------------------------------------
# Independent reader (written against the PBS sources, shares no code with the
# writer above except the tiny zstd/AES wrappers and the KDF primitives)
# ---------------------------------------------------------------------------

class PBSReadError(Exception):
    pass


def _magic_of(text):
    return hashlib.sha256(text.encode()).digest()[:8]


R_MAGIC = {
    _magic_of("Proxmox Backup uncompressed blob v1.0"): ("plain", False, False),
    _magic_of("Proxmox Backup zstd compressed blob v1.0"): ("zstd", True, False),
    _magic_of("Proxmox Backup encrypted blob v1.0"): ("encrypted", False, True),
    _magic_of("Proxmox Backup zstd compressed encrypted blob v1.0"): ("encrypted+zstd", True, True),
}
R_FIDX_MAGIC = _magic_of("Proxmox Backup fixed sized chunk index v1.0")


class ReaderKey:
    def __init__(self, key):
        self.key = key
        self.id_key = hashlib.pbkdf2_hmac("sha256", key, b"_id_key", 10, 32)
        self.fp = hashlib.sha256(
            hashlib.sha256(b"Proxmox Backup Encryption Key Fingerprint").digest() + self.id_key).digest()

    def digest(self, data):
        return hashlib.sha256(data + self.id_key).digest()


def reader_load_key(path, password):
    cfg = json.load(open(path))
    for field in ("kdf", "created", "modified", "data"):
        if field not in cfg:
            raise PBSReadError("key file lacks %r" % field)
    parse_rfc3339(cfg["created"])
    parse_rfc3339(cfg["modified"])
    blob = base64.b64decode(cfg["data"], validate=True)
    if cfg["kdf"] is None:
        key = blob
    else:
        if not password or len(password.encode()) < 5:
            raise PBSReadError("Passphrase is too short!")
        if len(cfg["kdf"]) != 1:
            raise PBSReadError("bad kdf object")
        name = next(iter(cfg["kdf"]))
        p = cfg["kdf"][name]
        salt = base64.b64decode(p["salt"])
        if name == "Scrypt":
            dk = scrypt32(password.encode(), salt, p["n"], p["r"], p["p"])
        elif name == "PBKDF2":
            dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, p["iter"], 32)
        else:
            raise PBSReadError("unknown kdf %s" % name)
        if len(blob) < 32:
            raise PBSReadError("Unable to decrypt key - short data")
        try:
            key = _aesgcm()(dk).decrypt(blob[:16], blob[32:] + blob[16:32], b"")
        except Exception:
            raise PBSReadError("Unable to decrypt key (wrong password?)")
    if len(key) != 32:
        raise PBSReadError("key has length %d" % len(key))
    rk = ReaderKey(key)
    if cfg.get("fingerprint") is not None and cfg["fingerprint"] != fingerprint_str(rk.fp):
        raise PBSReadError("KeyConfig contains wrong fingerprint")
    return rk


def reader_decode_blob(raw, key, what, expect_encrypted=None):
    if len(raw) < 12:
        raise PBSReadError("%s: blob too small (%d bytes)" % (what, len(raw)))
    kind = R_MAGIC.get(raw[:8])
    if kind is None:
        raise PBSReadError("%s: unknown blob magic %s" % (what, raw[:8].hex()))
    name, compressed, encrypted = kind
    hl = 44 if encrypted else 12
    if len(raw) < hl:
        raise PBSReadError("%s: encrypted blob too small" % what)
    crc = struct.unpack("<I", raw[8:12])[0]
    if zlib.crc32(raw[hl:]) & 0xffffffff != crc:
        raise PBSReadError("%s: wrong CRC" % what)
    if expect_encrypted is not None and expect_encrypted != encrypted:
        raise PBSReadError("%s: blob crypt mode does not match manifest" % what)
    payload = raw[hl:]
    if encrypted:
        if key is None:
            raise PBSReadError("%s: encrypted blob but no key" % what)
        try:
            payload = _aesgcm()(key.key).decrypt(raw[12:28], payload + raw[28:44], b"")
        except Exception:
            raise PBSReadError("%s: AES-GCM authentication failed" % what)
    if compressed:
        try:
            payload = ZSTD.decompress(payload)
        except Exception as e:
            raise PBSReadError("%s: zstd: %s" % (what, e))
    return payload, name


def read_snapshot(datastore, snapshot, ns="", key=None, expect=None):
    """Read and fully verify a snapshot. Returns {archive name: bytes} (images and blobs),
    plus stats. Raises PBSReadError on any inconsistency."""
    m = SNAPSHOT_RE.match(snapshot)
    if not m:
        raise PBSReadError("bad snapshot name")
    btype, bid, tstr = m.groups()
    parts = [p for p in ns.strip("/").split("/") if p] if ns else []
    snap_dir = os.path.join(datastore, *sum((["ns", p] for p in parts), []), btype, bid, tstr)
    mpath = os.path.join(snap_dir, "index.json.blob")
    if not os.path.isfile(mpath):
        raise PBSReadError("no manifest at %s" % mpath)
    mraw = open(mpath, "rb").read()
    mdata, _ = reader_decode_blob(mraw, None, "manifest", expect_encrypted=False)
    try:
        man = json.loads(mdata.decode())
    except Exception as e:
        raise PBSReadError("manifest: invalid JSON: %s" % e)
    if man.get("backup-type") != btype or man.get("backup-id") != bid:
        raise PBSReadError("manifest: wrong backup type/id")
    if man.get("backup-time") != calendar.timegm(time.strptime(tstr, "%Y-%m-%dT%H:%M:%SZ")):
        raise PBSReadError("manifest: wrong backup-time")
    unprot = man.get("unprotected", {})
    fp = unprot.get("key-fingerprint")
    if fp is not None:
        if key is None:
            if any(f.get("crypt-mode") == "encrypt" for f in man["files"]):
                raise PBSReadError("missing key - manifest was created with key %s" % fp[:23])
        elif fp != fingerprint_str(key.fp):
            raise PBSReadError("wrong key - manifest's key %s does not match provided key %s"
                               % (fp[:23], fingerprint_str(key.fp)[:23]))
    if key is not None and man.get("signature") is not None:
        signed = dict(man)
        signed.pop("unprotected", None)
        signed.pop("signature", None)
        canon = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if hmac.new(key.id_key, canon, hashlib.sha256).hexdigest() != man["signature"]:
            raise PBSReadError("wrong signature in manifest")
    out = {}
    stats = {"chunks_read": 0, "magics": set()}
    for fi in man["files"]:
        fname = fi["filename"]
        cmode = fi.get("crypt-mode", "none")
        if cmode not in ("none", "encrypt", "sign-only"):
            raise PBSReadError("%s: bad crypt-mode" % fname)
        enc = cmode == "encrypt"
        if enc and key is None:
            raise PBSReadError("%s: encrypted, no key given" % fname)
        path = os.path.join(snap_dir, fname)
        if not os.path.isfile(path):
            raise PBSReadError("%s: missing" % fname)
        raw = open(path, "rb").read()
        if fname.endswith(".blob"):
            if len(raw) != fi["size"] or hashlib.sha256(raw).hexdigest() != fi["csum"]:
                raise PBSReadError("%s: size/csum does not match manifest" % fname)
            out[fname], _ = reader_decode_blob(raw, key if enc else None, fname, expect_encrypted=enc)
        elif fname.endswith(".fidx"):
            if len(raw) < 4096:
                raise PBSReadError("%s: index too small" % fname)
            if raw[:8] != R_FIDX_MAGIC:
                raise PBSReadError("%s: got unknown magic number" % fname)
            ctime, = struct.unpack_from("<q", raw, 24)
            index_csum = raw[32:64]
            size, csize = struct.unpack_from("<QQ", raw, 64)
            if csize == 0 or csize & (csize - 1):
                raise PBSReadError("%s: bad chunk size %d" % (fname, csize))
            n = -(-size // csize)
            if len(raw) - 4096 != 32 * n:
                raise PBSReadError("%s: got unexpected file size" % fname)
            body = raw[4096:]
            if hashlib.sha256(body).digest() != index_csum:
                raise PBSReadError("%s: index_csum mismatch" % fname)
            if size != fi["size"] or index_csum.hex() != fi["csum"]:
                raise PBSReadError("%s: wrong size/checksum for file (manifest)" % fname)
            img = bytearray()
            for i in range(n):
                dig = body[32 * i:32 * i + 32]
                want = min(csize, size - i * csize)
                cp = os.path.join(datastore, ".chunks", dig[:2].hex(), dig.hex())
                if not os.path.isfile(cp):
                    raise PBSReadError("%s: chunk %d (%s) missing" % (fname, i, dig.hex()))
                craw = open(cp, "rb").read()
                data, kind = reader_decode_blob(craw, key if enc else None, "chunk %s" % dig.hex(),
                                                expect_encrypted=enc)
                stats["magics"].add(kind)
                stats["chunks_read"] += 1
                calc = key.digest(data) if enc else hashlib.sha256(data).digest()
                if calc != dig:
                    raise PBSReadError("chunk %s: detected chunk with wrong digest" % dig.hex())
                if len(data) != want:
                    raise PBSReadError("chunk %s: wrong length %d != %d" % (dig.hex(), len(data), want))
                img += data
            out[fname[:-5]] = bytes(img)
        else:
            raise PBSReadError("%s: unknown archive type" % fname)
    if expect is not None:
        for name, data in expect.items():
            if out.get(name) != data:
                raise PBSReadError("%s: restored data differs from the original" % name)
    return out, man, stats


# ---------------------------------------------------------------------------
# Self test
# ---------------------------------------------------------------------------

def _selftest_vectors():
    # magic constants are sha256(...)[0:8]
    assert _magic_of("Proxmox Backup uncompressed blob v1.0") == UNCOMPRESSED_BLOB_MAGIC
    assert _magic_of("Proxmox Backup zstd compressed blob v1.0") == COMPRESSED_BLOB_MAGIC
    assert _magic_of("Proxmox Backup encrypted blob v1.0") == ENCRYPTED_BLOB_MAGIC
    assert _magic_of("Proxmox Backup zstd compressed encrypted blob v1.0") == ENCR_COMPR_BLOB_MAGIC
    assert _magic_of("Proxmox Backup fixed sized chunk index v1.0") == FIXED_SIZED_CHUNK_INDEX_MAGIC
    assert _magic_of("Proxmox Backup dynamic sized chunk index v1.0") == DYNAMIC_SIZED_CHUNK_INDEX_MAGIC
    assert hashlib.sha256(b"Proxmox Backup Encryption Key Fingerprint").digest() == FINGERPRINT_INPUT
    # pbs-key-config fingerprint_checks: key 0..31 -> fingerprint
    fp = CryptConfig(bytes(range(32))).fingerprint()
    assert fp == bytes([14, 171, 212, 70, 11, 110, 185, 202, 52, 80, 35, 222, 226, 183, 120, 199,
                        144, 229, 74, 22, 131, 185, 101, 156, 10, 87, 174, 25, 144, 144, 21, 155]), fp.hex()
    assert ReaderKey(bytes(range(32))).fp == fp
    # pbs-datastore manifest.rs test_manifest_signature
    testkey = scrypt32(b"test", b"", 65536, 8, 1)
    cc = CryptConfig(testkey)
    man = {"backup-type": "host", "backup-id": "elsa",
           "backup-time": parse_rfc3339("2020-06-26T13:56:05Z"),
           "files": [{"filename": "test1.img.fidx", "crypt-mode": "encrypt", "size": 200, "csum": "01" * 32},
                     {"filename": "abc.blob", "crypt-mode": "none", "size": 200, "csum": "02" * 32}],
           "unprotected": {"note": "This is not protected by the signature."}, "signature": None}
    sig = manifest_signature(man, cc)
    assert sig == "d7b446fb7db081662081d4b40fedd858a1d6307a5aff4ecff7d5bf4fd35679e9", sig
    print("ok   PBS test vectors (magics, key fingerprint, manifest signature)")


def _make_images(tmp, cs, seed):
    r = random.Random(seed)
    rnd = lambda n: bytes(r.getrandbits(8) for _ in range(n))  # noqa: E731
    text = (b"QcowPress PBS test pattern 0123456789 " * ((cs // 38) + 1))[:cs]
    a = rnd(cs)
    # drive 0: random, zero, text(compressible), random again (dedup), zero, partial tail
    img0 = a + bytes(cs) + text + a + bytes(cs) + rnd(12345)
    # drive 1: exact multiple; zero, text (dedup across drives), different random, all-zero tail chunk
    img1 = bytes(cs) + text + rnd(cs) + bytes(cs)
    # drive 2: smaller than a chunk, all zeros (partial zero chunk is a real chunk)
    img2 = bytes(1000)
    paths = []
    for i, img in enumerate((img0, img1, img2)):
        p = os.path.join(tmp, "img%d.raw" % i)
        with open(p, "wb") as f:
            f.write(img)
        paths.append((p, img))
    return paths


def selftest():
    if not ZSTD.available:
        print("FAIL: selftest needs zstd (pip install zstandard)")
        return 1
    _selftest_vectors()
    tmp = tempfile.mkdtemp(prefix="pbs-selftest-")
    failures = 0
    quiet = lambda *a, **k: None  # noqa: E731
    try:
        cs = 64 * 1024
        imgs = _make_images(tmp, cs, 1)
        drives = [("drive-scsi0.img", imgs[0][0]), ("drive-virtio1.img", imgs[1][0]),
                  ("drive-sata2", imgs[2][0])]
        expect = {"drive-scsi0.img": imgs[0][1], "drive-virtio1.img": imgs[1][1], "drive-sata2.img": imgs[2][1]}
        keyfiles = {}
        rng = Rng(7)
        for kdf, pw in (("none", None), ("scrypt", "secret-pw"), ("pbkdf2", "secret-pw")):
            kp = os.path.join(tmp, "key-%s.json" % kdf)
            with open(kp, "w") as f:
                f.write(make_key_config(rng.bytes(32), kdf, pw, rng, 1763632800))
            keyfiles[kdf] = (kp, pw)
        cases = [
            # name, ns, compress, kdf, crypt_mode, chunk size
            ("plain", "", False, None, "none", cs),
            ("zstd+ns", "lab/nested", True, None, "none", cs),
            ("encrypted kdf=none", "", True, "none", "encrypt", cs),
            ("encrypted kdf=scrypt", "lab", True, "scrypt", "encrypt", cs),
            ("encrypted kdf=pbkdf2 no-compress", "", False, "pbkdf2", "encrypt", cs),
            ("sign-only kdf=none", "", True, "none", "sign-only", cs),
            ("zstd 4MiB chunks", "", True, None, "none", DEFAULT_CHUNK_SIZE),
        ]
        ds = os.path.join(tmp, "datastore")
        for n, (name, ns, compress, kdf, cmode, csz) in enumerate(cases):
            snap = "vm/%d/2026-11-20T10:%02d:00Z" % (100 + n, n)
            key = rkey = None
            if kdf:
                key = load_key_config(keyfiles[kdf][0], keyfiles[kdf][1])
                rkey = reader_load_key(keyfiles[kdf][0], keyfiles[kdf][1])
            drv, exp = drives, expect
            if csz != cs:
                big = os.path.join(tmp, "big.raw")
                bimg = os.urandom(csz) + bytes(csz * 2) + b"x" * 5000
                with open(big, "wb") as f:
                    f.write(bimg)
                drv, exp = [("drive-scsi0.img", big)], {"drive-scsi0.img": bimg}
            try:
                info = build_snapshot(ds, snap, drv, ns=ns, chunk_size=csz, key=key, crypt_mode=cmode,
                                      compress=compress, rng=Rng(n), log=quiet)
                out, man, st = read_snapshot(ds, snap, ns=ns, key=rkey, expect=exp)
                # structural checks
                zd = info["zero_digest"]
                zp = info["store"].chunk_path(zd)
                assert os.path.isfile(zp), "zero chunk missing"
                for d in info["drives"]:
                    for i, dig in enumerate(d["digests"]):
                        full = (i + 1) * csz <= d["size"]
                        if full and exp[d["name"]][i * csz:(i + 1) * csz] == bytes(csz):
                            assert dig == zd
                if cmode == "encrypt":
                    assert st["magics"] <= {"encrypted", "encrypted+zstd"}, st["magics"]
                    if compress:
                        assert st["magics"] == {"encrypted", "encrypted+zstd"}, st["magics"]
                    assert out[CONFIG_BLOB_NAME] == info["config_data"]
                else:
                    # with --no-compress only the zero chunk is zstd (register_zero_chunk: compress=true)
                    assert st["magics"] == {"plain", "zstd"}, st["magics"]
                    assert open(zp, "rb").read(8) == COMPRESSED_BLOB_MAGIC
                if not compress:
                    for d in info["drives"]:
                        for dig in set(d["digests"]) - {zd}:
                            m8 = open(info["store"].chunk_path(dig), "rb").read(8)
                            assert m8 in (UNCOMPRESSED_BLOB_MAGIC, ENCRYPTED_BLOB_MAGIC), m8.hex()
                if cmode == "sign-only":
                    assert man["signature"] and man["unprotected"]["key-fingerprint"]
                    # sign-only snapshot is readable without key
                    read_snapshot(ds, snap, ns=ns, key=None, expect=exp)
                if ns:
                    assert os.path.isdir(os.path.join(ds, ns_relpath(ns), "vm", str(100 + n), snap.split("/")[2]))
                print("ok   %-34s %s" % (name, ", ".join(sorted(st["magics"]))))
            except Exception as e:
                failures += 1
                print("FAIL %-34s %r" % (name, e))

        # corruptions: every mode must be caught by the reader
        for mode in CORRUPT_MODES:
            enc = mode in ("chunk-tag", "chunk-iv", "manifest-signature", "wrong-key")
            cds = os.path.join(tmp, "corrupt-" + mode)
            snap = "vm/200/2026-11-20T12:00:00Z"
            kdf = "none" if enc else None
            key = load_key_config(keyfiles["none"][0], None) if kdf else None
            rkey = reader_load_key(keyfiles["none"][0], None) if kdf else None
            try:
                r = Rng(3)
                bkey = key
                if mode == "wrong-key":
                    bkey = r.bytes(32)
                info = build_snapshot(cds, snap, drives[:2], chunk_size=cs, key=bkey, compress=True,
                                      rng=r, log=quiet)
                ex2 = {k: expect[k] for k in ("drive-scsi0.img", "drive-virtio1.img")}
                if mode != "wrong-key":
                    read_snapshot(cds, snap, key=rkey, expect=ex2)  # intact first
                    desc = apply_corruption(info, mode, r)
                else:
                    desc = "backup encrypted with another key"
                try:
                    read_snapshot(cds, snap, key=rkey, expect=ex2)
                except PBSReadError as e:
                    print("ok   corrupt %-22s -> %s" % (mode, e))
                else:
                    failures += 1
                    print("FAIL corrupt %-22s not detected (%s)" % (mode, desc))
            except Exception as e:
                failures += 1
                print("FAIL corrupt %-22s %r" % (mode, e))

        # CLI round trip (subprocess), deterministic output with --seed
        def cli(*a):
            return subprocess.run([sys.executable, os.path.abspath(__file__)] + list(a),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        trees = []
        for run in range(2):
            cds = os.path.join(tmp, "cli%d" % run)
            kp = os.path.join(tmp, "cli-key%d.json" % run)
            p = cli("--datastore", cds, "--ns", "x", "--snapshot", "vm/300/2026-11-20T13:00:00Z",
                    "--drive", "drive-scsi0.img=" + imgs[0][0], "--chunk-size", str(cs), "--seed", "42",
                    "--make-key", kp, "--kdf", "pbkdf2", "--password", "pw-12345", "--pbkdf2-iter", "1000")
            if p.returncode != 0:
                failures += 1
                print("FAIL cli build: %s" % p.stdout.decode())
                break
            p = cli("--datastore", cds, "--ns", "x", "--snapshot", "vm/300/2026-11-20T13:00:00Z", "--verify",
                    "--encrypt-keyfile", kp, "--password", "pw-12345", "--restore-to", os.path.join(tmp, "out%d" % run))
            if p.returncode != 0:
                failures += 1
                print("FAIL cli verify: %s" % p.stdout.decode())
                break
            with open(os.path.join(tmp, "out%d" % run, "drive-scsi0.img"), "rb") as f:
                if f.read() != imgs[0][1]:
                    failures += 1
                    print("FAIL cli restore differs")
            tree = {}
            for root, _, fs in os.walk(cds):
                for fn in fs:
                    pth = os.path.join(root, fn)
                    tree[os.path.relpath(pth, cds)] = hashlib.sha256(open(pth, "rb").read()).hexdigest()
            tree["key"] = hashlib.sha256(open(kp, "rb").read()).hexdigest()
            trees.append(tree)
        if len(trees) == 2:
            if trees[0] == trees[1]:
                print("ok   CLI build/verify/restore, --seed is deterministic (%d files)" % len(trees[0]))
            else:
                failures += 1
                print("FAIL --seed output not deterministic")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("selftest: %s" % ("PASSED" if failures == 0 else "%d FAILURE(S)" % failures))
    return 0 if failures == 0 else 1


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="Create PBS datastore test data from raw images.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="corrupt modes:\n" + "\n".join(
                                     "  %-20s %s" % kv for kv in CORRUPT_MODES.items()))
    ap.add_argument("--datastore", help="datastore root directory (created if missing)")
    ap.add_argument("--ns", default="", help="namespace, e.g. 'a' or 'a/b' (-> ns/a/ns/b)")
    ap.add_argument("--snapshot", help="TYPE/ID/TIME, e.g. vm/100/2026-11-20T10:00:00Z")
    ap.add_argument("--drive", action="append", default=[], metavar="NAME=RAW",
                    help="archive name (drive-scsi0.img; '.img' appended if missing) = raw image path")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                    help="fixed chunk size, power of two (real PBS: always 4194304)")
    ap.add_argument("--encrypt-keyfile", help="existing PBS key file (JSON) to encrypt with / read with")
    ap.add_argument("--make-key", metavar="KEYFILE", help="create a new key file (and encrypt with it)")
    ap.add_argument("--kdf", choices=("none", "scrypt", "pbkdf2"), help="kdf for --make-key "
                    "(default: scrypt if --password is given, else none)")
    ap.add_argument("--password", help="key file password (>= 5 bytes)")
    ap.add_argument("--scrypt-n", type=int, default=65536, help="scrypt N for --make-key (PBS: 65536)")
    ap.add_argument("--pbkdf2-iter", type=int, default=65535, help="PBKDF2 iterations for --make-key (PBS: 65535)")
    ap.add_argument("--key-hex", help="raw 32-byte key in hex for --make-key (default random)")
    ap.add_argument("--crypt-mode", choices=("encrypt", "sign-only"), default="encrypt",
                    help="with a key: encrypt (default) or sign-only (plain chunks, signed manifest)")
    ap.add_argument("--no-compress", action="store_true",
                    help="do not zstd chunks/config (zero chunk and manifest are always compressed, as in PBS)")
    ap.add_argument("--config", help="file to store as qemu-server.conf.blob (default: generated)")
    ap.add_argument("--owner", default="root@pam", help="group owner written to the 'owner' file")
    ap.add_argument("--ctime", type=int, help="fidx ctime (default: backup time)")
    ap.add_argument("--all-chunk-dirs", action="store_true", help="pre-create all 65536 .chunks/XXXX dirs like PBS")
    ap.add_argument("--force", action="store_true", help="replace an existing snapshot directory")
    ap.add_argument("--seed", type=int, help="deterministic IVs/UUIDs/salts/keys")
    ap.add_argument("--corrupt", action="append", default=[], metavar="MODE", help="apply a damage (repeatable)")
    ap.add_argument("--list-corrupt-modes", action="store_true")
    ap.add_argument("--verify", action="store_true", help="read the snapshot back with the built-in reader")
    ap.add_argument("--restore-to", metavar="DIR", help="with --verify: write restored archives into DIR")
    ap.add_argument("--selftest", action="store_true")
    args = ap.parse_args(argv)

    if args.selftest:
        return selftest()
    if args.list_corrupt_modes:
        for kv in CORRUPT_MODES.items():
            print("%-20s %s" % kv)
        return 0
    rng = Rng(args.seed)

    if args.verify:
        if not (args.datastore and args.snapshot):
            ap.error("--verify needs --datastore and --snapshot")
        rkey = reader_load_key(args.encrypt_keyfile, args.password) if args.encrypt_keyfile else None
        try:
            out, man, st = read_snapshot(args.datastore, args.snapshot, ns=args.ns, key=rkey)
        except PBSReadError as e:
            print("verify FAILED: %s" % e)
            return 1
        for name, data in out.items():
            print("  %s: %d bytes, sha256 %s" % (name, len(data), hashlib.sha256(data).hexdigest()))
            if args.restore_to:
                os.makedirs(args.restore_to, exist_ok=True)
                with open(os.path.join(args.restore_to, name), "wb") as f:
                    f.write(data)
        print("verify OK (%d chunks read: %s)" % (st["chunks_read"], ", ".join(sorted(st["magics"]))))
        return 0

    key = None
    if args.make_key and args.encrypt_keyfile:
        ap.error("use either --make-key or --encrypt-keyfile")
    if args.make_key:
        if os.path.exists(args.make_key) and not args.force:
            ap.error("%s exists (use --force)" % args.make_key)
        kdf = args.kdf or ("scrypt" if args.password else "none")
        key = bytes.fromhex(args.key_hex) if args.key_hex else rng.bytes(32)
        if len(key) != 32:
            ap.error("--key-hex must be 32 bytes")
        created = parse_snapshot(args.snapshot)[2] if (args.seed is not None and args.snapshot) else (
            1763632800 if args.seed is not None else int(time.time()))
        text = make_key_config(key, kdf, args.password, rng, created, args.scrypt_n, args.pbkdf2_iter)
        with open(args.make_key, "w") as f:
            f.write(text)
        os.chmod(args.make_key, 0o600)
        print("created key file %s (kdf %s, fingerprint %s)" % (args.make_key, kdf,
                                                              fingerprint_str(CryptConfig(key).fingerprint())))
    elif args.encrypt_keyfile:
        key = load_key_config(args.encrypt_keyfile, args.password)

    if not args.snapshot:
        if args.make_key:
            return 0
        ap.error("--snapshot is required")
    if not args.datastore:
        ap.error("--datastore is required")
    if not args.drive:
        ap.error("at least one --drive NAME=RAW is required")
    drives = []
    for d in args.drive:
        if "=" not in d:
            ap.error("--drive wants NAME=PATH, got %r" % d)
        name, path = d.split("=", 1)
        drives.append((name, path))
    for mode in args.corrupt:
        if mode not in CORRUPT_MODES:
            ap.error("unknown corrupt mode %r; one of: %s" % (mode, ", ".join(CORRUPT_MODES)))

    build_key = key
    if "wrong-key" in args.corrupt:
        if key is None:
            ap.error("wrong-key needs --encrypt-keyfile or --make-key")
        build_key = rng.bytes(32)
        print("corrupt wrong-key: data encrypted with another key (fingerprint %s), key file left alone"
              % fingerprint_str(CryptConfig(build_key).fingerprint()))
    config_data = open(args.config, "rb").read() if args.config else None
    print("building %s%s in %s" % (args.ns + ":" if args.ns else "", args.snapshot, args.datastore))
    info = build_snapshot(args.datastore, args.snapshot, drives, ns=args.ns, chunk_size=args.chunk_size,
                          key=build_key, crypt_mode=(args.crypt_mode if key is not None else "none"),
                          compress=not args.no_compress, rng=rng, config_data=config_data,
                          owner=args.owner, all_chunk_dirs=args.all_chunk_dirs, ctime=args.ctime,
                          force=args.force)
    print("  zero chunk %s, crypt-mode %s" % (info["zero_digest"].hex(), info["crypt_mode"]))
    for mode in args.corrupt:
        if mode == "wrong-key":
            continue
        print("corrupt %s: %s" % (mode, apply_corruption(info, mode, rng)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:
        print("error: %s" % e, file=sys.stderr)
        sys.exit(2)
