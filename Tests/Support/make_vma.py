#!/usr/bin/env python3
"""make_vma.py - write Proxmox VE vzdump VMA archives for QcowPress tests.

Reproduces the byte layout of pve-qemu's vma-writer.c
(debian/patches/pve/0026-PVE-Backup-add-vma-backup-format-code.patch) and ships
an independent, stricter stream reader modelled on vma-reader.c.
See VMA-FORMAT-NOTES.md next to this file for the verified format facts.

Usage:
  make_vma.py OUT.vma --device NAME=RAWFILE [--device ...]
              [--config NAME=FILE ...] [--shuffle SEED] [--order interleave|sequential]
              [--per-extent N] [--compress zst|gz] [--uuid HEX] [--ctime SECS]
              [--corrupt MODE] [--corrupt-extent INDEX]
  make_vma.py --read ARCHIVE [--extract DIR]    # parse/verify with the built-in reader
  make_vma.py --selftest

Every stream offset printed refers to the *uncompressed* VMA stream.

The built-in reader (read_vma) follows vma-reader.c and is stricter in these points:
unsafe device/config names ("", ".", "..", "/" or NUL inside), repeated device or
config names, a device with a size but no valid name, any cluster number >= the
device's cluster count (vma-reader only fails when a mask bit lands past the end),
and missing clusters (vma-reader checks those only when restoring, not in verify).
"""

import argparse
import gzip
import hashlib
import io
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib

# --------------------------------------------------------------------------
# Constants (vma.h)
# --------------------------------------------------------------------------
VMA_BLOCK_SIZE = 4096                   # 1 << VMA_BLOCK_BITS(12)
VMA_CLUSTER_SIZE = 65536                # 1 << (VMA_BLOCK_BITS + 4)
BLOCKS_PER_CLUSTER = VMA_CLUSTER_SIZE // VMA_BLOCK_SIZE   # 16 -> 16-bit mask
VMA_EXTENT_HEADER_SIZE = 512
VMA_BLOCKS_PER_EXTENT = 59              # block-info slots per extent header
VMA_MAX_CONFIGS = 256
VMA_MAX_EXTENT_SIZE = VMA_EXTENT_HEADER_SIZE + VMA_CLUSTER_SIZE * VMA_BLOCKS_PER_EXTENT  # 3867136
VMA_HEADER_FIXED = 12288                # sizeof(VmaHeader) = 4096 + 8192
VMA_MAGIC = b"VMA\x00"
VMA_EXTENT_MAGIC = b"VMAE"
WRITER_CLUSTERS_PER_EXTENT = VMA_BLOCKS_PER_EXTENT - 1   # vma_writer_get_buffer flushes at >= 58
HEADERBUF_SIZE = VMA_CLUSTER_SIZE * 8   # writer refuses header_size > 512 KiB
MAX_STREAMS = 254                       # dev ids 1..254 (0 and 255 reserved)

# header field offsets
OFF_MAGIC, OFF_VERSION, OFF_UUID, OFF_CTIME, OFF_MD5 = 0, 4, 8, 24, 32
OFF_BLOB_OFS, OFF_BLOB_SIZE, OFF_HEADER_SIZE = 48, 52, 56
OFF_CONFIG_NAMES, OFF_CONFIG_DATA, OFF_DEV_INFO = 2044, 3068, 4096
DEV_INFO_SIZE = 32
# extent header field offsets
EOFF_MAGIC, EOFF_RESERVED, EOFF_BLOCK_COUNT, EOFF_UUID, EOFF_MD5, EOFF_BLOCKINFO = 0, 4, 6, 8, 24, 40

CORRUPT_MODES = [
    "magic", "header-md5", "extent-md5", "truncate-header", "truncate-extent",
    "bad-devid", "cluster-beyond-size", "missing-cluster", "repeated-cluster",
    "extent-uuid", "block-count", "duplicate-device-name", "device-name-slash",
    "config-name-dotdot",
]

ZERO_BLOCK = bytes(VMA_BLOCK_SIZE)


class GenError(Exception):
    pass


def g_path_get_basename(name):
    """GLib g_path_get_basename() as used by vma_writer_add_config()."""
    if name == "":
        return "."
    stripped = name.rstrip("/")
    if stripped == "":
        return "/"
    return stripped.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------
# Writer model
# --------------------------------------------------------------------------
class Device:
    def __init__(self, name, path, dev_id):
        self.name = name
        self.path = path
        self.dev_id = dev_id
        self.raw_len = os.path.getsize(path)
        if self.raw_len <= 0:
            # vma_writer_register_stream: "got strange size"
            raise GenError("device %r: empty raw file (writer rejects size 0)" % name)
        # bdrv_getlength() = total_sectors * 512, total_sectors = DIV_ROUND_UP(len, 512)
        self.size = (self.raw_len + 511) // 512 * 512
        self.nclusters = (self.size + VMA_CLUSTER_SIZE - 1) // VMA_CLUSTER_SIZE
        self._fh = None

    def read_cluster(self, cluster):
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(cluster * VMA_CLUSTER_SIZE)
        buf = self._fh.read(VMA_CLUSTER_SIZE)
        # backup_run: last cluster buffer is memset(0) before the partial read
        return buf + bytes(VMA_CLUSTER_SIZE - len(buf))

    def cluster_blocks(self, cluster):
        """(mask, [stored 4 KiB blocks]) exactly like vma_writer_write()."""
        buf = self.read_cluster(cluster)
        mask = 0
        blocks = []
        byte_offset = cluster * VMA_CLUSTER_SIZE
        for i in range(BLOCKS_PER_CLUSTER):
            blk = buf[i * VMA_BLOCK_SIZE:(i + 1) * VMA_BLOCK_SIZE]
            if byte_offset < self.size and blk != ZERO_BLOCK:
                mask |= 1 << i
                if byte_offset + VMA_BLOCK_SIZE > self.size:
                    real = self.size - byte_offset        # zero the tail past the device end
                    blk = blk[:real] + bytes(VMA_BLOCK_SIZE - real)
                blocks.append(blk)
            byte_offset += VMA_BLOCK_SIZE
        return mask, blocks

    def close(self):
        if self._fh:
            self._fh.close()
            self._fh = None


class Entry:
    """One block-info slot plus its stored blocks."""

    def __init__(self, dev, dev_id, cluster, mask, blocks=None):
        self.dev = dev              # Device or None (synthetic entry)
        self.dev_id = dev_id
        self.cluster = cluster
        self.mask = mask
        self.blocks = blocks        # None -> re-read from dev at write time

    def nblocks(self):
        return bin(self.mask).count("1")

    def data_blocks(self):
        if self.blocks is not None:
            return self.blocks
        mask, blocks = self.dev.cluster_blocks(self.cluster)
        assert mask == self.mask, "source file changed while writing"
        return blocks

    def blockinfo(self):
        return (self.mask << 48) | ((self.dev_id & 0xFF) << 32) | (self.cluster & 0xFFFFFFFF)


