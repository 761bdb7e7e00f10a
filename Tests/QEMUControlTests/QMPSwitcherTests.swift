import Foundation
import QEMUControl
import Testing

/// The switch plan as a value, and the switcher against fake QEMUs: a switch that completes, one
/// whose QEMU goes silent half-way (the failure says what is left to do by hand), and a socket
/// that never appears.
@Suite(.tags(.fast))
struct QMPSwitcherTests {
    /// An overlay `ovl` (file `ovl-file`, backing the NBD node `livenbd`) under a throttle filter
    /// `top`, as x-debug-query-block-graph returns it.
    static let graph = #"{"return": {"nodes": [{"id": 1, "type": "block-driver", "name": "ovl"}, {"id": 2, "type": "block-driver", "name": "ovl-file"}, {"id": 3, "type": "block-driver", "name": "livenbd"}, {"id": 4, "type": "block-driver", "name": "top"}, {"id": 5, "type": "block-backend", "name": "dev0"}], "edges": [{"parent": 1, "child": 2, "name": "file"}, {"parent": 1, "child": 3, "name": "backing"}, {"parent": 4, "child": 1, "name": "file"}, {"parent": 5, "child": 4, "name": "root"}]}}"#
    static let ok = #"{"return": {}}"#

    static func parsedGraph() throws -> BlockGraph {
        let obj = try JSONSerialization.jsonObject(with: Data(graph.utf8)) as! [String: Any]
        return try #require(BlockGraph(qmpValue: obj["return"]!))
    }

