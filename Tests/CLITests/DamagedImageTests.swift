import Foundation
import Testing

/// Images damaged on purpose: `check` agrees with `qemu-img check`; the reader refuses unsafe
/// metadata with one line naming the field and offset (where qemu-img would read on).
@Suite(.tags(.e2e, .faults), .enabled(if: Harness.haveQemuImg, "qemu-img is the oracle"))
struct DamagedImageTests {
    /// A small image with data in several L2 tables (4 KiB clusters: 2 MiB per L2 table).
    func makeImage(_ dir: URL, compressed: Bool = false) throws -> (path: String, bytes: [UInt8]) {
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 16, block: 512 << 10)
        let img = dir.appendingPathComponent("img.qcow2").path
        let args = ["convert", "-O", "qcow2", "-o", "cluster_size=4096"] + (compressed ? ["-c"] : []) + [src.path, img]
        #expect(try Harness.qemuImg(args).status == 0)
        return (img, [UInt8](try Data(contentsOf: URL(fileURLWithPath: img))))
    }

    func be64(_ b: [UInt8], _ at: Int) -> UInt64 { b[at..<(at + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
    func put64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) { for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) } }
    func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) { for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) } }
    func put16(_ b: inout [UInt8], _ at: Int, _ v: UInt16) { b[at] = UInt8(v >> 8); b[at + 1] = UInt8(v & 255) }

    /// Offset of the 16-bit refcount of host cluster `c` (first refcount block only).
    func refcountAt(_ b: [UInt8], cluster c: Int) -> Int {
        let table = Int(be64(b, 48))
        return Int(be64(b, table) & 0x00FF_FFFF_FFFF_FE00) + 2 * c
    }
    func l1(_ b: [UInt8]) -> Int { Int(be64(b, 40)) }
    func firstL2(_ b: [UInt8]) -> (entryAt: Int, table: Int) {
        var i = l1(b)
        while be64(b, i) == 0 { i += 8 }
        return (i, Int(be64(b, i) & 0x00FF_FFFF_FFFF_FE00))
    }
    func firstDataEntry(_ b: [UInt8]) -> Int {
        var at = firstL2(b).table
        while be64(b, at) & 0x00FF_FFFF_FFFF_FE00 == 0 && be64(b, at) & (1 << 62) == 0 { at += 8 }
        return at
    }

    func checkAgrees(_ path: String, expected: Int32, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let theirs = try Harness.qemuImg(["check", path])
        let ours = try Harness.qcowpress(["check", "--output", "json", path])
        #expect(theirs.status == expected, "qemu-img check: \(theirs.stdout)", sourceLocation: sourceLocation)
        #expect(ours.status == theirs.status, "ours \(ours.status) vs qemu \(theirs.status): \(ours.stdout)", sourceLocation: sourceLocation)
    }

    @Test func checkAgreesWithQemu() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (img, clean) = try makeImage(dir)
        try checkAgrees(img, expected: 0)
        let ours = try Harness.qcowpress(["check", img])
        #expect(ours.stdout.contains("No errors were found on the image."))

        // Leaked cluster: one more cluster at the end of the file, counted but unused.
        var leak = clean + [UInt8](repeating: 0, count: 4096)
        let leaked = clean.count / 4096
        leak[refcountAt(leak, cluster: leaked) + 1] = 1
        let p1 = dir.appendingPathComponent("leak.qcow2").path
        try Data(leak).write(to: URL(fileURLWithPath: p1))
        try checkAgrees(p1, expected: 3)

        // Refcount too low: a data cluster's refcount set to 0.
        var low = clean
        let data = Int(be64(low, firstDataEntry(low)) & 0x00FF_FFFF_FFFF_FE00) / 4096
        put16(&low, refcountAt(low, cluster: data), 0)
        let p2 = dir.appendingPathComponent("low.qcow2").path
        try Data(low).write(to: URL(fileURLWithPath: p2))
        try checkAgrees(p2, expected: 2)

        // Overlapping tables: an L1 entry points at the refcount table.
        var overlap = clean
        put64(&overlap, firstL2(overlap).entryAt, (1 << 63) | be64(overlap, 48))
        let p3 = dir.appendingPathComponent("overlap.qcow2").path
        try Data(overlap).write(to: URL(fileURLWithPath: p3))
        try checkAgrees(p3, expected: 2)
    }

    func expectRefused(_ bytes: [UInt8], in dir: URL, mentions: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let bad = dir.appendingPathComponent("bad-\(UUID().uuidString).qcow2")
        try Data(bytes).write(to: bad)
        let out = dir.appendingPathComponent("out.qcow2")
        let r = try Harness.qcowpress(["convert", bad.path, out.path])
        #expect(r.status == 1, "status \(r.status): \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr.split(separator: "\n").count == 1, "\(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains(mentions), "'\(r.stderr)' should mention '\(mentions)'", sourceLocation: sourceLocation)
        #expect(!FileManager.default.fileExists(atPath: out.path), sourceLocation: sourceLocation)
        try? FileManager.default.removeItem(at: bad)
    }

    @Test func unsafeMetadataIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (_, clean) = try makeImage(dir)
        var b = clean
        put64(&b, 40, UInt64(clean.count + 4096 * 10))
        try expectRefused(b, in: dir, mentions: "l1_table_offset")
        b = clean
        put32(&b, 36, 0xFFFF_FFFF)
        try expectRefused(b, in: dir, mentions: "l1_size")
        b = clean
        put32(&b, 20, 30)
        try expectRefused(b, in: dir, mentions: "cluster_bits at offset 20 is 30")
        b = clean
        put64(&b, firstL2(b).entryAt, (1 << 63) | UInt64(clean.count + 4096 * 8))
        try expectRefused(b, in: dir, mentions: "past the end of the file")
        b = clean  // two L1 entries share one L2 table
        let first = firstL2(b).entryAt
        put64(&b, first + 8, be64(b, first))
        try expectRefused(b, in: dir, mentions: "both point at the L2 table")
        b = clean  // a data cluster past the end
        put64(&b, firstDataEntry(b), (1 << 63) | UInt64(clean.count + 4096 * 100))
        try expectRefused(b, in: dir, mentions: "past the end of the file")
        b = clean  // an L2 table on top of the L1 table
        put64(&b, first, (1 << 63) | UInt64(l1(b)))
        try expectRefused(b, in: dir, mentions: "overlaps the L1 table")
    }

    @Test func compressedDescriptorPastEndIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (_, clean) = try makeImage(dir, compressed: true)
        var b = clean
        let at = firstDataEntry(b)
        #expect(be64(b, at) & (1 << 62) != 0)
        put64(&b, at, (1 << 62) | UInt64(clean.count + 100_000))
        try expectRefused(b, in: dir, mentions: "compressed data")
    }
}