class Extent:
    def __init__(self, entries):
        self.entries = list(entries)
        self.extra_blocks = []      # appended data not described by any mask (block-count mode)
        self.uuid = None            # override (extent-uuid mode)
        self.block_count = None     # override

    def computed_block_count(self):
        return sum(e.nblocks() for e in self.entries) + len(self.extra_blocks)

    def header(self, archive_uuid):
        if len(self.entries) > VMA_BLOCKS_PER_EXTENT:
            raise GenError("extent with %d entries > %d slots" % (len(self.entries), VMA_BLOCKS_PER_EXTENT))
        bc = self.block_count if self.block_count is not None else self.computed_block_count()
        if bc > 0xFFFF:
            raise GenError("block count overflow")
        infos = [e.blockinfo() for e in self.entries]
        infos += [0] * (VMA_BLOCKS_PER_EXTENT - len(infos))
        h = bytearray(struct.pack(">4sHH16s16s%dQ" % VMA_BLOCKS_PER_EXTENT,
                                  VMA_EXTENT_MAGIC, 0, bc, self.uuid or archive_uuid,
                                  bytes(16), *infos))
        assert len(h) == VMA_EXTENT_HEADER_SIZE
        h[EOFF_MD5:EOFF_MD5 + 16] = hashlib.md5(bytes(h)).digest()
        return bytes(h)

    def stream_size(self):
        bc = self.block_count if self.block_count is not None else self.computed_block_count()
        # the data actually emitted always equals mask blocks + extra blocks
        return VMA_EXTENT_HEADER_SIZE + VMA_BLOCK_SIZE * (sum(e.nblocks() for e in self.entries)
                                                          + len(self.extra_blocks)), bc


