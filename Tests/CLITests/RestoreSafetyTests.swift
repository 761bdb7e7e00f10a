import Foundation
import Testing

// MARK: restores

/// DataSafetyTests (the suite's traits hold here too): what restores leave behind.
extension DataSafetyTests {
    @Test(.enabled(if: PBSFixture.available, "needs python3"))
    func vmaConfigThatCollidesWithAnImageIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let disks = try VMARestoreTests.makeDisks(in: dir, count: 2)
        let evil = dir.appendingPathComponent("evil.conf")
        try Data("not a disk\n".utf8).write(to: evil)
        for name in ["drive-scsi0.qcow2", "drive-scsi1.qcow2"] {
            let archive = try VMARestoreTests.makeArchive(dir, disks: disks, name: "a-\(name).vma", extra: ["--config", "\(name)=\(evil.path)"])
            let out = dir.appendingPathComponent("out").path
            for extra in [[String](), ["--force"], ["--device", "drive-scsi0"]] {
                let r = try Harness.qcowpress(["restore", "vma"] + extra + [archive, out])
                #expect(r.status == 1 && Self.lines(r.stderr) == 1, "\(name) \(extra): \(r.status) \(r.stderr)")
                #expect(r.stderr.contains(name), "\(r.stderr)")
                #expect(!FileManager.default.fileExists(atPath: out), "\(name) \(extra): OUTDIR was created")
            }
        }
        // Into an existing directory with a restored disk: the disk survives.
        let archive = try VMARestoreTests.makeArchive(dir, disks: disks, name: "good.vma")
        let out = dir.appendingPathComponent("kept").path
        #expect(try Harness.qcowpress(["restore", "vma", archive, out]).status == 0)
        let bad = try VMARestoreTests.makeArchive(dir, disks: disks, name: "bad.vma", extra: ["--config", "drive-scsi0.qcow2=\(evil.path)"])
        let r = try Harness.qcowpress(["restore", "vma", "--force", bad, out])
        #expect(r.status == 1)
        try Harness.expectGood(out + "/drive-scsi0.qcow2", equals: disks[0].path)
    }

    @Test(.enabled(if: PBSFixture.available, "needs python3"))
    func pbsAllWritesConfigsAndIsAllOrNothing() throws {
        let f = try PBSFixture(.init(name: "two drives", chunk: 1 << 20))
        defer { f.remove() }
        let out = f.dir.appendingPathComponent("all").path
        let r = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [PBSRestoreTests.snapshot, "--all", out])
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(out + "/drive-scsi0.qcow2", equals: f.rawA)
        try Harness.expectGood(out + "/drive-virtio1.qcow2", equals: f.rawB)
        let conf = try String(contentsOfFile: out + "/qemu-server.conf", encoding: .utf8)
        #expect(conf.contains("memory: 2048") && conf.contains("scsi0:"), "\(conf)")
        #expect(try Harness.strayFiles(in: URL(fileURLWithPath: out), except: ["drive-scsi0.qcow2", "drive-virtio1.qcow2", "qemu-server.conf"]).isEmpty)

        // A second datastore whose second drive has a chunk of its own, then deleted: the first
        // drive is restored completely before the second fails.
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (ds, hex) = try f.damagedSecondDrive(in: dir)

        let nested = dir.appendingPathComponent("new/outdir").path
        let failed = try Harness.qcowpress(["restore", "pbs", "--datastore", ds, PBSRestoreTests.snapshot, "--all", nested])
        #expect(failed.status == 1 && Self.lines(failed.stderr) == 1 && failed.stderr.contains(String(hex)), "\(failed.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("new").path), "a directory the run created was left")

        // Into an existing directory holding an earlier restore, with --force: the earlier files stay.
        let failedForce = try Harness.qcowpress(["restore", "pbs", "--datastore", ds, PBSRestoreTests.snapshot, "--all", out, "--force"])
        #expect(failedForce.status == 1, "\(failedForce.stderr)")
        try Harness.expectGood(out + "/drive-scsi0.qcow2", equals: f.rawA)
        try Harness.expectGood(out + "/drive-virtio1.qcow2", equals: f.rawB)
        #expect(try String(contentsOfFile: out + "/qemu-server.conf", encoding: .utf8) == conf)
        #expect(try Harness.strayFiles(in: URL(fileURLWithPath: out), except: ["drive-scsi0.qcow2", "drive-virtio1.qcow2", "qemu-server.conf"]).isEmpty)
    }
}
