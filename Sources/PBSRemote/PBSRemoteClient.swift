import BackupSources
import Foundation
import Synchronization
import NIOCore
import NIOHTTP1

/// A client of one Proxmox Backup Server repository: logs in (API token or ticket), lists a group's
/// snapshots and opens snapshots for reading (the reader protocol). Errors are ``SourceError``s
/// naming the server and what it said, one line each.
public final class PBSRemoteClient: Sendable {
    public let repository: PBSRepository
    let connector: PBSConnector
    private let credentials: PBSCredentials
    /// The login ticket, once logged in (renewed when the server says it expired).
    private let ticket = Mutex<(cookie: String, csrf: String)?>(nil)

    public init(repository: PBSRepository, credentials: PBSCredentials) throws(SourceError) {
        self.repository = repository
        self.credentials = credentials
        connector = PBSConnector(repository: repository, fingerprint: credentials.fingerprint)
        guard credentials.secret != nil else {
            let what = repository.isToken ? "the API token's secret" : "the password of \(repository.authID)"
            throw SourceError(.network, path: repository.server, "\(what) is not given (PBS_PASSWORD, PBS_PASSWORD_FILE or --password-file)")
        }
    }

    /// Percent-encodes everything but unreserved characters (RFC 3986).
    static func percent(_ s: String) -> String {
        var allowed = CharacterSet.alphanumerics.intersection(CharacterSet(charactersIn: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
        allowed.insert(charactersIn: "-._~")
        return s.addingPercentEncoding(withAllowedCharacters: allowed) ?? s
    }

    static func query(_ items: [(String, String)]) -> String {
        items.map { "\($0.0)=\(percent($0.1))" }.joined(separator: "&")
    }

    /// The headers that authenticate a request: `Authorization: PBSAPIToken ID:SECRET` for a token,
    /// else the ticket cookie and CSRF token from `POST /api2/json/access/ticket` (logged in once).
    func authHeaders() throws(SourceError) -> [(String, String)] {
        let secret = credentials.secret ?? ""
        if repository.isToken {
            return [("Authorization", "PBSAPIToken \(repository.authID):\(Self.percent(secret))")]
        }
        if let t = ticket.withLock({ $0 }) {
            return [("Cookie", "PBSAuthCookie=\(Self.percent(t.cookie))"), ("CSRFPreventionToken", t.csrf)]
        }
        let body: [UInt8]
        do {
            body = Array(try JSONSerialization.data(withJSONObject: ["username": repository.authID, "password": secret]))
        } catch {
            throw SourceError(.network, path: repository.server, "cannot encode the login request")
        }
        let r = try connector.request(method: .POST, target: "/api2/json/access/ticket",
                                      headers: [("Content-Type", "application/json")], body: body)
        guard r.status == 200 else {
            throw refusal(r, doing: "login as \(repository.authID)")
        }
        guard let obj = try? JSONSerialization.jsonObject(with: Data(r.body.readableBytesView)) as? [String: Any],
              let data = obj["data"] as? [String: Any], let t = data["ticket"] as? String,
              let csrf = data["CSRFPreventionToken"] as? String else {
            throw SourceError(.network, path: repository.server, "login as \(repository.authID): the answer lacks data.ticket or data.CSRFPreventionToken")
        }
        ticket.withLock { $0 = (t, csrf) }
        return [("Cookie", "PBSAuthCookie=\(Self.percent(t))"), ("CSRFPreventionToken", csrf)]
    }

    /// Drops the ticket so that the next request logs in again; false when there was none.
    func forgetTicket() -> Bool {
        ticket.withLock { t in
            defer { t = nil }
            return t != nil
        }
    }

    /// An error status as one line: what we did, the status, the server's message.
    func refusal(_ r: PBSResponse, doing: String, path: String? = nil) -> SourceError {
        var msg = r.text
        if msg.count > 200 { msg = String(msg.prefix(200)) + "…" }
        msg = msg.replacingOccurrences(of: "\n", with: " ")
        let kind: SourceError.Kind
        var why: String
        switch r.status {
        case 401:
            kind = .network
            why = repository.isToken ? "the server refused the API token \(repository.authID) (wrong secret?)"
                                     : "the server refused the password of \(repository.authID)"
        case 403:
            kind = .network
            why = "\(repository.authID) has no access"
        case 404:
            kind = .missing
            why = "not found"
        default:
            kind = msg.contains("does not exist") || msg.contains("not found") || msg.contains("No such file") ? .missing : .network
            why = "refused"
        }
        return SourceError(kind, path: path ?? repository.server, "\(doing): \(why) (HTTP \(r.status): \(msg.isEmpty ? "no message" : msg))")
    }

    /// A GET on the JSON API; returns `data`.
    func apiGet(_ target: String, doing: String) throws(SourceError) -> Any {
        let r = try connector.request(method: .GET, target: target, headers: try authHeaders())
        guard r.status == 200 else { throw refusal(r, doing: doing) }
        guard let obj = try? JSONSerialization.jsonObject(with: Data(r.body.readableBytesView)) as? [String: Any], let data = obj["data"] else {
            throw SourceError(.network, path: repository.server, "\(doing): the answer is not JSON with 'data'")
        }
        return data
    }

    /// The snapshots of a group (`vm/100`), oldest first, as `vm/100/2026-11-20T10:00:00Z`
    /// (`GET /api2/json/admin/datastore/{store}/snapshots`).
    public func snapshots(namespace: String?, group: String) throws(SourceError) -> [String] {
        let parts = try PBSSnapshot.checkedGroup(group)
        var q = [("backup-type", parts.type), ("backup-id", parts.id)]
        if let namespace, !namespace.isEmpty { q.append(("ns", namespace)) }
        let target = "/api2/json/admin/datastore/\(Self.percent(repository.datastore))/snapshots?" + Self.query(q)
        guard let list = try apiGet(target, doing: "listing \(group)") as? [[String: Any]] else {
            throw SourceError(.network, path: repository.server, "listing \(group): 'data' is not a list")
        }
        var times: [Int64] = []
        for item in list {
            guard let t = (item["backup-time"] as? NSNumber)?.int64Value else {
                throw SourceError(.network, path: repository.server, "listing \(group): an entry lacks backup-time")
            }
            if item["backup-type"] as? String == parts.type, item["backup-id"] as? String == parts.id { times.append(t) }
        }
        if times.isEmpty {
            throw SourceError(.missing, path: "\(repository.server):\(repository.datastore)", "backup group \(group) has no snapshots")
        }
        return times.sorted().map { group + "/" + Self.rfc3339($0) }
    }

    /// Opens a snapshot (`vm/100/2026-11-20T10:00:00Z`) for reading: a reader session, the manifest.
    public func openSnapshot(namespace: String?, snapshot: String) throws(SourceError) -> PBSRemoteSnapshot {
        let parts = try PBSSnapshot.checkedSnapshot(snapshot)
        guard let epoch = Self.epoch(parts.time) else {
            throw SourceError(.damaged, path: snapshot, "backup time '\(parts.time)' is not YYYY-MM-DDTHH:MM:SSZ")
        }
        var q = [("store", repository.datastore)]
        var display = "\(repository.server):\(repository.datastore)"
        if let namespace, !namespace.isEmpty {
            _ = try PBSSnapshot.checkedNamespace(namespace)
            q.append(("ns", namespace))
            display += "/ns/" + namespace.split(separator: "/").joined(separator: "/ns/")
        }
        q += [("backup-type", parts.type), ("backup-id", parts.id), ("backup-time", String(epoch)), ("debug", "false")]
        let reader = PBSRemoteReader(client: self, target: "/api2/json/reader?" + Self.query(q), display: display + "/" + snapshot)
        try reader.connect()
        return try PBSRemoteSnapshot(reader: reader)
    }

    /// `2026-11-20T10:00:00Z` → seconds since the epoch (BACKUP_TIME_RE, UTC only).
    static func epoch(_ s: String) -> Int64? {
        let u = Array(s.utf8)
        guard u.count == 20, u[4] == 45, u[7] == 45, u[10] == 84, u[13] == 58, u[16] == 58, u[19] == 90 else { return nil }
        func n(_ a: Int, _ b: Int) -> Int32? {
            var v: Int32 = 0
            for i in a..<b { guard (48...57).contains(u[i]) else { return nil }; v = v * 10 + Int32(u[i] - 48) }
            return v
        }
        guard let y = n(0, 4), let mo = n(5, 7), let d = n(8, 10), let h = n(11, 13), let mi = n(14, 16), let se = n(17, 19),
              (1...12).contains(mo), (1...31).contains(d), h < 24, mi < 60, se < 61 else { return nil }
        var t = tm()
        t.tm_year = y - 1900; t.tm_mon = mo - 1; t.tm_mday = d; t.tm_hour = h; t.tm_min = mi; t.tm_sec = se
        let e = timegm(&t)
        return rfc3339(Int64(e)) == s ? Int64(e) : nil
    }

    static func rfc3339(_ epoch: Int64) -> String {
        var t = time_t(epoch)
        var parts = tm()
        gmtime_r(&t, &parts)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02dZ", Int(parts.tm_year) + 1900, Int(parts.tm_mon) + 1, Int(parts.tm_mday),
                      Int(parts.tm_hour), Int(parts.tm_min), Int(parts.tm_sec))
    }
}

/// A snapshot on a server, read through one reader session (re-opened when it drops).
public final class PBSRemoteSnapshot: PBSSnapshotSource {
    public let manifest: PBSManifest
    public let manifestPath: String
    public let directory: String
    let reader: PBSRemoteReader

    init(reader: PBSRemoteReader) throws(SourceError) {
        self.reader = reader
        directory = reader.display
        manifestPath = reader.display + "/index.json.blob"
        let bytes = try reader.download("index.json.blob", limit: PBSBlob.maxBlobSize)
        manifest = try PBSManifest(bytes: bytes, path: manifestPath)
    }

    public var chunks: any PBSChunkStore { reader }

    public func readFile(_ name: String, limit: Int) throws(SourceError) -> [UInt8] {
        try PBSSnapshot.checkComponent(name, what: "file name")
        return try reader.download(name, limit: limit)
    }

    /// Reconnections so far (a dropped connection is opened again, a bounded number of times).
    public var reconnects: Int { reader.reconnectCount }
    /// Chunk requests sent so far (each chunk once, unless a connection dropped under it).
    public var chunkRequests: Int { reader.chunkRequestCount }
}