class BlobTable:
    """allocate_header_blob()/allocate_header_string() of vma-writer.c."""

    def __init__(self):
        self.buf = bytearray()
        self.size = 0       # header_blob_table_size (grows in 512-byte steps)
        self.pos = 1        # header_blob_table_pos ("start at pos 1")
        self.warnings = []

    def alloc(self, data):
        n = len(data)
        if n > 65535:
            raise GenError("blob of %d bytes > 65535 (writer returns 0 -> failure)" % n)
        if self.size < self.pos + n + 2:
            newsize = self.size + ((n + 2 + 511) // 512) * 512
            self.buf += bytes(newsize - self.size)
            self.size = newsize
            if self.size < self.pos + n + 2:
                # The real writer grows by round_up(len+2) only once and would
                # write past its buffer here (off by one vs. pos starting at 1).
                self.warnings.append("blob of %d bytes at pos %d: real writer would overflow its "
                                     "blob table; grew it by another 512 bytes" % (n, self.pos))
                self.buf += bytes(512)
                self.size += 512
        cpos = self.pos
        self.buf[cpos] = n & 0xFF
        self.buf[cpos + 1] = (n >> 8) & 0xFF
        self.buf[cpos + 2:cpos + 2 + n] = data
        self.pos += n + 2
        return cpos

    def alloc_string(self, s):
        return self.alloc(s.encode("utf-8") + b"\x00")


class Archive:
    def __init__(self, devices, configs, uuid_bytes, ctime, per_extent):
        self.devices = devices          # list of Device, dev_id = index+1
        self.configs = configs          # list of (name as given, bytes)
        self.uuid = uuid_bytes
        self.ctime = ctime
        self.per_extent = per_extent
        self.extents = []
        # header build knobs (corruption)
        self.raw_config_names = {}      # config index -> name stored without basename()
        self.name_override = {}         # dev_id -> stored name
        self.header_info = {}

    # -- layout --------------------------------------------------------------
    def plan(self, order, shuffle_seed):
        per_dev = []
        for d in self.devices:
            lst = []
            for c in range(d.nclusters):
                mask, _ = d.cluster_blocks(c)
                lst.append(Entry(d, d.dev_id, c, mask))
            per_dev.append(lst)
        seq = []
        if order == "sequential":
            for lst in per_dev:
                seq.extend(lst)
        else:   # round-robin interleave across devices
            i = 0
            while any(i < len(l) for l in per_dev):
                for l in per_dev:
                    if i < len(l):
                        seq.append(l[i])
                i += 1
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(seq)
        self.extents = [Extent(seq[i:i + self.per_extent]) for i in range(0, len(seq), self.per_extent)]
        if not self.extents:
            # vma create without disks: backup_run_empty -> vma_writer_flush_output
            # writes the header plus one empty extent.
            self.extents = [Extent([])]

    # -- header --------------------------------------------------------------
    def build_header(self):
        if len(self.devices) > MAX_STREAMS:
            raise GenError("too many drives (max %d)" % MAX_STREAMS)
        if len(self.configs) > VMA_MAX_CONFIGS:
            raise GenError("too many configs (max %d)" % VMA_MAX_CONFIGS)
        bt = BlobTable()
        cfg_ptrs = []
        cfg_name_blob = []
        for i, (name, data) in enumerate(self.configs):
            stored = self.raw_config_names.get(i, g_path_get_basename(name))
            np_ = bt.alloc_string(stored)
            dp = bt.alloc(data)
            cfg_ptrs.append((np_, dp))
            cfg_name_blob.append(np_)
        dev_ptrs = {}
        for d in self.devices:          # allocated in vma_write_header, dev id order
            dev_ptrs[d.dev_id] = bt.alloc_string(self.name_override.get(d.dev_id, d.name))
        header_size = VMA_HEADER_FIXED + bt.size
        if header_size > HEADERBUF_SIZE:
            raise GenError("header_size %d > %d (writer refuses)" % (header_size, HEADERBUF_SIZE))
        h = bytearray(header_size)
        struct.pack_into(">4sI16sq16sIII", h, 0, VMA_MAGIC, 1, self.uuid, self.ctime, bytes(16),
                         VMA_HEADER_FIXED, bt.pos, header_size)
        for i, (np_, dp) in enumerate(cfg_ptrs):
            struct.pack_into(">I", h, OFF_CONFIG_NAMES + 4 * i, np_)
            struct.pack_into(">I", h, OFF_CONFIG_DATA + 4 * i, dp)
        for d in self.devices:
            struct.pack_into(">IIQQQ", h, OFF_DEV_INFO + DEV_INFO_SIZE * d.dev_id,
                             dev_ptrs[d.dev_id], 0, d.size, 0, 0)
        h[VMA_HEADER_FIXED:] = bt.buf
        h[OFF_MD5:OFF_MD5 + 16] = hashlib.md5(bytes(h)).digest()
        self.header_info = dict(header_size=header_size, blob_size=bt.pos, dev_ptrs=dev_ptrs,
                                cfg_name_ptrs=cfg_name_blob, warnings=bt.warnings)
        return bytes(h)

    # -- offsets -------------------------------------------------------------
    def extent_offsets(self, header_size):
        offs = []
        o = header_size
        for e in self.extents:
            offs.append(o)
            o += e.stream_size()[0]
        return offs, o

    def add_entry(self, entry):
        """Append a slot after all others (last extent if it has room, else a new extent)."""
        last = self.extents[-1]
        if len(last.entries) < self.per_extent and not last.extra_blocks:
            last.entries.append(entry)
            return len(self.extents) - 1, len(last.entries) - 1
        self.extents.append(Extent([entry]))
        return len(self.extents) - 1, 0

    # -- output --------------------------------------------------------------
    def write(self, out, header, truncate_at=None):
        w = LimitedWriter(out, truncate_at)
        w.write(header)
        for ext in self.extents:
            w.write(ext.header(self.uuid))
            if w.full():
                break
            for ent in ext.entries:
                for blk in ent.data_blocks():
                    w.write(blk)
                if w.full():
                    break
            for blk in ext.extra_blocks:
                w.write(blk)
            if w.full():
                break
        return w.count

    def close(self):
        for d in self.devices:
            d.close()


class LimitedWriter:
    def __init__(self, out, limit):
        self.out = out
        self.limit = limit
        self.count = 0

    def write(self, b):
        if self.limit is not None:
            room = self.limit - self.count
            if room <= 0:
                return
            b = b[:room]
        self.out.write(b)
        self.count += len(b)

    def full(self):
        return self.limit is not None and self.count >= self.limit


# --------------------------------------------------------------------------
# Corruptions
# --------------------------------------------------------------------------
def _pick_extent(arch, index, need_entries=True):
    n = len(arch.extents)
    i = index if index >= 0 else n + index
    if not 0 <= i < n:
        raise GenError("--corrupt-extent %d out of range (archive has %d extents)" % (index, n))
    if need_entries and not arch.extents[i].entries:
        raise GenError("extent %d has no block-info entries (archive needs at least one device)" % i)
    return i


def apply_structural_corruption(arch, mode, ext_index):
    """Corruptions done before serialization (MD5s stay valid). Returns a callable
    that, given the header bytes, yields (offset, description)."""
    if mode == "duplicate-device-name":
        if len(arch.devices) < 2:
            src = arch.devices[0] if arch.devices else None
            if src is None:
                raise GenError("duplicate-device-name needs at least one device")
            dup = Device(src.name, src.path, len(arch.devices) + 1)
            arch.devices.append(dup)
            for c in range(dup.nclusters):
                mask, _ = dup.cluster_blocks(c)
                arch.add_entry(Entry(dup, dup.dev_id, c, mask))
        target = arch.devices[1]
        arch.name_override[target.dev_id] = arch.devices[0].name

        def rep(h):
            off = OFF_DEV_INFO + DEV_INFO_SIZE * target.dev_id
            blob = VMA_HEADER_FIXED + arch.header_info["dev_ptrs"][target.dev_id]
            return off, ("dev_info[%d].devname_ptr -> blob at offset %d holds %r, same name as dev_id %d"
                         % (target.dev_id, blob, arch.devices[0].name, arch.devices[0].dev_id))
        return rep

    if mode == "device-name-slash":
        if not arch.devices:
            raise GenError("device-name-slash needs at least one device")
        d = arch.devices[0]
        evil = "../evil"
        arch.name_override[d.dev_id] = evil

        def rep(h):
            blob = VMA_HEADER_FIXED + arch.header_info["dev_ptrs"][d.dev_id]
            return blob + 2, ("device %d name stored as %r (name blob at offset %d, dev_info entry at %d)"
                              % (d.dev_id, evil, blob, OFF_DEV_INFO + DEV_INFO_SIZE * d.dev_id))
        return rep

    if mode == "config-name-dotdot":
        if not arch.configs:
            arch.configs.append(("qemu-server.conf", b"name: evil\n"))
        idx = 0
        arch.raw_config_names[idx] = "../" + g_path_get_basename(arch.configs[idx][0])

        def rep(h):
            blob = VMA_HEADER_FIXED + arch.header_info["cfg_name_ptrs"][idx]
            return blob + 2, ("config %d name stored as %r, bypassing basename() (name blob at %d, "
                              "config_names[%d] at %d)" % (idx, arch.raw_config_names[idx], blob, idx,
                                                           OFF_CONFIG_NAMES + 4 * idx))
        return rep

    if mode in ("bad-devid", "missing-cluster", "block-count", "extent-uuid", "extent-md5",
                "truncate-extent", "repeated-cluster", "cluster-beyond-size"):
        need = mode in ("bad-devid", "missing-cluster", "repeated-cluster")
        if mode == "cluster-beyond-size" and not arch.devices:
            raise GenError("cluster-beyond-size needs at least one device")
        ei = _pick_extent(arch, ext_index, need_entries=need)
        ext = arch.extents[ei]

        if mode == "bad-devid":
            used = {d.dev_id for d in arch.devices}
            bad = next(i for i in list(range(len(arch.devices) + 1, 255)) + [255] if i not in used)
            ent = ext.entries[0]
            old = ent.dev_id
            ent.dev_id = bad

            def rep(h):
                offs, _ = arch.extent_offsets(len(h))
                return offs[ei] + EOFF_BLOCKINFO + 3, (
                    "extent %d slot 0: dev_id %d -> %d (not in device table); cluster %d; "
                    "blockinfo slot at offset %d" % (ei, old, bad, ent.cluster, offs[ei] + EOFF_BLOCKINFO))
            return rep

        if mode == "missing-cluster":
            ent = ext.entries.pop(0)

            def rep(h):
                offs, _ = arch.extent_offsets(len(h))
                return offs[ei], ("dropped dev_id %d cluster %d (was slot 0 of extent %d at offset %d)"
                                  % (ent.dev_id, ent.cluster, ei, offs[ei]))
            return rep

        if mode == "block-count":
            ext.extra_blocks.append(bytes([0xA5]) * VMA_BLOCK_SIZE)

            def rep(h):
                offs, _ = arch.extent_offsets(len(h))
                return offs[ei] + EOFF_BLOCK_COUNT, (
                    "extent %d block_count %d but masks describe %d blocks (one unreferenced 4 KiB block "
                    "appended to its data)" % (ei, ext.computed_block_count(), ext.computed_block_count() - 1))
            return rep

        if mode == "extent-uuid":
            newu = bytearray(arch.uuid)
            newu[0] ^= 0xFF
            ext.uuid = bytes(newu)

            def rep(h):
                offs, _ = arch.extent_offsets(len(h))
                return offs[ei] + EOFF_UUID, "extent %d uuid differs from header uuid (MD5 recomputed)" % ei
            return rep

        if mode == "repeated-cluster":
            src = ext.entries[0]
            dup = Entry(src.dev, src.dev_id, src.cluster, src.mask, src.data_blocks())
            xi, si = arch.add_entry(dup)

            def rep(h):
                offs, _ = arch.extent_offsets(len(h))
                return offs[xi] + EOFF_BLOCKINFO + 8 * si, (
                    "dev_id %d cluster %d stored again in extent %d slot %d" % (src.dev_id, src.cluster, xi, si))
            return rep

        if mode == "cluster-beyond-size":
            d = arch.devices[0]
            # mask bit 0 set, so vma-reader's "write beyond end" check also fires
            ent = Entry(None, d.dev_id, d.nclusters, 0x0001, [bytes([0x5A]) * VMA_BLOCK_SIZE])
            xi, si = arch.add_entry(ent)

            def rep(h):
                offs, _ = arch.extent_offsets(len(h))
                return offs[xi] + EOFF_BLOCKINFO + 8 * si, (
                    "extent %d slot %d: dev_id %d cluster %d (device has %d clusters, size %d), mask 0x0001"
                    % (xi, si, d.dev_id, d.nclusters, d.nclusters, d.size))
            return rep

        # extent-md5 / truncate-extent are byte-level; remember the extent
        arch._byte_extent = ei
        return None
    return None


def byte_level_corruption(arch, mode, header):
    """Returns (header bytes, truncate_at, patches{offset: bytes}, report)."""
    if mode == "magic":
        h = bytearray(header)
        h[0:4] = b"XMA\x00"
        h[OFF_MD5:OFF_MD5 + 16] = bytes(16)
        h[OFF_MD5:OFF_MD5 + 16] = hashlib.md5(bytes(h)).digest()
        return bytes(h), None, {}, (0, "header magic 'VMA\\0' -> 'XMA\\0' (header MD5 recomputed)")
    if mode == "header-md5":
        h = bytearray(header)
        h[OFF_MD5] ^= 0xFF
        return bytes(h), None, {}, (OFF_MD5, "first byte of header md5sum flipped")
    if mode == "truncate-header":
        cut = len(header) // 2
        return header, cut, {}, (cut, "stream ends after %d bytes, inside the %d-byte header" % (cut, len(header)))
    if mode == "extent-md5":
        ei = arch._byte_extent
        offs, _ = arch.extent_offsets(len(header))
        off = offs[ei] + EOFF_MD5
        return header, None, {off: None}, (off, "first byte of extent %d md5sum flipped" % ei)
    if mode == "truncate-extent":
        ei = arch._byte_extent
        offs, _ = arch.extent_offsets(len(header))
        size, _ = arch.extents[ei].stream_size()
        if size > VMA_EXTENT_HEADER_SIZE:
            cut = offs[ei] + VMA_EXTENT_HEADER_SIZE + (size - VMA_EXTENT_HEADER_SIZE) // 2 + 100
            what = "inside the data of extent %d" % ei
        else:
            cut = offs[ei] + VMA_EXTENT_HEADER_SIZE // 2
            what = "inside the header of extent %d (it has no data blocks)" % ei
        return header, cut, {}, (cut, "stream ends after %d bytes, %s (extent at %d, %d bytes)"
                                 % (cut, what, offs[ei], size))
    return header, None, {}, None


class PatchingWriter:
    """Flips the byte at given stream offsets (extent-md5 mode)."""

    def __init__(self, out, offsets):
        self.out = out
        self.offsets = sorted(offsets)
        self.pos = 0

    def write(self, b):
        b = bytes(b)
        for o in self.offsets:
            if self.pos <= o < self.pos + len(b):
                ba = bytearray(b)
                ba[o - self.pos] ^= 0xFF
                b = bytes(ba)
        self.out.write(b)
        self.pos += len(b)


# --------------------------------------------------------------------------
# Compression helpers
# --------------------------------------------------------------------------
class CompressedOut:
    def __init__(self, path, kind):
        self.kind = kind
        self.path = path
        self.fh = open(path, "wb")
        self.proc = None
        self.zw = None
        if kind == "gz":
            self.w = gzip.GzipFile(filename="", mode="wb", fileobj=self.fh, mtime=0)
        elif kind == "zst":
            try:
                import zstandard
                self.zw = zstandard.ZstdCompressor(level=3).stream_writer(self.fh, closefd=False)
                self.w = self.zw
            except ImportError:
                if not shutil.which("zstd"):
                    raise GenError("need the zstandard module or the zstd binary")
                self.proc = subprocess.Popen(["zstd", "-q", "-c"], stdin=subprocess.PIPE, stdout=self.fh)
                self.w = self.proc.stdin
        else:
            self.w = self.fh

    def write(self, b):
        self.w.write(b)

    def close(self):
        if self.kind == "gz":
            self.w.close()
        elif self.zw is not None:
            self.zw.close()
        elif self.proc is not None:
            self.proc.stdin.close()
            if self.proc.wait() != 0:
                raise GenError("zstd failed")
        self.fh.close()


def open_decompressed(path):
    """Binary stream of the uncompressed VMA, sniffing gzip/zstd magic."""
    fh = open(path, "rb")
    head = fh.read(4)
    fh.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=fh, mode="rb")
    if head == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
            try:
                return zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
            except TypeError:
                return zstandard.ZstdDecompressor().stream_reader(fh)
        except ImportError:
            fh.close()
            p = subprocess.run(["zstd", "-dc", path], stdout=subprocess.PIPE, check=True)
            return io.BytesIO(p.stdout)
    return fh


