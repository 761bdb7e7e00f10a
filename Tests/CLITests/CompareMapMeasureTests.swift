import Foundation
import Testing

/// `compare`, `map` and `measure` (issue 31) against qemu-img on the same files: the same output
/// and exit status, byte for byte where qemu-img's output is deterministic.
@Suite(.tags(.e2e, .fast), .enabled(if: Harness.haveQemuImg, "qemu-img makes the images and judges"))
struct CompareMapMeasureTests {
    /// qemu-img run in `dir`, status 0 expected.
    @discardableResult
    static func qemu(_ args: [String]) throws -> Harness.Output {
        let r = try Harness.qemuImg(args)
        #expect(r.status == 0, "qemu-img \(args.joined(separator: " ")): \(r.stderr)")
        return r
    }

    /// A 10 MiB qcow2 with data, a zero cluster, compressed clusters and unallocated runs (whole
    /// clusters only), and its raw, vdi and vpc conversions made by qemu-img.
    static func images(_ dir: URL) throws -> (qcow2: String, raw: String, vdi: String, vpc: String) {
        let q = dir.appendingPathComponent("a.qcow2").path
        try qemu(["create", "-q", "-f", "qcow2", q, "10M"])
        try Harness.qemuIO(q, ["write -P 1 0 64k", "write -z 1M 64k", "write -c -P 3 2M 128k", "write -P 5 4M 192k", "write -P 6 9M 64k"])
        let raw = dir.appendingPathComponent("a.raw").path
        let vdi = dir.appendingPathComponent("a.vdi").path
        let vpc = dir.appendingPathComponent("a.vhd").path
        try qemu(["convert", "-O", "raw", q, raw])
        try qemu(["convert", "-O", "vdi", q, vdi])
        try qemu(["convert", "-O", "vpc", q, vpc])
        return (q, raw, vdi, vpc)
    }

    /// Both tools' status and stdout for the same arguments.
    static func expectSame(_ command: [String], _ args: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
        let ours = try Harness.qcowpress(command + args)
        let theirs = try Harness.qemuImg(command + args)
        #expect(ours.status == theirs.status, "\(command + args): status \(ours.status) vs qemu-img \(theirs.status); \(ours.stderr)", sourceLocation: sourceLocation)
        #expect(ours.stdout == theirs.stdout, "\(command + args):\n\(ours.stdout)\nqemu-img:\n\(theirs.stdout)\n\(ours.stderr)", sourceLocation: sourceLocation)
    }

