import BackupSources
import Crypto
import Foundation
import NIOCore

/// The reader session of one snapshot and the chunk store on it.
///
/// Chunks announced with `willFetch` are requested ahead, up to `window` streams past the furthest
/// one a consumer has asked for, and kept (as received blobs) until taken; they arrive in any
/// order and each consumer waits only for its own. A chunk not announced is fetched when asked.
///
/// A dropped connection is opened again at most ``maxReconnects`` times per snapshot: the indexes
/// downloaded so far are downloaded again on the new session (the server serves only the chunks of
/// indexes downloaded on the same connection), then the requests that were lost are sent again;
/// chunks already taken are never asked for again.
// @unchecked: its vars are guarded by `cond`, an NSCondition (loaders wait on it for answers and reconnects, which Mutex cannot).
final class PBSRemoteReader: PBSChunkStore, @unchecked Sendable {
    /// Reconnections allowed per snapshot. A restore that loses its connection more often than this
    /// is better reported than retried forever.
    static let maxReconnects = 5

    let client: PBSRemoteClient
    let target: String
    let display: String
    private let cond = NSCondition()
    // Guarded by `cond`.
    private var session: PBSReaderSession?
    private var generation = 0
    private var reconnecting = false
    /// Set when a reconnection failed: every waiting consumer reports it.
    private var broken: SourceError?
    private(set) var reconnectCount = 0
    private(set) var chunkRequestCount = 0
    /// Index files downloaded (name, SHA-256): downloaded again on a new session.
    private var indexes: [(name: String, sha: [UInt8])] = []
    // Prefetch state (guarded by `cond`).
    private var epoch = 0
    private var sequence: [ArraySlice<UInt8>] = []
    private var position: [ArraySlice<UInt8>: Int] = [:]
    private var window = 0
    private var next = 0
    private var furthest = -1
    private struct Entry { var generation: Int; var result: Result<PBSResponse, Error>? }
    private var entries: [Int: Entry] = [:]

    init(client: PBSRemoteClient, target: String, display: String) {
        self.client = client
        self.target = target
        self.display = display
    }

    var isRemote: Bool { true }

    private var server: String { client.repository.server }

    /// Opens the first session.
    func connect() throws(SourceError) {
        let s = try openSession()
        cond.withLock { session = s }
    }

    /// A new reader session (login headers, upgrade); a refusal becomes one line.
    /// A ticket expires (PBS: after two hours): a ticket refused when a session is opened again is
    /// replaced by a new login, once.
    private func openSession() throws(SourceError) -> PBSReaderSession {
        var renewed = false
        while true {
            let headers = try client.authHeaders()
            switch try client.connector.openReader(target: target, headers: headers) {
            case .session(let s): return s
            case .refused(let r):
                if r.status == 401 && !client.repository.isToken && !renewed && client.forgetTicket() {
                    renewed = true
                    continue
                }
                throw client.refusal(r, doing: "opening the snapshot", path: display)
            }
        }
    }

    func location(of digest: ArraySlice<UInt8>) -> String {
        "\(server):\(client.repository.datastore) chunk \(hexString(digest))"
    }

    // MARK: synchronous requests

    /// Downloads a file of the snapshot (`download?file-name=`); an index is remembered so that a
    /// new session registers its chunks again.
    func download(_ name: String, limit: Int) throws(SourceError) -> [UInt8] {
        let path = display + "/" + name
        let r = try get("/download?file-name=" + PBSRemoteClient.percent(name), limit: limit, path: path)
        guard r.status == 200 else { throw client.refusal(r, doing: "downloading \(name)", path: path) }
        let bytes = Array(buffer: r.body)
        if name.hasSuffix(".fidx") || name.hasSuffix(".didx") {
            let sha = Array(SHA256.hash(data: bytes))
            cond.withLock { if !indexes.contains(where: { $0.name == name }) { indexes.append((name, sha)) } }
        }
        return bytes
    }

    /// One GET on the current session, reconnecting when the connection is lost.
    private func get(_ target: String, limit: Int, path: String) throws(SourceError) -> PBSResponse {
        while true {
            let (s, gen) = try currentSession()
            do {
                return try s.get(target, limit: limit).wait()
            } catch PBSTransportError.tooLarge(let n) {
                throw SourceError(.damaged, path: path, "the server sent more than \(n) bytes")
            } catch {
                try reconnect(after: gen, why: PBSConnector.describe(error))
            }
        }
    }

    private func currentSession() throws(SourceError) -> (PBSReaderSession, Int) {
        cond.lock()
        defer { cond.unlock() }
        while reconnecting { cond.wait() }
        if let broken { throw broken }
        guard let session else { throw SourceError(.network, path: server, "the reader session is closed") }
        return (session, generation)
    }

