#!/usr/bin/env python3
"""Writes the fuzz seeds of the vhdx, vhd and vdi targets into Fixtures/fuzz/<target>/.

Small on purpose (each fuzz run writes its input to a file): qemu-img's own VHDX layout puts the
log, BAT and metadata at 1, 2 and 3 MiB, so the VHDX seeds are built here with the same structures
packed into the first MiB (region offsets are not required to be MiB-aligned by qemu or QcowPress),
and qemu-img is asked to read each one that it can (it mishandles 4096-byte logical sectors and
refuses a log to replay). VHD and VDI seeds are qemu-img-made, trimmed to the part the guest sees,
plus a hand-made VHD with 4 KiB blocks. Usage: fuzz/make_format_seeds.py [REPO_ROOT]
"""
import os, re, struct, subprocess, sys, tempfile, uuid, zlib

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
out = os.path.join(root, "Fixtures", "fuzz")


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


def guid(s):
    return uuid.UUID(s).bytes_le


BAT = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
META = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
PARAMS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VSIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83 = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
MIB = 1 << 20


def with_crc(b, size):
    b = bytearray(b.ljust(size, b"\0"))
    b[4:8] = b"\0\0\0\0"
    b[4:8] = struct.pack("<I", crc32c(bytes(b)))
    return bytes(b)


