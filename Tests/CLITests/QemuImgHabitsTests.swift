import Foundation
import Testing

/// qemu-img spellings a Proxmox/QEMU administrator types without thinking.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg, "qemu-img is the oracle"))
struct QemuImgHabitsTests {
    @Test func convertTakesDashFAndDashU() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 8)
        let base = dir.appendingPathComponent("base.raw").path
        FileManager.default.createFile(atPath: base, contents: nil)
        try FileHandle(forWritingTo: URL(fileURLWithPath: base)).truncate(atOffset: 8 << 20)
        let dst = dir.appendingPathComponent("top.qcow2").path
        let r = try Harness.qcowpress(["convert", "-U", "-B", "base.raw", "-F", "raw", src.path, dst])
        #expect(r.status == 0, "\(r.stderr)")
        let info = try JSONSerialization.jsonObject(with: Data(try Harness.qemuImg(["info", "--output", "json", dst]).stdout.utf8)) as? [String: Any]
        #expect(info?["backing-filename-format"] as? String == "raw", "\(String(describing: info))")
        let cmp = try Harness.qemuImg(["compare", "-f", "raw", "-F", "qcow2", src.path, dst])
        #expect(cmp.status == 0, "\(cmp.stdout) \(cmp.stderr)")

        for cmd in ["info", "check"] {
            let u = try Harness.qcowpress([cmd, "-U", dst])
            #expect(u.status == 0, "\(cmd) -U: \(u.stderr)")
        }

        let noB = try Harness.qcowpress(["convert", "-F", "raw", src.path, dir.appendingPathComponent("x.qcow2").path])
        #expect(noB.status == 1 && noB.stderr.contains("-F needs -B"), "\(noB.stderr)")
        let badF = try Harness.qcowpress(["convert", "-B", "base.raw", "-F", "vmdk", src.path, dir.appendingPathComponent("x.qcow2").path])
        #expect(badF.status == 1 && badF.stderr.contains("vmdk"), "\(badF.stderr)")
    }

    @Test func compressedRawIsAnError() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 4)
        let dst = dir.appendingPathComponent("dst.raw").path
        let r = try Harness.qcowpress(["convert", "-c", "-O", "raw", src.path, dst])
        #expect(r.status == 1 && r.stderr.split(separator: "\n").count == 1 && r.stderr.contains("-c needs -O qcow2"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dst))
    }

    /// A raw base, a qcow2 on it and a qcow2 on that, the top one in a subdirectory so that the
    /// backing names are relative ("../mid.qcow2"), as qemu-img makes them.
    func chain(_ dir: URL) throws -> (base: String, mid: String, top: String) {
        let base = dir.appendingPathComponent("base.raw")
        try SourceImage.mixed(at: base, blocks: 8)
        let mid = dir.appendingPathComponent("mid.qcow2").path
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("sub"), withIntermediateDirectories: true)
        let top = dir.appendingPathComponent("sub/top.qcow2").path
        #expect(try Harness.qemuImg(["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid]).status == 0)
        #expect(try Harness.qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "../mid.qcow2", "-F", "qcow2", top]).status == 0)
        return (base.path, mid, top)
    }

    func json(_ s: String) -> Any? { try? JSONSerialization.jsonObject(with: Data(s.utf8)) }

    @Test func infoFormatAndBackingChainAsQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (base, mid, top) = try chain(dir)
        // The human form, line for line (sizes, "actual path", the blank line between images).
        for args in [["--backing-chain", top], ["--backing-chain", mid], [top], ["-f", "raw", top], ["-f", "qcow2", mid],
                     ["--backing-chain", base], ["-f", "raw", "--backing-chain", top]] {
            let ours = try Harness.qcowpress(["info"] + args)
            let theirs = try Harness.qemuImg(["info"] + args)
            #expect(ours.status == 0 && theirs.status == 0, "\(args): \(ours.stderr)")
            #expect(ours.stdout == theirs.stdout, "info \(args)\nours:\n\(ours.stdout)\nqemu-img:\n\(theirs.stdout)")
        }
        #expect(try Harness.qcowpress(["info", "--backing-chain", top]).stdout.components(separatedBy: "image: ").count == 4)
        // JSON: one object, or with --backing-chain a list of them, top first (as qemu-img).
        for args in [["--backing-chain", top], [top], ["--backing-chain", base], ["-f", "raw", top]] {
            let ours = json(try Harness.qcowpress(["info", "--output", "json"] + args).stdout)
            let theirs = json(try Harness.qemuImg(["info", "--output", "json"] + args).stdout)
            #expect(ours != nil && (ours as? NSObject) == (theirs as? NSObject), "info --output json \(args)\nours: \(String(describing: ours))\nqemu-img: \(String(describing: theirs))")
        }
        let list = json(try Harness.qcowpress(["info", "--backing-chain", "--output", "json", top]).stdout) as? [[String: Any]]
        #expect(list?.map { $0["format"] as? String ?? "" } == ["qcow2", "qcow2", "raw"])
        #expect(list?.first?["full-backing-filename"] as? String == (top as NSString).deletingLastPathComponent + "/../mid.qcow2")

        // -f qcow2 on a raw file is an error in both; -f raw reads a qcow2 as raw (above).
        let theirs = try Harness.qemuImg(["info", "-f", "qcow2", base])
        let ours = try Harness.qcowpress(["info", "-f", "qcow2", base])
        #expect(theirs.status == 1 && ours.status == 1, "\(ours.stderr)")
        #expect(ours.stderr.split(separator: "\n").count == 1 && ours.stderr.contains("base.raw") && ours.stderr.contains("not a qcow2 image"), "\(ours.stderr)")
        let qed = try Harness.qcowpress(["info", "-f", "qed", top])
        #expect(qed.status == 1 && qed.stderr.contains("-f 'qed'"), "\(qed.stderr)")

        // A chain whose backing file is missing: both refuse --backing-chain; plain info works.
        let lost = dir.appendingPathComponent("lost.qcow2").path
        #expect(try Harness.qemuImg(["create", "-f", "qcow2", "-u", "-b", "nowhere.qcow2", "-F", "qcow2", lost, "1M"]).status == 0)
        #expect(try Harness.qemuImg(["info", "--backing-chain", lost]).status == 1)
        let missing = try Harness.qcowpress(["info", "--backing-chain", lost])
        #expect(missing.status == 1 && missing.stderr.contains("nowhere.qcow2") && missing.stderr.split(separator: "\n").count == 1, "\(missing.stderr)")
        #expect(try Harness.qcowpress(["info", lost]).status == 0)
    }

    @Test func checkFormatAsQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (base, mid, _) = try chain(dir)
        // qemu-img: raw has no checks (63), -f qcow2 on raw cannot open (1), -f qcow2 on qcow2 checks.
        for args in [["-f", "raw", mid], [base], ["-f", "qcow2", base], ["-f", "qcow2", mid], ["-f", "raw", base]] {
            let theirs = try Harness.qemuImg(["check"] + args)
            let ours = try Harness.qcowpress(["check"] + args)
            #expect(ours.status == theirs.status, "check \(args): ours \(ours.status) \(ours.stderr), qemu-img \(theirs.status) \(theirs.stderr)")
            if ours.status != 0 {
                #expect(ours.stdout.isEmpty && ours.stderr.split(separator: "\n").count == 1, "check \(args): \(ours.stdout) \(ours.stderr)")
            }
        }
        #expect(try Harness.qcowpress(["check", "-f", "raw", mid]).stderr.contains("does not support checks"))
    }

    /// -q: no progress (even with -p) and no notes; stdout of check stays empty, as with qemu-img.
    @Test func quietIsQuiet() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 16)
        // Too many threads for the memory limit: the engine says so in a note.
        let chatty = ["-c", "-p", "--threads", "64", "--memory-limit", "8M"]
        let loud = try Harness.qcowpress(["convert"] + chatty + [src.path, dir.appendingPathComponent("loud.qcow2").path])
        #expect(loud.status == 0 && loud.stderr.contains("note:") && loud.stderr.contains("100%"), "\(loud.stderr)")
        let q = dir.appendingPathComponent("q.qcow2").path
        let quiet = try Harness.qcowpress(["convert", "-q"] + chatty + [src.path, q])
        #expect(quiet.status == 0 && quiet.stderr.isEmpty && quiet.stdout.isEmpty, "\(quiet.stderr)")
        try Harness.expectGood(q, equals: src.path)
        let theirs = try Harness.qemuImg(["convert", "-q", "-p", "-O", "qcow2", src.path, dir.appendingPathComponent("t.qcow2").path])
        #expect(theirs.status == 0 && theirs.stderr.isEmpty && theirs.stdout.isEmpty)
        let e = try Harness.qcowpress(["export", "-q"] + chatty + [src.path, dir.appendingPathComponent("e.qcow2").path])
        #expect(e.status == 0 && e.stderr.isEmpty && e.stdout.isEmpty, "\(e.stderr)")
        // check -q prints nothing on stdout for a clean image nor for a leaky one (exit 3 tells).
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir.appendingPathComponent("t.qcow2").path)))
        bytes += [UInt8](repeating: 0, count: (65536 - bytes.count % 65536) % 65536)
        let extra = bytes.count / 65536
        bytes += [UInt8](repeating: 0, count: 65536)
        let table = Int(QcowBytes.be64(bytes, 48))
        let block = Int(QcowBytes.be64(bytes, table) & QcowBytes.mask)
        bytes[block + 2 * extra + 1] = 1  // a refcount for the new cluster, which nothing uses
        let leaky = dir.appendingPathComponent("leaky.qcow2").path
        try Data(bytes).write(to: URL(fileURLWithPath: leaky))
        for img in [q, leaky] {
            let t = try Harness.qemuImg(["check", "-q", img])
            let o = try Harness.qcowpress(["check", "-q", img])
            let oj = try Harness.qcowpress(["check", "-q", "--output", "json", img])
            #expect(o.status == t.status && oj.status == t.status, "ours \(o.status), qemu-img \(t.status)")
            #expect(o.stdout == t.stdout && oj.stdout.isEmpty && o.stdout.isEmpty, "\(o.stdout)")
        }
        #expect(try Harness.qcowpress(["check", "-q", leaky]).status == 3)
    }

    /// restore vma: -q quiet as convert's, -p progress without it.
    @Test(.enabled(if: PBSFixture.available, "needs python3 to make the VMA archive"))
    func quietIsQuietForRestoreVMA() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let archive = try VMARestoreTests.makeArchive(dir, disks: try VMARestoreTests.makeDisks(in: dir, count: 1), name: "a.vma")
        let v = try Harness.qcowpress(["restore", "vma", "-q", "-p", archive, dir.appendingPathComponent("vma").path])
        #expect(v.status == 0 && v.stderr.isEmpty && v.stdout.isEmpty, "\(v.stderr)")
        let vl = try Harness.qcowpress(["restore", "vma", "-p", archive, dir.appendingPathComponent("vma-loud").path])
        #expect(vl.status == 0 && !vl.stderr.isEmpty, "-p prints progress without -q")
    }

    /// `-o help` / `-o ?` list the options a line each and exit 0 without files, as qemu-img.
    @Test func optionHelpListsOptions() throws {
        let theirs = try Harness.qemuImg(["convert", "-O", "qcow2", "-o", "help"])
        #expect(theirs.status == 0)
        func entries(_ s: String) -> [String: String] {
            var out: [String: String] = [:]
            for line in s.split(separator: "\n") where line.hasPrefix("  ") && line.contains("=<") {
                let kv = line.dropFirst(2).split(separator: " ")[0].split(separator: "=", maxSplits: 1)
                out[String(kv[0])] = String(kv[1])
            }
            return out
        }
        let qemu = entries(theirs.stdout)
        for args in [["convert", "-o", "help"], ["convert", "-O", "qcow2", "-o", "?"], ["export", "-o", "cluster_size=4k,help"],
                     ["restore", "vma", "-o", "help"], ["restore", "pbs", "-o", "help"], ["convert", "-o", "help", "a.raw", "b.qcow2"]] {
            let r = try Harness.qcowpress(args)
            #expect(r.status == 0 && r.stderr.isEmpty, "\(args): \(r.stderr)")
            #expect(r.stdout.hasPrefix("Supported qcow2 options:\n"), "\(args): \(r.stdout)")
            let ours = entries(r.stdout)
            // Every option QcowPress takes is listed, and one qemu-img knows has qemu-img's type.
            #expect(Set(ours.keys) == ["backing_file", "backing_fmt", "cluster_size", "compression_level", "compression_type", "refcount_bits"], "\(args): \(r.stdout)")
            for (k, v) in ours where k != "compression_level" { #expect(qemu[k] == v, "\(k)=\(v) vs qemu-img \(qemu[k] ?? "absent")") }
            #expect(r.stdout.split(separator: "\n").dropFirst().allSatisfy { $0.hasPrefix("  ") && $0.contains(" - ") })
        }
        #expect(!FileManager.default.fileExists(atPath: "b.qcow2"))
        let raw = try Harness.qcowpress(["convert", "-O", "raw", "-o", "help"])
        #expect(raw.status == 0 && raw.stdout.hasPrefix("Supported raw options:"), "\(raw.stdout)")
        #expect(try Harness.qemuImg(["convert", "-O", "raw", "-o", "help"]).status == 0)
        // Every key listed is one -o accepts.
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 2)
        let r = try Harness.qcowpress(["convert", "-c", "-o", "cluster_size=4096,compression_type=zstd,compression_level=5",
                                       src.path, dir.appendingPathComponent("o.qcow2").path])
        #expect(r.status == 0, "\(r.stderr)")
        let r2 = try Harness.qcowpress(["convert", "-o", "refcount_bits=8", "-B", "src.raw", "-o", "backing_fmt=raw",
                                        src.path, dir.appendingPathComponent("o2.qcow2").path])
        #expect(r2.status == 0, "\(r2.stderr)")
    }

    /// A qcow2 with the corrupt bit: qemu-img convert/compare/info read it (read-only); so does
    /// qcowpress, with one warning line naming the image.
    @Test func corruptBitIsReadWithAWarning() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 8)
        let base = dir.appendingPathComponent("base.qcow2").path
        #expect(try Harness.qemuImg(["convert", "-O", "qcow2", src.path, base]).status == 0)
        let top = dir.appendingPathComponent("top.qcow2").path
        #expect(try Harness.qemuImg(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top]).status == 0)
        var b = [UInt8](try Data(contentsOf: URL(fileURLWithPath: base)))
        b[79] |= 2  // incompatible_features bit 1
        try Data(b).write(to: URL(fileURLWithPath: base))
        // qemu-img: read-only use works, read/write does not (so the bit is really set).
        #expect(try Harness.qemuImg(["convert", "-O", "raw", base, dir.appendingPathComponent("t.raw").path]).status == 0)
        let rw = try Harness.qemuImg(["amend", "-o", "lazy_refcounts=on", base])
        #expect(rw.status == 1 && rw.stderr.contains("corrupt"), "\(rw.stderr)")

        for (img, args) in [(base, ["convert", "-O", "raw"]), (base, ["convert", "-c"]), (top, ["convert"]), (base, ["export"])] {
            let out = dir.appendingPathComponent("out-\(UUID().uuidString)").path
            let r = try Harness.qcowpress(args + [img, out])
            #expect(r.status == 0, "\(args): \(r.stderr)")
            let lines = r.stderr.split(separator: "\n")
            #expect(lines.count == 1 && lines[0].hasPrefix("qcowpress: warning: \(base): ") && lines[0].contains("corrupt"), "\(args): \(r.stderr)")
            let cmp = try Harness.qemuImg(["compare", "-f", "raw", src.path, out])
            #expect(cmp.status == 0, "\(args): \(cmp.stdout)")
        }
        let ours = try Harness.qcowpress(["info", "--output", "json", base])
        #expect(ours.status == 0 && ours.stderr.contains("warning") && ours.stderr.contains("corrupt"), "\(ours.stderr)")
        let theirs = try Harness.qemuImg(["info", "--output", "json", base])
        #expect((json(ours.stdout) as? NSObject) == (json(theirs.stdout) as? NSObject), "\(ours.stdout)")
        #expect(try Harness.qcowpress(["info", base]).stdout.contains("    corrupt: true"))
        // check reads it as qemu-img check does: the bit alone is no error.
        let c = try Harness.qcowpress(["check", base])
        #expect(c.status == (try Harness.qemuImg(["check", base]).status), "\(c.stdout)")
        // The source image itself is untouched (never opened for writing).
        #expect([UInt8](try Data(contentsOf: URL(fileURLWithPath: base))) == b)
    }

    /// Truncated images and tables past the end of the file: corruption (exit 2), with qemu-img's
    /// ERROR lines (hex offsets) on stderr and its summary on stdout, byte for byte; JSON too.
    @Test func checkOfTruncatedImagesAsQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        FileManager.default.createFile(atPath: src.path, contents: SourceImage.noise(3_000_000, seed: 11))
        let good = dir.appendingPathComponent("good.qcow2").path
        #expect(try Harness.qemuImg(["convert", "-O", "qcow2", "-o", "cluster_size=4096", src.path, good]).status == 0)
        let clean = QcowBytes(try Data(contentsOf: URL(fileURLWithPath: good)))
        let n = UInt64(clean.bytes.count)
        let cases: [(String, (inout QcowBytes) -> Void)] = [
            ("cut in half", { $0.bytes = Array($0.bytes.prefix($0.bytes.count / 2)) }),
            ("cut after two clusters", { $0.bytes = Array($0.bytes.prefix(8192)) }),
            ("cut inside the L2 tables", { $0.bytes = Array($0.bytes.prefix(40_000)) }),
            ("L1 table past the end", { $0.put64(40, n + 40960) }),
            ("refcount table past the end", { $0.put64(48, n + 40960) }),
            ("refcount table far past the end", { $0.put64(48, 1 << 50) }),
            ("L2 table past the end", { i in i.put64(i.l1, 1 << 63 | (n + 81920)) }),
            ("data cluster past the end", { i in i.put64(i.firstL2, 1 << 63 | (n + 122_880)) }),
            ("refcount block past the end", { i in i.put64(i.reftable, n + 163_840) }),
        ]
        for (name, damage) in cases {
            var img = clean
            damage(&img)
            let p = dir.appendingPathComponent("bad.qcow2").path
            try Data(img.bytes).write(to: URL(fileURLWithPath: p))
            let theirs = try Harness.qemuImg(["check", p])
            let ours = try Harness.qcowpress(["check", p])
            #expect(theirs.status == 2 && ours.status == 2, "\(name): ours \(ours.status), qemu-img \(theirs.status)")
            #expect(ours.stdout == theirs.stdout, "\(name) stdout\nours:\n\(ours.stdout)\nqemu-img:\n\(theirs.stdout)")
            #expect(ours.stderr == theirs.stderr, "\(name) stderr\nours:\n\(ours.stderr.prefix(2000))\nqemu-img:\n\(theirs.stderr.prefix(2000))")
            #expect(ours.stderr.contains("ERROR") && ours.stderr.contains("0x") || ours.stderr.contains("ERROR refcount block"), "\(name): \(ours.stderr.prefix(500))")
            let tj = json(try Harness.qemuImg(["check", "--output", "json", p]).stdout) as? [String: Any]
            let oj = try Harness.qcowpress(["check", "--output", "json", p])
            let o = json(oj.stdout) as? [String: Any]
            #expect(oj.status == 2 && o != nil, "\(name): \(oj.status) \(oj.stdout.prefix(300))")
            for key in ["corruptions", "leaks", "check-errors", "image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters"] {
                #expect((o?[key] as? Int ?? 0) == (tj?[key] as? Int ?? 0), "\(name): \(key) ours \(o?[key] ?? "nil"), qemu-img \(tj?[key] ?? "nil")")
            }
        }
    }
}

