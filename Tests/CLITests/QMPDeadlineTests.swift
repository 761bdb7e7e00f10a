import Foundation
import Glibc
import Synchronization
import Testing

/// Bug 5 of #27: a QEMU that accepts the QMP socket and then stops answering must not hang
/// `restore pbs --live --qmp` (the image is complete by then). Each case is a fake QMP server that
/// goes silent at a different exchange; qcowpress must give up after `--qmp-timeout` with one line
/// naming the socket and the exchange, keep the finished image, and say how to switch by hand.
@Suite(.enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3"), .tags(.e2e, .pbs))
struct QMPDeadlineTests {
    struct Case: Sendable, CustomTestStringConvertible {
        var name: String
        var greeting: Bool
        /// Command → what the fake sends back (one or more lines); any other command gets silence.
        var replies: [String: String]
        /// What the error line must name.
        var unanswered: String
        var testDescription: String { name }
    }

    /// The block graph of a qemu-storage-daemon with overlay `ovl` (file `ovl-file`) backed by the
    /// live export (`livenbd`), as x-debug-query-block-graph returns it.
    static let graph = #"{"return": {"nodes": [{"id": 1, "type": "block-driver", "name": "ovl"}, {"id": 2, "type": "block-driver", "name": "ovl-file"}, {"id": 3, "type": "block-driver", "name": "livenbd"}], "edges": [{"parent": 1, "child": 2, "name": "file", "perm": [], "shared-perm": []}, {"parent": 1, "child": 3, "name": "backing", "perm": [], "shared-perm": []}]}}"#
    static let event = #"{"event": "JOB_STATUS_CHANGE", "data": {"id": "x", "status": "created"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#

    static let cases = [
        Case(name: "accepts, never greets", greeting: false, replies: [:], unanswered: "greeting"),
        Case(name: "greets, then silent", greeting: true, replies: [:], unanswered: "qmp_capabilities"),
        Case(name: "silent at blockdev-add", greeting: true,
             replies: ["qmp_capabilities": event + "\n" + #"{"return": {}}"#, "x-debug-query-block-graph": graph],
             unanswered: "blockdev-add"),
    ]

    @Test(arguments: cases)
    func silentQEMUEndsTheRestoreWithTheImageKept(_ c: Case) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("a.raw").path
        try (SourceImage.noise(3 << 20, seed: 7) + Data(count: 1 << 20)).write(to: URL(fileURLWithPath: raw))
        let ds = try PBSFixture.datastore(in: dir, drives: ["drive-scsi0.img": raw], seed: 4)
        let qmp = dir.appendingPathComponent("qmp.sock").path
        let live = dir.appendingPathComponent("live.sock").path
        let out = dir.appendingPathComponent("restored.qcow2").path
        let fake = try FakeQMPServer(path: qmp, greeting: c.greeting ? FakeQMPServer.qemuGreeting : nil, replies: c.replies)
        defer { fake.stop() }

        let p = Process()
        p.executableURL = URL(fileURLWithPath: Harness.binary)
        p.arguments = ["restore", "pbs", "--datastore", ds, "--live", live, "--qmp", qmp, "--qmp-timeout", "2",
                       "--node", "drive-scsi0=ovl", PBSRestoreTests.snapshot, "drive-scsi0.img", out]
        let errPath = dir.appendingPathComponent("qp.err").path
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        p.standardError = FileHandle(forWritingAtPath: errPath)
        p.standardOutput = FileHandle.nullDevice
        let exited = DispatchSemaphore(value: 0)
        p.terminationHandler = { _ in exited.signal() }
        try p.run()
        // Bounded: before the fix qcowpress waited for the answer forever.
        guard exited.wait(timeout: .now() + 90) == .success else {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            Issue.record("qcowpress still waits for QMP 90 s after it started (--qmp-timeout 2)")
            return
        }
        let err = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
        #expect(p.terminationStatus == 1, "\(err)")
        let lines = err.split(separator: "\n")
        #expect(lines.count == 1, "one line: \(err)")
        let line = String(lines.last ?? "")
        #expect(line.contains(qmp) && line.contains(c.unanswered) && line.contains("within 2 s"), "\(line)")
        // The hint: the image kept, and the QMP steps qcowpress would have sent.
        #expect(line.contains("kept") && line.contains(out), "\(line)")
        for step in ["blockdev-add", "blockdev-reopen", "blockdev-del", "change-backing-file", "'ovl'"] {
            #expect(line.contains(step), "hint names \(step): \(line)")
        }
        #expect(fake.waitForDisconnect(seconds: 30), "qcowpress left the QMP connection")
        // Nothing is sent after the exchange that got no answer.
        #expect(fake.commands.last ?? "greeting" == c.unanswered, "\(fake.commands)")
        try Harness.expectGood(out, equals: raw)
    }
}
