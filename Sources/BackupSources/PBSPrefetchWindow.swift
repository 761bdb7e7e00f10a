import DirectIO

/// The fetch-ahead window of a chunk store that fetches over the network (``PBSChunkStore/willFetch(_:window:)``):
/// chunks announced in the order the loaders will ask for them are requested up to `window` past
/// the furthest one asked for, with at most `window` requests out or answers held, and kept until
/// taken; they arrive in any order and each loader waits only for its own. A loader whose chunk is
/// not out yet asks for it itself (one more out per waiting loader). A chunk not announced (or
/// announced in a list since replaced) is left to the store to fetch directly.
///
/// The store supplies `start`, which begins one request and calls its completion once, on any
/// thread (possibly before `start` returns). Requests are started outside the lock.
/// Retries are the transport's business: a failed request is handed to the loader that takes it.
public final class PBSPrefetchWindow<Response: Sendable>: Sendable {
    public typealias Completion = @Sendable (Result<Response, SourceError>) -> Void
    public typealias Start = @Sendable (_ digest: ArraySlice<UInt8>, _ done: @escaping Completion) -> Void

    private struct Entry { var result: Result<Response, SourceError>? }
    private struct State {
        var epoch = 0
        var sequence: [ArraySlice<UInt8>] = []
        var position: [ArraySlice<UInt8>: Int] = [:]
        var window = 1
        var next = 0
        var furthest = -1
        var entries: [Int: Entry] = [:]
        var requests = 0
    }
    private struct Launch { var epoch: Int; var position: Int; var digest: ArraySlice<UInt8> }

    private let state = ConditionMutex(State())
    private let start: Start

    public init(start: @escaping Start) { self.start = start }

    /// Requests started so far through the window.
    public var requestCount: Int { state.withLock { $0.requests } }

    /// The chunks about to be fetched, in order; replaces the previous list (answers held for it
    /// are dropped, requests still out are ignored when they complete).
    public func announce(_ digests: [ArraySlice<UInt8>], window: Int) {
        let launches = state.withLock { s -> [Launch] in
            s.epoch += 1
            s.entries = [:]
            s.sequence = digests
            s.position = [:]
            for (i, d) in digests.enumerated() where s.position[d] == nil { s.position[d] = i }
            s.window = max(1, window)
            s.next = 0
            s.furthest = -1
            return Self.ahead(&s)
        }
        state.broadcast()
        launch(launches)
    }

    /// The response for `digest`, waiting for it; nil when it was not announced (or was taken).
    public func take(_ digest: ArraySlice<UInt8>) throws(SourceError) -> Response? {
        var launches: [Launch] = []
        let claimed = state.withLock { s -> (epoch: Int, position: Int)? in
            guard let p = s.position[digest] else { return nil }
            s.position[digest] = nil
            if p > s.furthest { s.furthest = p }
            if s.entries[p] == nil { launches.append(Self.issue(&s, p)) }
            launches += Self.ahead(&s)
            return (s.epoch, p)
        }
        guard let claimed else { return nil }
        launch(launches)
        var more: [Launch] = []
        let result = state.withLock(waitingUntil: { s in s.epoch != claimed.epoch || s.entries[claimed.position]?.result != nil }) { s -> Result<Response, SourceError>? in
            guard s.epoch == claimed.epoch else { return nil }
            let r = s.entries.removeValue(forKey: claimed.position)?.result
            more = Self.ahead(&s)
            return r
        }
        launch(more)
        guard let result else { return nil }
        return try result.get()
    }

    /// Positions to request now: up to `window` ahead of the furthest asked for, at most `window`
    /// out or held (a loader that jumps ahead does not make everything in between arrive at once).
    private static func ahead(_ s: inout State) -> [Launch] {
        var out: [Launch] = []
        while s.next < s.sequence.count && s.next <= s.furthest + s.window && s.entries.count < s.window {
            if s.position[s.sequence[s.next]] == s.next && s.entries[s.next] == nil { out.append(issue(&s, s.next)) }
            s.next += 1
        }
        return out
    }

    private static func issue(_ s: inout State, _ p: Int) -> Launch {
        s.entries[p] = Entry(result: nil)
        s.requests += 1
        return Launch(epoch: s.epoch, position: p, digest: s.sequence[p])
    }

    private func launch(_ launches: [Launch]) {
        for l in launches {
            start(l.digest) { [state] r in
                state.withLock { s in
                    guard s.epoch == l.epoch, s.entries[l.position] != nil else { return }
                    s.entries[l.position] = Entry(result: r)
                }
                state.broadcast()
            }
        }
    }
}