/// A qcow2 file's bytes, with the offsets the damage above needs.
struct QcowBytes {
    static let mask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    var bytes: [UInt8]
    init(_ d: Data) { bytes = [UInt8](d) }
    static func be64(_ b: [UInt8], _ at: Int) -> UInt64 { b[at..<(at + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
    func be64(_ at: Int) -> UInt64 { Self.be64(bytes, at) }
    mutating func put64(_ at: Int, _ v: UInt64) { for i in 0..<8 { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) } }
    var l1: Int { Int(be64(40)) }
    var reftable: Int { Int(be64(48)) }
    /// The first entry of the first L2 table.
    var firstL2: Int { Int(be64(l1) & Self.mask) }
}

/// Mistyped commands, usage errors and the --help texts themselves.
@Suite(.tags(.e2e)) struct CommandLineTests {
    @Test func typosGetASuggestion() throws {
        let cases: [([String], String)] = [
            (["conver", "a", "b"], "qcowpress: 'conver' is not a command. Did you mean 'convert'?\n"),
            (["chekc", "a"], "qcowpress: 'chekc' is not a command. Did you mean 'check'?\n"),
            (["exprt", "a", "b"], "qcowpress: 'exprt' is not a command. Did you mean 'export'?\n"),
            (["restore", "pbz", "x"], "qcowpress: 'pbz' is not a restore command. Did you mean 'pbs'?\n"),
            (["serve", "imag", "x"], "qcowpress: 'imag' is not a serve command. Did you mean 'image'?\n"),
            (["frobnicate"], "qcowpress: 'frobnicate' is not a command. See 'qcowpress --help'.\n"),
        ]
        for (args, expected) in cases {
            let r = try Harness.qcowpress(args)
            #expect(r.status == 1 && r.stderr == expected && r.stdout.isEmpty, "\(args): \(r.status) \(r.stderr)")
        }
    }

    @Test func usageErrorsPointToHelp() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 2)
        let cases: [([String], String, String)] = [
            (["convert", "only-one"], "<destination>", "qcowpress convert"),
            (["convert", "--bogus", "a", "b"], "--bogus", "qcowpress convert"),
            (["restore", "vma"], "<archive>", "qcowpress restore vma"),
            (["info", "-f", "qed", "x"], "qed", "qcowpress info"),
            (["check", "--output", "xml", "x"], "xml", "qcowpress check"),
            (["serve", "image", "x.qcow2"], "--socket", "qcowpress serve image"),
            (["export", "--memory-limit", "lots", src.path, dir.appendingPathComponent("o.qcow2").path], "--memory-limit", "qcowpress export"),
        ]
        for (args, mentions, command) in cases {
            let r = try Harness.qcowpress(args)
            let lines = r.stderr.split(separator: "\n").map(String.init)
            #expect(r.status == 1 && lines.count == 2, "\(args): \(r.status) \(r.stderr)")
            #expect(lines.first?.hasPrefix("qcowpress: ") == true && lines.first?.contains(mentions) == true, "\(args): \(r.stderr)")
            #expect(lines.last == "See '\(command) --help'.", "\(args): \(r.stderr)")
            // The command named is one whose help works.
            let help = try Harness.qcowpress(Array(command.split(separator: " ").dropFirst().map(String.init)) + ["--help"])
            #expect(help.status == 0 && help.stdout.contains("USAGE: \(command)"), "\(command) --help")
        }
    }

