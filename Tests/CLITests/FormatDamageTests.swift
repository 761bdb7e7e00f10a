import Foundation
import QcowPress
import Testing

/// Hand-damaged VHDX, VHD and VDI images (issue 31): structures past the end of the file, wrong
/// checksums, counts that overflow, truncation at every structure, block map entries past the end
/// or sharing data. Each is exit 1 with one line naming the file and the field, and no destination.
@Suite(.tags(.e2e, .fast, .faults), .enabled(if: Harness.haveQemuImg, "qemu-img makes the images"))
struct FormatDamageTests {
    typealias Damage = (name: String, field: String, damage: (String) throws -> Void)

    /// Copies `good` once per case, damages the copy, and expects the refusal (convert and info).
    static func expectAllRefused(_ good: String, _ cases: [Damage], dir: URL, args: [String] = [],
                                 sourceLocation: SourceLocation = #_sourceLocation) throws {
        for c in cases {
            let p = dir.appendingPathComponent("\(c.name)-\(URL(fileURLWithPath: good).lastPathComponent)").path
            try VHDXBytes.copy(good, p)
            try c.damage(p)
            let dst = dir.appendingPathComponent("\(c.name).qcow2").path
            let r = try Harness.qcowpress(["convert"] + args + [p, dst])
            #expect(r.status == 1, "\(c.name): exit \(r.status) \(r.stderr)", sourceLocation: sourceLocation)
            #expect(r.stderr.contains(p) && r.stderr.contains(c.field) && r.stderr.split(separator: "\n").count == 1, "\(c.name): \(r.stderr)", sourceLocation: sourceLocation)
            #expect(!FileManager.default.fileExists(atPath: dst), "\(c.name) left \(dst)", sourceLocation: sourceLocation)
            let info = try Harness.qcowpress(["info"] + args + [p])
            #expect(info.status == 1 && info.stderr.split(separator: "\n").count == 1, "\(c.name): info \(info.status) \(info.stderr)", sourceLocation: sourceLocation)
            try? FileManager.default.removeItem(atPath: p)
        }
    }
    static func truncate(_ path: String, to size: Int) throws {
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.truncate(atOffset: UInt64(size))
    }
    static func size(_ path: String) throws -> Int { Int((try FileManager.default.attributesOfItem(atPath: path)[.size] as? UInt64) ?? 0) }
    static func le32(_ v: Int) -> [UInt8] { VHDXBytes.le32(v) }
    static func le64(_ v: UInt64) -> [UInt8] { VHDXBytes.le64(v) }