    /// Opens a new session unless another thread already replaced generation `gen`; gives up after
    /// ``maxReconnects``. Never holds the lock while talking to the server (completions need it).
    private func reconnect(after gen: Int, why: String) throws(SourceError) {
        cond.lock()
        while reconnecting { cond.wait() }
        if let broken {
            cond.unlock()
            throw broken
        }
        if generation != gen {
            cond.unlock()
            return
        }
        guard reconnectCount < Self.maxReconnects else {
            let e = SourceError(.network, path: server, "connection lost (\(why)); gave up after \(Self.maxReconnects) reconnections")
            broken = e
            cond.broadcast()
            cond.unlock()
            throw e
        }
        reconnecting = true
        reconnectCount += 1
        let attempt = reconnectCount
        let old = session
        let toRegister = indexes
        cond.unlock()
        old?.close()
        // A short pause, longer each time: a server that restarts needs a moment.
        usleep(UInt32(min(attempt, 5)) * 200_000)
        var result: Result<PBSReaderSession, SourceError>
        do throws(SourceError) {
            let s = try openSession()
            for ix in toRegister {
                let r: PBSResponse
                do { r = try s.get("/download?file-name=" + PBSRemoteClient.percent(ix.name), limit: PBSFixedIndex.maxFileSize).wait() } catch {
                    throw SourceError(.network, path: server, "connection lost again while downloading \(ix.name): \(PBSConnector.describe(error))")
                }
                guard r.status == 200 else { throw client.refusal(r, doing: "downloading \(ix.name) again", path: display + "/" + ix.name) }
                guard Array(SHA256.hash(data: Array(buffer: r.body))) == ix.sha else {
                    throw SourceError(.damaged, path: display + "/" + ix.name, "the index changed on the server after the connection was lost")
                }
            }
            result = .success(s)
        } catch {
            result = .failure(error)
        }
        cond.lock()
        reconnecting = false
        switch result {
        case .success(let s):
            session = s
            generation += 1
            // Requests lost with the old connection go again on the new one.
            for (p, e) in entries where e.generation < generation {
                if case .success = e.result { continue }
                issueLocked(p)
            }
        case .failure(let e):
            session = nil
            broken = SourceError(e.kind, path: e.path, "reconnecting after the connection was lost (\(why)): \(e.detail)", errno: e.errno)
        }
        cond.broadcast()
        cond.unlock()
        if let broken = cond.withLock({ broken }) { throw broken }
    }

    // MARK: chunks

    func willFetch(_ digests: [ArraySlice<UInt8>], window: Int) {
        cond.withLock {
            epoch += 1
            entries = [:]
            sequence = digests.map { ArraySlice($0) }
            position = [:]
            for (i, d) in sequence.enumerated() where position[d] == nil { position[d] = i }
            self.window = max(1, window)
            next = 0
            furthest = -1
            issueAheadLocked()
        }
    }

    /// Sends requests until `window` are ahead of the furthest position asked for, with at most
    /// `window` requests out or answers held (the memory plan's share; a consumer that jumps ahead
    /// does not make everything in between arrive at once). A consumer whose chunk is not out yet
    /// asks for it itself, so that one more can be out per waiting loader.
    private func issueAheadLocked() {
        guard !reconnecting, session != nil else { return }
        while next < sequence.count && next <= furthest + window && entries.count < window {
            if position[sequence[next]] == next && entries[next] == nil { issueLocked(next) }
            next += 1
        }
    }

    private func issueLocked(_ p: Int) {
        guard let session else { return }
        let gen = generation, ep = epoch
        entries[p] = Entry(generation: gen, result: nil)
        chunkRequestCount += 1
        let target = "/chunk?digest=" + hexString(sequence[p])
        session.get(target, limit: PBSBlob.maxBlobSize + 4096).whenComplete { r in
            self.cond.withLock {
                guard self.epoch == ep, let e = self.entries[p], e.generation == gen else { return }
                self.entries[p]!.result = r
                self.cond.broadcast()
            }
        }
    }

    func fetch(_ digest: ArraySlice<UInt8>, into buffer: inout [UInt8], what: String) throws(SourceError) -> Int {
        let path = location(of: digest)
        let r: PBSResponse
        if let response = try takePrefetched(digest) {
            r = response
        } else {
            cond.withLock { chunkRequestCount += 1 }
            r = try get("/chunk?digest=" + hexString(digest), limit: PBSBlob.maxBlobSize + 4096, path: path)
        }
        guard r.status == 200 else { throw client.refusal(r, doing: "\(what): fetching the chunk", path: path) }
        let n = r.body.readableBytes
        guard n <= PBSBlob.maxBlobSize else {
            throw SourceError(.damaged, path: path, "\(what): chunk is \(n) bytes (limit 128 MiB)")
        }
        if buffer.count < n { buffer = [UInt8](repeating: 0, count: n) }
        buffer.withUnsafeMutableBytes { out in
            r.body.withUnsafeReadableBytes { src in
                if n > 0 { out.baseAddress!.copyMemory(from: src.baseAddress!, byteCount: n) }
            }
        }
        return n
    }

    /// The prefetched response for `digest` (waiting for it), or nil when it was not announced
    /// (or was taken before).
    private func takePrefetched(_ digest: ArraySlice<UInt8>) throws(SourceError) -> PBSResponse? {
        cond.lock()
        guard let p = position[digest] else {
            cond.unlock()
            return nil
        }
        position[digest] = nil
        if p > furthest { furthest = p }
        if entries[p] == nil && p < next {
            // Skipped while reconnecting or not yet connected: ask now.
            issueLocked(p)
        }
        issueAheadLocked()
        while true {
            if let e = entries[p], let result = e.result {
                switch result {
                case .success(let r):
                    entries[p] = nil
                    issueAheadLocked()
                    cond.unlock()
                    return r
                case .failure(let error):
                    if case PBSTransportError.tooLarge(let n) = error {
                        entries[p] = nil
                        cond.unlock()
                        throw SourceError(.damaged, path: location(of: digest), "the server sent more than \(n) bytes for the chunk")
                    }
                    let gen = e.generation
                    cond.unlock()
                    try reconnect(after: gen, why: PBSConnector.describe(error))
                    cond.lock()
                    if let e2 = entries[p], e2.generation < generation, e2.result != nil { issueLocked(p) }
                    if entries[p] == nil { issueLocked(p) }
                    continue
                }
            }
            if let broken {
                cond.unlock()
                throw broken
            }
            if entries[p] == nil && !reconnecting { issueLocked(p) }
            cond.wait()
        }
    }
}
