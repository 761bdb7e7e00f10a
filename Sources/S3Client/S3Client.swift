import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// A client of one bucket: blocking calls for the caller's threads, `startGet` for many requests in
/// flight; up to `streams` kept-alive connections, requests queued when all are busy. Every
/// request is signed with AWS Signature V4 when it is sent. Throttling (503 SlowDown) and server
/// errors (500, 502, 504) are retried with jittered exponential backoff, a dropped connection on a
/// new connection; a retry replaces the response, so a body is delivered once.
public final class S3Client: Sendable {
    public let endpoint: S3Endpoint
    public let bucket: String
    let credentials: S3Credentials
    public let streams: Int
    let pool: S3Pool
    let group: EventLoopGroup
    /// The clock of the signatures (seconds since the epoch); tests fix it.
    let now: @Sendable () -> Int

    /// How requests are retried.
    struct RetryPolicy: Sendable {
        /// Attempts per request, the first included: 6 attempts with the default backoff wait at
        /// most 0.2+0.4+0.8+1.6+3.2 = 6.2 s in all, inside the brief's ~20 s, and outlast the few
        /// seconds a throttling S3 partition takes to scale (AWS recommends retrying SlowDown with
        /// backoff).
        var maxAttempts = 6
        /// The backoff before retry n (1-based) is a random time in [d/2, d], d = base·2^n capped:
        /// jitter spreads the retries of many streams throttled at once.
        var backoffBase = 0.1
        var backoffCap = 4.0
        /// Immediate retries of a request whose reused kept-alive connection turned out closed
        /// before a byte of the response came (the server's idle close racing our send): not
        /// counted as attempts, bounded so a server that closes every connection still ends in an
        /// error.
        var staleRetries = 2
    }
    let retry: RetryPolicy

    public convenience init(endpoint: S3Endpoint, bucket: String, credentials: S3Credentials, streams: Int) throws(S3Error) {
        try self.init(endpoint: endpoint, bucket: bucket, credentials: credentials, streams: streams,
                      now: { Int(time(nil)) }, retry: RetryPolicy())
    }

    init(endpoint: S3Endpoint, bucket: String, credentials: S3Credentials, streams: Int,
         now: @escaping @Sendable () -> Int, retry: RetryPolicy,
         idleTimeout: TimeAmount = S3ResponseHandler.idleTimeout) throws(S3Error) {
        guard !bucket.isEmpty, !bucket.contains("/") else {
            throw S3Error(code: "endpoint", bucket: bucket, message: "'\(bucket)' is not a bucket name")
        }
        guard streams >= 1 else {
            throw S3Error(code: "endpoint", bucket: bucket, message: "streams must be at least 1, not \(streams)")
        }
        var endpoint = endpoint
        if !endpoint.pathStyle, !Self.virtualHostable(bucket, tls: endpoint.tls) { endpoint.pathStyle = true }
        self.endpoint = endpoint
        self.bucket = bucket
        self.credentials = credentials
        self.streams = streams
        self.now = now
        self.retry = retry
        group = MultiThreadedEventLoopGroup.singleton
        var connector = try S3Connector(endpoint: endpoint, bucket: bucket, group: group)
        connector.idleTimeout = idleTimeout
        pool = S3Pool(streams: streams, connector: connector)
    }

    /// Whether `bucket` can be a host name label (as botocore decides): lowercase letters, digits
    /// and '-', 3 to 63 characters; a '.' only over plain http (over TLS a dotted bucket would not
    /// match the wildcard certificate *.s3.<region>.amazonaws.com). Otherwise path style is used.
    static func virtualHostable(_ bucket: String, tls: Bool) -> Bool {
        guard (3...63).contains(bucket.utf8.count), bucket.first != "-", bucket.last != "-" else { return false }
        return bucket.utf8.allSatisfy { c in
            (c >= 0x61 && c <= 0x7A) || (c >= 0x30 && c <= 0x39) || c == UInt8(ascii: "-") || (!tls && c == UInt8(ascii: "."))
        }
    }

    /// The requests sent so far (retries included).
    public var requestCount: Int { pool.requestCount }

    /// The object's bytes (or the bytes of `range`, end exclusive). Blocking: not on a NIO thread.
    /// Fails with "too-large" when the body is over `limit` bytes.
    public func get(_ key: String, range: Range<UInt64>? = nil, limit: Int) throws(S3Error) -> [UInt8] {
        let p = group.next().makePromise(of: [UInt8].self)
        startGet(key, range: range, limit: limit) { p.completeWith($0.mapError { $0 as Error }) }
        return try wait(p.futureResult, key: key)
    }