    @Test func damagedVHDX() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (_, good) = try ImageFormatTests.qemuMade("vhdx", named: "good.vhdx", options: ["-o", "block_size=1M"], size: 5 * 1_048_576, seed: 5, in: dir)
        let bat = try VHDXBytes.bat(good), meta = try VHDXBytes.metadata(good)
        let params = try VHDXBytes.item(good, guid: 0xCAA1_6737), vsize = try VHDXBytes.item(good, guid: 0x2FA5_4224)
        let logical = try VHDXBytes.item(good, guid: 0x8141_BF1D)
        let entry0 = try VHDXBytes.read(good, at: bat.offset, count: 8)
        #expect(entry0[0] & 7 == 6, "block 0 of the test image is present")
        /// A field of the first region table, its checksum fixed (the table stays the valid one).
        func region(_ at: Int, _ b: [UInt8]) -> (String) throws -> Void {
            { p in try VHDXBytes.patch(p, at: at, b); try VHDXBytes.fixChecksum(p, at: 196_608, size: 65536) }
        }
        /// A field of both headers, their checksums fixed.
        func headers(_ field: Int, _ b: [UInt8]) -> (String) throws -> Void {
            { p in for h in [65536, 131_072] { try VHDXBytes.patch(p, at: h + field, b); try VHDXBytes.fixChecksum(p, at: h, size: 4096) } }
        }
        let cases: [Damage] = [
            ("id", "file identifier", { try VHDXBytes.patch($0, at: 0, Array("vhdxfilx".utf8)) }),
            ("header-sums", "no valid VHDX header", { p in for h in [65536, 131_072] { try VHDXBytes.patch(p, at: h + 8, [0x55]) } }),
            ("header-version", "version", headers(66, [2, 0])),
            ("log-offset", "log_offset", headers(72, Self.le64(1_572_864))),
            ("log-past-eof", "past the end", headers(68, Self.le32(1 << 30))),
            ("region-sums", "no valid VHDX region table", { p in for t in [196_608, 262_144] { try VHDXBytes.patch(p, at: t + 20, [0x55]) } }),
            ("region-count", "entry_count", region(196_608 + 8, Self.le32(5000))),
            ("bat-past-eof", "past the end", region(bat.entry + 16, Self.le64(1 << 40))),
            ("bat-length-overflow", "past the end", region(bat.entry + 24, Self.le32(-1))),
            ("regions-overlap", "overlaps the", region(bat.entry + 16, Self.le64(UInt64(meta.offset)))),
            ("region-in-log", "overlaps the log", region(bat.entry + 16, Self.le64(1 << 20))),
            ("region-in-header", "overlaps the VHDX header area", region(bat.entry + 16, Self.le64(65536))),
            ("unknown-required", "marked required", { p in try VHDXBytes.patch(p, at: bat.entry + 28, Self.le32(1)); try region(bat.entry + 3, [0x99])(p) }),
            ("metadata-signature", "signature", { try VHDXBytes.patch($0, at: meta.offset, Array("metadate".utf8)) }),
            ("metadata-count", "entry_count", { try VHDXBytes.patch($0, at: meta.offset + 10, [0xFF, 0x7F]) }),
            ("item-missing", "no virtual disk size item", { p in try VHDXBytes.patch(p, at: vsize.entry, [0x11]); try VHDXBytes.patch(p, at: vsize.entry + 24, Self.le32(0)) }),
            ("item-outside", "does not lie inside the metadata region", { try VHDXBytes.patch($0, at: vsize.entry + 16, Self.le32(-16)) }),
            ("block-size-odd", "block size", { try VHDXBytes.patch($0, at: params.offset, Self.le32(3 << 20)) }),
            ("block-size-big", "block size", { try VHDXBytes.patch($0, at: params.offset, Self.le32(512 << 20)) }),
            ("differencing", "a differencing VHDX image", { try VHDXBytes.patch($0, at: params.offset + 4, Self.le32(2)) }),
            ("sector-size", "logical sector size", { try VHDXBytes.patch($0, at: logical.offset, Self.le32(1000)) }),
            ("size-overflow", "virtual disk size", { try VHDXBytes.patch($0, at: vsize.offset, Self.le64(1 << 62)) }),
            ("size-odd", "virtual disk size", { try VHDXBytes.patch($0, at: vsize.offset, Self.le64(5_000_001)) }),
            ("bat-too-small", "too small for", { try VHDXBytes.patch($0, at: vsize.offset, Self.le64(60 << 40)) }),
            ("entry-past-eof", "BAT entry 0", { try VHDXBytes.patch($0, at: bat.offset, Self.le64(1 << 40 | 6)) }),
            ("entry-partial", "partially present", { try VHDXBytes.patch($0, at: bat.offset, [entry0[0] | 7]) }),
            ("entry-state", "not a payload block state", { try VHDXBytes.patch($0, at: bat.offset, [entry0[0] & ~7 | 4]) }),
            ("entry-in-metadata", "overlaps the metadata region", { try VHDXBytes.patch($0, at: bat.offset, Self.le64(UInt64(meta.offset) | 6)) }),
            ("blocks-overlap", "overlapping data", { try VHDXBytes.patch($0, at: bat.offset + 16, entry0) }),
        ]
        try Self.expectAllRefused(good, cases, dir: dir, args: ["-f", "vhdx"])
        // Truncated inside every structure: headers, region tables, log, BAT, metadata, data.
        let total = try Self.size(good)
        let cuts = [4, 100_000, 140_000, 200_000, 270_000, 1_500_000, bat.offset + 4, meta.offset + 100, meta.offset + 70_000, total - 4096]
        try Self.expectAllRefused(good, cuts.map { n in ("cut-\(n)", "past the end", { try Self.truncate($0, to: n) }) }, dir: dir, args: ["-f", "vhdx"])
    }

    @Test func damagedVHD() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (src, good) = try ImageFormatTests.qemuMade("vpc", named: "good.vhd", size: 5 * 1_048_576, seed: 9, in: dir)
        let batAt = 1536
        let e0 = try VHDXBytes.read(good, at: batAt, count: 4)
        #expect(e0 != [0xFF, 0xFF, 0xFF, 0xFF], "block 0 of the test image is allocated")
        let cases: [Damage] = [
            ("footer-sum", "checksum", { try VHDXBytes.patch($0, at: 40, [0x7F]) }),
            ("cookie", "cxsparse", { try VHDXBytes.patch($0, at: 512, Array("cxsparsf".utf8)) }),
            ("table-past-eof", "table_offset", { try VHDXBytes.patch($0, at: 512 + 16, [0, 0, 0, 0x10, 0, 0, 0, 0]) }),
            ("entries-overflow", "table_offset", { try VHDXBytes.patch($0, at: 512 + 28, [0xFF, 0xFF, 0xFF, 0xFF]) }),
            ("entries-short", "max_table_entries", { try VHDXBytes.patch($0, at: 512 + 28, [0, 0, 0, 1]) }),
            ("block-size", "block_size", { try VHDXBytes.patch($0, at: 512 + 32, [0, 0x20, 0, 1]) }),
            ("entry-past-eof", "block allocation table entry 0", { try VHDXBytes.patch($0, at: batAt, [0x7F, 0xFF, 0, 0]) }),
            ("entries-same-block", "overlaps the block of entry", { try VHDXBytes.patch($0, at: batAt + 8, e0) }),
            ("entry-in-table", "overlaps the block allocation table", { try VHDXBytes.patch($0, at: batAt, [0, 0, 0, 3]) }),
            ("differencing", "a differencing VHD image", { try ImageFormatTests.patchVHDFooter($0, footerAt: 0, field: 60, [0, 0, 0, 4]) }),
            ("size-overflow", "current_size", { p in
                try ImageFormatTests.patchVHDFooter(p, footerAt: 0, field: 28, Array("qem2".utf8))
                try ImageFormatTests.patchVHDFooter(p, footerAt: 0, field: 48, [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0])
            }),
        ]
        try Self.expectAllRefused(good, cases, dir: dir)
        let total = try Self.size(good)
        let cuts = [100, 700, 1600, total - 600_000]
        try Self.expectAllRefused(good, cuts.map { n in ("cut-\(n)", "past the end", { try Self.truncate($0, to: n) }) }, dir: dir, args: ["-f", "vpc"])
        // A fixed VHD whose footer is cut off or damaged.
        let fixed = dir.appendingPathComponent("fixed.vhd").path
        #expect(try Harness.qemuImg(["convert", "-O", "vpc", "-o", "subformat=fixed", src.path, fixed]).status == 0)
        let fixedSize = try Self.size(fixed)
        try Self.expectAllRefused(fixed, [("fixed-sum", "checksum", { try VHDXBytes.patch($0, at: fixedSize - 512 + 64, [0, 0, 0, 0]) }),
                                          ("fixed-cut", "conectix", { try Self.truncate($0, to: fixedSize - 100) })], dir: dir, args: ["-f", "vpc"])
    }

    @Test func damagedVDI() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (_, good) = try ImageFormatTests.qemuMade("vdi", named: "good.vdi", size: 5 * 1_048_576, seed: 13, in: dir)
        let h = try VHDXBytes.read(good, at: 0, count: 512)
        let mapAt = VHDXBytes.le(h, 340, 4), dataAt = VHDXBytes.le(h, 344, 4)
        let e0 = try VHDXBytes.read(good, at: mapAt, count: 4)
        let cases: [Damage] = [
            ("signature", "signature", { try VHDXBytes.patch($0, at: 64, [0, 0, 0, 0]) }),
            ("map-past-eof", "offset_bmap", { try VHDXBytes.patch($0, at: 340, Self.le32(0x4000_0000)) }),
            ("blocks-overflow", "disk_size", { try VHDXBytes.patch($0, at: 368, Self.le64(UInt64.max)) }),
            ("blocks-count", "blocks_in_image", { try VHDXBytes.patch($0, at: 384, Self.le32(-1)) }),
            ("allocated", "blocks_allocated", { try VHDXBytes.patch($0, at: 388, Self.le32(1000)) }),
            ("data-in-map", "offset_data", { try VHDXBytes.patch($0, at: 344, Self.le32(mapAt)) }),
            ("block-size", "block_size", { try VHDXBytes.patch($0, at: 376, Self.le32(3000)) }),
            ("entry-past-eof", "block map entry 0", { try VHDXBytes.patch($0, at: mapAt, Self.le32(4)) }),
            ("entries-same-block", "points to the same data block", { try VHDXBytes.patch($0, at: mapAt + 8, e0) }),
        ]
        try Self.expectAllRefused(good, cases, dir: dir, args: ["-f", "vdi"])
        let total = try Self.size(good)
        let cuts = [60, 300, mapAt + 2, dataAt + 100, total - 4096]
        try Self.expectAllRefused(good, cuts.map { n in ("cut-\(n)", "past the end", { try Self.truncate($0, to: n) }) }, dir: dir, args: ["-f", "vdi"])
    }
}

