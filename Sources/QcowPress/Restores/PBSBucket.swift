import BackupSources
import PBSS3
import DirectIO
import Glibc
import S3Client

/// A PBS 4 datastore on S3-compatible object storage (`s3://BUCKET/DATASTORE`) and how to reach
/// it: the endpoint (default AWS in `region`), the addressing style, the pinned certificate, the
/// credentials (never shown: errors name the key id at most) and the requests in flight.
public struct PBSBucket: Sendable {
    public let url: String
    let endpoint: S3Endpoint
    let credentials: S3Credentials
    public let streams: Int

    /// - Parameters:
    ///   - url: `s3://BUCKET/DATASTORE`.
    ///   - endpoint: `https://host[:port]` or `http://host:port`; nil is AWS's endpoint of `region`.
    ///   - region: the signing region (nil: us-west-1, as PBS).
    ///   - pathStyle: `/BUCKET/KEY` instead of a virtual-hosted `BUCKET.host`.
    ///   - fingerprint: the SHA-256 of the endpoint's certificate to pin (PBS's `aa:bb:…` form);
    ///     nil verifies it by the system CAs.
    ///   - credentialsFile: two lines (key id, secret; a third: session token); when nil, the
    ///     credentials come from `environment` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN).
    ///   - environment: the process environment to take credentials from.
    ///   - streams: requests in flight (kept-alive connections).
    public init(url: String, endpoint: String?, region: String?, pathStyle: Bool, fingerprint: String?,
                credentialsFile: String?, environment: [String: String], streams: Int) throws(QcowPressError) {
        do throws(SourceError) { _ = try PBSS3Datastore.parse(url) } catch {
            throw .invalidArgument("\(error.path): \(error.detail)")
        }
        self.url = url
        do throws(S3Error) {
            self.endpoint = try S3Endpoint(endpoint: endpoint, region: region ?? "us-west-1", pathStyle: pathStyle, fingerprint: fingerprint)
            if let credentialsFile {
                credentials = try S3Credentials.fromFile(credentialsFile)
            } else if let c = S3Credentials.fromEnvironment(environment) {
                credentials = c
            } else {
                throw S3Error(code: "credentials", bucket: "", message:
                    "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass --s3-credentials FILE")
            }
        } catch {
            throw .invalidArgument("\(url): \(error.message)")
        }
        guard streams >= 1 else { throw .invalidArgument("--streams \(streams): must be at least 1") }
        self.streams = streams
    }

    func datastore() throws(SourceError) -> PBSS3Datastore {
        try PBSS3Datastore(url: url, endpoint: endpoint, credentials: credentials, streams: streams)
    }
}

extension PBSRestore {
    /// Opens a snapshot in a datastore on object storage (no PBS server).
    public init(bucket: PBSBucket, namespace: String?, snapshot: String, keyFile: String?,
                password: @escaping () throws(QcowPressError) -> String) throws(QcowPressError) {
        let snap: PBSS3Snapshot
        do throws(SourceError) { snap = try bucket.datastore().openSnapshot(namespace: namespace, snapshot: snapshot) } catch {
            throw QcowPressError(error)
        }
        try self.init(source: snap, keyFile: keyFile, password: password)
    }

    /// The snapshots of a backup group (`vm/100`) in a bucket, oldest first.
    public static func snapshots(bucket: PBSBucket, namespace: String?, group: String) throws(QcowPressError) -> [String] {
        do throws(SourceError) { return try bucket.datastore().snapshots(namespace: namespace, group: group) } catch {
            throw QcowPressError(error)
        }
    }

    /// What a namespace of a bucket's datastore holds: child namespaces and backup groups.
    public static func contents(bucket: PBSBucket, namespace: String?) throws(QcowPressError) -> (namespaces: [String], groups: [String]) {
        do throws(SourceError) { return try bucket.datastore().contents(namespace: namespace) } catch {
            throw QcowPressError(error)
        }
    }
}

extension PBSRestore {
    /// What a namespace of a local datastore holds: child namespaces (`ns/<name>` directories) and
    /// backup groups (`vm/<id>`, `ct/<id>`, `host/<id>` directories), as for a bucket.
    public static func contents(datastore: String, namespace: String?) throws(QcowPressError) -> (namespaces: [String], groups: [String]) {
        var dir = datastore
        let base = (namespace ?? "").isEmpty ? "" : namespace! + "/"
        do throws(SourceError) {
            for p in try PBSSnapshot.checkedNamespace(namespace) { dir += "/ns/" + p }
            func names(_ d: String, required: Bool) throws(SourceError) -> [String] {
                do throws(IOError) { return try FileNames.listing(d).filter { !$0.hasPrefix(".") }.sorted() } catch {
                    if !required && (error.errno == ENOENT || error.errno == ENOTDIR) { return [] }
                    if error.errno == ENOENT { throw SourceError(.missing, path: d, required && d == datastore ? "datastore directory does not exist" : "namespace does not exist") }
                    throw SourceError(.io, path: d, "cannot list the namespace: \(error.errnoName)", errno: error.errno)
                }
            }
            _ = try names(dir, required: true)
            var groups: [String] = []
            for t in ["ct", "host", "vm"] { groups += try names(dir + "/" + t, required: false).map { t + "/" + $0 } }
            let namespaces = try names(dir + "/ns", required: false).map { base + $0 }
            return (namespaces, groups)
        } catch {
            throw QcowPressError(error)
        }
    }
}
