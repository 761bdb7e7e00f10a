import Foundation
import Glibc
import Testing

/// QEMU's image locks, judged by QEMU itself: qemu-storage-daemon holding a disk open read-write
/// (as a running VM does) makes QcowPress refuse to replace it or read it (unless -U), with
/// qemu-img's words; a disk QcowPress reads or writes makes qemu-img refuse as it would against
/// another qemu-img; two QcowPress runs writing one destination: the second is refused at its
/// start. Runs are held mid-way by what waits for a client (`serve image`, an NBD sink), not by
/// sleeps.
@Suite(.tags(.e2e, .faults), .enabled(if: Harness.haveQemuImg && FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-storage-daemon"),
                                       "needs qemu-utils and qemu-system-common"))
struct ImageLockTests {

    /// qemu-storage-daemon with `image` open read-write (`format` over `protocol`: file or
    /// host_device) and exported writable over NBD, as a VM holds its disk. Killed with SIGKILL
    /// (it may inherit a mask in which SIGTERM is blocked).
    final class QEMUHolding {
        let process = Process()
        init(_ image: String, format: String, protocol proto: String = "file", in dir: URL) throws {
            let sock = dir.appendingPathComponent("qsd-\(UInt32.random(in: 0...UInt32.max)).sock").path
            process.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-storage-daemon")
            process.arguments = ["--blockdev", "driver=\(proto),filename=\(image),node-name=f",
                                 "--blockdev", "driver=\(format),file=f,node-name=q",
                                 "--nbd-server", "addr.type=unix,addr.path=\(sock)",
                                 "--export", "type=nbd,id=e,node-name=q,writable=on"]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            // It listens (and so holds the image) once its socket is there.
            let up = Wait.until(watching: [dir.path], orExitOf: process.processIdentifier, timeout: 30) {
                FileManager.default.fileExists(atPath: sock)
            }
            #expect(up && process.isRunning, "qemu-storage-daemon did not start")
        }
        func stop() {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    /// A qcowpress run that waits for a client (a server, an NBD sink): started, and held once its
    /// first stdout line (a URL) is out; stopped with SIGTERM.
    final class Held {
        let process = Process()
        let stderrPath: URL
        let firstLine: String
        init(_ args: [String], in dir: URL) throws {
            process.executableURL = URL(fileURLWithPath: Harness.binary)
            process.arguments = args
            let out = Pipe()
            process.standardOutput = out
            stderrPath = dir.appendingPathComponent("held-\(UInt32.random(in: 0...UInt32.max)).err")
            _ = FileManager.default.createFile(atPath: stderrPath.path, contents: nil)
            process.standardError = try FileHandle(forWritingTo: stderrPath)
            try process.run()
            var text = ""
            while !text.contains("\n") {
                let d = out.fileHandleForReading.availableData
                if d.isEmpty { break }
                text += String(decoding: d, as: UTF8.self)
            }
            firstLine = text
        }
        var stderr: String { (try? String(contentsOf: stderrPath, encoding: .utf8)) ?? "" }
        @discardableResult
        func stop(_ signal: Int32 = SIGTERM) -> Int32 {
            kill(process.processIdentifier, signal)
            process.waitUntilExit()
            try? FileManager.default.removeItem(at: stderrPath)
            return process.terminationStatus
        }
    }

    /// One line, exit 1, qemu-img's words for the lock and its question naming `path`.
    static func expectRefused(_ r: Harness.Output, _ lock: String, _ path: String, _ what: String,
                              sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status == 1, "\(what): \(r.status) \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains("Failed to get \(lock) lock") && r.stderr.contains("Is another process using the image [\(path)]?"),
                "\(what): \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr.split(separator: "\n").count == 1, "\(what): not one line: \(r.stderr)", sourceLocation: sourceLocation)
    }

    static func inode(_ path: String) -> UInt64? {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_ino) : nil
    }

