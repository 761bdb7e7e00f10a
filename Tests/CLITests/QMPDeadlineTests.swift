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
        let fake = try FakeQMP(path: qmp, greeting: c.greeting, replies: c.replies)
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

/// A QMP server on a unix socket that answers only what it is told to (the greeting, then each
/// command in `replies`) and otherwise stays silent with the connection open.
final class FakeQMP: Sendable {
    let path: String
    private let listener: Int32
    private let state = Mutex<(received: [String], open: Int, accepted: Int)>(([], 0, 0))
    private let disconnected = DispatchSemaphore(value: 0)

    /// The commands received so far, in order.
    var commands: [String] { state.withLock { $0.received } }

    init(path: String, greeting: Bool, replies: [String: String]) throws {
        self.path = path
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in path.utf8.enumerated() { p[i] = b } }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard listener >= 0, bound == 0, listen(listener, 4) == 0 else {
            throw FixtureError(message: "\(path): cannot listen: \(String(cString: strerror(errno)))")
        }
        let fd = listener
        Thread.detachNewThread { [self] in
            while true {
                let c = accept(fd, nil, nil)
                if c < 0 { return }
                state.withLock { $0.open += 1; $0.accepted += 1 }
                Thread.detachNewThread { [self] in serve(c, greeting: greeting, replies: replies) }
            }
        }
    }

    private func serve(_ c: Int32, greeting: Bool, replies: [String: String]) {
        func send(_ s: String) { _ = (s + "\r\n").withCString { Glibc.send(c, $0, strlen($0), Int32(MSG_NOSIGNAL)) } }
        if greeting { send(#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 9}}, "capabilities": []}}"#) }
        var pending = Data()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(c, &buf, buf.count, 0)
            if n <= 0 { break }
            pending.append(contentsOf: buf[0..<n])
            while let nl = pending.firstIndex(of: 0x0A) {
                let line = pending[pending.startIndex..<nl]
                pending.removeSubrange(pending.startIndex...nl)
                let cmd = ((try? JSONSerialization.jsonObject(with: line)) as? [String: Any])?["execute"] as? String ?? "?"
                state.withLock { $0.received.append(cmd) }
                if let r = replies[cmd] { send(r) }
            }
        }
        close(c)
        if state.withLock({ $0.open -= 1; return $0.open == 0 }) { disconnected.signal() }
    }

    /// Waits until a client connected and every client has gone.
    func waitForDisconnect(seconds: Double) -> Bool {
        if state.withLock({ $0.accepted > 0 && $0.open == 0 }) { return true }
        return disconnected.wait(timeout: .now() + seconds) == .success
    }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        unlink(path)
    }
}