    @Test func planNamesTheOverlaysChildrenAndTheTopOfItsChain() throws {
        let steps = try Self.parsedGraph().switchPlan(node: "ovl", image: "/srv/out/drive-scsi0.qcow2", newNode: "qcowpress-drive-scsi0")
        #expect(steps.map(\.description) == [
            #"blockdev-add {"driver":"qcow2","file":{"driver":"file","filename":"/srv/out/drive-scsi0.qcow2"},"node-name":"qcowpress-drive-scsi0","read-only":true}"#,
            #"blockdev-reopen {"options":[{"backing":"qcowpress-drive-scsi0","driver":"qcow2","file":"ovl-file","node-name":"ovl"}]}"#,
            #"blockdev-del {"node-name":"livenbd"}"#,
            #"change-backing-file {"backing-file":"/srv/out/drive-scsi0.qcow2","device":"top","image-node-name":"ovl"}"#,
        ])
        #expect(throws: BlockGraphError.self) { try Self.parsedGraph().switchPlan(node: "nope", image: "/x", newNode: "n") }
        #expect(throws: BlockGraphError.self) { try Self.parsedGraph().switchPlan(node: "ovl-file", image: "/x", newNode: "n") }
        #expect(BlockGraph(qmpValue: ["nodes": 1]) == nil)
    }

    /// Waits for `finish()` on another thread, at most `seconds`: nil when it did not return.
    func finish(_ s: QMPSwitcher, within seconds: Double) -> Result<Void, QMPSwitchFailure>? {
        let result = Shared<Result<Void, QMPSwitchFailure>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let r = Result { () throws(QMPSwitchFailure) in try s.finish() }
            result.value.withLock { $0 = r }
            done.signal()
        }
        guard done.wait(timeout: .now() + seconds) == .success else { return nil }
        return result.current
    }

    @Test func switchesAndReports() throws {
        let fake = try FakeQMPServer(replies: ["qmp_capabilities": Self.ok, "x-debug-query-block-graph": Self.graph, "blockdev-add": Self.ok,
                                               "blockdev-reopen": Self.ok, "blockdev-del": Self.ok, "change-backing-file": Self.ok])
        defer { fake.stop() }
        let seen = Shared<[String]>([])
        let s = QMPSwitcher(socket: fake.path, nodes: ["drive-scsi0": "ovl"], timeout: .seconds(5)) { export, node, image in
            seen.value.withLock { $0.append("\(export) \(node) \(image)") }
        }
        s.enqueue(export: "drive-virtio1", image: "/srv/b.qcow2")  // no node: ignored
        s.enqueue(export: "drive-scsi0", image: "/srv/a.qcow2")
        let r = try #require(finish(s, within: 60))
        #expect(throws: Never.self) { try r.get() }
        #expect(seen.current == ["drive-scsi0 ovl /srv/a.qcow2"])
        #expect(s.switched == ["drive-scsi0"])
        #expect(fake.commands == ["qmp_capabilities", "x-debug-query-block-graph", "x-debug-query-block-graph", "blockdev-add",
                                  "blockdev-reopen", "blockdev-del", "change-backing-file"])
    }

    /// QEMU goes silent at blockdev-reopen: the failure names it, the steps from it on are the
    /// hand switch (the reopen may have happened), and the other node is named as not switched.
    @Test func silenceHalfWaySaysWhatIsLeft() throws {
        let fake = try FakeQMPServer(replies: ["qmp_capabilities": Self.ok, "x-debug-query-block-graph": Self.graph, "blockdev-add": Self.ok])
        defer { fake.stop() }
        let s = QMPSwitcher(socket: fake.path, nodes: ["drive-scsi0": "ovl", "drive-virtio1": "ovlB"], timeout: .milliseconds(300)) { _, _, _ in }
        s.enqueue(export: "drive-scsi0", image: "/srv/a.qcow2")
        let r = try #require(finish(s, within: 60), "finish() still waits 60 s after a 0.3 s deadline")
        guard case .failure(let f) = r else {
            Issue.record("the switch succeeded")
            return
        }
        #expect(f.cause.reason == .noAnswer(exchange: "blockdev-reopen", after: .milliseconds(300)))
        #expect(f.description.hasPrefix("QMP \(fake.path): no answer to blockdev-reopen within 0.3 s; /srv/a.qcow2 is complete and kept; "), "\(f)")
        #expect(f.manualSteps.hasPrefix("blockdev-reopen {") && f.manualSteps.contains("blockdev-del {\"node-name\":\"livenbd\"}")
                && f.manualSteps.contains("change-backing-file") && !f.manualSteps.contains("blockdev-add")
                && f.manualSteps.contains("blockdev-reopen may have been done already"), "\(f.manualSteps)")
        #expect(f.notSwitched == ["'ovlB' (drive-virtio1)"])
        #expect(!f.description.contains("\n"))
        #expect(s.switched.isEmpty)
        #expect(fake.commands.last == "blockdev-reopen")
    }

    /// No QEMU at all: waiting for the socket ends after `appearWithin`, and the hand switch names
    /// the image with what only QEMU knows left in angle brackets.
    @Test func aSocketThatNeverAppears() throws {
        let dir = NSTemporaryDirectory() + "qp-qmp-\(UUID().uuidString.prefix(8))"
        let s = QMPSwitcher(socket: dir + "/qmp.sock", nodes: ["drive-scsi0": "ovl"], timeout: .seconds(5), appearWithin: .milliseconds(500)) { _, _, _ in }
        s.enqueue(export: "drive-scsi0", image: "/srv/a.qcow2")
        let r = try #require(finish(s, within: 60))
        guard case .failure(let f) = r else {
            Issue.record("the switch succeeded")
            return
        }
        #expect(f.cause.reason == .notListening(errno: ENOENT, waited: .milliseconds(500)), "\(f)")
        #expect(f.manualSteps.hasPrefix(#"blockdev-add {"driver":"qcow2","file":{"driver":"file","filename":"/srv/a.qcow2"},"node-name":"qcowpress-drive-scsi0","read-only":true}; blockdev-reopen"#), "\(f.manualSteps)")
        #expect(f.manualSteps.contains("<its old (NBD) backing node>"))
    }

    /// A stop while waiting for QEMU returns at once and reports nothing switched.
    @Test func stopWhileWaiting() {
        let s = QMPSwitcher(socket: "/nonexistent/qmp.sock", nodes: ["drive-scsi0": "ovl"]) { _, _, _ in }
        s.enqueue(export: "drive-scsi0", image: "/srv/a.qcow2")
        #expect(s.stopAndReportSwitched().isEmpty)
    }
}
