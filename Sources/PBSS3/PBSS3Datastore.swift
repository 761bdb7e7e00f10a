import BackupSources
import S3Client

/// A PBS 4 datastore kept on S3-compatible object storage, read straight from the bucket (no PBS
/// server). The layout (proxmox-backup `pbs-datastore`, its s3 module): every key begins with the
/// datastore name; chunks are `<store>/.chunks/<4 hex>/<digest>` holding the bytes of a local chunk
/// file; snapshot content is `<store>/.cnt/` followed by the path it has on disk
/// (`[ns/<a>/ns/<b>/]vm/100/<time>/index.json.blob`). Listings are prefix listings.
public final class PBSS3Datastore: Sendable {
    public let client: S3Client
    public let bucket: String
    public let store: String

    /// `url` is `s3://BUCKET/DATASTORE`.
    public init(url: String, endpoint: S3Endpoint, credentials: S3Credentials, streams: Int) throws(SourceError) {
        let (bucket, store) = try Self.parse(url)
        self.bucket = bucket
        self.store = store
        do throws(S3Error) {
            client = try S3Client(endpoint: endpoint, bucket: bucket, credentials: credentials, streams: streams)
        } catch {
            throw SourceError(.network, path: url, "\(error.code): \(error.message)")
        }
    }

    deinit { client.shutdown() }

    /// `s3://BUCKET/DATASTORE` → (bucket, datastore); the datastore is one plain name.
    public static func parse(_ url: String) throws(SourceError) -> (bucket: String, store: String) {
        guard url.hasPrefix("s3://") else {
            throw SourceError(.damaged, path: url, "--s3 takes s3://BUCKET/DATASTORE")
        }
        let parts = url.dropFirst(5).split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 2 || (parts.count == 3 && parts[2].isEmpty), !parts[0].isEmpty else {
            throw SourceError(.damaged, path: url, "--s3 takes s3://BUCKET/DATASTORE (one bucket, one datastore name)")
        }
        try PBSSnapshot.checkComponent(parts[1], what: "datastore name")
        return (parts[0], parts[1])
    }

    /// `s3://bucket/store`: names the datastore in errors.
    public var display: String { "s3://\(bucket)/\(store)" }

    /// The key prefix of a namespace's content, ending in "/": `<store>/.cnt/[ns/a/ns/b/]`.
    func contentPrefix(namespace: String?) throws(SourceError) -> String {
        var p = store + "/.cnt/"
        for c in try PBSSnapshot.checkedNamespace(namespace) { p += "ns/" + c + "/" }
        return p
    }

    /// An S3 failure as one line naming the object (`s3://bucket/key`) and S3's error code.
    func failure(_ e: S3Error, doing: String) -> SourceError {
        let kind: SourceError.Kind = ["NoSuchKey", "NoSuchBucket"].contains(e.code) ? .missing : .network
        let path = e.key.map { "s3://\(bucket)/\($0)" } ?? display
        let status = e.status.map { " (HTTP \($0))" } ?? ""
        var msg = e.message.replacingOccurrences(of: "\n", with: " ")
        if msg.count > 200 { msg = String(msg.prefix(200)) + "…" }
        return SourceError(kind, path: path, "\(doing): \(e.code): \(msg)\(status)")
    }

    func list(_ prefix: String, delimiter: String?, doing: String) throws(SourceError) -> (objects: [S3Object], commonPrefixes: [String]) {
        do throws(S3Error) { return try client.list(prefix: prefix, delimiter: delimiter) } catch {
            throw failure(error, doing: doing)
        }
    }

    /// Refuses a datastore name with nothing under it (a typo, or another bucket): one listing of
    /// the store's top level (`.chunks/`, `.cnt/`), never of its chunks.
    func checkExists() throws(SourceError) {
        let top = try list(store + "/", delimiter: "/", doing: "looking for the datastore")
        guard top.commonPrefixes.contains(store + "/.chunks/") || top.commonPrefixes.contains(store + "/.cnt/") else {
            throw SourceError(.missing, path: display, "no datastore '\(store)' in bucket \(bucket) (no \(store)/.chunks/ or \(store)/.cnt/)")
        }
    }

    /// The snapshots of a backup group (`vm/100`), oldest first: the time-named prefixes of the
    /// group that hold a manifest, as `vm/100/2026-11-20T10:00:00Z`.
    public func snapshots(namespace: String?, group: String) throws(SourceError) -> [String] {
        _ = try PBSSnapshot.checkedGroup(group)
        let prefix = try contentPrefix(namespace: namespace) + group + "/"
        let listing = try list(prefix, delimiter: nil, doing: "listing the backup group")
        var times: [String] = []
        for o in listing.objects where o.key.hasSuffix("/index.json.blob") {
            let rest = o.key.dropFirst(prefix.count).split(separator: "/", omittingEmptySubsequences: false)
            if rest.count == 2 { times.append(String(rest[0])) }
        }
        if times.isEmpty {
            try checkExists()
            throw SourceError(.missing, path: display + "/" + prefix.dropFirst(store.count + 1) + group, "backup group does not exist")
        }
        return times.sorted().map { group + "/" + $0 }  // RFC 3339 UTC times sort as text
    }

    /// What a namespace holds: its child namespaces (full names, `a/b`) and its backup groups
    /// (`vm/100`), each sorted.
    public func contents(namespace: String?) throws(SourceError) -> (namespaces: [String], groups: [String]) {
        let prefix = try contentPrefix(namespace: namespace)
        let top = try list(prefix, delimiter: "/", doing: "listing the namespace")
        var groups: [String] = []
        var namespaces: [String] = []
        for p in top.commonPrefixes {
            let name = String(p.dropFirst(prefix.count).dropLast())
            if ["vm", "ct", "host"].contains(name) {
                let ids = try list(p, delimiter: "/", doing: "listing the \(name) groups")
                groups += ids.commonPrefixes.map { name + "/" + $0.dropFirst(p.count).dropLast() }
            } else if name == "ns" {
                let children = try list(p, delimiter: "/", doing: "listing the namespaces")
                let base = (namespace ?? "").isEmpty ? "" : namespace! + "/"
                namespaces += children.commonPrefixes.map { base + $0.dropFirst(p.count).dropLast() }
            }
        }
        if groups.isEmpty && namespaces.isEmpty {
            try checkExists()
            if let namespace, !namespace.isEmpty {
                throw SourceError(.missing, path: display, "namespace '\(namespace)' does not exist")
            }
        }
        return (namespaces.sorted(), groups.sorted())
    }

    /// Opens a snapshot (`vm/100/2026-11-20T10:00:00Z`): reads and parses its manifest.
    public func openSnapshot(namespace: String?, snapshot: String) throws(SourceError) -> PBSS3Snapshot {
        let parts = try PBSSnapshot.checkedSnapshot(snapshot)
        try PBSSnapshot.checkComponent(parts.time, what: "backup time")
        let prefix = try contentPrefix(namespace: namespace) + snapshot + "/"
        return try PBSS3Snapshot(datastore: self, prefix: prefix)
    }
}