def vhdx(vsize, block, states, logical=512, fixed=False, log_entry=False, seed=1):
    """states: BAT entries in file order (payload and bitmap): a state, or (6, mib) for data."""
    log_guid = bytes(range(1, 17)) if log_entry else bytes(16)
    log_off, log_len = MIB, (MIB if log_entry else 0)
    data_end = max([m + 1 for s in states if isinstance(s, tuple) for m in [s[1]]] + [2 if log_entry else 0])
    img = bytearray(max(data_end * MIB, 512 << 10))
    img[0:8] = b"vhdxfile"
    for i, at in enumerate([64 << 10, 128 << 10]):
        h = b"head" + b"\0" * 4 + struct.pack("<Q", i + 1) + bytes(32) + log_guid
        h += struct.pack("<HHIQ", 0, 1, log_len, log_off)
        img[at:at + 4096] = with_crc(h, 4096)
    rt = b"regi" + b"\0" * 4 + struct.pack("<II", 2, 0)
    rt += BAT + struct.pack("<QII", 320 << 10, 64 << 10, 1) + META + struct.pack("<QII", 384 << 10, 128 << 10, 1)
    rt = with_crc(rt, 64 << 10)
    img[192 << 10:256 << 10] = rt
    img[256 << 10:320 << 10] = rt
    items = [(PARAMS, struct.pack("<II", block, 1 if fixed else 0), 0), (VSIZE, struct.pack("<Q", vsize), 6),
             (PAGE83, bytes(range(16)), 6), (LOGICAL, struct.pack("<I", logical), 6), (PHYSICAL, struct.pack("<I", 4096), 6)]
    mt = bytearray(b"metadata" + struct.pack("<HH", 0, len(items)) + bytes(20))
    at = 64 << 10
    for g, data, flags in items:
        mt += g + struct.pack("<IIII", at, len(data), flags, 0)
        img[(384 << 10) + at:(384 << 10) + at + len(data)] = data
        at += 64
    img[384 << 10:(384 << 10) + len(mt)] = mt
    for i, s in enumerate(states):
        e = s[1] * MIB | s[0] if isinstance(s, tuple) else s
        img[(320 << 10) + 8 * i:(320 << 10) + 8 * i + 8] = struct.pack("<Q", e)
        if isinstance(s, tuple):
            visible = min(block, vsize - i * block)
            img[s[1] * MIB:s[1] * MIB + visible] = (bytes([seed, i]) * (visible // 2))
    if log_entry:
        e = bytearray(4096)
        e[0:4] = b"loge"
        e[8:12] = struct.pack("<I", 4096)
        e[16:24] = struct.pack("<Q", 1)
        e[32:48] = log_guid
        e[48:64] = struct.pack("<QQ", len(img), len(img))
        img[MIB:MIB + 4096] = with_crc(bytes(e), 4096)
    ends = [s[1] * MIB + min(block, vsize - i * block) for i, s in enumerate(states) if isinstance(s, tuple)]
    return bytes(img[:max(ends + [512 << 10, 2 * MIB if log_entry else 0])])


def write(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    return os.path.join(d, name)


def qemu_reads(path, fmt):
    r = subprocess.run(["qemu-img", "info", "-f", fmt, path], capture_output=True, text=True)
    assert r.returncode == 0, f"qemu-img cannot read {path}: {r.stderr}"


seeds = {
    "data-64k.vhdx": vhdx(65536, MIB, [(6, 1)]),
    "fixed-64k.vhdx": vhdx(65536, MIB, [(6, 1)], fixed=True, seed=2),
    "4k-sectors.vhdx": vhdx(65536, MIB, [(6, 1)], logical=4096, seed=3),
    "zero-states.vhdx": vhdx(8 * MIB, MIB, [2, 0, 3, 1, 5, 0, 2, 2]),
    # 256 MiB blocks: a chunk is 16 blocks, so BAT entry 16 is a sector bitmap and block 16 is entry 17.
    "interleave.vhdx": vhdx(17 * 256 * MIB, 256 * MIB, [2] * 16 + [0] + [3]),
}
def pack(img):
    """The sparse-file form the vhdx target reads (SparseInput in Sources/qcowpress-fuzz/FormatTargets.swift):
    size u32, then offset u32, length u16 and the bytes of each non-zero run (runs joined across
    fewer than 16 zeros); a run is cut to 512 bytes (only block data is longer), so that mutations
    land on the structures."""
    out = bytearray(struct.pack("<I", len(img)))
    for m in re.finditer(rb"[^\x00]+(?:\x00{1,15}[^\x00]+)*", img):
        run = m.group()[:512]
        out += struct.pack("<IH", m.start(), len(run)) + run
    return bytes(out)


for old in os.listdir(os.path.join(out, "vhdx")) if os.path.isdir(os.path.join(out, "vhdx")) else []:
    os.remove(os.path.join(out, "vhdx", old))
seeds["log.vhdx"] = vhdx(65536, MIB, [0], log_entry=True)
with tempfile.TemporaryDirectory() as tmp:
    for name, data in seeds.items():
        if "4k" not in name and "log" not in name:
            p = os.path.join(tmp, name)
            with open(p, "wb") as f:
                f.write(data)
            qemu_reads(p, "vhdx")
        write("vhdx", name.replace(".vhdx", ".pieces"), pack(data))

def qemu(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def header_field(path, off, fmt):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


# VDI: an empty dynamic one, and 64 KiB disks with data, trimmed to the visible 64 KiB.
os.makedirs(os.path.join(out, "vdi"), exist_ok=True)
qemu("create", "-q", "-f", "vdi", os.path.join(out, "vdi", "empty-dynamic.vdi"), "4M")
for static in ["off", "on"]:
    p = os.path.join(out, "vdi", f"data-64k-static-{static}.vdi")
    qemu("create", "-q", "-f", "vdi", "-o", f"static={static}", p, "64K")
    subprocess.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x5a 0 65536", p], check=True, capture_output=True)
    os.truncate(p, header_field(p, 344, "<I") + 65536)

# VHD: an empty dynamic and a fixed one by qemu-img; a dynamic one with 4 KiB blocks by hand.
os.makedirs(os.path.join(out, "vhd"), exist_ok=True)
qemu("create", "-q", "-f", "vpc", os.path.join(out, "vhd", "empty-dynamic.vhd"), "4M")
qemu("create", "-q", "-f", "vpc", "-o", "subformat=fixed", os.path.join(out, "vhd", "fixed.vhd"), "64K")


def vhd_footer(size, dtype, data_offset):
    f = bytearray(b"conectix" + struct.pack(">IIQI", 2, 0x10000, data_offset, 0) + b"qem2" + struct.pack(">I", 0x50003) + b"Wi2k")
    f += struct.pack(">QQHBBI", size, size, 2, 4, 17, dtype) + bytes(4) + bytes(range(16))
    f = f.ljust(512, b"\0")
    f[64:68] = struct.pack(">I", ~sum(f) & 0xFFFFFFFF)
    return bytes(f)


size, block = 65536, 4096
entries = size // block
bat = [0xFFFFFFFF] * entries
body = bytearray()
base = 2048
for k, i in enumerate([0, 3, 7, 15]):
    bat[i] = (base + len(body)) // 512
    bitmap = bytes([0xFF if k % 2 == 0 else 0xA5]) + bytes(511)
    body += bitmap + bytes([k + 1]) * block
dyn = bytearray(b"cxsparse" + struct.pack(">QQIII", 0xFFFFFFFFFFFFFFFF, 1536, 0x10000, entries, block)).ljust(1024, b"\0")
dyn[36:40] = struct.pack(">I", ~sum(dyn) & 0xFFFFFFFF)
footer = vhd_footer(size, 3, 512)
img = footer + bytes(dyn) + b"".join(struct.pack(">I", e) for e in bat).ljust(base - 1536, b"\xff") + bytes(body) + footer
p = write("vhd", "small-blocks.vhd", img)
qemu_reads(p, "vpc")
print("seeds written under", out)
