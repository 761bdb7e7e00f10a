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
        for f in ["vmdk", "vhdx", "qed", "parallels", "qcow"] {
            let p = dir.appendingPathComponent("x.\(f)").path
            let r = try Harness.qemuImg(["create", "-q", "-f", f, p, "4M"])
            #expect(r.status == 0, "qemu-img create -f \(f): \(r.stderr)")
            out.append((f, p))
        }
        let desc = dir.appendingPathComponent("desc.vmdk")
        try Data("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8192 FLAT \"flat.img\" 0\n".utf8).write(to: desc)
        out.append(("vmdk", desc.path))
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
}
