import Foundation
import QcowPress
import Testing

/// VMDK images (issue 31): every subformat qemu-img writes, a VMware-style stream (grain
/// directory in the footer), zeroed grains, ZERO extents; converted by qcowpress and judged by
/// qemu-img; damaged and hostile ones refused with one line naming the file and the field.
@Suite(.tags(.e2e, .fast), .enabled(if: Harness.haveQemuImg, "qemu-img makes the images and judges"))
struct VMDKTests {
    static let subformats = ["monolithicSparse", "streamOptimized", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"]

    static func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) } }
    static func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
    static func read32(_ d: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(d[o + $1]) << (8 * UInt32($1)) } }
    static func read64(_ d: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(d[o + $1]) << (8 * UInt64($1)) } }

    /// qemu-img's streamOptimized keeps its grain directory near the start; VMware's writer (and
    /// OVAs) put grain tables after their grains and the directory in a footer, with the header
    /// saying gdOffset = all ones. This re-lays qemu-img's file out that way, byte for byte grains.
    static func vmwareStream(from src: String, to dst: String) throws {
        let d = [UInt8](try Data(contentsOf: URL(fileURLWithPath: src)))
        let grain = Int(read64(d, 20)) * 512, gtes = Int(read32(d, 44)), gdAt = Int(read64(d, 56)) * 512
        let capacity = Int(read64(d, 12)) * 512, overhead = Int(read64(d, 64)) * 512
        let gdEntries = (capacity + gtes * grain - 1) / (gtes * grain)
        var header = Array(d[0..<512])
        header.replaceSubrange(8..<12, with: le32(read32(d, 8) & ~2))  // no redundant directory
        header.replaceSubrange(48..<56, with: le64(0))
        header.replaceSubrange(56..<64, with: le64(UInt64.max))
        var out = header + Array(d[512..<overhead])
        func pad() { out += [UInt8](repeating: 0, count: (512 - out.count % 512) % 512) }
        func marker(_ sectors: Int, _ type: UInt32) { out += le64(UInt64(sectors)) + le32(0) + le32(type) + [UInt8](repeating: 0, count: 496) }
        var gd = [UInt32](repeating: 0, count: gdEntries)
        for t in 0..<gdEntries {
            let gtAt = Int(read32(d, gdAt + t * 4)) * 512
            guard gtAt != 0 else { continue }
            var gt = [UInt32](repeating: 0, count: gtes)
            for i in 0..<gtes {
                let e = Int(read32(d, gtAt + i * 4)) * 512
                guard e != 0 else { continue }
                gt[i] = UInt32(out.count / 512)
                out += d[e..<(e + 12 + Int(read32(d, e + 8)))]
                pad()
            }
            guard gt.contains(where: { $0 != 0 }) else { continue }
            marker(gtes * 4 / 512, 1)
            gd[t] = UInt32(out.count / 512)
            out += gt.flatMap { le32($0) }
            pad()
        }
        marker((gdEntries * 4 + 511) / 512, 2)
        let gdSector = out.count / 512
        out += gd.flatMap { le32($0) }
        pad()
        marker(1, 3)
        var footer = header
        footer.replaceSubrange(56..<64, with: le64(UInt64(gdSector)))
        out += footer
        out += [UInt8](repeating: 0, count: 512)  // end of stream
        try Data(out).write(to: URL(fileURLWithPath: dst))
    }

    @Test func everySubformatQemuImgWrites() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try ImageFormatTests.mixedRaw(src, size: 5 * 1_048_576 + 3 * 512, seed: 51)
        for s in Self.subformats {
            let vmdk = dir.appendingPathComponent("\(s).vmdk").path
            let r = try Harness.qemuImg(["convert", "-O", "vmdk", "-o", "subformat=\(s)", src.path, vmdk])
            #expect(r.status == 0, "\(s): \(r.stderr)")
            try ImageFormatTests.expectConverts(vmdk, format: "vmdk", subformat: s, dir: dir)
            let dst = dir.appendingPathComponent("\(s)-zstd.qcow2").path
            let z = try Harness.qcowpress(["convert", "-c", "-o", "compression_type=zstd", vmdk, dst])
            #expect(z.status == 0, "\(s): \(z.stderr)")
            try Harness.expectGood(dst, equals: src.path)
            let plain = dir.appendingPathComponent("\(s)-plain.qcow2").path
            #expect(try Harness.qcowpress(["convert", vmdk, plain]).status == 0)
            try Harness.expectGood(plain, equals: src.path)
        }
    }

    /// The stream form VMware writes: grain tables after their grains, directory in the footer.
    @Test func vmwareStreamWithFooter() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (src, qemu) = try ImageFormatTests.qemuMade("vmdk", named: "q.vmdk", options: ["-o", "subformat=streamOptimized"], size: 40 * 1_048_576 + 7 * 512, seed: 52, in: dir)
        let vmw = dir.appendingPathComponent("vmware.vmdk").path
        try Self.vmwareStream(from: qemu, to: vmw)
        try ImageFormatTests.expectConverts(vmw, format: "vmdk", subformat: "streamOptimized", dir: dir)
        try Harness.expectGood(dir.appendingPathComponent("z.qcow2").path, equals: src.path, convertedFrom: vmw)
    }

    /// Zeroed grains (grain table entry 1 with header flag 2) read as zeros, as qemu-img reads them.
    @Test func zeroedGrains() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let vmdk = dir.appendingPathComponent("z.vmdk").path
        #expect(try Harness.qemuImg(["create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", vmdk, "3000000"]).status == 0)
        try Harness.qemuIO(vmdk, ["write -P 0x5a 0 1M", "write -z 65536 131072", "write -P 0x33 2000000 5000"], format: "vmdk")
        try ImageFormatTests.expectConverts(vmdk, format: "vmdk", subformat: "monolithicSparse", dir: dir)
    }

    /// ZERO extents read as zeros in their place (qemu-img skips them, so the reference is raw).
    @Test func flatAndZeroExtents() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let a = SourceImage.noise(1_048_576, seed: 1), b = SourceImage.noise(1_048_576 + 512, seed: 2)
        try a.write(to: dir.appendingPathComponent("a.bin"))
        try (Data(count: 4096) + b).write(to: dir.appendingPathComponent("b.bin"))
        let desc = dir.appendingPathComponent("d.vmdk")
        try Data("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"a.bin\" 0\nRW 4096 ZERO\nRDONLY 2049 FLAT \"b.bin\" 8\n".utf8).write(to: desc)
        let expected = dir.appendingPathComponent("expected.raw")
        try (a + Data(count: 4096 * 512) + b).write(to: expected)
        let dst = dir.appendingPathComponent("out.qcow2").path
        let r = try Harness.qcowpress(["convert", "-c", desc.path, dst])
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(dst, equals: expected.path)
    }
}