/// Backing files are followed only to regular files, never in a loop.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg, "qemu-img makes the images"))
struct BackingSafetyTests {
    func image(_ dir: URL, _ name: String, backing: String) throws -> String {
        let p = dir.appendingPathComponent(name).path
        // -u: write the name without opening it (qemu-img would refuse the bad ones).
        let r = try Harness.qemuImg(["create", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", p, "1M"])
        #expect(r.status == 0, "\(r.stderr)")
        return p
    }

    @Test func unsafeBackingFilesAreRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("adir"), withIntermediateDirectories: true)
        let cases: [(String, String, String)] = [
            ("missing.qcow2", "nowhere.qcow2", "does not resolve to a regular file"),
            ("todir.qcow2", "adir", "does not resolve to a regular file"),
            ("dev.qcow2", "/dev/zero", "does not resolve to a regular file"),
            ("self.qcow2", "self.qcow2", "loops"),
        ]
        for (name, backing, message) in cases {
            let p = try image(dir, name, backing: backing)
            let out = dir.appendingPathComponent("out.qcow2").path
            let r = try Harness.qcowpress(["convert", p, out])
            #expect(r.status == 1, "\(name): \(r.stderr)")
            #expect(r.stderr.contains(message), "\(name): \(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1)
            #expect(!FileManager.default.fileExists(atPath: out))
        }
        // A two-image loop: a → b → a.
        _ = try image(dir, "a.qcow2", backing: "b.qcow2")
        _ = try image(dir, "b.qcow2", backing: "a.qcow2")
        let r = try Harness.qcowpress(["convert", dir.appendingPathComponent("a.qcow2").path, dir.appendingPathComponent("o.qcow2").path])
        #expect(r.status == 1 && r.stderr.contains("loops"), "\(r.stderr)")
        // --no-backing reads such an image without touching the backing name.
        let nb = try Harness.qcowpress(["convert", "--no-backing", dir.appendingPathComponent("a.qcow2").path, dir.appendingPathComponent("nb.qcow2").path])
        #expect(nb.status == 0, "\(nb.stderr)")
    }
}