    @Test func compareAsQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let i = try Self.images(dir)
        try Self.expectSame(["compare"], [i.qcow2, i.raw])
        try Self.expectSame(["compare"], [i.vdi, i.raw])
        try Self.expectSame(["compare", "-f", "vpc"], [i.vpc, i.raw])
        // -s: block status must match too (qcow2's unallocated clusters are not a raw file's holes).
        try Self.expectSame(["compare", "-s"], [i.qcow2, i.raw])
        try Self.expectSame(["compare", "-s"], [i.raw, i.vdi])
        try Self.expectSame(["compare", "-s"], [i.raw, i.raw])
        // One byte changed at an odd offset, inside data and inside a hole.
        for at in [4 * 1048576 + 70001, 7 * 1048576 + 333] {
            let other = dir.appendingPathComponent("b\(at).raw").path
            try FileManager.default.copyItem(atPath: i.raw, toPath: other)
            let h = try FileHandle(forWritingTo: URL(fileURLWithPath: other))
            try h.seek(toOffset: UInt64(at))
            try h.write(contentsOf: Data([0x42]))
            try h.close()
            try Self.expectSame(["compare"], [i.qcow2, other])
            try Self.expectSame(["compare"], [other, i.vdi])
            let r = try Harness.qcowpress(["compare", i.qcow2, other])
            #expect(r.stdout == "Content mismatch at offset \(at / 512 * 512)!\n")
        }
        // Sizes that differ: a zero tail is identical (with the warning), a data tail is not; -s.
        let longer = dir.appendingPathComponent("long.raw").path
        try FileManager.default.copyItem(atPath: i.raw, toPath: longer)
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: longer))
        try h.truncate(atOffset: 12 << 20)
        try h.close()
        try Self.expectSame(["compare"], [i.qcow2, longer])
        try Self.expectSame(["compare"], [longer, i.qcow2])
        try Self.expectSame(["compare", "-s"], [i.qcow2, longer])
        let h2 = try FileHandle(forWritingTo: URL(fileURLWithPath: longer))
        try h2.seek(toOffset: (11 << 20) + 4097)
        try h2.write(contentsOf: Data([1]))
        try h2.close()
        try Self.expectSame(["compare"], [i.qcow2, longer])
        // -q prints nothing; errors are one line and exit 2.
        let q = try Harness.qcowpress(["compare", "-q", i.qcow2, longer])
        #expect(q.status == 1 && q.stdout.isEmpty)
        let missing = try Harness.qcowpress(["compare", i.qcow2, dir.appendingPathComponent("none").path])
        #expect(missing.status == 2 && missing.stderr.split(separator: "\n").count == 1, "\(missing.stderr)")
    }

    /// VMDK and VHDX made by qemu-img from the same image: compare and measure as qemu-img; map
    /// too for VHDX (qemu's driver has no block status: one data entry, every cluster required).
    @Test func vmdkAndVhdxAsQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let i = try Self.images(dir)
        for sub in ["monolithicSparse", "streamOptimized", "monolithicFlat"] {
            let v = dir.appendingPathComponent("\(sub).vmdk").path
            try Self.qemu(["convert", "-O", "vmdk", "-o", "subformat=\(sub)", i.qcow2, v])
            try Self.expectSame(["compare"], [v, i.raw])
            try Self.expectSame(["measure", "-O", "qcow2", "--output=json"], [v])
        }
        let sparse = dir.appendingPathComponent("sparse.vhdx").path
        try Self.qemu(["create", "-q", "-f", "vhdx", "-o", "block_size=1M", sparse, "64M"])
        try Harness.qemuIO(sparse, ["write -P 1 3M 64k"], format: "vhdx")
        for sub in ["dynamic", "fixed"] {
            let x = dir.appendingPathComponent("\(sub).vhdx").path
            try Self.qemu(["convert", "-O", "vhdx", "-o", "subformat=\(sub)", i.qcow2, x])
            try Self.expectSame(["compare"], [x, i.raw])
        }
        try Self.expectSame(["map", "--output=json"], [sparse])
        try Self.expectSame(["measure", "-O", "qcow2", "--output=json"], [sparse])
    }

    @Test func mapAsQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let i = try Self.images(dir)
        for img in [i.qcow2, i.raw, i.vdi] { try Self.expectSame(["map", "--output=json"], [img]) }
        try Self.expectSame(["map", "--output=json", "-f", "vpc"], [i.vpc])
        try Self.expectSame(["map"], [i.raw])
        try Self.expectSame(["map"], [i.vdi])
        // A backing chain: depth, and the File column naming the image that holds the data.
        let base = dir.appendingPathComponent("base.qcow2").path
        let top = dir.appendingPathComponent("top.qcow2").path
        try Self.qemu(["create", "-q", "-f", "qcow2", base, "4M"])
        try Harness.qemuIO(base, ["write -P 7 0 1M"])
        try Self.qemu(["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "8M"])
        try Harness.qemuIO(top, ["write -P 9 512k 64k", "write -z 2M 64k"])
        try Self.expectSame(["map", "--output=json"], [top])
        try Self.expectSame(["map"], [top])
        // The human table cannot show compressed clusters: one line, exit 1.
        let r = try Harness.qcowpress(["map", i.qcow2])
        #expect(r.status == 1 && r.stderr.contains("compressed"), "\(r.stderr)")
    }

    @Test func measureAsQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let i = try Self.images(dir)
        for img in [i.qcow2, i.raw, i.vdi] {
            for o in [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=2M,refcount_bits=1"]] {
                try Self.expectSame(["measure", "-O", "qcow2", "--output=json"] + o, [img])
            }
        }
        try Self.expectSame(["measure", "-O", "qcow2"], [i.qcow2])
        try Self.expectSame(["measure", "-O", "raw"], [i.qcow2])
        for size in ["1G", "123456789", "16T"] {
            for o in ["cluster_size=512", "cluster_size=64k", "cluster_size=2M,refcount_bits=64", "extended_l2=on"] {
                try Self.expectSame(["measure", "-O", "qcow2", "--output=json", "--size", size, "-o", o], [])
            }
        }
        // Persistent dirty bitmaps count in qemu-img's "bitmaps" (qemu-img bitmap --add).
        let bm = dir.appendingPathComponent("bitmaps.qcow2").path
        try Self.qemu(["create", "-q", "-f", "qcow2", bm, "64M"])
        try Self.qemu(["bitmap", "--add", bm, "b0"])
        try Self.qemu(["bitmap", "--add", "-g", "64k", bm, "second-bitmap"])
        for o in ["cluster_size=64k", "cluster_size=4k"] {
            try Self.expectSame(["measure", "-O", "qcow2", "--output=json", "-o", o], [bm])
        }
        // A bitmap directory past the end of the file: one line naming the file and the field.
        let bad = dir.appendingPathComponent("bad-bitmaps.qcow2")
        var b = try Data(contentsOf: URL(fileURLWithPath: bm))
        let ext = b.range(of: Data([0x23, 0x85, 0x28, 0x75]), in: 0..<4096)?.lowerBound ?? 0
        #expect(ext > 0)
        b.replaceSubrange((ext + 24)..<(ext + 32), with: [UInt8](repeating: 0xFF, count: 7) + [0])
        try b.write(to: bad)
        let r = try Harness.qcowpress(["measure", bad.path])
        #expect(r.status == 1 && r.stderr.contains(bad.path) && r.stderr.contains("bitmaps extension")
                && r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
        // The size qemu refuses (L1 table over 32 MiB) is refused too.
        let big = try Harness.qcowpress(["measure", "--size", "1024T", "-o", "cluster_size=512"])
        #expect(big.status == 1 && big.stderr.contains("too large"), "\(big.stderr)")
    }

    /// measure -c on a small real file system (ext4 with perl's libraries and modules): the real
    /// `convert -c` size lies within the stated error of the estimate, for zlib and zstd.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/sbin/mkfs.ext4")
                   && FileManager.default.fileExists(atPath: "/usr/lib/x86_64-linux-gnu/perl"), "mkfs.ext4 and perl's files make the image"))
    func compressedEstimate() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("fs.raw").path
        _ = FileManager.default.createFile(atPath: raw, contents: nil)
        try FileHandle(forWritingTo: URL(fileURLWithPath: raw)).truncate(atOffset: 96 << 20)
        let mk = try Harness.run("/usr/sbin/mkfs.ext4", ["-q", "-F", "-d", "/usr/lib/x86_64-linux-gnu/perl", raw])
        #expect(mk.status == 0, "\(mk.stderr)")
        for type in ["zlib", "zstd"] {
            let m = try Harness.qcowpress(["measure", "-c", "-o", "compression_type=\(type)", "--output", "json", raw])
            #expect(m.status == 0, "\(m.stderr)")
            let j = try JSONSerialization.jsonObject(with: Data(m.stdout.utf8)) as? [String: Any] ?? [:]
            let estimate = (j["compressed"] as? NSNumber)?.doubleValue ?? 0
            let error = (j["compressed-error"] as? NSNumber)?.doubleValue ?? 0
            let out = dir.appendingPathComponent("c-\(type).qcow2").path
            let c = try Harness.qcowpress(["convert", "-c", "-o", "compression_type=\(type)", raw, out])
            #expect(c.status == 0, "\(c.stderr)")
            let real = Double((try FileManager.default.attributesOfItem(atPath: out)[.size] as? NSNumber)?.intValue ?? 0)
            #expect(error > 0 && error <= 0.05, "\(type): stated error \(error)")
            #expect(abs(estimate - real) <= error * real, "\(type): estimate \(estimate), real \(real), stated error \(error)")
        }
    }
}

