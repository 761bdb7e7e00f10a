import Foundation
import QcowPress
import Testing

/// Reading and patching VHDX structures in a test image (offsets as [MS-VHDX] places them).
enum VHDXBytes {
    static func read(_ path: String, at: Int, count: Int) throws -> [UInt8] {
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(at))
        return [UInt8](try h.read(upToCount: count) ?? Data())
    }
    static func le(_ b: [UInt8], _ o: Int, _ n: Int) -> Int { (0..<n).reversed().reduce(0) { $0 << 8 | Int(b[o + $1]) } }
    static func le32(_ v: Int) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
    static func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
    static func patch(_ path: String, at: Int, _ bytes: [UInt8]) throws { try ImageFormatTests.patch(path, at: at, bytes) }

    /// Recomputes the CRC-32C of the structure of `size` bytes at `at` (checksum at +4).
    static func fixChecksum(_ path: String, at: Int, size: Int) throws {
        var b = try read(path, at: at, count: size)
        for i in 4..<8 { b[i] = 0 }
        try patch(path, at: at + 4, le32(Int(CRC32C.checksum(b))))
    }
    /// The offset of the current header (the higher sequence number).
    static func currentHeader(_ path: String) throws -> Int {
        let a = le(try read(path, at: 65536 + 8, count: 8), 0, 8), b = le(try read(path, at: 131072 + 8, count: 8), 0, 8)
        return a >= b ? 65536 : 131072
    }
    /// Region table entry `i` of the first table: (offset of the entry, file offset, length).
    static func region(_ path: String, _ i: Int) throws -> (entry: Int, offset: Int, length: Int) {
        let e = 196_608 + 16 + 32 * i
        let b = try read(path, at: e, count: 32)
        return (e, le(b, 16, 8), le(b, 24, 4))
    }
    /// The region whose GUID starts with `first4` (BAT 0x2DC27766, metadata 0x8B7CA206).
    static func region(_ path: String, guid first4: Int) throws -> (entry: Int, offset: Int, length: Int) {
        for i in 0..<2 where le(try read(path, at: 196_608 + 16 + 32 * i, count: 4), 0, 4) == first4 { return try region(path, i) }
        throw CocoaError(.fileReadCorruptFile)
    }
    static func bat(_ path: String) throws -> (entry: Int, offset: Int, length: Int) { try region(path, guid: 0x2DC2_7766) }
    static func metadata(_ path: String) throws -> (entry: Int, offset: Int, length: Int) { try region(path, guid: 0x8B7C_A206) }
    /// The file offset of the metadata item whose GUID starts with `first4` (file parameters
    /// 0xCAA16737, virtual size 0x2FA54224, logical sector 0x8141BF1D, physical 0xCDA348C7).
    static func item(_ path: String, guid first4: Int) throws -> (entry: Int, offset: Int) {
        let m = try metadata(path)
        let t = try read(path, at: m.offset, count: 65536)
        for i in 0..<le(t, 10, 2) where le(t, 32 + 32 * i, 4) == first4 {
            return (m.offset + 32 + 32 * i, m.offset + le(t, 32 + 32 * i + 16, 4))
        }
        throw CocoaError(.fileReadCorruptFile)
    }
    static func copy(_ from: String, _ to: String) throws {
        let r = try Harness.run("/bin/cp", ["--sparse=always", from, to])
        #expect(r.status == 0, "\(r.stderr)")
    }
}