    /// Every command's --help: placeholders that say what they are, no default said twice.
    @Test func helpTextsAreClean() throws {
        let commands = [["convert"], ["export"], ["info"], ["check"], ["restore", "pbs"], ["restore", "vma"], ["serve", "image"], ["serve", "pbs"]]
        for c in commands {
            let r = try Harness.qcowpress(c + ["--help"])
            #expect(r.status == 0)
            // One option's entry: its first line and the indented lines after it.
            var entries: [String] = []
            for line in r.stdout.split(separator: "\n", omittingEmptySubsequences: false) {
                if line.hasPrefix("  -") || line.hasPrefix("  <") { entries.append(String(line)) } else if line.hasPrefix("      "), !entries.isEmpty {
                    entries[entries.count - 1] += " " + line.trimmingCharacters(in: .whitespaces)
                }
            }
            #expect(!entries.isEmpty)
            for e in entries {
                #expect(e.components(separatedBy: "default").count <= 2, "\(c): default said twice: \(e)")
                // "-f <f>": a placeholder that only repeats the option's letter.
                let words = e.split(separator: " ")
                if words.count >= 2, words[0].count == 2, words[0].hasPrefix("-") {
                    #expect(words[1].lowercased() != "<\(words[0].dropFirst().lowercased())>", "\(c): \(e)")
                }
            }
            for (option, placeholder) in [("-f", "<format>"), ("-O", "<format>"), ("-o", "<options>"), ("-F", "<format>"), ("-B", "<backing>"), ("-b", "<base>")] {
                if let e = entries.first(where: { $0.hasPrefix("  \(option) ") }) {
                    #expect(e.hasPrefix("  \(option) \(placeholder)"), "\(c): \(e)")
                }
            }
        }
        // export always compresses: its -c says so.
        let export = try Harness.qcowpress(["export", "--help"]).stdout.replacingOccurrences(of: "\n", with: " ")
            .replacingOccurrences(of: " +", with: " ", options: .regularExpression)
        #expect(export.contains("export always compresses"), "\(export)")
    }
}
