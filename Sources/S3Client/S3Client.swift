import Synchronization

/// A client of one bucket: blocking calls for the caller's threads, `startGet` for many requests in
/// flight; up to `streams` kept-alive connections, requests queued when all are busy.
public final class S3Client: Sendable {
    public let endpoint: S3Endpoint
    public let bucket: String
    let credentials: S3Credentials
    public let streams: Int
    private let sent = Atomic<Int>(0)

    public init(endpoint: S3Endpoint, bucket: String, credentials: S3Credentials, streams: Int) throws(S3Error) {
        guard !bucket.isEmpty, !bucket.contains("/") else {
            throw S3Error(code: "endpoint", bucket: bucket, message: "'\(bucket)' is not a bucket name")
        }
        guard streams >= 1 else {
            throw S3Error(code: "endpoint", bucket: bucket, message: "streams must be at least 1, not \(streams)")
        }
        self.endpoint = endpoint
        self.bucket = bucket
        self.credentials = credentials
        self.streams = streams
    }

    /// The requests sent so far (retries included).
    public var requestCount: Int { sent.load(ordering: .relaxed) }

    /// The object's bytes (or the bytes of `range`, end exclusive). Blocking: not on a NIO thread.
    /// Fails with "too-large" when the body is over `limit` bytes.
    public func get(_ key: String, range: Range<UInt64>? = nil, limit: Int) throws(S3Error) -> [UInt8] {
        throw S3Error(code: "unimplemented", bucket: bucket, key: key, message: "not implemented yet")
    }

    /// Starts a GET; `done` is called once on a NIO thread (used for prefetch windows of many requests in flight).
    public func startGet(_ key: String, range: Range<UInt64>? = nil, limit: Int,
                         done: @escaping @Sendable (Result<[UInt8], S3Error>) -> Void) {
        done(.failure(S3Error(code: "unimplemented", bucket: bucket, key: key, message: "not implemented yet")))
    }

    /// The object's size, nil when the key does not exist.
    public func head(_ key: String) throws(S3Error) -> UInt64? {
        throw S3Error(code: "unimplemented", bucket: bucket, key: key, message: "not implemented yet")
    }

    /// Every object under `prefix` (all pages), and with a delimiter the common prefixes.
    public func list(prefix: String, delimiter: String?) throws(S3Error) -> (objects: [S3Object], commonPrefixes: [String]) {
        throw S3Error(code: "unimplemented", bucket: bucket, key: prefix, message: "not implemented yet")
    }

    /// Closes the connections; later calls fail with "shutdown".
    public func shutdown() {}
}