    static func files(_ dir: URL) -> Set<String> {
        Set((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? [])
    }

    /// The lock qemu-img's or qcowpress's refusal names (`shared "write"`), nil when not refused.
    static func refusal(_ r: Harness.Output) -> String? {
        guard r.status != 0, let a = r.stderr.range(of: "Failed to get "),
              let b = r.stderr.range(of: " lock", range: a.upperBound..<r.stderr.endIndex) else { return nil }
        return String(r.stderr[a.upperBound..<b.lowerBound])
    }

    /// Runs qcowpress `ours` and qemu-img `theirs` against the same held image: both refused with
    /// the same lock named (ours as one line naming `path`, exit 1), or neither refused. Returns
    /// the lock named.
    @discardableResult
    static func expectAsQemuImg(_ ours: [String], _ theirs: [String], _ path: String,
                                sourceLocation: SourceLocation = #_sourceLocation) throws -> String? {
        let q = try Harness.qemuImg(theirs)
        let r = try Harness.qcowpress(ours)
        let what = ours.joined(separator: " ")
        let lock = refusal(q)
        #expect(refusal(r) == lock, "\(what): qemu-img: \(q.stderr) qcowpress: \(r.stderr)", sourceLocation: sourceLocation)
        if let lock { expectRefused(r, lock, path, what, sourceLocation: sourceLocation) }
        return lock
    }

    /// A disk QEMU has open read-write (qcow2 or raw, qemu-storage-daemon exporting it writable)
    /// is replaced (`--force`) or read by convert, export, info and check exactly when qemu-img
    /// would: refused with qemu-img's words (the qcow2 driver shares no writes; the raw export
    /// shares writes but not resizing, and qemu-img info and check of a raw image lock nothing a
    /// writer minds), nothing changed or left behind; serve image refused as convert is; with -U
    /// every reader reads it, and serve image -U says the data may change underneath.
    @Test(arguments: ["qcow2", "raw"])
    func diskInUseByQEMUIsRefusedAsQemuImgRefusesIt(format: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let disk = dir.appendingPathComponent("vm.\(format)").path
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.noise(1 << 20, seed: 3).write(to: src)
        #expect(try Harness.qemuImg(["convert", "-O", format, src.path, disk]).status == 0)
        let before = try Data(contentsOf: URL(fileURLWithPath: disk))
        let vm = try QEMUHolding(disk, format: format, in: dir)
        defer { vm.stop() }
        let present = Self.files(dir)

        // Writers: never replace it.
        let wanted = format == "qcow2" ? "\"write\"" : "\"resize\""
        #expect(try Self.expectAsQemuImg(["convert", "--force", src.path, disk], ["convert", "-O", format, src.path, disk], disk) == wanted)
        try Self.expectAsQemuImg(["convert", "--force", "-O", "raw", src.path, disk], ["convert", "-O", "raw", src.path, disk], disk)
        try Self.expectAsQemuImg(["export", "--force", src.path, disk], ["convert", "-O", "qcow2", src.path, disk], disk)
        #expect(try Data(contentsOf: URL(fileURLWithPath: disk)) == before, "the disk changed")
        #expect(Self.files(dir) == present, "left behind: \(Self.files(dir).subtracting(present))")

        // Readers: as qemu-img without -U.
        let out = dir.appendingPathComponent("copy.qcow2").path
        let theirs = dir.appendingPathComponent("theirs.qcow2").path
        let readers: [([String], [String])] = [(["convert", disk, out], ["convert", "-O", "qcow2", disk, theirs]),
                                               (["export", "--force", disk, out], ["convert", "-O", "qcow2", disk, theirs]),
                                               (["info", disk], ["info", disk]),
                                               (["info", "--output", "json", disk], ["info", "--output", "json", disk]),
                                               (["check", disk], ["check", disk])]
        for (ours, q) in readers {
            try? FileManager.default.removeItem(atPath: theirs)
            let lock = try Self.expectAsQemuImg(ours, q, disk)
            // qemu-img info and check of a raw image lock nothing a writer minds; the rest is refused.
            let readsData = ours[0] == "convert" || ours[0] == "export"
            #expect(lock == (format == "qcow2" || readsData ? "shared \"write\"" : nil), "\(ours)")
        }
        try? FileManager.default.removeItem(atPath: out)
        try? FileManager.default.removeItem(atPath: theirs)
        let sock = dir.appendingPathComponent("serve.sock").path
        // Under timeout: a binary that serves instead of refusing ends (and the test fails) instead of hanging.
        let serve = try Harness.run("/usr/bin/timeout", ["-s", "KILL", "20", Harness.binary, "serve", "image", "--socket", sock, disk])
        Self.expectRefused(serve, "shared \"write\"", disk, "serve image")
        try? FileManager.default.removeItem(atPath: sock)
        #expect(Self.files(dir) == present, "left behind: \(Self.files(dir).subtracting(present))")

        // -U: read anyway.
        for args in [["convert", "-U", disk, out], ["export", "-U", "--force", disk, out], ["info", "-U", disk]]
            + (format == "qcow2" ? [["check", "-U", disk]] : []) {
            let r = try Harness.qcowpress(args)
            #expect(r.status == 0, "\(args.joined(separator: " ")): \(r.stderr)")
        }
        #expect(try Harness.qemuImg(["compare", "-U", "-f", "raw", "-F", "qcow2", src.path, out]).status == 0)
        let served = try Held(["serve", "image", "-U", "--socket", sock, disk], in: dir)
        let warning = served.stderr
        served.stop()
        #expect(served.firstLine.hasPrefix("nbd+unix://"), "\(served.firstLine) \(warning)")
        #expect(warning.contains("qcowpress: warning: \(disk):") && warning.contains("may change underneath")
                && warning.split(separator: "\n").count == 1, "\(warning)")
    }