    /// Starts a GET; `done` is called once on a NIO thread (used for prefetch windows of many requests in flight).
    public func startGet(_ key: String, range: Range<UInt64>? = nil, limit: Int,
                         done: @escaping @Sendable (Result<[UInt8], S3Error>) -> Void) {
        var headers: [(String, String)] = []
        if let range {
            guard !range.isEmpty else {
                done(.failure(S3Error(code: "range", bucket: bucket, key: key, message: "an empty byte range \(range)")))
                return
            }
            headers.append(("Range", "bytes=\(range.lowerBound)-\(range.upperBound - 1)"))
        }
        let op = Operation(method: .GET, path: objectPath(key), query: [], headers: headers, limit: limit, key: key)
        perform(op) { [bucket] result in
            done(result.flatMap { response -> Result<[UInt8], S3Error> in
                // A server that ignores Range answers 200 with the whole object: cut the range out.
                if let range, response.status == 200 {
                    guard UInt64(response.body.count) >= range.upperBound else {
                        return .failure(S3Error(code: "range", bucket: bucket, key: key, status: 200, message:
                            "the server sent \(response.body.count) bytes for the range \(range.lowerBound)-\(range.upperBound - 1)"))
                    }
                    return .success(Array(response.body[Int(range.lowerBound)..<Int(range.upperBound)]))
                }
                return .success(response.body)
            })
        }
    }

    /// The object's size, nil when the key does not exist.
    public func head(_ key: String) throws(S3Error) -> UInt64? {
        let p = group.next().makePromise(of: UInt64?.self)
        let op = Operation(method: .HEAD, path: objectPath(key), query: [], headers: [], limit: 0, key: key,
                           notFoundIsNil: true)
        perform(op) { [bucket] result in
            p.completeWith(result.flatMap { response -> Result<UInt64?, S3Error> in
                if response.status == 404 { return .success(nil) }
                guard let size = response.headers.first(name: "content-length").flatMap({ UInt64($0) }) else {
                    return .failure(S3Error(code: "protocol", bucket: bucket, key: key, status: response.status,
                                            message: "the HEAD response has no Content-Length"))
                }
                return .success(size)
            }.mapError { $0 as Error })
        }
        return try wait(p.futureResult, key: key)
    }

    /// Every object under `prefix` (all pages), and with a delimiter the common prefixes.
    public func list(prefix: String, delimiter: String?) throws(S3Error) -> (objects: [S3Object], commonPrefixes: [String]) {
        try list(prefix: prefix, delimiter: delimiter, pageSize: nil)
    }

    /// `pageSize` (max-keys) lets tests force many pages; nil takes the server's (1000 on S3).
    func list(prefix: String, delimiter: String?, pageSize: Int?) throws(S3Error) -> (objects: [S3Object], commonPrefixes: [String]) {
        var objects: [S3Object] = []
        var prefixes: [String] = []
        var token: String? = nil
        repeat {
            var query: [(String, String)] = [("list-type", "2"), ("prefix", prefix)]
            if let delimiter { query.append(("delimiter", delimiter)) }
            if let token { query.append(("continuation-token", token)) }
            if let pageSize { query.append(("max-keys", String(pageSize))) }
            let op = Operation(method: .GET, path: pathStyleRoot, query: query, headers: [],
                               limit: Self.listPageLimit, key: prefix)
            let p = group.next().makePromise(of: [UInt8].self)
            perform(op) { p.completeWith($0.map(\.body).mapError { $0 as Error }) }
            let body = try wait(p.futureResult, key: prefix)
            let page: ListPage
            do {
                page = try ListPage.parse(body)
            } catch {
                throw S3Error(code: "protocol", bucket: bucket, key: prefix,
                              message: "the listing is not a ListBucketResult: \(error.why) at byte \(error.offset)")
            }
            objects += page.objects
            prefixes += page.commonPrefixes
            guard page.isTruncated else { break }
            guard page.nextContinuationToken != token else {
                throw S3Error(code: "protocol", bucket: bucket, key: prefix, message: "the listing repeats its continuation token")
            }
            token = page.nextContinuationToken
        } while true
        return (objects, prefixes)
    }

    /// One page of a listing is at most 1000 keys of at most 1 KiB each plus their metadata
    /// (~350 bytes): 4 MiB holds it with room.
    static let listPageLimit = 4 << 20

    /// Closes the connections; later calls fail with "shutdown".
    public func shutdown() { pool.shutdown() }

    func objectPath(_ key: String) -> String {
        endpoint.pathStyle ? "/\(bucket)/\(key)" : "/\(key)"
    }

    var pathStyleRoot: String { endpoint.pathStyle ? "/\(bucket)" : "/" }

    private func wait<T: Sendable>(_ f: EventLoopFuture<T>, key: String) throws(S3Error) -> T {
        // Blocking an event loop on a request that needs the same loop would never return (NIO
        // traps in debug builds): refused with an error instead.
        guard MultiThreadedEventLoopGroup.currentEventLoop == nil else {
            throw S3Error(code: "internal", bucket: bucket, key: key,
                          message: "a blocking S3 call on a NIO event-loop thread (use startGet there)")
        }
        do {
            return try f.wait()
        } catch let e as S3Error {
            throw e
        } catch {
            throw S3Error(code: "internal", bucket: bucket, key: key, message: "\(error)")
        }
    }
}