/// A file read front to back, in reads of at most 5000 bytes (short reads on purpose).
final class FileByteSource: VMDKByteSource {
    let handle: FileHandle
    init(_ path: String) throws { handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path)) }
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Int {
        let d = (try? handle.read(upToCount: min(buffer.count, 5000))) ?? Data()
        d.copyBytes(to: buffer)
        return d.count
    }
}

extension VMDKTests {
    /// The streaming decoder (an OVA on stdin) gives back the source: grains in order, in place,
    /// from VMware's layout and from qemu-img's.
    @Test func streamReaderRebuildsTheDisk() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try ImageFormatTests.mixedRaw(src, size: 5 * 1_048_576 + 512, seed: 77)
        let want = try Data(contentsOf: src)
        let qemu = dir.appendingPathComponent("q.vmdk").path
        #expect(try Harness.qemuImg(["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src.path, qemu]).status == 0)
        let vmw = dir.appendingPathComponent("v.vmdk").path
        try Self.vmwareStream(from: qemu, to: vmw)
        for image in [qemu, vmw] {
            let r = try VMDKStreamReader(source: try FileByteSource(image), name: image)
            #expect(r.virtualSize == UInt64(want.count))
            var got = Data(count: Int(r.virtualSize))
            var last: UInt64?
            while let g = try r.next() {
                #expect(last.map { $0 < g.offset } ?? true)
                last = g.offset
                got.replaceSubrange(Int(g.offset)..<(Int(g.offset) + g.data.count), with: g.data)
            }
            #expect(got == want, "\(image)")
        }
        // Truncated inside a grain: one error naming the stream and the grain's offset.
        let cut = dir.appendingPathComponent("cut.vmdk").path
        try Data(try Data(contentsOf: URL(fileURLWithPath: vmw)).prefix(65536 + 1000)).write(to: URL(fileURLWithPath: cut))
        let r = try VMDKStreamReader(source: try FileByteSource(cut), name: cut)
        #expect(throws: QcowPressError.self) { while try r.next() != nil {} }
    }
}

