import DirectIO
import Foundation

/// Switches QEMU's block nodes onto finished images one at a time, on a thread of its own, so the
/// caller goes on (restoring the next drive) while QEMU is waited for. `nodes` maps an export
/// name to the QEMU node to switch when that export's image is finished (an overlay whose backing
/// is the export). For each image enqueued: waits for QEMU's QMP socket and the node (QEMU may
/// start later; up to `appearWithin`), switches the node onto the image, then calls `onSwitch`
/// (the caller stops offering the export). Each QMP exchange has `timeout`. The first failure
/// stops it (QEMU's block graph is then in a state it cannot reason about); ``finish()`` throws it
/// with the steps left to do by hand. Images enqueued are finished, and the caller keeps them
/// whatever the switch's outcome.
public final class QMPSwitcher: Sendable {
    public let socket: String
    public let nodes: [String: String]
    public let timeout: Duration
    public let appearWithin: Duration
    private let onSwitch: @Sendable (_ export: String, _ node: String, _ image: String) -> Void
    private struct State {
        var queue: [(export: String, image: String)] = []
        var busy = false
        var stopped = false
        var failure: QMPSwitchFailure?
        var done: Set<String> = []
    }
    private let state = ConditionMutex(State())

    public init(socket: String, nodes: [String: String], timeout: Duration = .seconds(30), appearWithin: Duration = .seconds(600),
                onSwitch: @escaping @Sendable (_ export: String, _ node: String, _ image: String) -> Void) {
        self.socket = socket
        self.nodes = nodes
        self.timeout = timeout
        self.appearWithin = appearWithin
        self.onSwitch = onSwitch
        // The loop holds the switcher until it returns (stopped, finished or failed).
        startThread(name: "qp-qmp") { self.loop() }
    }

    /// Exports whose node reads the finished image now.
    public var switched: Set<String> { state.withLock { $0.done } }

    /// Queues the switch of `export`'s node onto `image` (made absolute here: QEMU's working
    /// directory is not ours). Exports without a node are ignored.
    public func enqueue(export: String, image: String) {
        guard nodes[export] != nil else { return }
        let path = image.hasPrefix("/") ? image : FileManager.default.currentDirectoryPath + "/" + image
        state.withLock { $0.queue.append((export, path)) }
        state.broadcast()
    }

    /// Waits for every queued switch; throws the first failure.
    public func finish() throws(QMPSwitchFailure) {
        let nodes = self.nodes
        let f = state.withLock(waitingUntil: { !$0.busy && ($0.queue.isEmpty || $0.failure != nil) }) { s -> QMPSwitchFailure? in
            s.stopped = true
            guard var f = s.failure else { return nil }
            let done = s.done
            f.notSwitched = nodes.filter { $0.key != f.export && !done.contains($0.key) }.sorted { $0.key < $1.key }
                .map { "'\($0.value)' (\($0.key))" }
            return f
        }
        state.broadcast()
        if let f { throw f }
    }

    /// Drops what is queued, waits for a switch under way (at most one exchange's timeout), and
    /// says which exports were switched.
    public func stopAndReportSwitched() -> Set<String> {
        state.withLock {
            $0.stopped = true
            $0.queue.removeAll()
        }
        state.broadcast()
        return state.withLock(waitingUntil: { !$0.busy }) { $0.done }
    }

