import Foundation
import QcowPress
import Testing

/// Reader and check fidelity (issue 14): images made by qemu-img, damaged by a byte patch, must get
/// the same verdict (`check` status and error counts) and the same bytes (`convert -O raw`) from
/// qcowpress as from qemu-img, or a one-line refusal where qemu-img reports corruption.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg, "qemu-img is the oracle"))
struct FidelityTests {
    // MARK: - Byte patching

    struct Image {
        var bytes: [UInt8]
        func be64(_ at: Int) -> UInt64 { bytes[at..<(at + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
        func be32(_ at: Int) -> UInt32 { bytes[at..<(at + 4)].reduce(0) { $0 << 8 | UInt32($1) } }
        mutating func put64(_ at: Int, _ v: UInt64) { for i in 0..<8 { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) } }
        mutating func put32(_ at: Int, _ v: UInt32) { for i in 0..<4 { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) } }
        static let mask: UInt64 = 0x00FF_FFFF_FFFF_FE00
        var clusterBits: Int { Int(be32(20)) }
        var extendedL2: Bool { be64(72) & 16 != 0 }
        var l1: Int { Int(be64(40)) }
        var reftable: Int { Int(be64(48)) }
        /// Offset of the first non-zero L1 entry and the L2 table it names.
        var firstL1: (entryAt: Int, table: Int) {
            var i = l1
            while be64(i) == 0 { i += 8 }
            return (i, Int(be64(i) & Self.mask))
        }
        /// Offset of the first L2 entry with a host cluster or compressed data.
        var firstData: Int {
            let w = extendedL2 ? 16 : 8
            var at = firstL1.table
            while be64(at) & Self.mask == 0 && be64(at) & (1 << 62) == 0 { at += w }
            return at
        }
        /// Offset of the first L2 entry (and bitmap) that is entirely zero.
        var firstEmpty: Int {
            let w = extendedL2 ? 16 : 8
            var at = firstL1.table
            while be64(at) != 0 || (extendedL2 && be64(at + 8) != 0) { at += w }
            return at
        }
    }

    static func load(_ p: String) throws -> Image { Image(bytes: [UInt8](try Data(contentsOf: URL(fileURLWithPath: p)))) }
    static func save(_ i: Image, _ p: String) throws { try Data(i.bytes).write(to: URL(fileURLWithPath: p)) }

    /// Small qemu-img images of several kinds, made once per test in `dir`.
    static func makeSources(_ dir: URL) throws -> [String: String] {
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 16, block: 256 << 10)
        var out: [String: String] = [:]
        let kinds: [(String, [String])] = [
            ("plain", ["-o", "cluster_size=4096"]),
            ("compressed", ["-c", "-o", "cluster_size=4096"]),
            ("extl2", ["-o", "cluster_size=65536,extended_l2=on"]),
            ("zstd", ["-c", "-o", "cluster_size=65536,compression_type=zstd"]),
        ]
        for (name, opts) in kinds {
            let p = dir.appendingPathComponent("\(name).qcow2").path
            let r = try Harness.qemuImg(["convert", "-O", "qcow2"] + opts + [src.path, p])
            #expect(r.status == 0, "\(name): \(r.stderr)")
            out[name] = p
        }
        return out
    }

    // MARK: - Running with a time limit

    struct Run {
        var status: Int32
        var signaled: Bool
        var timedOut: Bool
        var stdout: String
        var stderr: String
    }

