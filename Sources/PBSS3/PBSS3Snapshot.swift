import BackupSources
import S3Client

/// A snapshot in a bucket: its files are the objects under `<store>/.cnt/…/<type>/<id>/<time>/`.
public final class PBSS3Snapshot: PBSSnapshotSource {
    public let manifest: PBSManifest
    public let manifestPath: String
    public let directory: String
    let datastore: PBSS3Datastore
    let prefix: String
    let store: PBSS3Chunks

    init(datastore: PBSS3Datastore, prefix: String) throws(SourceError) {
        self.datastore = datastore
        self.prefix = prefix
        directory = "s3://\(datastore.bucket)/\(prefix.dropLast())"
        manifestPath = directory + "/index.json.blob"
        store = PBSS3Chunks(datastore: datastore)
        let bytes: [UInt8]
        do throws(SourceError) {
            bytes = try Self.get(datastore, prefix + "index.json.blob", limit: PBSBlob.maxBlobSize, doing: "reading the manifest")
        } catch where error.kind == .missing {
            // A wrong datastore name says so, rather than that the snapshot is missing.
            try datastore.checkExists()
            throw SourceError(.missing, path: directory, "snapshot does not exist (no index.json.blob)")
        }
        manifest = try PBSManifest(bytes: bytes, path: manifestPath)
    }

    public var chunks: any PBSChunkStore { store }

    public func readFile(_ name: String, limit: Int) throws(SourceError) -> [UInt8] {
        try PBSSnapshot.checkComponent(name, what: "file name")
        return try Self.get(datastore, prefix + name, limit: limit, doing: name.hasSuffix(".fidx") ? "reading the fixed index" : "reading the blob")
    }

    static func get(_ ds: PBSS3Datastore, _ key: String, limit: Int, doing: String) throws(SourceError) -> [UInt8] {
        do throws(S3Error) { return try ds.client.get(key, limit: limit) } catch {
            throw ds.failure(error, doing: doing)
        }
    }

    /// Requests sent to the bucket so far (listings, files and chunks; retries included).
    public var requests: Int { datastore.client.requestCount }
}

/// The chunks of a datastore in a bucket: one GET per chunk, `willFetch` keeping up to `window`
/// in flight ahead of the loaders (``PBSPrefetchWindow``) over the client's kept-alive connections.
final class PBSS3Chunks: PBSChunkStore {
    let datastore: PBSS3Datastore
    let window: PBSPrefetchWindow<[UInt8]>

    init(datastore: PBSS3Datastore) {
        self.datastore = datastore
        let client = datastore.client
        let store = datastore.store
        window = PBSPrefetchWindow { [weak datastore] digest, done in
            guard let datastore else {
                done(.failure(SourceError(.network, path: "s3://\(client.bucket)/\(Self.key(store, digest))", "the datastore was closed")))
                return
            }
            client.startGet(Self.key(store, digest), limit: PBSBlob.maxBlobSize + 1) { r in
                done(r.mapError { datastore.failure($0, doing: "fetching the chunk") })
            }
        }
    }

    var isRemote: Bool { true }

    static func key(_ store: String, _ digest: ArraySlice<UInt8>) -> String {
        let hex = hexString(digest)
        return store + "/.chunks/" + hex.prefix(4) + "/" + hex
    }

    func location(of digest: ArraySlice<UInt8>) -> String {
        "s3://\(datastore.bucket)/\(Self.key(datastore.store, digest))"
    }

    func willFetch(_ digests: [ArraySlice<UInt8>], window: Int) {
        self.window.announce(digests, window: window)
    }

    func fetch(_ digest: ArraySlice<UInt8>, into buffer: inout [UInt8], what: String) throws(SourceError) -> Int {
        let bytes: [UInt8]
        do throws(SourceError) {
            if let b = try window.take(digest) {
                bytes = b
            } else {
                bytes = try PBSS3Snapshot.get(datastore, Self.key(datastore.store, digest), limit: PBSBlob.maxBlobSize + 1, doing: "fetching the chunk")
            }
        } catch {
            throw SourceError(error.kind, path: error.path, "\(what): \(error.detail)", errno: error.errno)
        }
        guard bytes.count <= PBSBlob.maxBlobSize else {
            throw SourceError(.damaged, path: location(of: digest), "\(what): chunk object is over 128 MiB")
        }
        // The received array becomes the loader's buffer (no 4 MiB copy per chunk).
        buffer = bytes
        return bytes.count
    }
}