extension Harness {
    /// Converts `image` to `dst` with qcowpress (zstd) and judges it against `source`.
    static func expectGood(_ dst: String, equals source: String, convertedFrom image: String,
                           sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try qcowpress(["convert", "-c", "-o", "compression_type=zstd", image, dst])
        #expect(r.status == 0, "\(image): \(r.stderr)", sourceLocation: sourceLocation)
        try expectGood(dst, equals: source, sourceLocation: sourceLocation)
    }
}

// MARK: Damaged and hostile images

extension VMDKTests {
    /// A 3 MiB monolithicSparse and a VMware-style stream of the same data, made fresh.
    static func images(_ dir: URL) throws -> (sparse: String, stream: String) {
        let (src, sparse) = try ImageFormatTests.qemuMade("vmdk", named: "good.vmdk", size: 3 * 1_048_576, seed: 9, in: dir)
        let q = dir.appendingPathComponent("q.vmdk").path
        #expect(try Harness.qemuImg(["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src.path, q]).status == 0)
        let stream = dir.appendingPathComponent("stream.vmdk").path
        try vmwareStream(from: q, to: stream)
        return (sparse, stream)
    }

    static func damaged(_ good: String, _ name: String, dir: URL, patch: [(Int, [UInt8])] = [], truncate: Int? = nil) throws -> String {
        let p = dir.appendingPathComponent("\(name).vmdk").path
        try FileManager.default.copyItem(atPath: good, toPath: p)
        for (at, bytes) in patch { try ImageFormatTests.patch(p, at: at, bytes) }
        if let truncate {
            let h = try FileHandle(forUpdating: URL(fileURLWithPath: p))
            let size = try h.seekToEnd()
            try h.truncate(atOffset: truncate >= 0 ? UInt64(truncate) : size - UInt64(-truncate))
            try h.close()
        }
        return p
    }

