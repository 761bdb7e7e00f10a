import Foundation
import Testing

/// A loop device over a file in a test directory, detached by `detach()` (call it in a defer).
/// The binary is pointed at a private device node in the test directory (same major/minor as
/// /dev/loopN), never at /dev/loopN itself: a regression that replaced the destination by a file
/// would otherwise replace a node of the whole machine's /dev.
struct LoopDevice {
    /// The private block device node the tests write through.
    let path: String
    /// /dev/loopN, for losetup only.
    let loop: String
    let backing: String

    /// True when this machine can attach loop devices (root, loop module): the block-device tests
    /// are skipped, visibly, otherwise.
    static let available: Bool = {
        guard FileManager.default.isExecutableFile(atPath: "/sbin/losetup") else { return false }
        guard let dir = try? Harness.tempDir() else { return false }
        defer { try? FileManager.default.removeItem(at: dir) }
        guard let dev = try? LoopDevice(in: dir, contents: Data(count: 1 << 20)) else { return false }
        dev.detach()
        return true
    }()

    /// Attaches a device holding `contents` (its size is the device's size).
    init(in dir: URL, contents: Data) throws {
        backing = dir.appendingPathComponent("loop-backing-\(UUID().uuidString).img").path
        try contents.write(to: URL(fileURLWithPath: backing))
        let r = try Harness.run("/sbin/losetup", ["-f", "--show", backing])
        guard r.status == 0, r.stdout.hasPrefix("/dev/") else { throw FixtureError(message: "losetup: \(r.stderr)") }
        loop = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        path = dir.appendingPathComponent("disk-\(UUID().uuidString.prefix(8))").path
        let numbers = try Harness.run("/usr/bin/stat", ["-c", "%t %T", loop]).stdout.split(separator: " ")
        guard numbers.count == 2, let major = Int(numbers[0], radix: 16),
              let minor = Int(numbers[1].trimmingCharacters(in: .whitespacesAndNewlines), radix: 16),
              try Harness.run("/bin/mknod", [path, "b", String(major), String(minor)]).status == 0 else {
            _ = try? Harness.run("/sbin/losetup", ["-d", loop])
            throw FixtureError(message: "cannot make a device node for \(loop)")
        }
    }

    func detach() {
        _ = try? Harness.run("/sbin/losetup", ["-d", loop])
    }

    /// The first `n` bytes of the device (through the page cache, after our O_DIRECT writes: the
    /// loop driver keeps them coherent for a reader that opens it afresh).
    func head(_ n: Int) throws -> Data {
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? h.close() }
        return try h.read(upToCount: n) ?? Data()
    }

    var isBlockDevice: Bool {
        (try? FileManager.default.attributesOfItem(atPath: path)[.type] as? FileAttributeType) == .typeBlockSpecial
    }
}

/// The data-safety promises of CLI.md, through the real binary: block devices written in place,
/// character devices refused, symlinks written through, --force never destroying an input, the
/// no-replace rename at the end, every stop signal cleaning up, leftovers named, and restores that
/// refuse colliding names and leave nothing after a failure.
@Suite(.tags(.e2e, .faults), .enabled(if: Harness.haveQemuImg, "qemu-img is the oracle"))
struct DataSafetyTests {
    static func lines(_ s: String) -> Int { s.split(separator: "\n").count }

    // MARK: block and character devices

    @Test(.enabled(if: LoopDevice.available, "needs losetup (root and the loop module)"))
    func rawOntoABlockDevice() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        // Holes and zero blocks over a device full of noise: zeros must really be written.
        try SourceImage.mixed(at: src, blocks: 32, block: 512 << 10, tail: 0)
        let size = try FileManager.default.attributesOfItem(atPath: src.path)[.size] as! Int
        let noise = SourceImage.noise(size, seed: 77)
        let dev = try LoopDevice(in: dir, contents: noise)
        defer { dev.detach() }