    /// QEMU refuses what QcowPress holds, as it would against another qemu-img: an image QcowPress
    /// serves (a reader) is not written by qemu-img, but read; a destination QcowPress writes is
    /// not even read by qemu-img info, and a second QcowPress writer is refused at its start. When
    /// the run ends the destination is as it was and nothing is left beside it.
    @Test func qemuRefusesWhatQcowpressHolds() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.noise(1 << 20, seed: 4).write(to: src)
        let disk = dir.appendingPathComponent("disk.qcow2").path
        #expect(try Harness.qemuImg(["convert", "-O", "qcow2", src.path, disk]).status == 0)
        let present = Self.files(dir)

        // A reader (serve image, no -U): QEMU may read it, not write it.
        let served = try Held(["serve", "image", "--socket", dir.appendingPathComponent("s.sock").path, disk], in: dir)
        #expect(served.firstLine.hasPrefix("nbd+unix://"), "\(served.firstLine) \(served.stderr)")
        let w = try Harness.qemuImg(["convert", "-O", "qcow2", src.path, disk])
        #expect(w.status == 1 && w.stderr.contains("Failed to get \"write\" lock"), "qemu-img wrote an image being read: \(w.stderr)")
        #expect(try Harness.qemuImg(["info", disk]).status == 0, "qemu-img info refused beside a reader")
        #expect(served.stop() == 0)

        // A writer (an NBD sink replacing disk.qcow2 with --force): qemu-img cannot even read it.
        let sink = try Held(["export", "--nbd-sink", dir.appendingPathComponent("sink.sock").path, "--size", "1M", "--force", disk], in: dir)
        #expect(sink.firstLine.hasPrefix("nbd+unix://"), "\(sink.firstLine) \(sink.stderr)")
        let inode = Self.inode(disk)
        let info = try Harness.qemuImg(["info", disk])
        #expect(info.status == 1 && info.stderr.contains("Failed to get shared \"write\" lock"), "qemu-img info read a disk being replaced: \(info.stderr)")
        Self.expectRefused(try Harness.qcowpress(["convert", "--force", src.path, disk]), "\"write\"", disk, "second writer")
        #expect(sink.stop() != 0)
        #expect(Self.inode(disk) == inode)
        #expect(try Harness.qemuImg(["compare", "-f", "raw", src.path, disk]).status == 0)
        #expect(Self.files(dir) == present, "left behind: \(Self.files(dir).subtracting(present))")
    }

    /// Two runs writing one new destination: the second is refused at its start (before any
    /// work, with or without --force), the first is not disturbed; once the first is gone —
    /// even killed, its lock file left behind — the destination is free again.
    @Test func secondWriterIsRefusedAtTheStart() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.noise(1 << 20, seed: 5).write(to: src)
        let dst = dir.appendingPathComponent("new.qcow2").path
        let present = Self.files(dir)