    /// Runs a program with output to files (no pipe can fill up) and kills it after `seconds`.
    static func run(_ exe: String, _ args: [String], in dir: URL, seconds: Double = 20) throws -> Run {
        let out = dir.appendingPathComponent("run-\(UUID().uuidString).out")
        let err = dir.appendingPathComponent("run-\(UUID().uuidString).err")
        FileManager.default.createFile(atPath: out.path, contents: nil)
        FileManager.default.createFile(atPath: err.path, contents: nil)
        defer {
            try? FileManager.default.removeItem(at: out)
            try? FileManager.default.removeItem(at: err)
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        p.standardOutput = try FileHandle(forWritingTo: out)
        p.standardError = try FileHandle(forWritingTo: err)
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let timedOut = !Wait.exit(of: p.processIdentifier, timeout: seconds)
        if timedOut { p.terminate() }
        p.waitUntilExit()
        return Run(status: p.terminationStatus, signaled: p.terminationReason == .uncaughtSignal, timedOut: timedOut,
                   stdout: String(decoding: try Data(contentsOf: out), as: UTF8.self),
                   stderr: String(decoding: try Data(contentsOf: err), as: UTF8.self))
    }

    struct Verdict: Equatable, CustomStringConvertible {
        var status: Int32
        var corruptions: Int
        var leaks: Int
        var checkErrors: Int
        var description: String { "exit \(status), \(corruptions) corruptions, \(leaks) leaks, \(checkErrors) check errors" }
    }

    static func verdict(_ r: Run) -> Verdict? {
        guard let j = try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any] else { return nil }
        return Verdict(status: r.status, corruptions: j["corruptions"] as? Int ?? 0, leaks: j["leaks"] as? Int ?? 0,
                       checkErrors: j["check-errors"] as? Int ?? 0)
    }

    static func checkBoth(_ p: String, in dir: URL) throws -> (theirs: Verdict?, ours: Verdict?, oursRun: Run) {
        let t = try run("/usr/bin/qemu-img", ["check", "--output", "json", p], in: dir)
        let o = try run(Harness.binary, ["check", "--output", "json", p], in: dir)
        return (verdict(t), verdict(o), o)
    }

    // MARK: - Item 1: check counts errors as qemu-img does

