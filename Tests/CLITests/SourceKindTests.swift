import Foundation
import QcowPress
import Testing

/// `check` memory is bounded by what the image references, not by its file size (issue 14).
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg && FileManager.default.isExecutableFile(atPath: "/usr/bin/time"), "qemu-img and /usr/bin/time"))
struct CheckMemoryTests {
    /// Maximum resident set size in KiB of one run, from /usr/bin/time.
    static func maxRSS(_ exe: String, _ args: [String]) throws -> (status: Int32, kib: Int) {
        let r = try Harness.run("/usr/bin/time", ["-f", "RSS=%M", exe] + args)
        let line = r.stderr.split(separator: "\n").last { $0.hasPrefix("RSS=") }
        return (r.status, Int(line?.dropFirst(4) ?? "") ?? Int.max)
    }

    @Test func truncatedToFourTiBCostsLessThanQemuImg() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let p = dir.appendingPathComponent("big.qcow2").path
        #expect(try Harness.qemuImg(["create", "-q", "-f", "qcow2", p, "1M"]).status == 0)
        #expect(truncate(p, 4 << 40) == 0)
        let theirs = try Self.maxRSS("/usr/bin/qemu-img", ["check", p])
        let ours = try Self.maxRSS(Harness.binary, ["check", p])
        #expect(theirs.status == 0 && ours.status == 0)
        #expect(ours.kib <= theirs.kib, "qcowpress check \(ours.kib) KiB, qemu-img check \(theirs.kib) KiB")
        #expect(ours.kib < 100 * 1024, "qcowpress check used \(ours.kib) KiB")
    }
}

/// Non-regular files where a source file is expected get one clear line, never a hang (issue 14).
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3"))
struct NonRegularSourceTests {
    @Test func fifoSourceIsRefusedAtOnce() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let fifo = dir.appendingPathComponent("src.fifo").path
        #expect(mkfifo(fifo, 0o600) == 0)
        for args in [["convert", "-O", "raw", fifo, dir.appendingPathComponent("o.raw").path], ["check", fifo], ["info", fifo]] {
            let r = try FidelityTests.run(Harness.binary, args, in: dir, seconds: 20)
            #expect(!r.timedOut && r.status == 1, "\(args[0]): \(r.stderr)")
            #expect(r.stderr.contains("is a FIFO, not a regular file"), "\(args[0]): \(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1, "\(args[0]): \(r.stderr)")
        }
    }

    @Test func fifoChunkIsRefusedAtOnce() throws {
        let f = try PBSFixture(.init(name: "fifo chunk", chunk: 1 << 20))
        defer { f.remove() }
        let chunks = URL(fileURLWithPath: f.datastore).appendingPathComponent(".chunks")
        let files = FileManager.default.enumerator(at: chunks, includingPropertiesForKeys: nil)?.allObjects
            .compactMap { $0 as? URL }.filter { $0.lastPathComponent.count == 64 } ?? []
        #expect(!files.isEmpty)
        for c in files {
            try FileManager.default.removeItem(at: c)
            #expect(mkfifo(c.path, 0o600) == 0)
        }
        let out = f.dir.appendingPathComponent("o.qcow2").path
        let r = try FidelityTests.run(Harness.binary, ["restore", "pbs"] + f.datastoreArgs + [PBSRestoreTests.snapshot, "drive-scsi0.img", out], in: f.dir, seconds: 60)
        #expect(!r.timedOut, "restore hung on a FIFO chunk")
        #expect(r.status == 1 && r.stderr.contains("chunk is a FIFO, not a regular file"), "\(r.stderr)")
        #expect(r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
    }

    /// PBS chunk opens and reads go through the syscall seam: injected faults reach them.
    @Test func pbsChunkFaultsAreInjected() throws {
        let f = try PBSFixture(.init(name: "faults", chunk: 1 << 20))
        defer { f.remove() }
        for fault in ["open:1:EIO", "stat:2:EIO", "read:3:EIO"] {
            let out = f.dir.appendingPathComponent("o.qcow2").path
            let r = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [PBSRestoreTests.snapshot, "drive-scsi0.img", out],
                                          env: ["QCOWPRESS_FAULT": fault])
            #expect(r.status == 1, "\(fault): \(r.stderr)")
            #expect(r.stderr.contains("Input/output error"), "\(fault): \(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1, "\(fault): \(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: out))
        }
    }
}
