import Foundation
import Glibc
import QEMUControl
import Testing

/// The QMP client against fake servers: every exchange ends by its deadline, events are skipped,
/// QEMU's errors and hang-ups are one line naming the socket.
@Suite(.tags(.fast))
struct QMPClientTests {
    static let event = #"{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}"#
    static let ok = #"{"return": {}}"#

    /// Runs `body`, which must throw a QMPError; returns it (nil when it did not throw one) and
    /// the seconds it took.
    func failure(_ body: () throws -> Void) -> (QMPError?, Double) {
        let start = ContinuousClock.now
        do {
            try body()
            return (nil, 0)
        } catch {
            let d = (ContinuousClock.now - start).components
            return (error as? QMPError, Double(d.seconds) + Double(d.attoseconds) / 1e18)
        }
    }

    @Test func noGreetingEndsAtTheDeadline() throws {
        let fake = try FakeQMPServer(greeting: nil)
        defer { fake.stop() }
        let (e, took) = failure { _ = try QMPClient(path: fake.path, timeout: .milliseconds(300)) }
        #expect(e?.reason == .noAnswer(exchange: "greeting", after: .milliseconds(300)))
        #expect(took >= 0.29 && took < 10, "\(took) s")
        #expect(e?.description.contains(fake.path) == true && e?.description.contains("no greeting within 0.3 s") == true, "\(String(describing: e))")
    }

    @Test func silenceAfterTheGreetingEndsAtTheDeadline() throws {
        let fake = try FakeQMPServer()
        defer { fake.stop() }
        let (e, took) = failure { _ = try QMPClient(path: fake.path, timeout: .milliseconds(300)) }
        #expect(e?.reason == .noAnswer(exchange: "qmp_capabilities", after: .milliseconds(300)))
        #expect(took >= 0.29 && took < 10, "\(took) s")
        #expect(e?.description == "QMP \(fake.path): no answer to qmp_capabilities within 0.3 s")
    }

    /// An event is not the answer: a command answered only by an event fails by the deadline.
    @Test func anEventIsNoAnswer() throws {
        let fake = try FakeQMPServer(replies: ["qmp_capabilities": Self.ok, "query-status": Self.event])
        defer { fake.stop() }
        let client = try QMPClient(path: fake.path, timeout: .milliseconds(300))
        let (e, took) = failure { try client.execute("query-status") }
        #expect(e?.reason == .noAnswer(exchange: "query-status", after: .milliseconds(300)))
        #expect(took >= 0.29 && took < 10, "\(took) s")
    }

    @Test func exchangesSkipEventsAndReportQEMUErrors() throws {
        let fake = try FakeQMPServer(replies: [
            "qmp_capabilities": Self.event + "\n" + Self.ok,
            "query-status": Self.event + "\r\n\r\n" + Self.event + "\n" + #"{"return": {"status": "running", "running": true}}"#,
            "blockdev-del": #"{"error": {"class": "GenericError", "desc": "Node 'x' is busy"}}"#,
        ])
        defer { fake.stop() }
        let client = try QMPClient(path: fake.path, timeout: .seconds(5))
        let status = try client.execute("query-status") as? [String: Any]
        #expect(status?["status"] as? String == "running")
        let (e, _) = failure { try client.execute("blockdev-del", ["node-name": "x"]) }
        #expect(e?.reason == .failed(command: "blockdev-del", description: "Node 'x' is busy"))
        #expect(fake.commands == ["qmp_capabilities", "query-status", "blockdev-del"])
    }

    @Test func hangUpAndNoListenerAreSaidApart() throws {
        let fake = try FakeQMPServer(closeAfterGreeting: true)
        defer { fake.stop() }
        let (closed, _) = failure { _ = try QMPClient(path: fake.path, timeout: .seconds(5)) }
        #expect(closed?.reason == .closed(exchange: "qmp_capabilities"))
        #expect(closed?.isNotListening == false)

        let (missing, _) = failure { _ = try QMPClient(path: fake.dir + "/none.sock", timeout: .seconds(5)) }
        #expect(missing?.reason == .notListening(errno: ENOENT, waited: nil))
        // Bound, not listening: refused.
        let bound = try FakeQMPServer.listen(fake.dir + "/bound.sock", backlog: -1)
        defer { close(bound) }
        let (refused, _) = failure { _ = try QMPClient(path: fake.dir + "/bound.sock", timeout: .seconds(5)) }
        #expect(refused?.reason == .notListening(errno: ECONNREFUSED, waited: nil))
        #expect(refused?.isNotListening == true)
    }

    @Test func aPathTooLongIsOneLine() {
        let long = "/tmp/" + String(repeating: "x", count: 200) + ".sock"
        let (e, _) = failure { _ = try QMPClient(path: long) }
        #expect(e?.description.contains("socket path too long (210 bytes") == true, "\(String(describing: e))")
    }
}
