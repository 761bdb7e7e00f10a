import Foundation
import Testing

/// Formats by magic (issue 31): a file whose magic names a format QcowPress does not read is
/// refused by name (never converted as raw bytes); `-f raw` reads any file as raw, as qemu-img.
@Suite(.tags(.e2e, .fast), .enabled(if: Harness.haveQemuImg, "qemu-img makes the images and judges"))
struct ImageFormatTests {
    /// Writes `bytes` at offset 0 of a 64 KiB file (a hand-made image with one format's magic).
    static func magicFile(_ url: URL, _ parts: [(Int, [UInt8])], size: Int = 65536) throws {
        var d = [UInt8](repeating: 0, count: size)
        for (at, b) in parts { d.replaceSubrange(at..<(at + b.count), with: b) }
        try Data(d).write(to: url)
    }
    static func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) } }

    /// Images of every foreign format, by name: qemu-img-made where qemu-img writes the format,
    /// hand-made magic otherwise.
    static func foreignImages(_ dir: URL) throws -> [(format: String, path: String)] {
        var out: [(String, String)] = []
        for f in ["qed", "parallels", "qcow"] {
            let p = dir.appendingPathComponent("x.\(f)").path
            let r = try Harness.qemuImg(["create", "-q", "-f", f, p, "4M"])
            #expect(r.status == 0, "qemu-img create -f \(f): \(r.stderr)")
            out.append((f, p))
        }
        let luks = dir.appendingPathComponent("l.img")
        try magicFile(luks, [(0, [0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE, 0, 1])])
        out.append(("luks", luks.path))
        let cloop = dir.appendingPathComponent("c.img")
        try magicFile(cloop, [(0, Array("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".utf8))])
        out.append(("cloop", cloop.path))
        let bochs = dir.appendingPathComponent("b.img")
        try magicFile(bochs, [(0, Array("Bochs Virtual HD Image".utf8)), (32, Array("Redolog".utf8)), (48, Array("Growing".utf8)), (64, le32(0x0002_0000))])
        out.append(("bochs", bochs.path))
        let dmg = dir.appendingPathComponent("d.img")
        try magicFile(dmg, [(4096, [0xAA]), (65536 - 512, Array("koly".utf8))])
        out.append(("dmg", dmg.path))
        return out
    }

    @Test func foreignFormatsAreRefusedByName() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        for (format, path) in try Self.foreignImages(dir) {
            let dst = dir.appendingPathComponent("out.qcow2").path
            for args in [["convert", "-c", path, dst], ["convert", "-O", "raw", path, dst], ["export", path, dst], ["info", "--output", "json", path], ["check", path]] {
                let r = try Harness.qcowpress(args)
                #expect(r.status == 1, "\(args): exit \(r.status) \(r.stderr)")
                #expect(r.stderr.contains("\(path): unsupported: a \(format) image; QcowPress does not read \(format)"), "\(args): \(r.stderr)")
                #expect(r.stderr.split(separator: "\n").count == 1, "\(args): \(r.stderr)")
                #expect(!FileManager.default.fileExists(atPath: dst), "\(args) left \(dst)")
            }
        }
    }

    /// `-f raw` reads a vmdk's bytes as raw, as `qemu-img convert -f raw` does.
    @Test func rawWhenToldReadsAnyFile() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let vmdk = dir.appendingPathComponent("x.vmdk").path
        #expect(try Harness.qemuImg(["create", "-q", "-f", "vmdk", vmdk, "4M"]).status == 0)
        let dst = dir.appendingPathComponent("out.qcow2").path
        let r = try Harness.qcowpress(["convert", "-f", "raw", "-c", vmdk, dst])
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(dst, equals: vmdk, sourceFormat: "raw")
        let info = try Harness.qcowpress(["info", "-f", "raw", "--output", "json", vmdk])
        #expect(info.status == 0 && info.stdout.contains("\"raw\""), "\(info.stdout) \(info.stderr)")
    }

    @Test func unknownFormatNameIsOneLine() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("a.raw")
        try SourceImage.noise(65536, seed: 7).write(to: src)
        let dst = dir.appendingPathComponent("out.qcow2").path
        for args in [["convert", "-f", "vmdkx", src.path, dst], ["export", "-f", "vmdkx", src.path, dst]] {
            let r = try Harness.qcowpress(args)
            #expect(r.status == 1 && r.stderr.contains("-f 'vmdkx'") && r.stderr.split(separator: "\n").count == 1, "\(args): \(r.status) \(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dst))
        }
    }

    // MARK: VDI and VHD images made by qemu-img

    /// A raw source of an odd size (whole sectors) with seeded data at scattered offsets, a run of
    /// written zeros and holes.
    /// A mixed raw `src.raw` in `dir` and its conversion by qemu-img to `format` (with `options`)
    /// as `name`: the fixture the damage tests start from.
    static func qemuMade(_ format: String, named name: String, options: [String] = [], size: Int, seed: UInt64, in dir: URL) throws -> (src: URL, image: String) {
        let src = dir.appendingPathComponent("src.raw")
        try mixedRaw(src, size: size, seed: seed)
        let image = dir.appendingPathComponent(name).path
        #expect(try Harness.qemuImg(["convert", "-O", format] + options + [src.path, image]).status == 0)
        return (src, image)
    }

    static func mixedRaw(_ url: URL, size: Int, seed: UInt64) throws {
        FileManager.default.createFile(atPath: url.path, contents: nil)
        let h = try FileHandle(forWritingTo: url)
        defer { try? h.close() }
        try h.truncate(atOffset: UInt64(size))
        for (i, off) in [0, 700_000, 2_101_248, 3_000_000, size - 70_000].enumerated() {
            try h.seek(toOffset: UInt64(off))
            try h.write(contentsOf: SourceImage.noise(min(150_000, size - off), seed: seed + UInt64(i)))
        }
        try h.seek(toOffset: 4_194_304)
        try h.write(contentsOf: Data(count: 300_000))
    }

    /// Converts `image` with qcowpress, lets qemu-img judge, and compares info's virtual size.
    static func expectConverts(_ image: String, format: String, subformat: String, dir: URL,
                               sourceLocation: SourceLocation = #_sourceLocation) throws {
        let dst = dir.appendingPathComponent("out-\(UUID().uuidString).qcow2").path
        let r = try Harness.qcowpress(["convert", "-c", image, dst])
        #expect(r.status == 0, "\(image): \(r.stderr)", sourceLocation: sourceLocation)
        try Harness.expectGood(dst, equals: image, sourceFormat: format, sourceLocation: sourceLocation)
        let mine = try Harness.qcowpress(["info", "--output", "json", image])
        let theirs = try Harness.qemuImg(["info", "-f", format, "--output", "json", image])
        func field(_ s: String, _ k: String) -> String? {
            guard let o = try? JSONSerialization.jsonObject(with: Data(s.utf8)) as? [String: Any], let v = o[k] else { return nil }
            return "\(v)"
        }
        #expect(field(mine.stdout, "virtual-size") != nil && field(mine.stdout, "virtual-size") == field(theirs.stdout, "virtual-size"), "\(mine.stdout) vs \(theirs.stdout)", sourceLocation: sourceLocation)
        #expect(field(mine.stdout, "format") == format && field(mine.stdout, "subformat") == subformat, "\(mine.stdout)", sourceLocation: sourceLocation)
        #expect(field(mine.stdout, "cluster-size") == field(theirs.stdout, "cluster-size"), "\(mine.stdout) vs \(theirs.stdout)", sourceLocation: sourceLocation)
    }

    /// Refused with exit 1 and one line naming the file and `field`; no destination.
    static func expectRefused(_ image: String, field: String, dir: URL, args: [String] = [],
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        let dst = dir.appendingPathComponent("refused.qcow2").path
        let r = try Harness.qcowpress(["convert"] + args + [image, dst])
        #expect(r.status == 1, "\(image): exit \(r.status)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains(image) && r.stderr.contains(field) && r.stderr.split(separator: "\n").count == 1, "\(r.stderr)", sourceLocation: sourceLocation)
        #expect(!FileManager.default.fileExists(atPath: dst), sourceLocation: sourceLocation)
    }

    static func patch(_ path: String, at: Int, _ bytes: [UInt8]) throws {
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(at))
        try h.write(contentsOf: Data(bytes))
    }

    @Test func vdiStaticAndDynamic() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try Self.mixedRaw(src, size: 5 * 1_048_576 + 3 * 512, seed: 31)
        for kind in ["static", "dynamic"] {
            let vdi = dir.appendingPathComponent("\(kind).vdi").path
            #expect(try Harness.qemuImg(["convert", "-O", "vdi", "-o", "static=\(kind == "static" ? "on" : "off")", src.path, vdi]).status == 0)
            try Self.expectConverts(vdi, format: "vdi", subformat: kind, dir: dir)
            // Written with qemu-io after creation: scattered patterns in a fresh image.
            let fresh = dir.appendingPathComponent("fresh-\(kind).vdi").path
            #expect(try Harness.qemuImg(["create", "-q", "-f", "vdi", "-o", "static=\(kind == "static" ? "on" : "off")", fresh, "7340544"]).status == 0)
            try Harness.qemuIO(fresh, ["write -P 0x5a 1048064 4096", "write -P 0xc3 6291456 512"], format: "vdi")
            try Self.expectConverts(fresh, format: "vdi", subformat: kind, dir: dir)
        }
        // A zeroed block (map entry 0xfffffffe) reads as zeros, as qemu-img reads it.
        let dyn = dir.appendingPathComponent("dynamic.vdi").path
        try Self.patch(dyn, at: 512 + 4, [0xFE, 0xFF, 0xFF, 0xFF])
        try Self.expectConverts(dyn, format: "vdi", subformat: "dynamic", dir: dir)
    }

    @Test func damagedVDIIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (src, good) = try ImageFormatTests.qemuMade("vdi", named: "good.vdi", size: 3 * 1_048_576, seed: 7, in: dir)
        let cases: [(String, Int, [UInt8], String)] = [
            ("bmap-eof", 340, Self.le32(0x4000_0000), "offset_bmap"),
            ("entry-eof", 512, Self.le32(1000), "block map entry 0"),
            ("disk-size", 368 + 4, [0x10, 0, 0, 0], "disk_size"),
            ("block-size", 376, Self.le32(3000), "block_size"),
        ]
        for (name, at, bytes, field) in cases {
            let p = dir.appendingPathComponent("\(name).vdi").path
            try FileManager.default.copyItem(atPath: good, toPath: p)
            try Self.patch(p, at: at, bytes)
            try Self.expectRefused(p, field: field, dir: dir)
        }
        // -f vdi on a file that is not one: the signature named.
        try Self.expectRefused(src.path, field: "signature", dir: dir, args: ["-f", "vdi"])
    }

    /// Sets a VHD footer field (at `footerAt`) and recomputes the footer checksum, so only the
    /// field changes.
    static func patchVHDFooter(_ path: String, footerAt: Int, field: Int, _ bytes: [UInt8]) throws {
        var d = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        d.replaceSubrange((footerAt + field)..<(footerAt + field + bytes.count), with: bytes)
        for i in 64..<68 { d[footerAt + i] = 0 }
        let sum = ~d[footerAt..<(footerAt + 512)].reduce(UInt32(0)) { $0 &+ UInt32($1) }
        for i in 0..<4 { d[footerAt + 64 + i] = UInt8(truncatingIfNeeded: sum >> (24 - 8 * UInt32(i))) }
        try Data(d).write(to: URL(fileURLWithPath: path))
    }

    @Test func vhdFixedAndDynamic() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try Self.mixedRaw(src, size: 5 * 1_048_576 + 3 * 512, seed: 41)
        // qemu's creator "qemu" sizes by CHS geometry, force_size ("qem2") by current_size.
        for (name, opts) in [("dynamic", "subformat=dynamic"), ("fixed", "subformat=fixed"), ("dynamic", "subformat=dynamic,force_size=on")] {
            let vhd = dir.appendingPathComponent("\(name)-\(opts.count).vhd").path
            #expect(try Harness.qemuImg(["convert", "-O", "vpc", "-o", opts, src.path, vhd]).status == 0)
            if name == "fixed" {
                // As qemu-img: a fixed VHD has no magic at 0 and is probed as raw; -f vpc reads it.
                let probed = try Harness.qcowpress(["info", "--output", "json", vhd])
                #expect(probed.stdout.contains("\"raw\""), "\(probed.stdout)")
                let dst = dir.appendingPathComponent("fixed.qcow2").path
                #expect(try Harness.qcowpress(["convert", "-f", "vpc", "-c", vhd, dst]).status == 0)
                try Harness.expectGood(dst, equals: vhd, sourceFormat: "vpc")
                continue
            }
            try Self.expectConverts(vhd, format: "vpc", subformat: name, dir: dir)
        }
        // Written with qemu-io into a fresh dynamic image of an odd size.
        let fresh = dir.appendingPathComponent("fresh.vhd").path
        #expect(try Harness.qemuImg(["create", "-q", "-f", "vpc", fresh, "9000000"]).status == 0)
        try Harness.qemuIO(fresh, ["write -P 0x5a 2096640 4096", "write -P 0xc3 6291456 512"], format: "vpc")
        try Self.expectConverts(fresh, format: "vpc", subformat: "dynamic", dir: dir)
        // Hyper-V's creator ("win ") sizes by current_size: the footer copy at 0 says so.
        let win = dir.appendingPathComponent("win.vhd").path
        try FileManager.default.copyItem(atPath: fresh, toPath: win)
        try Self.patchVHDFooter(win, footerAt: 0, field: 28, Array("win ".utf8))
        try Self.expectConverts(win, format: "vpc", subformat: "dynamic", dir: dir)
    }

    @Test func damagedVHDIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (src, good) = try ImageFormatTests.qemuMade("vpc", named: "good.vhd", size: 5 * 1_048_576, seed: 9, in: dir)
        func copy(_ name: String) throws -> String {
            let p = dir.appendingPathComponent(name).path
            try FileManager.default.copyItem(atPath: good, toPath: p)
            return p
        }
        let sum = try copy("sum.vhd")
        try Self.patch(sum, at: 48, [0x7F])
        try Self.expectRefused(sum, field: "checksum", dir: dir)
        let bat = try copy("bat.vhd")
        try Self.patch(bat, at: 512 + 16, [0, 0, 0, 0, 0x7F, 0, 0, 0])
        try Self.expectRefused(bat, field: "table_offset", dir: dir)
        let entry = try copy("entry.vhd")
        try Self.patch(entry, at: 1536, [0x00, 0xFF, 0x00, 0x00])
        try Self.expectRefused(entry, field: "block allocation table entry 0", dir: dir)
        let diff = try copy("diff.vhd")
        try Self.patchVHDFooter(diff, footerAt: 0, field: 60, [0, 0, 0, 4])
        try Self.expectRefused(diff, field: "a differencing VHD image", dir: dir)
        let fixed = dir.appendingPathComponent("fixed.vhd").path
        #expect(try Harness.qemuImg(["convert", "-O", "vpc", "-o", "subformat=fixed", src.path, fixed]).status == 0)
        let size = Int((try FileManager.default.attributesOfItem(atPath: fixed)[.size] as? UInt64) ?? 0)
        try Self.patch(fixed, at: size - 512 + 64, [0, 0, 0, 0])
        try Self.expectRefused(fixed, field: "checksum", dir: dir, args: ["-f", "vpc"])
    }
}
