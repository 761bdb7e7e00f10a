#!/usr/bin/env python3
"""Writes the VMDK fuzz seeds (Fixtures/fuzz/vmdk, Fixtures/fuzz/vmdk-stream) into OUTDIR: a VMware-style
stream (grain directory in the footer, a partial last grain), a monolithicSparse with 4 KiB grains, 32-entry
grain tables and a zeroed grain, and a descriptor with FLAT, ZERO, RDONLY and SPARSE extents (flat.bin and
sparse.vmdk beside it). Usage: make_vmdk_seeds.py OUTDIR"""
import os
import struct
import sys
import zlib

os.chdir(sys.argv[1])


def header(cap, grain, desc_off, desc_size, gtes, rgd, gd, overhead, flags, comp):
    h = b'KDMV' + struct.pack('<IIQQQQIQQQ', 3 if comp else 1, flags, cap, grain, desc_off, desc_size, gtes, rgd, gd, overhead)
    h += b'\0' + b'\n \r\n' + struct.pack('<H', comp)
    return h + b'\0' * (512 - len(h))


def pad(b):
    return b + b'\0' * ((-len(b)) % 512)


def desc(ct, name, sectors, typ='SPARSE'):
    return pad(('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="%s"\n\nRW %d %s "%s"\n\n'
                'ddb.adapterType = "ide"\n' % (ct, sectors, typ, name)).encode())


def text(seed, n):
    return (('line %d of some log text with words\n' % seed) * (n // 30 + 1)).encode()[:n]


# Stream: 4 KiB grains, 84 sectors (the last grain is half), grains 0, 3 and 10.
cap, g, gtes = 84, 8, 512
out = bytearray(header(cap, g, 1, 1, gtes, 0, 0xFFFFFFFFFFFFFFFF, 2, 0x30001, 1) + desc('streamOptimized', 'stream.vmdk', cap))
gt = [0] * gtes
for i in [0, 3, 10]:
    z = zlib.compress(text(i, min(g, cap - i * g) * 512))
    gt[i] = len(out) // 512
    out += pad(struct.pack('<QI', i * g, len(z)) + z)
out += struct.pack('<QII', 4, 0, 1) + b'\0' * 496
gtsec = len(out) // 512
out += struct.pack('<%dI' % gtes, *gt)
out += struct.pack('<QII', 1, 0, 2) + b'\0' * 496
gdsec = len(out) // 512
out += pad(struct.pack('<I', gtsec))
out += struct.pack('<QII', 1, 0, 3) + b'\0' * 496
out += header(cap, g, 1, 1, gtes, 0, gdsec, 2, 0x30001, 1)
out += b'\0' * 512
open('stream.vmdk', 'wb').write(out)

# monolithicSparse: 400 sectors, 4 KiB grains, 32 entries a table (2 tables), grains 0 1 5 40, grain 2 zeroed.
cap, g, gtes = 400, 8, 32
gdents = (cap + g * gtes - 1) // (g * gtes)
gts = [4 + t for t in range(gdents)]
first = 4 + gdents
tables = [[0] * gtes for _ in range(gdents)]
grains = {}
nxt = first
for i in [0, 1, 5, 40]:
    tables[i // gtes][i % gtes] = nxt
    grains[nxt] = text(100 + i, g * 512)
    nxt += g
tables[0][2] = 1
out = bytearray(header(cap, g, 1, 1, gtes, 2, 3, first, 0x7, 0) + desc('monolithicSparse', 'sparse.vmdk', cap))
out += pad(struct.pack('<%dI' % gdents, *gts))
out += pad(struct.pack('<%dI' % gdents, *gts))
for t in tables:
    out += pad(struct.pack('<%dI' % gtes, *t))
for s in sorted(grains):
    out += grains[s]
open('sparse.vmdk', 'wb').write(out)

open('desc.vmdk', 'wb').write(('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                               'createType="twoGbMaxExtentFlat"\n\nRW 16 FLAT "flat.bin" 0\nRW 8 ZERO\n'
                               'RDONLY 16 FLAT "flat.bin" 16\nRW 400 SPARSE "sparse.vmdk"\n').encode())
open('flat.bin', 'wb').write(text(7, 32 * 512))