    private func loop() {
        var client: QMPClient?
        while true {
            let next = state.withLock(waitingUntil: { !$0.queue.isEmpty || $0.stopped }) { s -> (export: String, image: String)? in
                if s.stopped || s.failure != nil { return nil }
                s.busy = true
                return s.queue.removeFirst()
            }
            guard let next else { return }
            let (export, image) = next
            let node = nodes[export]!
            var steps: [QMPStep]?
            var outcome: Result<Bool, QMPError>
            do throws(QMPError) {
                let giveUp = ContinuousClock.now + appearWithin
                if client == nil { client = try connect(giveUp: giveUp) }
                if let client, try waitForNode(node, on: client, giveUp: giveUp) {
                    try client.switchBacking(node: node, to: image, newNode: "qcowpress-\(export)", planned: { steps = $0 })
                    onSwitch(export, node, image)
                    outcome = .success(true)
                } else {
                    outcome = .success(false)  // stopped while waiting
                }
            } catch {
                outcome = .failure(error)
            }
            let settled = outcome
            let rest = steps
            let carryOn = state.withLock { s -> Bool in
                s.busy = false
                switch settled {
                case .success(true):
                    s.done.insert(export)
                    return true
                case .success(false):
                    return false
                case .failure(let e):
                    s.failure = QMPSwitchFailure(cause: e, export: export, node: node, image: image, rest: Self.rest(of: rest, after: e))
                    return false
                }
            }
            state.broadcast()
            if !carryOn { return }
        }
    }

    /// Connects once something accepts on the socket: nil when stopped while waiting.
    private func connect(giveUp: ContinuousClock.Instant) throws(QMPError) -> QMPClient? {
        while true {
            do throws(QMPError) {
                return try QMPClient(path: socket, timeout: timeout)
            } catch {
                guard case .notListening(let e, _) = error.reason else { throw error }
                guard ContinuousClock.now < giveUp else { throw QMPError(socket: socket, reason: .notListening(errno: e, waited: appearWithin)) }
                if pauseOrStopped() { return nil }
            }
        }
    }

    /// Waits until `node` exists: false when stopped while waiting.
    private func waitForNode(_ node: String, on client: QMPClient, giveUp: ContinuousClock.Instant) throws(QMPError) -> Bool {
        while try !client.hasNode(node) {
            guard ContinuousClock.now < giveUp else {
                throw QMPError(socket: socket, reason: .blockGraph("node '\(node)' did not appear within \(QMPError.format(appearWithin))"))
            }
            if pauseOrStopped() { return false }
        }
        return true
    }

    /// Waits 200 ms between looks at QEMU (cut short by a stop): true when stopped.
    private func pauseOrStopped() -> Bool {
        state.withLock(waitingUntil: { $0.stopped }, atMost: 0.2) { $0.stopped }
    }

    /// The steps still to do after `error` ended the switch, and whether the first of them may
    /// have been done (sent without an answer); nil when it is not known where the switch stopped.
    static func rest(of steps: [QMPStep]?, after error: QMPError) -> (steps: [QMPStep], firstMayBeDone: Bool)? {
        guard let steps else { return nil }
        let command: String
        let unsure: Bool
        switch error.reason {
        case .noAnswer(let c, _), .closed(let c):
            command = c
            unsure = true
        case .failed(let c, _):
            command = c
            unsure = false
        default:
            return nil
        }
        guard let k = steps.firstIndex(where: { $0.command == command }) else { return nil }
        return (Array(steps[k...]), unsure)
    }
}

/// A switch that did not happen: why, and how to do it by hand. One line.
public struct QMPSwitchFailure: Error, Sendable, CustomStringConvertible {
    public var cause: QMPError
    public var export: String
    public var node: String
    public var image: String
    /// The QMP commands left to switch `node` by hand.
    public var manualSteps: String
    /// Other nodes not switched ("'ovlB' (drive-virtio1)").
    public var notSwitched: [String] = []

    init(cause: QMPError, export: String, node: String, image: String, rest: (steps: [QMPStep], firstMayBeDone: Bool)?) {
        self.cause = cause
        self.export = export
        self.node = node
        self.image = image
        if let rest {
            manualSteps = rest.steps.map(\.description).joined(separator: "; ")
            if rest.firstMayBeDone { manualSteps += " (\(rest.steps[0].command) may have been done already: see query-named-block-nodes)" }
        } else {
            manualSteps = BlockGraph.manualSwitch(node: node, image: image, newNode: "qcowpress-\(export)")
        }
    }

    public var description: String {
        var s = "\(cause); \(image) is complete and kept; to switch '\(node)' onto it by hand, send over QMP: \(manualSteps)"
        if !notSwitched.isEmpty { s += "; not switched either: \(notSwitched.joined(separator: ", "))" }
        return s
    }
}