/// VHDX images (issue 31) made by qemu-img in every subformat and block size it writes, converted
/// by qcowpress and judged by qemu-img; hand-patched 4096-byte logical sectors and logs.
@Suite(.tags(.e2e, .fast), .enabled(if: Harness.haveQemuImg, "qemu-img makes the images and judges"))
struct VHDXTests {
    @Test func crc32cKnownVectors() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([]) == 0)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)  // RFC 3720 B.4
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        // Slicing-by-8 and the byte loop agree at every length and split.
        let data = (0..<300).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 7) }
        for n in [1, 7, 8, 9, 63, 64, 65, 299] {
            var a = CRC32C()
            a.update(Array(data[0..<min(3, n)]))
            a.update(Array(data[min(3, n)..<n]))
            #expect(a.value == CRC32C.checksum(Array(data[0..<n])))
        }
    }

    @Test func qemuImgMadeSubformatsAndBlockSizes() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try ImageFormatTests.mixedRaw(src, size: 5 * 1_048_576 + 3 * 512, seed: 61)
        let cases = ["subformat=dynamic", "subformat=dynamic,block_size=1M", "subformat=dynamic,block_size=8M,log_size=2M",
                     "subformat=dynamic,block_size=256M", "subformat=dynamic,block_state_zero=off", "subformat=fixed",
                     "subformat=fixed,block_size=1M", "subformat=fixed,block_size=256M"]
        for (i, opts) in cases.enumerated() {
            let vhdx = dir.appendingPathComponent("\(i).vhdx").path
            let r = try Harness.qemuImg(["convert", "-O", "vhdx", "-o", opts, src.path, vhdx])
            #expect(r.status == 0, "\(opts): \(r.stderr)")
            try ImageFormatTests.expectConverts(vhdx, format: "vhdx", subformat: opts.contains("fixed") ? "fixed" : "dynamic", dir: dir)
        }
        // Plain (uncompressed) and zstd conversions of one, and -f vhdx.
        let one = dir.appendingPathComponent("1.vhdx").path
        for args in [["convert"], ["convert", "-c", "-o", "compression_type=zstd"], ["convert", "-f", "vhdx"]] {
            let dst = dir.appendingPathComponent("plain-\(args.count).qcow2").path
            let r = try Harness.qcowpress(args + [one, dst])
            #expect(r.status == 0, "\(args): \(r.stderr)")
            try Harness.expectGood(dst, equals: one, sourceFormat: "vhdx")
        }
    }

    /// A 10 GiB sparse disk of 32 MiB blocks: a chunk is 128 blocks, so block 128 (at 4 GiB) sits
    /// after the first sector-bitmap entry of the BAT. Then the same image with 4096-byte logical
    /// sectors (qemu-img writes only 512; its reader mishandles 4096): the chunk is 1024 blocks, so
    /// the BAT is rewritten without the bitmap entry and must read as the 512-byte original.
    @Test func bitmapInterleaveAnd4KLogicalSectors() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let img = dir.appendingPathComponent("big.vhdx").path
        #expect(try Harness.qemuImg(["create", "-q", "-f", "vhdx", "-o", "block_size=32M", img, "10G"]).status == 0)
        try Harness.qemuIO(img, ["write -P 0x5a 0 65536", "write -P 0xc3 4295999488 4096", "write -P 0x17 10737414144 4096"], format: "vhdx")
        try ImageFormatTests.expectConverts(img, format: "vhdx", subformat: "dynamic", dir: dir)

        let k4 = dir.appendingPathComponent("4k.vhdx").path
        try VHDXBytes.copy(img, k4)
        let bat = try VHDXBytes.bat(k4)
        let blocks = 320
        let old = try VHDXBytes.read(k4, at: bat.offset, count: (blocks + blocks / 128) * 8)
        var new = [UInt8](repeating: 0, count: old.count)
        for b in 0..<blocks { new.replaceSubrange((b * 8)..<(b * 8 + 8), with: old[((b + b / 128) * 8)..<((b + b / 128) * 8 + 8)]) }
        try VHDXBytes.patch(k4, at: bat.offset, new)
        try VHDXBytes.patch(k4, at: try VHDXBytes.item(k4, guid: 0x8141_BF1D).offset, VHDXBytes.le32(4096))
        let dst = dir.appendingPathComponent("4k.qcow2").path
        let r = try Harness.qcowpress(["convert", "-c", k4, dst])
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(dst, equals: img, sourceFormat: "vhdx")
        let info = try Harness.qcowpress(["info", "--output", "json", k4])
        #expect(info.stdout.contains("\"virtual-size\" : 10737418240"), "\(info.stdout)")
    }

    /// qemu-io writes into fresh images of odd sizes, and both headers: the valid one with the
    /// higher sequence number wins, a damaged current header falls back to the other.
    @Test func freshImagesAndHeaderChoice() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let fresh = dir.appendingPathComponent("fresh.vhdx").path
        #expect(try Harness.qemuImg(["create", "-q", "-f", "vhdx", "-o", "block_size=1M", fresh, "9000448"]).status == 0)
        try Harness.qemuIO(fresh, ["write -P 0x5a 1048064 4096", "write -z 2097152 1048576", "write -P 0xc3 8999936 512"], format: "vhdx")
        try ImageFormatTests.expectConverts(fresh, format: "vhdx", subformat: "dynamic", dir: dir)
        let pristine = dir.appendingPathComponent("pristine.vhdx").path
        try VHDXBytes.copy(fresh, pristine)
        // Damage the current header: the other one (qemu-io's writes updated both) is read.
        let current = try VHDXBytes.currentHeader(fresh)
        try VHDXBytes.patch(fresh, at: current + 4, [0xDE, 0xAD])
        try ImageFormatTests.expectConverts(fresh, format: "vhdx", subformat: "dynamic", dir: dir)
        // Damage the first region table: its copy at 256 KiB is read (qemu-img reads only the first).
        try VHDXBytes.patch(fresh, at: 196_608 + 4, [0xDE, 0xAD])
        let dst = dir.appendingPathComponent("copy.qcow2").path
        #expect(try Harness.qcowpress(["convert", "-c", fresh, dst]).status == 0)
        try Harness.expectGood(dst, equals: pristine, sourceFormat: "vhdx")
    }

    /// A log GUID in the current header: with no valid entry in the log there is nothing to replay
    /// (qemu-img reads it too); with one, QcowPress refuses naming how to replay, as qemu-img does.
    @Test func logToReplayIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try ImageFormatTests.mixedRaw(src, size: 5 * 1_048_576, seed: 3)
        let img = dir.appendingPathComponent("log.vhdx").path
        #expect(try Harness.qemuImg(["convert", "-O", "vhdx", "-o", "block_size=1M", src.path, img]).status == 0)
        let h = try VHDXBytes.currentHeader(img)
        let guid: [UInt8] = (1...16).map { UInt8($0) }
        try VHDXBytes.patch(img, at: h + 48, guid)
        try VHDXBytes.fixChecksum(img, at: h, size: 4096)
        try ImageFormatTests.expectConverts(img, format: "vhdx", subformat: "dynamic", dir: dir)

        let hb = try VHDXBytes.read(img, at: h, count: 80)
        let logOffset = VHDXBytes.le(hb, 72, 8)
        let size = Int((try FileManager.default.attributesOfItem(atPath: img)[.size] as? UInt64) ?? 0)
        var entry = [UInt8](repeating: 0, count: 4096)
        func put(_ at: Int, _ b: [UInt8]) { entry.replaceSubrange(at..<(at + b.count), with: b) }
        put(0, Array("loge".utf8)); put(8, VHDXBytes.le32(4096)); put(16, VHDXBytes.le64(1)); put(32, guid)
        put(48, VHDXBytes.le64(UInt64(size))); put(56, VHDXBytes.le64(UInt64(size)))
        put(4, VHDXBytes.le32(Int(CRC32C.checksum(entry))))
        try VHDXBytes.patch(img, at: logOffset + 3 * 4096, entry)
        let theirs = try Harness.qemuImg(["info", img])
        #expect(theirs.status != 0 && theirs.stderr.contains("replay"), "qemu-img takes the crafted entry for a log to replay: \(theirs.stderr)")
        try ImageFormatTests.expectRefused(img, field: "qemu-img check -r all", dir: dir)
        #expect(try Harness.qcowpress(["info", img]).status == 1)
    }
}

