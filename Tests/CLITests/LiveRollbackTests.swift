import Foundation
import Testing

/// Every multi-image restore commits and rolls back through one mechanism (`OutputSet`): the
/// user's files stay exactly as they were unless the whole run succeeds — live or not, even when
/// the failure comes in the middle of the renames.
@Suite(.tags(.e2e, .pbs), .enabled(if: PBSFixture.available, "needs python3"))
struct LiveRollbackTests {
    /// The user's earlier files in `dir`: name → bytes.
    static func snapshotFiles(in dir: String) throws -> [String: Data] {
        var out: [String: Data] = [:]
        for n in try FileManager.default.contentsOfDirectory(atPath: dir) {
            out[n] = try Data(contentsOf: URL(fileURLWithPath: dir + "/" + n))
        }
        return out
    }

    /// Bug: `restore pbs --live SOCK --all OUTDIR --force`, the second drive's chunk damaged,
    /// removed the user's earlier `OUTDIR/drive-scsi0.qcow2` (the live path unlinked each finished
    /// drive on failure). Now every file in OUTDIR stays as it was, and nothing else is left.
    @Test func failedLiveRestoreKeepsTheUsersFiles() throws {
        let f = try PBSFixture(.init(name: "two drives", chunk: 1 << 20))
        defer { f.remove() }
        let out = f.dir.appendingPathComponent("all").path
        let first = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [PBSRestoreTests.snapshot, "--all", out])
        #expect(first.status == 0, "\(first.stderr)")
        let before = try Self.snapshotFiles(in: out)
        #expect(before.keys.sorted() == ["drive-scsi0.qcow2", "drive-virtio1.qcow2", "qemu-server.conf"])

        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (ds, hex) = try f.damagedSecondDrive(in: dir)
        let sock = dir.appendingPathComponent("live.sock").path
        let r = try Harness.qcowpress(["restore", "pbs", "--datastore", ds, "--live", sock, PBSRestoreTests.snapshot, "--all", out, "--force"])
        #expect(r.status == 1 && r.stderr.split(separator: "\n").count == 1 && r.stderr.contains(hex), "\(r.stderr)")
        #expect(try Self.snapshotFiles(in: out) == before, "the user's files changed")
        #expect(!FileManager.default.fileExists(atPath: sock), "the live socket is gone")

        // Into a directory the run creates: nothing is left of it.
        let nested = dir.appendingPathComponent("new/outdir").path
        let r2 = try Harness.qcowpress(["restore", "pbs", "--datastore", ds, "--live", sock, PBSRestoreTests.snapshot, "--all", nested])
        #expect(r2.status == 1, "\(r2.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("new").path), "a directory the run created was left")
    }

    /// A failure in the middle of the renames (the second image's rename fails with EIO, after
    /// the first replaced the user's file): the rollback puts the replaced file back, live or not.
    @Test(arguments: [false, true])
    func failedCommitPutsBackWhatItReplaced(live: Bool) throws {
        let f = try PBSFixture(.init(name: "two drives", chunk: 1 << 20))
        defer { f.remove() }
        let out = f.dir.appendingPathComponent("all").path
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        let user: [String: Data] = ["drive-scsi0.qcow2": Data("the user's first disk\n".utf8),
                                    "drive-virtio1.qcow2": Data("the user's second disk\n".utf8),
                                    "qemu-server.conf": Data("memory: 512\n".utf8)]
        for (n, d) in user { try d.write(to: URL(fileURLWithPath: out + "/" + n)) }
        let sock = f.dir.appendingPathComponent("live.sock").path
        let args = ["restore", "pbs"] + f.datastoreArgs + (live ? ["--live", sock] : []) + [PBSRestoreTests.snapshot, "--all", out, "--force"]
        let r = try Harness.qcowpress(args, env: ["QCOWPRESS_FAULT": "rename:2:EIO"])
        #expect(r.status == 1 && r.stderr.contains("rename"), "\(r.stderr)")
        #expect(try Self.snapshotFiles(in: out) == user, "the user's files changed")

        // The same run without the fault replaces all three.
        let ok = try Harness.qcowpress(args)
        #expect(ok.status == 0, "\(ok.stderr)")
        try Harness.expectGood(out + "/drive-scsi0.qcow2", equals: f.rawA)
        try Harness.expectGood(out + "/drive-virtio1.qcow2", equals: f.rawB)
        #expect(try Self.snapshotFiles(in: out).keys.sorted() == ["drive-scsi0.qcow2", "drive-virtio1.qcow2", "qemu-server.conf"],
                "no second names or temporary files are left")
    }

    /// Bug: with `--output json`, `restore pbs --live` printed the NBD URI as plain text on stdout.
    /// Now stdout is JSON lines: one `{"export","uri"}` per drive as it is served, then the summary.
    @Test func liveJSONIsJSONOnly() throws {
        let f = try PBSFixture(.init(name: "two drives", chunk: 1 << 20))
        defer { f.remove() }
        let sock = f.dir.appendingPathComponent("live.sock").path
        let out = f.dir.appendingPathComponent("all").path
        let r = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + ["--live", sock, "--output", "json", PBSRestoreTests.snapshot, "--all", out])
        #expect(r.status == 0, "\(r.stderr)")
        let values = r.stdout.split(separator: "\n").map { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        #expect(values.count == 3 && values.allSatisfy { $0 != nil }, "stdout is not JSON lines: \(r.stdout)")
        #expect(values.prefix(2).map { $0?["uri"] as? String } == ["drive-scsi0", "drive-virtio1"].map { "nbd+unix:///\($0)?socket=\(sock)" },
                "\(r.stdout)")
        #expect((values.last??["drives"] as? [Any])?.count == 2, "\(r.stdout)")
        try Harness.expectGood(out + "/drive-scsi0.qcow2", equals: f.rawA)
    }
}