# --------------------------------------------------------------------------
# Build entry point
# --------------------------------------------------------------------------
def build(out_path, device_specs, config_specs, *, shuffle=None, order="interleave",
          per_extent=WRITER_CLUSTERS_PER_EXTENT, compress=None, uuid_bytes=None, ctime=None,
          corrupt=None, corrupt_extent=-1, log=print):
    if not 1 <= per_extent <= VMA_BLOCKS_PER_EXTENT:
        raise GenError("--per-extent must be 1..%d" % VMA_BLOCKS_PER_EXTENT)
    if corrupt is not None and corrupt not in CORRUPT_MODES:
        raise GenError("unknown corrupt mode %r" % corrupt)
    if compress is None:
        if out_path.endswith(".zst"):
            compress = "zst"
        elif out_path.endswith(".gz"):
            compress = "gz"
    devices = []
    for i, spec in enumerate(device_specs):
        if "=" in spec:
            name, path = spec.split("=", 1)
        else:
            name, path = "disk%d" % i, spec      # like vma create's extract_devname()
        devices.append(Device(name, path, i + 1))
    configs = []
    for spec in config_specs:
        if "=" in spec:
            name, path = spec.split("=", 1)
        else:
            name, path = spec, spec
        with open(path, "rb") as f:
            configs.append((name, f.read()))
    uuid_bytes = uuid_bytes or uuidlib.uuid4().bytes
    ctime = int(time.time()) if ctime is None else ctime

    arch = Archive(devices, configs, uuid_bytes, ctime, per_extent)
    try:
        arch.plan(order, shuffle)
        reporter = apply_structural_corruption(arch, corrupt, corrupt_extent) if corrupt else None
        if corrupt in ("extent-md5", "truncate-extent") and not hasattr(arch, "_byte_extent"):
            arch._byte_extent = _pick_extent(arch, corrupt_extent, need_entries=False)
        header = arch.build_header()
        if len(header) <= VMA_HEADER_FIXED:
            arch.header_info["warnings"].append(
                "header_size is %d (no configs, no devices): vma-reader.c rejects header_size <= 12288 "
                "('wrong vma header size'); vzdump always adds qemu-server.conf" % len(header))
        for wmsg in arch.header_info["warnings"]:
            log("warning: " + wmsg)
        report = None
        truncate_at = None
        patches = {}
        if corrupt:
            header, truncate_at, patches, report = byte_level_corruption(arch, corrupt, header)
            if reporter is not None:
                report = reporter(header)
        out = CompressedOut(out_path, compress)
        try:
            sink = PatchingWriter(out, patches.keys()) if patches else out
            written = arch.write(sink, header, truncate_at)
        finally:
            out.close()
        offs, total = arch.extent_offsets(len(header))
        nclusters = sum(len(e.entries) for e in arch.extents)
        log("wrote %s: %d device(s), %d config(s), %d cluster entries, %d extent(s), header_size %d, "
            "stream %d bytes%s, uuid %s"
            % (out_path, len(arch.devices), len(arch.configs), nclusters, len(arch.extents),
               len(header), written, " (%s-compressed)" % compress if compress else "",
               uuidlib.UUID(bytes=uuid_bytes)))
        for d in arch.devices:
            log("  dev_id %d %r size %d (raw %d) clusters %d" % (d.dev_id, d.name, d.size, d.raw_len, d.nclusters))
        if report:
            off, desc = report
            log("corrupted: mode=%s offset=%s hexoffset=%s what=%s"
                % (corrupt, off, "0x%x" % off if off is not None else "none", desc))
        return dict(header_size=len(header), extents=len(arch.extents), extent_offsets=offs,
                    stream_size=written, corrupt_offset=report[0] if report else None,
                    uuid=uuid_bytes, devices=[(d.name, d.size) for d in arch.devices])
    finally:
        arch.close()