extension VHDXTests {
    /// The vhdx fuzz seeds (sparse-file descriptions, fuzz/make_format_seeds.py) unpack to images
    /// QcowPress opens, all but the log one (refused: a log to replay), so that mutations start
    /// from readable images and reach the reader past its first checks.
    @Test func fuzzSeedsAreReadableImages() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let seeds = BadCorpusTests.dir.deletingLastPathComponent().appendingPathComponent("fuzz/vhdx")
        let names = try FileManager.default.contentsOfDirectory(atPath: seeds.path).sorted()
        #expect(names.count >= 6)
        for name in names {
            let b = [UInt8](try Data(contentsOf: seeds.appendingPathComponent(name)))
            var image = Data(count: VHDXBytes.le(b, 0, 4))
            var at = 4
            while at + 6 <= b.count {
                let offset = VHDXBytes.le(b, at, 4), n = VHDXBytes.le(b, at + 4, 2)
                if image.count < offset + n { image.count = offset + n }
                image.replaceSubrange(offset..<(offset + n), with: b[(at + 6)..<(at + 6 + n)])
                at += 6 + n
            }
            #expect(at == b.count, "\(name): a piece runs past the end")
            let p = dir.appendingPathComponent(name + ".vhdx")
            try image.write(to: p)
            let r = try Harness.qcowpress(["info", "-f", "vhdx", p.path])
            #expect(name.hasPrefix("log") ? r.stderr.contains("log") && r.status == 1 : r.status == 0, "\(name): \(r.stderr)")
        }
    }
}