extension FormatDamageTests {
    /// A monolithicSparse's redundant grain directory (header flag 1, rgdOffset) stands in for a
    /// primary directory or grain table that cannot be used, said once on stderr; both unusable is
    /// a one-line refusal naming both.
    @Test func vmdkRedundantGrainDirectory() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (src, good) = try ImageFormatTests.qemuMade("vmdk", named: "good.vmdk", size: 3 * 1_048_576, seed: 21, in: dir)
        let h = try VHDXBytes.read(good, at: 0, count: 512)
        #expect(VHDXBytes.le(h, 8, 4) & 2 != 0, "qemu-img writes a redundant grain directory")
        let rgd = VHDXBytes.le(h, 48, 8) * 512, gd = VHDXBytes.le(h, 56, 8) * 512
        let gt = VHDXBytes.le(try VHDXBytes.read(good, at: gd, count: 4), 0, 4) * 512
        let rgt = VHDXBytes.le(try VHDXBytes.read(good, at: rgd, count: 4), 0, 4) * 512
        let far = Self.le32(0x7FFF_FFFF)
        let healed: [Damage] = [
            ("gd-entry", "redundant grain directory", { try VHDXBytes.patch($0, at: gd, far) }),
            ("gd-offset", "redundant grain directory", { try VHDXBytes.patch($0, at: 56, Self.le64(1 << 40)) }),
            ("gd-over-itself", "redundant grain directory", { try VHDXBytes.patch($0, at: gd, Self.le32(gd / 512)) }),
            ("gt-entry", "redundant copy of grain table 0", { try VHDXBytes.patch($0, at: gt + 8, far) }),
        ]
        for c in healed {
            let p = dir.appendingPathComponent("\(c.name).vmdk").path
            try VHDXBytes.copy(good, p)
            try c.damage(p)
            let dst = dir.appendingPathComponent("\(c.name).qcow2").path
            let r = try Harness.qcowpress(["convert", "-c", p, dst])
            #expect(r.status == 0 && r.stderr.contains(c.field) && r.stderr.split(separator: "\n").count == 1, "\(c.name): \(r.stderr)")
            try Harness.expectGood(dst, equals: src.path)
        }
        try Self.expectAllRefused(good, [
            ("both-gd", "grain directory entry 0", { p in try VHDXBytes.patch(p, at: gd, far); try VHDXBytes.patch(p, at: rgd, far) }),
            ("gd-and-rgd-offset", "rgdOffset", { p in try VHDXBytes.patch(p, at: 56, Self.le64(1 << 40)); try VHDXBytes.patch(p, at: 48, Self.le64(1 << 40)) }),
            ("no-copy", "grain directory entry 0", { p in try VHDXBytes.patch(p, at: gd, far); try VHDXBytes.patch(p, at: 8, Self.le32(1)) }),
        ], dir: dir)
        // Grain tables are read when used: info opens this one, convert refuses it.
        let bothGT = dir.appendingPathComponent("both-gt.vmdk").path
        try VHDXBytes.copy(good, bothGT)
        try VHDXBytes.patch(bothGT, at: gt + 8, far)
        try VHDXBytes.patch(bothGT, at: rgt + 8, far)
        try ImageFormatTests.expectRefused(bothGT, field: "the redundant copy is unusable too: VMDK redundant grain table 0 entry 2", dir: dir)
    }
}
