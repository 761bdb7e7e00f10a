import Foundation
import Testing

// PBSServeTests (the suite's traits hold here too): a live restore switching a real QEMU.
extension PBSServeTests {
    /// The whole live flow with a real QEMU block layer (qemu-storage-daemon): an overlay whose
    /// backing is the live export, a guest write through the daemon's own NBD export during the
    /// restore, then the QMP switch. Afterwards the overlay's header names the restored image, the
    /// image is clean and equal to the source, the guest sees source + write, the live socket is gone.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-storage-daemon")
                   && FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-io"), "needs qemu-system-common and qemu-utils"))
    func liveRestoreSwitchesQEMU() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let rawA = dir.appendingPathComponent("a.raw").path
        try (SourceImage.noise(6 << 20, seed: 9) + Data(count: 2 << 20) + SourceImage.text(4 << 20, seed: 3)).write(to: URL(fileURLWithPath: rawA))
        let ds = try Self.datastore(in: dir, drive: rawA)
        let live = dir.appendingPathComponent("live.sock").path
        let qmp = dir.appendingPathComponent("qmp.sock").path
        let guest = dir.appendingPathComponent("guest.sock").path
        let out = dir.appendingPathComponent("restored.qcow2").path
        let overlay = dir.appendingPathComponent("overlay.qcow2").path
        let (qp, _, errPath, first) = try Self.launch(
            ["restore", "pbs", "--datastore", ds, "--live", live, "--qmp", qmp, "--node", "drive-scsi0=ovl",
             "--loaders", "1", "--memory-limit", "16M", PBSRestoreTests.snapshot, "drive-scsi0.img", out], in: dir)
        let url = "nbd+unix:///drive-scsi0?socket=\(live)"
        #expect(first.hasPrefix(url))
        // QEMU starts after qcowpress: an overlay over the live export, exported to the "guest".
        #expect(try Harness.qemuImg(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", url, "-u", overlay, String(12 << 20)]).status == 0)
        let qsd = Process()
        qsd.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-storage-daemon")
        qsd.arguments = ["--chardev", "socket,path=\(qmp),server=on,wait=off,id=qmp", "--monitor", "chardev=qmp",
                         "--blockdev", "driver=nbd,node-name=livenbd,server.type=unix,server.path=\(live),export=drive-scsi0,read-only=on",
                         "--blockdev", "driver=file,node-name=ovl-file,filename=\(overlay)",
                         "--blockdev", "driver=qcow2,node-name=ovl,file=ovl-file,backing=livenbd",
                         "--nbd-server", "addr.type=unix,addr.path=\(guest)",
                         "--export", "type=nbd,id=exp0,node-name=ovl,name=guest,writable=on"]
        qsd.standardOutput = FileHandle.nullDevice
        qsd.standardError = FileHandle.nullDevice
        try qsd.run()
        // SIGKILL: the daemon inherits a signal mask from the test runner in which SIGTERM may be blocked.
        defer { kill(qsd.processIdentifier, SIGKILL); qsd.waitUntilExit() }
        // Its NBD socket appears once it listens (or it ends, failing).
        _ = Wait.until(watching: [dir.path], orExitOf: qsd.processIdentifier, timeout: 30) { FileManager.default.fileExists(atPath: guest) }
        let guestURL = "nbd+unix:///guest?socket=\(guest)"
        // The guest writes and reads while the restore runs.
        let w = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", guestURL, "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k"])
        #expect(w.status == 0 && !w.stdout.contains("Pattern verification failed"), "\(w.stdout)\(w.stderr)")
        qp.waitUntilExit()
        let err = (try? String(contentsOf: errPath, encoding: .utf8)) ?? ""
        #expect(qp.terminationStatus == 0, "\(err)")
        #expect(!FileManager.default.fileExists(atPath: live), "the live socket is gone")
        let info = try Harness.qemuImg(["info", "-U", overlay])
        #expect(info.stdout.contains("backing file: \(out)") && info.stdout.contains("backing file format: qcow2"), "\(info.stdout)")
        try Harness.expectGood(out, equals: rawA)
        // The guest view: the source with the write on top, read after the switch.
        let view = dir.appendingPathComponent("view.raw").path
        #expect(try Harness.qemuImg(["convert", "-f", "raw", "-O", "raw", guestURL, view]).status == 0)
        var expected = try Data(contentsOf: URL(fileURLWithPath: rawA))
        expected.replaceSubrange((1 << 20)..<((1 << 20) + 65536), with: Data(repeating: 0x5A, count: 65536))
        #expect(try Data(contentsOf: URL(fileURLWithPath: view)) == expected, "guest view = source + write")
    }
}
