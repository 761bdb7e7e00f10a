import NIOCore
import NIOHTTP1
import Synchronization

/// Up to `streams` kept-alive connections to the endpoint; a request goes to an idle connection,
/// else to a new one while fewer than `streams` are open, else waits in a queue (FIFO) for the
/// next connection to come free.
final class S3Pool: Sendable {
    /// One request: `makeHead` is called when a connection is ready (so the signature's time is the
    /// sending time), `done` once with the response or why none came; `reused` tells whether the
    /// connection had served a request before (a stale kept-alive connection may have been closed
    /// by the server meanwhile).
    struct Job: Sendable {
        let makeHead: @Sendable () -> HTTPRequestHead
        let limit: Int
        let done: @Sendable (Result<S3HTTPResponse, S3TransportError>, _ reused: Bool) -> Void
    }

    private struct Idle {
        let channel: Channel
        let since: NIODeadline
    }

    private struct State {
        var idle: [Idle] = []
        /// Connections open or being opened.
        var open = 0
        var queue = CircularBuffer<Job>()
        var closed = false
        /// Every open channel, for shutdown.
        var channels: [ObjectIdentifier: Channel] = [:]
    }

    /// A kept-alive connection idle longer than this is closed instead of reused. Servers close
    /// idle connections on their own schedule (not measured here: nginx in front of MinIO/RGW
    /// defaults to 75 s, AWS S3 is reported at about 20 s); reusing one the server is closing
    /// costs an immediate retry (`staleRetries`), reconnecting costs one handshake. During a
    /// restore connections are never idle this long, so the value only matters between commands
    /// of a long-lived process.
    static let maxIdle = TimeAmount.seconds(15)

    let streams: Int
    let connector: S3Connector
    private let state = Mutex(State())
    private let sent = Atomic<Int>(0)

    init(streams: Int, connector: S3Connector) {
        self.streams = streams
        self.connector = connector
    }

    var requestCount: Int { sent.load(ordering: .relaxed) }

    func submit(_ job: Job) {
        enum Action { case run(Channel), connect, fail, wait }
        var stale: [Channel] = []
        let action: Action = state.withLock { s in
            if s.closed { return .fail }
            let now = NIODeadline.now()
            while let idle = s.idle.popLast() {
                if idle.channel.isActive, now - idle.since < Self.maxIdle { return .run(idle.channel) }
                stale.append(idle.channel)
            }
            if s.open - stale.count < streams {
                s.open += 1
                return .connect
            }
            s.queue.append(job)
            return .wait
        }
        // Closing runs the close callback, which takes the lock: never inside it.
        for ch in stale { ch.close(promise: nil) }
        switch action {
        case .run(let ch): run(job, on: ch, reused: true)
        case .connect: connect(for: job)
        case .fail: job.done(.failure(.shutdown), false)
        case .wait: break
        }
    }

    private func connect(for job: Job) {
        connector.connect().whenComplete { result in
            switch result {
            case .success(let ch):
                let accepted = self.state.withLock { s -> Bool in
                    if s.closed { return false }
                    s.channels[ObjectIdentifier(ch)] = ch
                    return true
                }
                ch.closeFuture.whenComplete { _ in self.closed(ch) }
                guard accepted else {
                    ch.close(promise: nil)
                    job.done(.failure(.shutdown), false)
                    return
                }
                self.run(job, on: ch, reused: false)
            case .failure(let e):
                // No connection came up: this job fails, and so do the queued ones when no other
                // connection is open to serve them (a refused endpoint fails everything at once
                // instead of timing out one by one).
                let orphans: [Job] = self.state.withLock { s in
                    s.open -= 1
                    guard s.open == 0 else { return [] }
                    let all = Array(s.queue)
                    s.queue.removeAll()
                    return all
                }
                let why = e as? S3TransportError ?? .connect(self.connector.describeConnectFailure(e))
                job.done(.failure(why), false)
                for o in orphans { o.done(.failure(why), false) }
            }
        }
    }

    private func run(_ job: Job, on ch: Channel, reused: Bool) {
        let promise = ch.eventLoop.makePromise(of: S3HTTPResponse.self)
        sent.add(1, ordering: .relaxed)
        let exchange = S3Exchange(head: job.makeHead(), limit: job.limit, promise: promise)
        ch.writeAndFlush(exchange).whenFailure { e in
            promise.fail(S3TransportError.dropped("cannot send: \(e)", sawResponse: false))
        }
        promise.futureResult.whenComplete { result in
            switch result {
            case .success(let response):
                self.release(ch, reusable: response.keepAlive)
                job.done(.success(response), reused)
            case .failure(let e):
                ch.close(promise: nil)
                job.done(.failure(e as? S3TransportError ?? .dropped("\(e)", sawResponse: false)), reused)
            }
        }
    }

    /// A connection whose exchange is done: the next queued job runs on it, or it waits idle.
    private func release(_ ch: Channel, reusable: Bool) {
        guard reusable, ch.isActive else {
            ch.close(promise: nil)
            return
        }
        let next: Job? = state.withLock { s in
            if s.closed { return nil }
            if let job = s.queue.popFirst() { return job }
            s.idle.append(Idle(channel: ch, since: .now()))
            return nil
        }
        if let next {
            run(next, on: ch, reused: true)
        } else if state.withLock({ $0.closed }) {
            ch.close(promise: nil)
        }
    }

    /// A connection closed (by either side): forget it; a queued job gets a new connection.
    private func closed(_ ch: Channel) {
        let id = ObjectIdentifier(ch)
        let next: Job? = state.withLock { s in
            guard s.channels.removeValue(forKey: id) != nil else { return nil }
            s.open -= 1
            s.idle.removeAll { ObjectIdentifier($0.channel) == id }
            guard !s.closed, s.open < streams, let job = s.queue.popFirst() else { return nil }
            s.open += 1
            return job
        }
        if let next { connect(for: next) }
    }

    /// Closes every connection; queued jobs fail with `.shutdown`.
    func shutdown() {
        let (channels, queued): ([Channel], [Job]) = state.withLock { s in
            s.closed = true
            let q = Array(s.queue)
            s.queue.removeAll()
            s.idle.removeAll()
            return (Array(s.channels.values), q)
        }
        for j in queued { j.done(.failure(.shutdown), false) }
        for ch in channels { ch.close(promise: nil) }
    }
}