        let refused = try Harness.qcowpress(["convert", "-O", "raw", src.path, dev.path])
        #expect(refused.status == 1 && Self.lines(refused.stderr) == 1 && refused.stderr.contains(dev.path), "\(refused.stderr)")
        #expect(refused.stderr.contains("--force"), "\(refused.stderr)")
        #expect(try dev.head(1 << 20) == noise.prefix(1 << 20), "refused: the device is untouched")

        let r = try Harness.qcowpress(["convert", "-O", "raw", "--force", src.path, dev.path])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(dev.isBlockDevice, "the device node is still a block device, not a file")
        let cmp = try Harness.qemuImg(["compare", "-f", "raw", "-F", "raw", src.path, dev.path])
        #expect(cmp.status == 0, "\(cmp.stdout) \(cmp.stderr)")
        #expect(try Harness.strayFiles(in: dir, except: ["src.raw", URL(fileURLWithPath: dev.backing).lastPathComponent,
                                                         URL(fileURLWithPath: dev.path).lastPathComponent]).isEmpty)

        // A source larger than the device: refused before anything is written.
        let big = dir.appendingPathComponent("big.raw")
        FileManager.default.createFile(atPath: big.path, contents: nil)
        try FileHandle(forWritingTo: big).truncate(atOffset: UInt64(size + (1 << 20)))
        let tooBig = try Harness.qcowpress(["convert", "-O", "raw", "--force", big.path, dev.path])
        #expect(tooBig.status == 1 && tooBig.stderr.contains("smaller") && tooBig.stderr.contains(dev.path), "\(tooBig.stderr)")
        let still = try Harness.qemuImg(["compare", "-f", "raw", "-F", "raw", src.path, dev.path])
        #expect(still.status == 0, "a refused conversion changed the device")
    }

    @Test(.enabled(if: LoopDevice.available, "needs losetup (root and the loop module)"))
    func qcow2OntoABlockDevice() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 24, block: 512 << 10)
        // An old qcow2 on the device first: its header must not survive a failed run.
        let old = dir.appendingPathComponent("old.qcow2").path
        #expect(try Harness.qcowpress(["convert", src.path, old]).status == 0)
        var contents = try Data(contentsOf: URL(fileURLWithPath: old))
        contents += SourceImage.noise((32 << 20) - contents.count, seed: 5)
        let dev = try LoopDevice(in: dir, contents: contents)
        defer { dev.detach() }

        for codec in [["-c"], []] {
            let r = try Harness.qcowpress(["convert", "--force"] + codec + [src.path, dev.path])
            #expect(r.status == 0, "\(codec): \(r.stderr)")
            #expect(dev.isBlockDevice)
            let check = try Harness.qemuImg(["check", "-f", "qcow2", dev.path])
            #expect(check.status == 0, "\(codec): \(check.stdout) \(check.stderr)")
            let cmp = try Harness.qemuImg(["compare", "-f", "raw", "-F", "qcow2", src.path, dev.path])
            #expect(cmp.status == 0, "\(codec): \(cmp.stdout) \(cmp.stderr)")
        }

        // A write failure mid-way: exit 1, and the device holds no qcow2 header (zeroed first,
        // written last), so nothing reads it as an image.
        let failed = try Harness.qcowpress(["convert", "--force", "-c", src.path, dev.path], env: ["QCOWPRESS_FAULT": "write:4:EIO"])
        #expect(failed.status == 1 && Self.lines(failed.stderr) == 1 && failed.stderr.contains(dev.path), "\(failed.stderr)")
        #expect(try dev.head(4) == Data(count: 4), "an unfinished device must not start with a header")
        let info = try Harness.qemuImg(["info", "-f", "qcow2", dev.path])
        #expect(info.status != 0, "qemu-img opened an unfinished image: \(info.stdout)")
    }

    /// /dev/null as the destination — through a private node of the same device (1, 3) in the test
    /// directory, so a regression cannot replace the machine's /dev/null.
    @Test(.enabled(if: getuid() == 0, "mknod needs root"))
    func characterDeviceIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 4)
        let null = dir.appendingPathComponent("null").path
        #expect(try Harness.run("/bin/mknod", ["-m", "666", null, "c", "1", "3"]).status == 0)
        for args in [["-O", "raw"], ["-O", "qcow2"], ["-c"]] {
            let r = try Harness.qcowpress(["convert", "--force"] + args + [src.path, null])
            #expect(r.status == 1 && Self.lines(r.stderr) == 1, "\(args): \(r.status) \(r.stderr)")
            #expect(r.stderr.contains(null) && r.stderr.contains("character device"), "\(r.stderr)")
            let type = try FileManager.default.attributesOfItem(atPath: null)[.type] as? FileAttributeType
            #expect(type == .typeCharacterSpecial, "the null device node was replaced")
            #expect(try Harness.strayFiles(in: dir, except: ["src.raw", "null"]).isEmpty)
        }
    }

    // MARK: symbolic links

    @Test func symlinkIsWrittenThrough() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 6)
        let sub = dir.appendingPathComponent("images")
        try FileManager.default.createDirectory(at: sub, withIntermediateDirectories: true)
        let target = sub.appendingPathComponent("vm.qcow2").path
        try Data("old".utf8).write(to: URL(fileURLWithPath: target))
        let link = dir.appendingPathComponent("link.qcow2").path
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "images/vm.qcow2")

        let refused = try Harness.qcowpress(["convert", src.path, link])
        #expect(refused.status == 1 && refused.stderr.contains("already exists"), "\(refused.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: target)) == Data("old".utf8))

        for args in [["-c"], ["-O", "raw"]] {
            let r = try Harness.qcowpress(["convert", "--force"] + args + [src.path, link])
            #expect(r.status == 0, "\(args): \(r.stderr)")
            #expect(try FileManager.default.destinationOfSymbolicLink(atPath: link) == "images/vm.qcow2", "the link is kept")
            if args == ["-c"] {
                try Harness.expectGood(target, equals: src.path)
            } else {
                #expect(try Harness.qemuImg(["compare", "-f", "raw", "-F", "raw", src.path, target]).status == 0)
            }
            #expect(try Harness.strayFiles(in: sub, except: ["vm.qcow2"]).isEmpty)
        }

        // A dangling link is refused and nothing is created.
        let dangling = dir.appendingPathComponent("dangling.qcow2").path
        try FileManager.default.createSymbolicLink(atPath: dangling, withDestinationPath: "images/missing.qcow2")
        let d = try Harness.qcowpress(["convert", "--force", src.path, dangling])
        #expect(d.status == 1 && Self.lines(d.stderr) == 1 && d.stderr.contains("dangling.qcow2"), "\(d.stderr)")
        #expect(!FileManager.default.fileExists(atPath: sub.appendingPathComponent("missing.qcow2").path))

        // A link to the source is the source.
        let toSource = dir.appendingPathComponent("to-src.raw").path
        try FileManager.default.createSymbolicLink(atPath: toSource, withDestinationPath: src.path)
        let s = try Harness.qcowpress(["convert", "--force", "-O", "raw", src.path, toSource])
        #expect(s.status == 1 && s.stderr.contains("the source"), "\(s.stderr)")
    }

    // MARK: --force never overwrites an input

    @Test func forceNeverOverwritesAnInput() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        func path(_ n: String) -> String { dir.appendingPathComponent(n).path }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 6)
        #expect(try Harness.qcowpress(["convert", src.path, path("b.qcow2")]).status == 0)
        #expect(try Harness.qemuImg(["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", path("top.qcow2")]).status == 0)
        try FileManager.default.linkItem(atPath: path("b.qcow2"), toPath: path("hardlink-b.qcow2"))
        try FileManager.default.linkItem(atPath: src.path, toPath: path("hardlink-src.raw"))
        let before = try [path("b.qcow2"), path("top.qcow2"), src.path].map { try Data(contentsOf: URL(fileURLWithPath: $0)) }

        let cases: [(args: [String], expect: String)] = [
            (["convert", "--force", "-B", "b.qcow2", src.path, path("b.qcow2")], "backing file"),
            (["convert", "--force", "-B", "b.qcow2", src.path, path("hardlink-b.qcow2")], "backing file"),
            (["convert", "--force", src.path, src.path], "the source"),
            (["convert", "--force", src.path, path("hardlink-src.raw")], "the source"),
            (["convert", "--force", "-O", "raw", src.path, path("hardlink-src.raw")], "the source"),
            (["convert", "--force", path("top.qcow2"), path("b.qcow2")], "a backing file of the source"),
            (["convert", "--force", "--no-backing", path("top.qcow2"), path("hardlink-b.qcow2")], "a backing file of the source"),
            (["convert", "--force", "-O", "raw", path("top.qcow2"), path("top.qcow2")], "the source"),
            (["export", "--force", "-b", path("b.qcow2"), src.path, path("hardlink-b.qcow2")], "base"),
            (["export", "--force", path("top.qcow2"), path("b.qcow2")], "a backing file of the source"),
        ]
        for c in cases {
            let r = try Harness.qcowpress(c.args)
            #expect(r.status == 1 && Self.lines(r.stderr) == 1, "\(c.args): \(r.status) \(r.stderr)")
            #expect(r.stderr.contains(c.expect) && r.stderr.contains("refusing"), "\(c.args): \(r.stderr)")
        }
        let after = try [path("b.qcow2"), path("top.qcow2"), src.path].map { try Data(contentsOf: URL(fileURLWithPath: $0)) }
        #expect(before == after, "an input changed")
        #expect(try Harness.qemuImg(["check", path("top.qcow2")]).status == 0)
        #expect(try Harness.strayFiles(in: dir, except: ["src.raw", "b.qcow2", "top.qcow2", "hardlink-b.qcow2", "hardlink-src.raw"]).isEmpty)
        // Still allowed: --force over an unrelated existing file.
        try Data("x".utf8).write(to: URL(fileURLWithPath: path("other.qcow2")))
        let ok = try Harness.qcowpress(["convert", "--force", "-B", "b.qcow2", src.path, path("other.qcow2")])
        #expect(ok.status == 0, "\(ok.stderr)")
    }

    // MARK: the no-replace rename

    /// Runs a conversion, creates DST once its temporary file exists, and returns the result.
    static func destinationAppears(args: [String], dir: URL, dst: String, keep: Set<String>, env: [String: String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Harness.binary)
        p.arguments = args
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        p.environment = e
        let err = Pipe()
        p.standardError = err
        try p.run()
        let sawTemp = try Wait.until(watching: [dir.path], orExitOf: p.processIdentifier) {
            try Harness.strayFiles(in: dir, except: keep).contains(where: { $0.hasSuffix(".tmp") })
        }
        try Data("appeared during the run\n".utf8).write(to: URL(fileURLWithPath: dst))
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(sawTemp, "the conversion never showed its temporary file")
        return (p.terminationStatus, stderr)
    }

    @Test(arguments: [["convert"], ["convert", "-O", "raw"], ["convert", "--io", "pwrite"]])
    func destinationThatAppearsMidRunIsNotReplaced(args: [String]) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        FileManager.default.createFile(atPath: src.path, contents: SourceImage.noise(4 << 20, seed: 8))
        let dst = dir.appendingPathComponent("dst.img").path
        // Every write is slow, so the run is still writing when the destination appears (at once:
        // the test waits for the temporary file and then creates it).
        let (status, stderr) = try Self.destinationAppears(args: args + [src.path, dst], dir: dir, dst: dst, keep: ["src.raw", "dst.img"],
                                                           env: ["QCOWPRESS_FAULT": "write:1:delay100:sticky"])
        #expect(status == 1 && Self.lines(stderr) == 1, "\(status) \(stderr)")
        #expect(stderr.contains("dst.img") && stderr.contains("already exists"), "\(stderr)")
        #expect(try String(contentsOfFile: dst, encoding: .utf8) == "appeared during the run\n")
        #expect(try Harness.strayFiles(in: dir, except: ["src.raw", "dst.img"]).isEmpty, "the temporary file was not removed")
    }

    /// Where renameat2 is refused (EINVAL, forced through the seam) link + unlink keeps the promise.
    @Test func linkFallbackNeverReplacesEither() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 8)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        let ok = try Harness.qcowpress(["convert", src.path, dst], env: ["QCOWPRESS_FAULT": "rename:1:EINVAL"])
        #expect(ok.status == 0, "\(ok.stderr)")
        try Harness.expectGood(dst, equals: src.path)
        #expect(try Harness.strayFiles(in: dir, except: ["src.raw", "dst.qcow2"]).isEmpty)
        // The same fallback when the destination appears: slow compression (text, level 9, one
        // thread) keeps the run going while the test creates it.
        let slow = dir.appendingPathComponent("slow.raw")
        FileManager.default.createFile(atPath: slow.path, contents: SourceImage.text(24 << 20, seed: 9))
        let late = dir.appendingPathComponent("late.qcow2").path
        let (status, stderr) = try Self.destinationAppears(
            args: ["convert", "-c", "-o", "compression_level=9", "--threads", "1", slow.path, late], dir: dir, dst: late,
            keep: ["src.raw", "dst.qcow2", "slow.raw", "late.qcow2"], env: ["QCOWPRESS_FAULT": "rename:1:EINVAL"])
        #expect(status == 1 && stderr.contains("already exists"), "\(status) \(stderr)")
        #expect(try String(contentsOfFile: late, encoding: .utf8) == "appeared during the run\n")
        #expect(try Harness.strayFiles(in: dir, except: ["src.raw", "dst.qcow2", "slow.raw", "late.qcow2"]).isEmpty)
    }

    // MARK: signals and leftovers

    @Test(arguments: [SIGHUP, SIGQUIT])
    func hangupAndQuitRemoveTemporaryOutput(signal: Int32) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        FileManager.default.createFile(atPath: src.path, contents: SourceImage.noise(16 << 20, seed: 4))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Harness.binary)
        p.arguments = ["convert", src.path, dir.appendingPathComponent("dst.qcow2").path]
        var env = ProcessInfo.processInfo.environment
        env["QCOWPRESS_FAULT"] = "write:1:delay100:sticky"
        p.environment = env
        try p.run()
        let sawTemp = try Wait.until(watching: [dir.path], orExitOf: p.processIdentifier) {
            !(try Harness.strayFiles(in: dir, except: ["src.raw"])).isEmpty
        }
        #expect(sawTemp)
        kill(p.processIdentifier, signal)
        p.waitUntilExit()
        #expect(p.terminationReason == .exit && p.terminationStatus == 128 + signal, "status \(p.terminationStatus)")
        #expect(try Harness.strayFiles(in: dir, except: ["src.raw"]).isEmpty, "a temporary file was left")
    }

    @Test func leftoverTemporaryFilesAreNamed() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 4)
        // pid_max is at most 2^22 on Linux: this process cannot exist. The second is this test's
        // own (live) process: not a leftover.
        let dead = ".vm.qcow2.qcowpress-99999999-123.tmp"
        let live = ".vm.qcow2.qcowpress-\(getpid())-456.tmp"
        let unrelated = ".vm.qcow2.tmp"
        for n in [dead, live, unrelated] { FileManager.default.createFile(atPath: dir.appendingPathComponent(n).path, contents: Data("x".utf8)) }
        let r = try Harness.qcowpress(["convert", src.path, dir.appendingPathComponent("dst.qcow2").path])
        #expect(r.status == 0, "\(r.stderr)")
        let warnings = r.stderr.split(separator: "\n").filter { $0.contains("warning") }
        #expect(warnings.count == 1 && warnings[0].contains(dead), "\(r.stderr)")
        #expect(!r.stderr.contains(live) && !r.stderr.contains(unrelated))
        for n in [dead, live, unrelated] { #expect(FileManager.default.fileExists(atPath: dir.appendingPathComponent(n).path), "\(n) was removed") }
        // restore writes into a directory: the same warning.
        let out = dir.appendingPathComponent("out")
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: out.appendingPathComponent(dead).path, contents: nil)
        let v = try Harness.qcowpress(["restore", "vma", "/nonexistent.vma", out.path])
        #expect(v.stderr.contains("warning") && v.stderr.contains(dead), "\(v.stderr)")
    }
}