extension CompareMapMeasureTests {
    /// The manual (generated from the help) and the shell completions know the new commands.
    @Test func helpAndCompletionsNameTheCommands() throws {
        let help = try Harness.qcowpress(["--help"])
        for c in ["compare", "map", "measure"] { #expect(help.stdout.contains(c), "--help lacks \(c)") }
        for shell in ["bash", "zsh", "fish"] {
            let s = try Harness.qcowpress(["--generate-completion-script", shell])
            for c in ["compare", "map", "measure", "force-share", "size"] {
                #expect(s.stdout.contains(c), "\(shell) completion lacks \(c)")
            }
        }
        let m = try Harness.qcowpress(["measure", "--help"])
        #expect(m.stdout.contains("compressed-error") && m.stdout.contains("cluster_size"))
    }
}

/// compare, map and measure take qemu-img's read lock: a disk QEMU has open read-write is refused
/// as qemu-img refuses it (compare with its exit status 2), and read with -U.
@Suite(.tags(.e2e, .faults), .enabled(if: Harness.haveQemuImg && FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-storage-daemon"),
                                       "needs qemu-utils and qemu-system-common"))
struct CompareMapMeasureLockTests {
    @Test func diskInUseIsRefusedAsQemuImgRefusesIt() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let disk = dir.appendingPathComponent("vm.qcow2").path
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.noise(1 << 20, seed: 5).write(to: src)
        #expect(try Harness.qemuImg(["convert", "-O", "qcow2", src.path, disk]).status == 0)
        let vm = try ImageLockTests.QEMUHolding(disk, format: "qcow2", in: dir)
        defer { vm.stop() }
        for cmd in [["map", "--output=json", disk], ["measure", "-O", "qcow2", disk], ["compare", disk, src.path]] {
            let q = try Harness.qemuImg(cmd)
            let r = try Harness.qcowpress(cmd)
            let lock = ImageLockTests.refusal(q)
            #expect(lock != nil, "qemu-img \(cmd) was not refused: \(q.stderr)")
            #expect(ImageLockTests.refusal(r) == lock, "\(cmd): \(r.stderr)")
            #expect(r.status == (cmd[0] == "compare" ? 2 : 1) && r.stderr.split(separator: "\n").count == 1, "\(cmd): \(r.status) \(r.stderr)")
            let shared = try Harness.qcowpress([cmd[0], "-U"] + cmd.dropFirst())
            let theirs = try Harness.qemuImg([cmd[0], "-U"] + cmd.dropFirst())
            #expect(shared.status == 0 && shared.stdout == theirs.stdout, "\(cmd) -U: \(shared.stderr)\n\(shared.stdout)\n\(theirs.stdout)")
        }
    }
}