    @Test func damagedSparseIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (good, _) = try Self.images(dir)
        // qemu-img's layout: descriptor at sector 1, grain directory at 26, its first table at 27.
        // The directory's cases clear flag 1 (no redundant copy; FormatDamageTests has those).
        let noCopy = (8, Self.le32(1))
        let cases: [(String, [(Int, [UInt8])], Int?, String)] = [
            ("gd-eof", [noCopy, (56, Self.le64(0x1000_0000))], nil, "gdOffset"),
            ("gd-entry-eof", [noCopy, (26 * 512, Self.le32(0x7FFF_FFFF))], nil, "grain directory entry 0"),
            ("gt-entry-eof", [noCopy, (27 * 512, Self.le32(0x7FFF_FFFF))], nil, "grain table 0 entry 0"),
            ("grain-size", [(20, Self.le64(100))], nil, "grainSize"),
            ("gtes", [(44, Self.le32(513))], nil, "numGTEsPerGT"),
            ("version", [(4, Self.le32(9))], nil, "version 9"),
            ("capacity", [(12, Self.le64(1 << 60))], nil, "capacity"),
            ("text-mode", [(75, [0x0A])], nil, "text-mode"),
            ("cut-header", [], 300, "VMDK header"),
            ("cut-tables", [], 20000, "overHead"),
            ("cut-grains", [], 65536 + 100_000, "grain table 0 entry"),
        ]
        for (name, patch, cut, field) in cases {
            try ImageFormatTests.expectRefused(try Self.damaged(good, name, dir: dir, patch: patch, truncate: cut), field: field, dir: dir)
        }
    }

    @Test func damagedStreamIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (_, good) = try Self.images(dir)
        let grain = 65536  // the first grain's marker, at the header's overhead (128 sectors)
        let cases: [(String, [(Int, [UInt8])], Int?, String)] = [
            ("lba", [(grain, Self.le64(999 * 128))], nil, "grain marker at offset \(grain) has LBA"),
            ("size", [(grain + 8, Self.le32(0x7FFF_FFFF))], nil, "grain marker at offset \(grain) has size"),
            ("zlib", [(grain + 40, [0xFF, 0xFF, 0xFF, 0xFF])], nil, "VMDK grain at offset \(grain)"),
            ("no-footer", [], -1536, "footer marker"),
            ("cut-footer", [], -100, "footer marker"),
            ("no-eos", [], -512, "footer marker"),
        ]
        for (name, patch, cut, field) in cases {
            try ImageFormatTests.expectRefused(try Self.damaged(good, name, dir: dir, patch: patch, truncate: cut), field: field, dir: dir)
        }
    }

    @Test func hostileDescriptorsAreRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        try SourceImage.noise(1_048_576, seed: 3).write(to: dir.appendingPathComponent("flat.bin"))
        let head = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        let cases: [(String, String, String)] = [
            ("missing", "createType=\"monolithicFlat\"\nRW 2048 FLAT \"nope.bin\" 0\n", "is missing"),
            ("absolute", "createType=\"monolithicFlat\"\nRW 2048 FLAT \"\(dir.path)/flat.bin\" 0\n", "absolute path"),
            ("dotdot", "createType=\"monolithicFlat\"\nRW 2048 FLAT \"../\(dir.lastPathComponent)/flat.bin\" 0\n", "leaves the descriptor's folder"),
            ("self", "createType=\"monolithicFlat\"\nRW 1 FLAT \"self.vmdk\" 0\n", "is the descriptor"),
            ("overlap", "createType=\"twoGbMaxExtentFlat\"\nRW 1024 FLAT \"flat.bin\" 0\nRW 1024 FLAT \"flat.bin\" 1000\n", "overlaps"),
            ("short", "createType=\"monolithicFlat\"\nRW 4096 FLAT \"flat.bin\" 0\n", "needs 2097152 bytes"),
            ("no-type", "RW 2048 FLAT \"flat.bin\" 0\n", "createType"),
            ("delta", "createType=\"monolithicFlat\"\nparentFileNameHint=\"base.vmdk\"\nRW 2048 FLAT \"flat.bin\" 0\n", "delta disk"),
            ("bad-line", "createType=\"monolithicFlat\"\nRW 2048 FLAT \"flat.bin\"\n", "line 6"),
            ("sesparse", "createType=\"monolithicFlat\"\nRW 2048 SESPARSE \"flat.bin\"\n", "SESPARSE"),
        ]
        for (name, body, field) in cases {
            let p = dir.appendingPathComponent("\(name).vmdk")
            try Data((head + body).utf8).write(to: p)
            try ImageFormatTests.expectRefused(p.path, field: field, dir: dir)
        }
        // A sparse extent whose header disagrees with its descriptor line.
        let src = dir.appendingPathComponent("s.raw")
        try SourceImage.noise(2_097_152, seed: 4).write(to: src)
        let two = dir.appendingPathComponent("two.vmdk").path
        #expect(try Harness.qemuImg(["convert", "-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", src.path, two]).status == 0)
        let text = try String(contentsOfFile: two, encoding: .isoLatin1).replacingOccurrences(of: "RW 4096 SPARSE", with: "RW 4000 SPARSE")
        try Data(text.utf8).write(to: URL(fileURLWithPath: two))
        try ImageFormatTests.expectRefused(two, field: "header's capacity", dir: dir)
        // -f vmdk on a file that is neither: named as a descriptor that is too big.
        let big = dir.appendingPathComponent("big.raw")
        try SourceImage.noise(2_097_152, seed: 5).write(to: big)
        try ImageFormatTests.expectRefused(big.path, field: "VMDK descriptor is 2097152 bytes", dir: dir, args: ["-f", "vmdk"])
    }
}