        let first = try Held(["export", "--nbd-sink", dir.appendingPathComponent("sink.sock").path, "--size", "1M", dst], in: dir)
        #expect(first.firstLine.hasPrefix("nbd+unix://"), "\(first.firstLine) \(first.stderr)")
        for args in [["convert", src.path, dst], ["convert", "--force", "-O", "raw", src.path, dst], ["export", src.path, dst]] {
            Self.expectRefused(try Harness.qcowpress(args), "\"write\"", dst, args.joined(separator: " "))
        }
        #expect(!FileManager.default.fileExists(atPath: dst))
        first.stop(SIGKILL)
        // A killed run leaves its temporary file and lock file; neither stops the next run.
        let r = try Harness.qcowpress(["convert", src.path, dst])
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(dst, equals: src.path)
        // What the killed run left: its temporary file and socket (named, never removed); its lock
        // file went with the next run.
        let left = Self.files(dir).subtracting(present).subtracting(["new.qcow2", "sink.sock"])
        #expect(left.count == 1 && left.allSatisfy { $0.hasSuffix(".tmp") }, "left behind: \(left)")
    }

    /// A failing lock call is one line naming the image, and nothing is written.
    @Test func lockFaultIsOneLine() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.noise(1 << 20, seed: 6).write(to: src)
        let dst = dir.appendingPathComponent("o.qcow2").path
        for n in 1...3 {
            let r = try Harness.qcowpress(["convert", src.path, dst], env: ["QCOWPRESS_FAULT": "lock:\(n):EIO"])
            #expect(r.status == 1 && r.stderr.contains("Input/output error") && r.stderr.split(separator: "\n").count == 1, "lock:\(n): \(r.stderr)")
            #expect(Self.files(dir) == ["src.raw"], "lock:\(n): left behind: \(Self.files(dir))")
        }
    }

    /// The help (and so the manual, generated from it) says what the locks do and what -U does,
    /// on every command that reads images; nothing says QcowPress never locks.
    @Test func helpDescribesLocksAndForceShare() throws {
        let root = try Harness.qcowpress(["--help"]).stdout
        #expect(root.contains("IMAGE LOCKS") && root.contains("Failed to get \"write\" lock") && root.contains("-U/--force-share"), "\(root)")
        for c in [["convert"], ["export"], ["info"], ["check"], ["serve", "image"]] {
            let h = try Harness.qcowpress(c + ["--help"]).stdout
            #expect(h.contains("-U, --force-share") && h.contains("as qemu-img -U") && !h.contains("never locks"), "\(c): \(h)")
        }
    }

    /// Block devices are locked as QEMU locks them: a qcow2 on a loop device that QEMU has open
    /// read-write is neither written nor read, as qemu-img refuses it; while QcowPress reads it,
    /// qemu-img does not write it.
    @Test(.enabled(if: LoopDevice.available, "needs losetup (root and the loop module)"))
    func blockDeviceInUseIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let backing = dir.appendingPathComponent("dev.img")
        try Data(count: 4 << 20).write(to: backing)
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.noise(1 << 20, seed: 7).write(to: src)
        let attach = try Harness.run("/sbin/losetup", ["-f", "--show", backing.path])
        try #require(attach.status == 0, "losetup: \(attach.stderr)")
        let dev = attach.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? Harness.run("/sbin/losetup", ["-d", dev]) }
        #expect(try Harness.qcowpress(["convert", "--force", src.path, dev]).status == 0)
        let before = try Data(contentsOf: backing)
        do {
            let vm = try QEMUHolding(dev, format: "qcow2", protocol: "host_device", in: dir)
            defer { vm.stop() }
            #expect(try Self.expectAsQemuImg(["convert", "--force", "-O", "raw", src.path, dev], ["convert", "-n", "-O", "raw", src.path, dev], dev) == "\"write\"")
            #expect(try Self.expectAsQemuImg(["info", dev], ["info", dev], dev) == "shared \"write\"")
        }
        #expect(try Data(contentsOf: backing) == before, "the device was written")
        let served = try Held(["serve", "image", "--socket", dir.appendingPathComponent("s.sock").path, dev], in: dir)
        defer { served.stop() }
        let w = try Harness.qemuImg(["convert", "-n", "-O", "raw", src.path, dev])
        #expect(Self.refusal(w) == "\"write\"", "qemu-img wrote a device being read: \(w.stderr)")
    }
}