# --------------------------------------------------------------------------
# Independent stream reader (modelled on vma-reader.c, plus strict checks)
# --------------------------------------------------------------------------
class VMAReadError(Exception):
    def __init__(self, code, msg, offset=None):
        super().__init__("%s: %s%s" % (code, msg, "" if offset is None else " (at offset %d)" % offset))
        self.code = code
        self.offset = offset


def _read_exact(fh, n):
    chunks = []
    got = 0
    while got < n:
        b = fh.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _safe_name(s):
    return s not in ("", ".", "..") and "/" not in s and "\x00" not in s


def read_vma(fh):
    """Parse a whole uncompressed VMA stream. Returns dict(devices={name: bytes}, configs={name: bytes},
    uuid, ctime, extents, header_size). Raises VMAReadError."""
    R_HDR, R_BLK, R_CLU, R_EXT = 12288, 4096, 65536, 512
    hdr = _read_exact(fh, R_HDR)
    if len(hdr) < R_HDR:
        raise VMAReadError("truncated-header", "can't read vma header - got %d bytes" % len(hdr), len(hdr))
    if hdr[0:4] != b"VMA\x00":
        raise VMAReadError("bad-magic", "not a vma file - wrong magic %r" % hdr[0:4], 0)
    (header_size,) = struct.unpack_from(">I", hdr, 56)
    if header_size <= R_HDR or header_size > 64 << 20:
        raise VMAReadError("bad-header-size", "wrong vma header size %d" % header_size, 56)
    rest = _read_exact(fh, header_size - R_HDR)
    if len(rest) < header_size - R_HDR:
        raise VMAReadError("truncated-header", "can't read vma header data", R_HDR + len(rest))
    h = bytearray(hdr + rest)
    stored_md5 = bytes(h[32:48])
    h[32:48] = bytes(16)
    if hashlib.md5(bytes(h)).digest() != stored_md5:
        raise VMAReadError("header-md5", "wrong vma header checksum", 32)
    version, = struct.unpack_from(">I", h, 4)
    if version != 1:
        raise VMAReadError("bad-version", "wrong vma version %d" % version, 4)
    archive_uuid = bytes(h[8:24])
    ctime, = struct.unpack_from(">q", h, 24)
    boff, bsize = struct.unpack_from(">II", h, 48)
    if boff < R_HDR:
        raise VMAReadError("bad-blob", "wrong vma blob buffer offset %d" % boff, 48)
    if boff + bsize > header_size:
        raise VMAReadError("bad-blob", "wrong vma blob buffer size %d/%d" % (boff, bsize), 52)
    blobs = {}
    p = boff + 1
    end = boff + bsize
    while p + 2 <= end:
        ln = h[p] | (h[p + 1] << 8)
        if p + ln + 2 <= end:
            blobs[p - boff] = bytes(h[p + 2:p + 2 + ln])
        p += ln + 2

    def blob_str(ptr):
        b = blobs.get(ptr)
        if b is None or len(b) == 0 or b[-1] != 0:
            return None
        return b[:-1].decode("utf-8", "replace")

    devices = {}
    names = {}
    for i in range(1, 256):
        o = 4096 + 32 * i
        nptr, _r0, size = struct.unpack_from(">IIQ", h, o)
        if size == 0:
            continue
        name = blob_str(nptr)
        if name is None:
            raise VMAReadError("bad-device-name", "device %d has size %d but no valid name" % (i, size), o)
        if not _safe_name(name):
            raise VMAReadError("bad-device-name", "device %d has unsafe name %r" % (i, name), o)
        if name in names:
            raise VMAReadError("duplicate-device-name", "devices %d and %d are both named %r"
                               % (names[name], i, name), o)
        names[name] = i
        devices[i] = dict(name=name, size=size, nclusters=(size + R_CLU - 1) // R_CLU,
                          data=bytearray(size), seen=bytearray((size + R_CLU - 1) // R_CLU))
    configs = {}
    for i in range(256):
        nptr, = struct.unpack_from(">I", h, 2044 + 4 * i)
        dptr, = struct.unpack_from(">I", h, 3068 + 4 * i)
        if not (nptr and dptr):
            continue
        name = blob_str(nptr)
        data = blobs.get(dptr)
        if name is None or data is None:
            raise VMAReadError("config-pointer", "vma contains invalid data pointers (config %d)" % i,
                               2044 + 4 * i)
        if not _safe_name(name):
            raise VMAReadError("bad-config-name", "config %d has unsafe name %r" % (i, name), 2044 + 4 * i)
        if name in configs:
            raise VMAReadError("bad-config-name", "config name %r repeated" % name, 2044 + 4 * i)
        configs[name] = data

    pos = header_size
    nextents = 0
    while True:
        eh = _read_exact(fh, R_EXT)
        if not eh:
            break
        if len(eh) < R_EXT:
            raise VMAReadError("truncated-extent", "read short extent (%d bytes)" % len(eh), pos)
        e = bytearray(eh)
        emd5 = bytes(e[24:40])
        e[24:40] = bytes(16)
        if hashlib.md5(bytes(e)).digest() != emd5:
            raise VMAReadError("extent-md5", "wrong vma extent header checksum", pos + 24)
        if bytes(e[8:24]) != archive_uuid:
            raise VMAReadError("extent-uuid", "wrong vma extent uuid", pos + 8)
        if bytes(e[0:4]) != b"VMAE" or e[4:6] != b"\x00\x00":
            raise VMAReadError("extent-magic", "wrong vma extent header magic", pos)
        block_count, = struct.unpack_from(">H", e, 6)
        data = _read_exact(fh, block_count * R_BLK)
        if len(data) < block_count * R_BLK:
            raise VMAReadError("truncated-extent", "short vma extent (%d < %d)"
                               % (R_EXT + len(data), R_EXT + block_count * R_BLK), pos)
        used = 0
        for s in range(59):
            slot_off = pos + 40 + 8 * s
            bi, = struct.unpack_from(">Q", e, 40 + 8 * s)
            cluster = bi & 0xFFFFFFFF
            dev_id = (bi >> 32) & 0xFF
            mask = bi >> 48
            if dev_id == 0:     # unused slot; vma-reader.c skips it whatever else it holds
                continue
            dev = devices.get(dev_id)
            if dev is None:
                raise VMAReadError("bad-devid", "got wrong dev id %d" % dev_id, slot_off)
            if cluster >= dev["nclusters"]:
                raise VMAReadError("cluster-beyond-size", "cluster %d beyond device %r (%d clusters)"
                                   % (cluster, dev["name"], dev["nclusters"]), slot_off)
            if dev["seen"][cluster]:
                raise VMAReadError("repeated-cluster", "found duplicated cluster %d for stream %s"
                                   % (cluster, dev["name"]), slot_off)
            dev["seen"][cluster] = 1
            for j in range(16):
                if not mask & (1 << j):
                    continue
                boff_ = cluster * R_CLU + j * R_BLK
                # vma-reader.c clamps a full (0xffff) cluster at the device end (writers before
                # pve-qemu b570f1c / June 2020 set such bits); a partial mask bit wholly past
                # the end is "write beyond end".
                if boff_ >= dev["size"] and mask != 0xFFFF:
                    raise VMAReadError("block-beyond-end", "got wrong block address - write beyond end",
                                       slot_off)
                if used >= block_count:
                    raise VMAReadError("block-count", "short vma extent - too many blocks", pos + 6)
                n = max(0, min(R_BLK, dev["size"] - boff_))
                dev["data"][boff_:boff_ + n] = data[used * R_BLK:used * R_BLK + n]
                used += 1
        if used != block_count:
            raise VMAReadError("block-count", "vma extent error - missing blocks (%d of %d used)"
                               % (used, block_count), pos + 6)
        pos += R_EXT + block_count * R_BLK
        nextents += 1
    for i, dev in devices.items():
        for c in range(dev["nclusters"]):
            if not dev["seen"][c]:
                raise VMAReadError("missing-cluster", "detected missing cluster %d for stream %s"
                                   % (c, dev["name"]), None)
    return dict(devices={d["name"]: bytes(d["data"]) for d in devices.values()},
                dev_ids={d["name"]: i for i, d in devices.items()},
                configs=configs, uuid=archive_uuid, ctime=ctime, extents=nextents,
                header_size=header_size, stream_size=pos)


def read_vma_file(path):
    fh = open_decompressed(path)
    try:
        return read_vma(fh)
    finally:
        fh.close()


# --------------------------------------------------------------------------
# Self-test
# --------------------------------------------------------------------------
EXPECTED_CODE = {
    "magic": "bad-magic", "header-md5": "header-md5", "extent-md5": "extent-md5",
    "truncate-header": "truncated-header", "truncate-extent": "truncated-extent",
    "bad-devid": "bad-devid", "cluster-beyond-size": "cluster-beyond-size",
    "missing-cluster": "missing-cluster", "repeated-cluster": "repeated-cluster",
    "extent-uuid": "extent-uuid", "block-count": "block-count",
    "duplicate-device-name": "duplicate-device-name", "device-name-slash": "bad-device-name",
    "config-name-dotdot": "bad-config-name",
}


def _mkraw(path, size, rng, density=1.0, zero_block_every=0, last_byte=None):
    buf = bytearray(size)
    nblk = (size + 4095) // 4096
    for b in range(nblk):
        if zero_block_every and b % zero_block_every == 0:
            continue
        if rng.random() < density:
            s = b * 4096
            e = min(size, s + 4096)
            buf[s:e] = rng.randbytes(e - s)
    if last_byte is not None:
        buf[-1] = last_byte
    with open(path, "wb") as f:
        f.write(buf)
    return bytes(buf)


def _expected(raw):
    size = (len(raw) + 511) // 512 * 512
    return raw + bytes(size - len(raw))


def _dissect_check(path, raws, configs):
    try:
        from dissect.archive.vma import VMA
    except ImportError:
        return None
    fh = open_decompressed(path)
    data = io.BytesIO(fh.read())
    fh.close()
    v = VMA(data)
    got = {d.name: d.open().read() for d in v.devices()}
    exp = {n: _expected(r) for n, r in raws.items()}
    if set(got) != set(exp):
        return "device set differs: %s vs %s" % (sorted(got), sorted(exp))
    for n in exp:
        if got[n] != exp[n]:
            i = next((k for k in range(min(len(got[n]), len(exp[n]))) if got[n][k] != exp[n][k]),
                     min(len(got[n]), len(exp[n])))
            return "device %r differs (len %d vs %d, first diff at %d)" % (n, len(got[n]), len(exp[n]), i)
    if dict(v.configs()) != configs:
        return "configs differ"
    return "ok"


def selftest():
    rng = random.Random(1234)
    tmp = tempfile.mkdtemp(prefix="make_vma_selftest_")
    failures = []
    dissect_results = []
    quiet = lambda *a, **k: None
    fixed_uuid = bytes(range(16))
    try:
        def p(n):
            return os.path.join(tmp, n)

        raws = {}
        # odd sizes: not multiples of 64 KiB, some not of 512 either
        raws["drive-scsi0"] = _mkraw(p("a.raw"), 3 * 65536 + 12345, rng, density=0.7,
                                     zero_block_every=5, last_byte=0x7E)
        raws["drive-virtio1"] = _mkraw(p("b.raw"), 200000, rng, density=0.5)
        # mostly zero, > 58 clusters so several extents; includes all-zero clusters
        raws["drive-sata2"] = _mkraw(p("c.raw"), 9 * 1024 * 1024 + 4096 * 3 + 512, rng, density=0.01)
        raws["efidisk0"] = _mkraw(p("d.raw"), 512, rng)
        raws["zero"] = bytes(70001)
        with open(p("z.raw"), "wb") as f:
            f.write(raws["zero"])
        files = {"drive-scsi0": "a.raw", "drive-virtio1": "b.raw", "drive-sata2": "c.raw",
                 "efidisk0": "d.raw", "zero": "z.raw"}
        conf = b"boot: order=scsi0\ncores: 2\nmemory: 2048\nscsi0: local-lvm:vm-100-disk-0,size=32G\n"
        fw = b"[OPTIONS]\nenable: 1\n"
        with open(p("qemu-server.conf"), "wb") as f:
            f.write(conf)
        with open(p("fw"), "wb") as f:
            f.write(fw)
        cfg_specs = ["qemu-server.conf=" + p("qemu-server.conf"), "qemu-server.fw=" + p("fw")]
        cfg_expect = {"qemu-server.conf": conf, "qemu-server.fw": fw}

        scenarios = [
            ("one", ["drive-scsi0"], cfg_specs[:1], {}),
            ("three", ["drive-scsi0", "drive-virtio1", "drive-sata2"], cfg_specs, {}),
            ("three-shuffled", ["drive-scsi0", "drive-virtio1", "drive-sata2"], cfg_specs, {"shuffle": 7}),
            ("sequential", ["drive-sata2", "efidisk0", "zero"], cfg_specs, {"order": "sequential"}),
            ("per59", ["drive-sata2", "drive-scsi0"], cfg_specs, {"per_extent": 59, "shuffle": 3}),
            ("per1", ["drive-virtio1", "efidisk0"], cfg_specs[:1], {"per_extent": 1}),
            ("allzero", ["zero"], cfg_specs[:1], {}),
            ("nodisk", [], cfg_specs, {}),
        ]
        for name, devs, cfgs, kw in scenarios:
            for comp in (None, "zst", "gz"):
                out = p("%s.vma%s" % (name, "." + comp if comp else ""))
                info = build(out, ["%s=%s" % (d, p(files[d])) for d in devs], cfgs,
                             uuid_bytes=fixed_uuid, ctime=1700000000, log=quiet, **kw)
                try:
                    res = read_vma_file(out)
                except VMAReadError as e:
                    failures.append("%s/%s: reader failed: %s" % (name, comp, e))
                    continue
                exp_cfg = {k: v for k, v in cfg_expect.items()
                           if any(c.startswith(k + "=") for c in cfgs)}
                if res["configs"] != exp_cfg:
                    failures.append("%s/%s: configs differ" % (name, comp))
                if list(res["devices"]) != devs:
                    failures.append("%s/%s: device list %s" % (name, comp, list(res["devices"])))
                for d in devs:
                    if res["devices"].get(d) != _expected(raws[d]):
                        failures.append("%s/%s: device %s differs" % (name, comp, d))
                per = kw.get("per_extent", 58)
                nclu = sum(((len(raws[d]) + 511) // 512 * 512 + 65535) // 65536 for d in devs)
                want_ext = max(1, (nclu + per - 1) // per)
                if res["extents"] != want_ext or info["extents"] != want_ext:
                    failures.append("%s/%s: %d extents, want %d" % (name, comp, res["extents"], want_ext))
                if res["header_size"] % 512 or res["ctime"] != 1700000000 or res["uuid"] != fixed_uuid:
                    failures.append("%s/%s: header fields" % (name, comp))
                if comp is None:
                    sz = os.path.getsize(out)
                    if sz != res["stream_size"]:
                        failures.append("%s: file size %d != parsed %d" % (name, sz, res["stream_size"]))
                    with open(out, "rb") as f:
                        raw = f.read()
                    if not _check_layout(raw, per, failures, name):
                        pass
                dr = _dissect_check(out, {d: raws[d] for d in devs}, exp_cfg)
                if dr is not None:
                    dissect_results.append((name, comp, dr))

        # corruption modes: each must be detected with the right error code
        three = ["%s=%s" % (d, p(files[d])) for d in ("drive-scsi0", "drive-virtio1", "drive-sata2")]
        clean = p("clean.vma")
        build(clean, three, cfg_specs, uuid_bytes=fixed_uuid, ctime=1700000000, log=quiet)
        with open(clean, "rb") as f:
            clean_bytes = f.read()
        for mode in CORRUPT_MODES:
            for variant, devspec, comp in (("three", three, None), ("one", three[:1], "gz"),
                                           ("three-shuffled", three, "zst")):
                out = p("bad-%s-%s.vma%s" % (mode, variant, "." + comp if comp else ""))
                lines = []
                kw = {"shuffle": 11} if variant == "three-shuffled" else {}
                try:
                    info = build(out, devspec, cfg_specs, uuid_bytes=fixed_uuid, ctime=1700000000,
                                 corrupt=mode, compress=comp, log=lines.append, **kw)
                except GenError as e:
                    failures.append("corrupt %s/%s: generator error %s" % (mode, variant, e))
                    continue
                if not any(l.startswith("corrupted: mode=%s " % mode) for l in lines):
                    failures.append("corrupt %s/%s: no 'corrupted:' line" % (mode, variant))
                try:
                    read_vma_file(out)
                    failures.append("corrupt %s/%s: NOT detected" % (mode, variant))
                except VMAReadError as e:
                    if e.code != EXPECTED_CODE[mode]:
                        failures.append("corrupt %s/%s: detected as %s, want %s"
                                        % (mode, variant, e.code, EXPECTED_CODE[mode]))
                except Exception as e:  # decompression errors etc.
                    failures.append("corrupt %s/%s: reader crashed: %r" % (mode, variant, e))
                if variant == "three":
                    with open(out, "rb") as f:
                        bad = f.read()
                    off = info["corrupt_offset"]
                    if mode.startswith("truncate"):
                        if len(bad) != off:
                            failures.append("corrupt %s: length %d != printed offset %d" % (mode, len(bad), off))
                    elif mode in ("magic", "header-md5", "extent-md5", "extent-uuid", "bad-devid"):
                        if off is None or off >= len(bad) or bad[off] == clean_bytes[off]:
                            failures.append("corrupt %s: byte at printed offset %s unchanged" % (mode, off))
        # CLI smoke test
        cli_out = p("cli.vma.zst")
        r = subprocess.run([sys.executable, os.path.abspath(__file__), cli_out,
                            "--device", "drive-scsi0=" + p("a.raw"), "--config", cfg_specs[0],
                            "--shuffle", "5", "--corrupt", "extent-uuid"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0 or "corrupted: mode=extent-uuid offset=" not in r.stdout:
            failures.append("CLI run failed: %s %s" % (r.stdout, r.stderr))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for n, c, dr in dissect_results:
        if dr != "ok":
            print("dissect.archive disagrees on %s/%s: %s" % (n, c, dr))
    if dissect_results:
        agree = sum(1 for *_, dr in dissect_results if dr == "ok")
        print("dissect.archive cross-check: %d/%d archives agree" % (agree, len(dissect_results)))
    else:
        print("dissect.archive not installed; cross-check skipped")
    if failures:
        for f_ in failures:
            print("FAIL:", f_)
        print("selftest FAILED (%d problems)" % len(failures))
        return 1
    print("selftest OK (%d scenarios x 3 encodings, %d corrupt modes x 3 variants)"
          % (len(scenarios), len(CORRUPT_MODES)))
    return 0


def _check_layout(raw, per, failures, name):
    """Byte-level checks of writer invariants on an uncompressed archive."""
    hs, = struct.unpack_from(">I", raw, 56)
    boff, bsize = struct.unpack_from(">II", raw, 48)
    ok = True
    if boff != 12288 or hs % 512 or bsize > hs - 12288 or raw[12288] != 0:
        failures.append("%s: blob layout boff=%d bsize=%d hs=%d" % (name, boff, bsize, hs))
        ok = False
    if any(raw[12288 + bsize:hs]):
        failures.append("%s: blob padding not zero" % name)
        ok = False
    pos = hs
    while pos < len(raw):
        n = 0
        for s in range(59):
            bi, = struct.unpack_from(">Q", raw, pos + 40 + 8 * s)
            if bi:
                if s != n:
                    failures.append("%s: gap in block-info slots at %d" % (name, pos))
                    ok = False
                n += 1
        if n > per:
            failures.append("%s: extent at %d has %d entries > %d" % (name, pos, n, per))
            ok = False
        bc, = struct.unpack_from(">H", raw, pos + 6)
        pos += 512 + 4096 * bc
    return ok


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description="Write Proxmox VMA archives like pve-qemu's vma-writer.c")
    ap.add_argument("out", nargs="?", help="output archive (.vma, .vma.zst, .vma.gz)")
    ap.add_argument("--device", action="append", default=[], metavar="NAME=RAWFILE",
                    help="disk image (raw); dev ids are assigned 1,2,... in order")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=FILE",
                    help="config blob; NAME goes through basename() like the writer")
    ap.add_argument("--shuffle", type=int, metavar="SEED", help="randomize cluster order across devices")
    ap.add_argument("--order", choices=["interleave", "sequential"], default="interleave")
    ap.add_argument("--per-extent", type=int, default=WRITER_CLUSTERS_PER_EXTENT, metavar="N",
                    help="clusters per extent, 1..59 (real writer: 58)")
    ap.add_argument("--compress", choices=["zst", "gz"], help="default: from OUT suffix")
    ap.add_argument("--uuid", help="archive uuid (32 hex digits); default random")
    ap.add_argument("--ctime", type=int, help="header ctime; default now")
    ap.add_argument("--corrupt", choices=CORRUPT_MODES)
    ap.add_argument("--corrupt-extent", type=int, default=-1, metavar="INDEX",
                    help="extent used by extent-level corruptions (default -1 = last)")
    ap.add_argument("--read", metavar="ARCHIVE", help="parse ARCHIVE with the built-in strict reader")
    ap.add_argument("--extract", metavar="DIR", help="with --read: write disk-NAME.raw and configs to DIR")
    ap.add_argument("--selftest", action="store_true")
    a = ap.parse_args(argv)
    if a.selftest:
        return selftest()
    if a.read:
        try:
            res = read_vma_file(a.read)
        except VMAReadError as e:
            print("invalid: %s" % e)
            return 2
        print("ok: uuid %s ctime %d header_size %d extents %d"
              % (uuidlib.UUID(bytes=res["uuid"]), res["ctime"], res["header_size"], res["extents"]))
        for n, d in res["devices"].items():
            print("  dev_id %d %r size %d" % (res["dev_ids"][n], n, len(d)))
        for n, d in res["configs"].items():
            print("  config %r %d bytes" % (n, len(d)))
        if a.extract:
            os.makedirs(a.extract, exist_ok=True)
            for n, d in res["devices"].items():
                with open(os.path.join(a.extract, "disk-%s.raw" % n), "wb") as f:
                    f.write(d)
            for n, d in res["configs"].items():
                with open(os.path.join(a.extract, n), "wb") as f:
                    f.write(d)
        return 0
    if not a.out:
        ap.error("OUT is required")
    try:
        u = uuidlib.UUID(hex=a.uuid).bytes if a.uuid else None
        build(a.out, a.device, a.config, shuffle=a.shuffle, order=a.order, per_extent=a.per_extent,
              compress=a.compress, uuid_bytes=u, ctime=a.ctime, corrupt=a.corrupt,
              corrupt_extent=a.corrupt_extent)
    except (GenError, OSError, ValueError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