    @Test func checkCountsAsQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = try Self.makeSources(dir)
        typealias Damage = (name: String, source: String, expected: Int32, patch: (inout Image) -> Void)
        let cases: [Damage] = [
            ("L2 reserved bit 1", "plain", 2, { i in let a = i.firstData; i.put64(a, i.be64(a) | 2) }),
            ("L2 reserved bit 57", "plain", 2, { i in let a = i.firstData; i.put64(a, i.be64(a) | 1 << 57) }),
            ("L1 reserved bit 0", "plain", 2, { i in let a = i.firstL1.entryAt; i.put64(a, i.be64(a) | 1) }),
            ("L1 reserved bit 60", "plain", 2, { i in let a = i.firstL1.entryAt; i.put64(a, i.be64(a) | 1 << 60) }),
            ("compressed with copied flag", "compressed", 2, { i in let a = i.firstData; i.put64(a, i.be64(a) | 1 << 63) }),
            ("extended L2: allocated and zero", "extl2", 2, { i in let a = i.firstData; i.put64(a + 8, i.be64(a + 8) | 1 << 32) }),
            ("extended L2: bitmap on unallocated", "extl2", 2, { i in i.put64(i.firstEmpty + 8, 1) }),
            ("extended L2: bitmap on compressed", "extl2", 2, { i in
                let a = i.firstData
                i.put64(a, 1 << 62 | i.be64(a) & Image.mask)
                i.put64(a + 8, 1)
            }),
            ("refcount table entry unaligned", "plain", 1, { i in i.put64(i.reftable, i.be64(i.reftable) | 0x200) }),
            ("refcount table entry reserved bits", "plain", 2, { i in i.put64(i.reftable, i.be64(i.reftable) | 1) }),
            ("refcount block outside the image", "plain", 2, { i in i.put64(i.reftable + 8, UInt64(i.bytes.count + 5 * 4096)) }),
            ("L1 entry past the virtual size, L2 past EOF", "plain", 2, { i in
                i.put64(24, 2 << 20)
                i.put64(i.l1 + 8, 1 << 63 | UInt64(i.bytes.count + 50 * 4096))
            }),
            ("L1 entry past the virtual size, shared L2", "plain", 2, { i in
                i.put32(36, 4)
                i.put64(i.l1 + 16, i.be64(i.firstL1.entryAt))
            }),
            ("data cluster far past EOF", "plain", 2, { i in i.put64(i.firstData, 1 << 63 | 1 << 50) }),
            ("data cluster unaligned", "plain", 2, { i in let a = i.firstData; i.put64(a, i.be64(a) + 512) }),
            ("preallocated zero cluster unaligned", "plain", 2, { i in let a = i.firstData; i.put64(a, (i.be64(a) + 512) | 1) }),
            ("L2 table unaligned", "plain", 2, { i in let (a, t) = i.firstL1; i.put64(a, 1 << 63 | UInt64(t + 512)) }),
            ("compressed data past EOF", "compressed", 2, { i in i.put64(i.firstData, 1 << 62 | UInt64(i.bytes.count + 100_000)) }),
        ]
        for c in cases {
            guard let s = src[c.source] else { continue }
            var img = try Self.load(s)
            c.patch(&img)
            let p = dir.appendingPathComponent("damaged.qcow2").path
            try Self.save(img, p)
            let (theirs, ours, run) = try Self.checkBoth(p, in: dir)
            #expect(theirs?.status == c.expected, "\(c.name): qemu-img \(String(describing: theirs))")
            #expect(ours != nil && ours == theirs, "\(c.name): ours \(String(describing: ours)) vs qemu-img \(String(describing: theirs)); \(run.stderr)")
            if let problem = try Self.compareReads(p, qemuCheck: theirs, in: dir) { Issue.record("\(c.name): \(problem)") }
        }
    }

    /// `convert -O raw` by both tools: nil when they agree (same bytes, or qcowpress refuses in one
    /// line where qemu-img reports corruption or cannot read either); otherwise what differs.
    static func compareReads(_ p: String, qemuCheck: Verdict?, in dir: URL) throws -> String? {
        let t = dir.appendingPathComponent("theirs.raw").path
        let o = dir.appendingPathComponent("ours.raw").path
        try? FileManager.default.removeItem(atPath: t)
        try? FileManager.default.removeItem(atPath: o)
        let tc = try run("/usr/bin/qemu-img", ["convert", "-O", "raw", p, t], in: dir)
        let oc = try run(Harness.binary, ["convert", "-O", "raw", p, o], in: dir)
        if oc.signaled || oc.timedOut { return "convert trapped or hung" }
        if oc.status == 0 {
            if tc.status == 0 {
                if try Data(contentsOf: URL(fileURLWithPath: t)) != Data(contentsOf: URL(fileURLWithPath: o)) { return "bytes differ from qemu-img's" }
            } else if qemuCheck?.status == 0 {
                return "we read an image qemu-img refuses: \(tc.stderr)"
            }
            return nil
        }
        if oc.stderr.split(separator: "\n").count != 1 { return "refusal is not one line: \(oc.stderr)" }
        if tc.status == 0 && qemuCheck?.status == 0 { return "we refuse a clean image: \(oc.stderr)" }
        return nil
    }

    // MARK: - Item 2: external data file by incompatible bit 2

    /// Inserts a header extension right after the 112-byte header (the existing ones move down).
    static func insertExtension(_ i: inout Image, type: UInt32, payload: [UInt8]) {
        var ext: [UInt8] = []
        for k in 0..<4 { ext.append(UInt8(truncatingIfNeeded: type >> (24 - 8 * UInt32(k)))) }
        for k in 0..<4 { ext.append(UInt8(truncatingIfNeeded: UInt32(payload.count) >> (24 - 8 * UInt32(k)))) }
        ext += payload
        while ext.count % 8 != 0 { ext.append(0) }
        let start = Int(i.be32(100))
        var end = start
        while i.be32(end) != 0 { end += 8 + (Int(i.be32(end + 4)) + 7) & ~7 }
        end += 8
        let old = Array(i.bytes[start..<end])
        i.bytes.replaceSubrange(start..<(start + ext.count + old.count), with: ext + old)
    }

    @Test func externalDataFileFollowsIncompatibleBit() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = try Self.makeSources(dir)
        let plain = try #require(src["plain"])
        // A decoy "data file": if it were read, every cluster would read as 0xEE.
        let decoy = dir.appendingPathComponent("decoy.raw")
        try Data(repeating: 0xEE, count: 4 << 20).write(to: decoy)

        // Extension without the bit: QEMU reads the data from the image itself.
        var a = try Self.load(plain)
        Self.insertExtension(&a, type: 0x4441_5441, payload: Array("decoy.raw".utf8))
        let pa = dir.appendingPathComponent("ext-no-bit.qcow2").path
        try Self.save(a, pa)
        try expectSameBytes(pa, in: dir)

        // The bit without the extension: both refuse ("'data-file' is required").
        var b = try Self.load(plain)
        b.put64(72, b.be64(72) | 4)
        let pb = dir.appendingPathComponent("bit-no-ext.qcow2").path
        try Self.save(b, pb)
        let theirs = try Self.run("/usr/bin/qemu-img", ["convert", "-O", "raw", pb, dir.appendingPathComponent("t.raw").path], in: dir)
        #expect(theirs.status != 0 && theirs.stderr.contains("data-file"), "\(theirs.stderr)")
        let ours = try Self.run(Harness.binary, ["convert", "-O", "raw", pb, dir.appendingPathComponent("o.raw").path], in: dir)
        #expect(ours.status == 1 && ours.stderr.contains("'data-file' is required"), "\(ours.stderr)")
        #expect(ours.stderr.split(separator: "\n").count == 1, "\(ours.stderr)")
    }

    /// `convert -O raw` by both tools gives the same bytes (both must succeed).
    func expectSameBytes(_ p: String, in dir: URL, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let t = dir.appendingPathComponent("theirs.raw").path
        let o = dir.appendingPathComponent("ours.raw").path
        try? FileManager.default.removeItem(atPath: t)
        try? FileManager.default.removeItem(atPath: o)
        let theirs = try Self.run("/usr/bin/qemu-img", ["convert", "-O", "raw", p, t], in: dir)
        let ours = try Self.run(Harness.binary, ["convert", "-O", "raw", p, o], in: dir)
        #expect(theirs.status == 0, "qemu-img: \(theirs.stderr)", sourceLocation: sourceLocation)
        #expect(ours.status == 0, "ours: \(ours.stderr)", sourceLocation: sourceLocation)
        guard theirs.status == 0, ours.status == 0 else { return }
        let same = try Data(contentsOf: URL(fileURLWithPath: t)) == Data(contentsOf: URL(fileURLWithPath: o))
        #expect(same, "raw bytes differ from qemu-img's", sourceLocation: sourceLocation)
    }

    // MARK: - Item 3: backing chains as deep as QEMU reads them

    @Test func deepBackingChainsAreRead() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let base = dir.appendingPathComponent("c0.qcow2").path
        let raw = dir.appendingPathComponent("base.raw")
        try SourceImage.noise(1 << 20, seed: 7).write(to: raw)
        #expect(try Harness.qemuImg(["convert", "-O", "qcow2", raw.path, base]).status == 0)
        for i in 1...24 {
            let p = dir.appendingPathComponent("c\(i).qcow2").path
            let r = try Harness.qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "c\(i - 1).qcow2", "-F", "qcow2", p, "1M"])
            #expect(r.status == 0, "\(r.stderr)")
        }
        try expectSameBytes(dir.appendingPathComponent("c24.qcow2").path, in: dir)

        // The depth bound names the image where the chain stops (c24 is image 1, c15 image 10).
        let top = dir.appendingPathComponent("c24.qcow2").path
        #expect(throws: Never.self) { _ = try Qcow2Image(path: top, depthLimit: 25) }
        do {
            _ = try Qcow2Image(path: top, depthLimit: 10)
            Issue.record("a 25-image chain opened with a limit of 10")
        } catch {
            #expect(error.message.hasPrefix(dir.appendingPathComponent("c15.qcow2").path + ": backing chain is deeper than 10 images"), "\(error.message)")
            #expect(error.message.contains("'c14.qcow2'"), "\(error.message)")
        }

        // A loop deep in the chain is refused, naming the image whose backing file closes it.
        _ = try Harness.qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "c24.qcow2", "-F", "qcow2", dir.appendingPathComponent("c0.qcow2").path, "1M"])
        let r = try Self.run(Harness.binary, ["convert", "-O", "raw", dir.appendingPathComponent("c24.qcow2").path, dir.appendingPathComponent("x.raw").path], in: dir)
        #expect(r.status == 1 && r.stderr.contains("/c0.qcow2:") && r.stderr.contains("loops"), "\(r.stderr)")
        #expect(r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
    }

    // MARK: - Item 4: zstd clusters in several frames

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/zstd"), "zstd makes the frames"))
    func zstdClustersInSeveralFrames() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = try Self.makeSources(dir)
        let zstdImage = try #require(src["zstd"])
        let cluster = [UInt8](SourceImage.text(65536, seed: 99))
        func frame(_ bytes: ArraySlice<UInt8>) throws -> [UInt8] {
            let f = dir.appendingPathComponent("part")
            try Data(bytes).write(to: f)
            let r = try Harness.run("/usr/bin/zstd", ["-q", "-f", "-c", "--no-check", f.path, "-o", f.path + ".zst"])
            #expect(r.status == 0, "\(r.stderr)")
            return [UInt8](try Data(contentsOf: URL(fileURLWithPath: f.path + ".zst")))
        }
        let two = (try frame(cluster[0..<32768])) + (try frame(cluster[32768...]))
        let skippable: [UInt8] = [0x50, 0x2A, 0x4D, 0x18, 5, 0, 0, 0, 1, 2, 3, 4, 5] + (try frame(cluster[...]))
        for (name, data) in [("two frames", two), ("skippable frame first", skippable)] {
            var img = try Self.load(zstdImage)
            // Put the new compressed data at the end of the file and point the first entry there.
            let at = (img.bytes.count + 511) & ~511
            img.bytes += [UInt8](repeating: 0, count: at - img.bytes.count) + data
            let sectors = UInt64((at + data.count - 1) / 512 - at / 512)
            img.put64(img.firstData, 1 << 62 | sectors << UInt64(70 - img.clusterBits) | UInt64(at))
            let p = dir.appendingPathComponent("zstd-\(name.count).qcow2").path
            try Self.save(img, p)
            try expectSameBytes(p, in: dir)
        }
    }

    // MARK: - Property: random damage, same verdict and bytes (or a one-line refusal)

    /// Seeded mutations of header, L1, L2 and refcount bytes. qcowpress must never trap or hang; a
    /// successful read must give qemu-img's bytes; a refusal (one line) is allowed only where
    /// qemu-img's check reports a problem or qemu-img cannot read the image either; and `check`
    /// must give qemu-img's verdict whenever qemu-img can check the image at all.
    @Test(.tags(.property, .faults)) func randomDamageAgreesWithQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = try Self.makeSources(dir)
        var rng = SplitMix(seed: UInt64(ProcessInfo.processInfo.environment["QCOWPRESS_PROPERTY_SEED"] ?? "") ?? 14)
        let cases = Int(ProcessInfo.processInfo.environment["QCOWPRESS_PROPERTY_CASES"] ?? "") ?? 32
        let kinds = src.keys.sorted()
        var failures: [String] = []
        for n in 0..<cases {
            let kind = kinds[Int(rng.next() % UInt64(kinds.count))]
            var img = try Self.load(try #require(src[kind]))
            // Pick a region: header fields, L1 table, first L2 table, refcount table, first refcount block.
            let l2 = img.firstL1.table
            let refblock = Int(img.be64(img.reftable) & Image.mask)
            let regions: [(String, Int, Int)] = [
                ("header", 0, 112), ("L1", img.l1, 64), ("L2", l2, 1 << img.clusterBits),
                ("reftable", img.reftable, 64), ("refblock", refblock, 256),
            ]
            let (region, start, len) = regions[Int(rng.next() % UInt64(regions.count))]
            var what: [String] = []
            for _ in 0..<(1 + Int(rng.next() % 3)) {
                let off = start + Int(rng.next() % UInt64(len))
                // nb_snapshots and snapshots_offset are left alone: qemu-img's snapshot-table
                // repair (entries "incomplete", tables re-read) is not reproduced (README).
                guard off < img.bytes.count, !(60..<72).contains(off) else { continue }
                let bit = UInt8(1) << UInt8(rng.next() % 8)
                img.bytes[off] ^= bit
                what.append("byte \(off) ^= \(bit)")
            }
            let label = "case \(n) (\(kind), \(region): \(what.joined(separator: ", ")))"
            let p = dir.appendingPathComponent("prop.qcow2").path
            try Self.save(img, p)

            let (theirs, ours, oursRun) = try Self.checkBoth(p, in: dir)
            if oursRun.signaled || oursRun.timedOut { failures.append("\(label): check trapped or hung"); continue }
            if let problem = try Self.compareReads(p, qemuCheck: theirs, in: dir) { failures.append("\(label): \(problem)") }
            if let theirs, theirs != ours, !(theirs.status == 1 && ours?.status == 1) {
                failures.append("\(label): check \(String(describing: ours)) vs qemu-img \(theirs)")
            }
        }
        #expect(failures.isEmpty, "\(failures.count) of \(cases) cases disagree:\n\(failures.joined(separator: "\n"))")
    }
}