extension VMDKTests {
    /// map and compare as qemu-img on every subformat (unallocated, zeroed and plain grains with
    /// their places, compressed grains without, flat extents with their files' holes).
    @Test func mapAndCompareAsQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try ImageFormatTests.mixedRaw(src, size: 5 * 1_048_576 + 3 * 512, seed: 61)
        var images: [String] = []
        for s in Self.subformats {
            let vmdk = dir.appendingPathComponent("\(s).vmdk").path
            #expect(try Harness.qemuImg(["convert", "-O", "vmdk", "-o", "subformat=\(s)", src.path, vmdk]).status == 0)
            images.append(vmdk)
        }
        let z = dir.appendingPathComponent("zeroed.vmdk").path
        #expect(try Harness.qemuImg(["create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", z, "3000000"]).status == 0)
        try Harness.qemuIO(z, ["write -P 0x5a 0 1M", "write -z 65536 131072"], format: "vmdk")
        images.append(z)
        for img in images {
            try CompareMapMeasureTests.expectSame(["map", "--output=json"], [img])
            try CompareMapMeasureTests.expectSame(["map"], [img])
        }
        try CompareMapMeasureTests.expectSame(["compare"], [images[0], src.path])
        try CompareMapMeasureTests.expectSame(["compare"], [images[1], images[3]])
    }
}

extension VMDKTests {
    /// info's format-specific block (cid, parent cid, create type, extents) as qemu-img shows it,
    /// in JSON and in the human layout, for the sparse, stream and descriptor forms; a sparse delta
    /// disk (its parent named in the embedded descriptor) is refused instead of read without it.
    @Test func infoAsQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try ImageFormatTests.mixedRaw(src, size: 3 * 1_048_576, seed: 71)
        func specific(_ json: String) -> NSDictionary? {
            (try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])?["format-specific"] as? NSDictionary
        }
        func block(_ text: String) -> String { text.components(separatedBy: "Format specific information:\n").last ?? "" }
        for s in ["monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse", "monolithicFlat"] {
            let vmdk = dir.appendingPathComponent("\(s).vmdk").path
            #expect(try Harness.qemuImg(["convert", "-O", "vmdk", "-o", "subformat=\(s)", src.path, vmdk]).status == 0)
            let mine = try Harness.qcowpress(["info", "--output", "json", vmdk]), theirs = try Harness.qemuImg(["info", "--output", "json", vmdk])
            #expect(mine.status == 0 && specific(mine.stdout) != nil && specific(mine.stdout) == specific(theirs.stdout), "\(s): \(mine.stdout) vs \(theirs.stdout)")
            // disk size counts the extents' files too, as qemu's vmdk_get_allocated_file_size.
            func actual(_ json: String) -> Int? { ((try? JSONSerialization.jsonObject(with: Data(json.utf8))) as? [String: Any])?["actual-size"] as? Int }
            #expect(actual(mine.stdout) != nil && actual(mine.stdout) == actual(theirs.stdout), "\(s): actual-size")
            let human = try Harness.qcowpress(["info", vmdk]), qemu = try Harness.qemuImg(["info", vmdk])
            #expect(human.stdout.contains("Format specific information:\n") && block(human.stdout) == block(qemu.stdout), "\(s): \(human.stdout) vs \(qemu.stdout)")
        }
        let delta = dir.appendingPathComponent("delta.vmdk").path
        #expect(try Harness.qemuImg(["create", "-q", "-f", "vmdk", "-b", dir.appendingPathComponent("monolithicSparse.vmdk").path, "-F", "vmdk", delta]).status == 0)
        try ImageFormatTests.expectRefused(delta, field: "parentFileNameHint", dir: dir)
    }
}
