import Foundation
import NIOCore
import NIOPosix
@testable import S3Client
import Synchronization
import Testing

/// The client against stub servers: retries, dropped connections, limits, keep-alive, the
/// queue of requests over `streams` connections, error mapping.
@Suite(.tags(.fast, .faults)) struct S3TransportTests {
    static let credentials = S3Credentials(accessKeyID: "AKIDSTUB", secretAccessKey: "stub-secret-do-not-print")
    /// Backoff of a millisecond: the retry logic is under test, not the waiting.
    static let fastRetry = S3Client.RetryPolicy(maxAttempts: 6, backoffBase: 0.0005, backoffCap: 0.002, staleRetries: 2)

    static func client(_ server: StubServer, streams: Int = 2) throws -> S3Client {
        try S3Client(endpoint: S3Endpoint(endpoint: "http://127.0.0.1:\(server.port)", pathStyle: true, fingerprint: nil),
                     bucket: "bkt", credentials: credentials, streams: streams, now: { Int(time(nil)) }, retry: fastRetry)
    }

    static let ok = StubServer.response(200, "OK", body: "helloworld")

    @Test func slowDownIsRetriedAndTheBodyArrivesOnce() throws {
        let server = try StubServer { i, _ in
            i < 2 ? .raw(StubServer.response(503, "Slow Down", body: StubServer.errorDocument("SlowDown", "Please reduce your request rate.")), close: false)
                : .raw(Self.ok, close: false)
        }
        defer { server.stop() }
        let c = try Self.client(server)
        defer { c.shutdown() }
        #expect(try c.get("store/.chunks/0000/x", limit: 100) == Array("helloworld".utf8))
        #expect(c.requestCount == 3)
        #expect(server.requests.count == 3)
        #expect(server.requests.allSatisfy { $0.hasPrefix("GET /bkt/store/.chunks/0000/x HTTP/1.1") })
    }

    @Test func serverErrorsGiveUpAfterTheAttempts() throws {
        let server = try StubServer { _, _ in
            .raw(StubServer.response(500, "Internal", body: StubServer.errorDocument("InternalError", "We encountered an internal error.")), close: false)
        }
        defer { server.stop() }
        let c = try Self.client(server)
        defer { c.shutdown() }
        let e = #expect(throws: S3Error.self) { try c.get("k", limit: 100) }
        #expect(e?.description == "s3://bkt/k: InternalError: We encountered an internal error. (after 6 attempts) (HTTP 500)")
        #expect(c.requestCount == 6)
    }

    @Test func aConnectionDroppedMidBodyIsRetriedOnANewOneAndTheBodyIsNotAppended() throws {
        let server = try StubServer { i, _ in
            i == 0 ? .raw("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", close: true) : .raw(Self.ok, close: false)
        }
        defer { server.stop() }
        let c = try Self.client(server)
        defer { c.shutdown() }
        #expect(try c.get("k", limit: 100) == Array("helloworld".utf8))
        #expect(c.requestCount == 2)
        #expect(server.connections == 2)
    }

    @Test func aHangUpBeforeTheResponseIsRetried() throws {
        let server = try StubServer { i, _ in i == 0 ? .hangUp : .raw(Self.ok, close: false) }
        defer { server.stop() }
        let c = try Self.client(server)
        defer { c.shutdown() }
        #expect(try c.startAndWait(c, "k") == Array("helloworld".utf8))
        #expect(c.requestCount == 2)
    }

    @Test func aServerThatAlwaysDropsEndsInOneConnectionError() throws {
        let server = try StubServer { _, _ in .hangUp }
        defer { server.stop() }
        let c = try Self.client(server)
        defer { c.shutdown() }
        let e = #expect(throws: S3Error.self) { try c.get("k", limit: 100) }
        #expect(e?.code == "connection")
        #expect(e?.description.contains("\n") == false)
        #expect(c.requestCount == 6)
    }

    @Test func keptAliveConnectionsAreReusedAndRequestsQueueOverStreams() throws {
        let server = try StubServer { i, _ in .raw(StubServer.response(200, "OK", body: "body\(i % 10)"), close: false) }
        defer { server.stop() }
        let c = try Self.client(server, streams: 3)
        defer { c.shutdown() }
        for _ in 0..<5 { _ = try c.get("k", limit: 100) }
        #expect(server.connections == 1)
        let results = Mutex<[Result<[UInt8], S3Error>]>([])
        let all = DispatchSemaphore(value: 0)
        for i in 0..<40 {
            c.startGet("k\(i)", limit: 100) { r in
                if results.withLock({ $0.append(r); return $0.count }) == 40 { all.signal() }
            }
        }
        all.wait()
        #expect(results.withLock { $0.allSatisfy { (try? $0.get())?.count == 5 } })
        #expect(server.connections <= 3)
        #expect(c.requestCount == 45)
    }

    @Test func aBodyOverTheLimitIsRefusedNotRetried() throws {
        let server = try StubServer { _, _ in .raw(Self.ok, close: false) }
        defer { server.stop() }
        let c = try Self.client(server)
        defer { c.shutdown() }
        let e = #expect(throws: S3Error.self) { try c.get("k", limit: 4) }
        #expect(e?.code == "too-large")
        #expect(c.requestCount == 1)
        // Chunked, no Content-Length: refused once the bytes pass the limit.
        let chunked = try StubServer { _, _ in
            .raw("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n", close: false)
        }
        defer { chunked.stop() }
        let c2 = try Self.client(chunked)
        defer { c2.shutdown() }
        #expect(throws: S3Error.self) { try c2.get("k", limit: 7) }
        #expect(try c2.get("k", limit: 10) == Array("helloworld".utf8))
    }

    @Test func errorsMapToS3Codes() throws {
        let server = try StubServer { _, request in
            if request.hasPrefix("HEAD /bkt/missing") { return .raw("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", close: false) }
            if request.hasPrefix("HEAD /bkt/denied") { return .raw("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", close: false) }
            if request.hasPrefix("HEAD") { return .raw("HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n", close: false) }
            if request.hasPrefix("GET /bkt/redirect") {
                return .raw(StubServer.response(301, "Moved", body: StubServer.errorDocument("PermanentRedirect", "Use the right endpoint."),
                                                headers: ["x-amz-bucket-region: eu-west-2"]), close: false)
            }
            if request.hasPrefix("GET /bkt/html") { return .raw(StubServer.response(502, "Bad Gateway", body: "<html>bad</html>"), close: false) }
            return .raw(StubServer.response(404, "Not Found", body: StubServer.errorDocument("NoSuchKey", "The specified key does not exist.")), close: false)
        }
        defer { server.stop() }
        let c = try Self.client(server)
        defer { c.shutdown() }
        #expect(try c.head("present") == 12345)
        #expect(try c.head("missing") == nil)
        let denied = #expect(throws: S3Error.self) { try c.head("denied") }
        #expect(denied?.code == "AccessDenied")
        let nsk = #expect(throws: S3Error.self) { try c.get("store/.chunks/abcd/abcdef", limit: 100) }
        #expect(nsk?.description == "s3://bkt/store/.chunks/abcd/abcdef: NoSuchKey: The specified key does not exist. (HTTP 404)")
        let moved = #expect(throws: S3Error.self) { try c.get("redirect", limit: 100) }
        #expect(moved?.code == "PermanentRedirect")
        #expect(moved?.message.contains("the bucket is in region eu-west-2, not us-west-1") == true)
        let html = #expect(throws: S3Error.self) { try c.get("html", limit: 100) }
        #expect(html?.code == "http")
        #expect(c.requestCount == 5 + 6, "the 502 is retried, the rest are not")
        for e in [denied, nsk, moved, html] { #expect(e?.description.contains("stub-secret") == false) }
    }

    @Test func rangesAreSentAndAServerIgnoringThemIsCutToTheRange() throws {
        let server = try StubServer { _, request in
            request.lowercased().contains("range: bytes=2-5") ? .raw(Self.ok, close: false) : .raw(StubServer.response(400, "Bad", body: ""), close: false)
        }
        defer { server.stop() }
        let c = try Self.client(server)
        defer { c.shutdown() }
        #expect(try c.get("k", range: 2..<6, limit: 100) == Array("llow".utf8))
        #expect(throws: S3Error.self) { try c.get("k", range: 3..<3, limit: 100) }
    }

    @Test func listingFollowsContinuationTokens() throws {
        let server = try StubServer { _, request in
            let page: String
            if !request.contains("continuation-token=") {
                page = "<ListBucketResult><IsTruncated>true</IsTruncated><NextContinuationToken>t/1+=</NextContinuationToken>"
                    + "<Contents><Key>p/a</Key><Size>1</Size></Contents><CommonPrefixes><Prefix>p/d/</Prefix></CommonPrefixes></ListBucketResult>"
            } else if request.contains("continuation-token=t%2F1%2B%3D") {
                page = "<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>p/b</Key><Size>2</Size></Contents></ListBucketResult>"
            } else {
                page = "<Error><Code>InvalidArgument</Code><Message>bad token</Message></Error>"
            }
            return .raw(StubServer.response(200, "OK", body: page), close: false)
        }
        defer { server.stop() }
        let c = try Self.client(server)
        defer { c.shutdown() }
        let l = try c.list(prefix: "p/", delimiter: "/")
        #expect(l.objects == [S3Object(key: "p/a", size: 1), S3Object(key: "p/b", size: 2)])
        #expect(l.commonPrefixes == ["p/d/"])
        #expect(server.requests.first?.hasPrefix("GET /bkt?delimiter=%2F&list-type=2&prefix=p%2F HTTP/1.1") == true)
    }

    @Test func connectionRefusedIsOneLineNamingTheEndpoint() throws {
        // A port that was just free: bound, then closed.
        let probe = try ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: 0).wait()
        let port = probe.localAddress?.port ?? 1
        try probe.close().wait()
        let c = try S3Client(endpoint: S3Endpoint(endpoint: "http://127.0.0.1:\(port)", pathStyle: true, fingerprint: nil),
                             bucket: "bkt", credentials: Self.credentials, streams: 4)
        defer { c.shutdown() }
        let e = #expect(throws: S3Error.self) { try c.get("k", limit: 10) }
        #expect(e?.description == "s3://bkt/k: connection: cannot connect to http://127.0.0.1:\(port): Connection refused")
        let h = #expect(throws: S3Error.self) { try c.head("k") }
        #expect(h?.code == "connection")
        // Queued requests fail too, instead of waiting.
        let failed = Mutex(0)
        let all = DispatchSemaphore(value: 0)
        for _ in 0..<20 {
            c.startGet("k", limit: 1) { r in
                if case .failure(let e) = r, e.code == "connection" {
                    if failed.withLock({ $0 += 1; return $0 }) == 20 { all.signal() }
                }
            }
        }
        all.wait()
    }

    @Test func aSilentServerTimesOut() throws {
        let server = try StubServer { _, _ in .raw("", close: false) }
        defer { server.stop() }
        let c = try S3Client(endpoint: S3Endpoint(endpoint: "http://127.0.0.1:\(server.port)", pathStyle: true, fingerprint: nil),
                             bucket: "bkt", credentials: Self.credentials, streams: 1, now: { Int(time(nil)) }, retry: Self.fastRetry,
                             idleTimeout: .milliseconds(200))
        defer { c.shutdown() }
        let e = #expect(throws: S3Error.self) { try c.get("k", limit: 100) }
        #expect(e?.description == "s3://bkt/k: timeout: http://127.0.0.1:\(server.port): no response for 200 ms")
        #expect(c.requestCount == 1, "a timeout is not retried")
    }

    @Test func aBlockingCallOnAnEventLoopIsRefusedNotDeadlocked() throws {
        let server = try StubServer { _, _ in .raw(Self.ok, close: false) }
        defer { server.stop() }
        let c = try Self.client(server)
        defer { c.shutdown() }
        let inner = Mutex<S3Error?>(nil)
        let done = DispatchSemaphore(value: 0)
        c.startGet("k", limit: 100) { _ in
            do throws(S3Error) { _ = try c.get("k", limit: 100) } catch { inner.withLock { $0 = error } }
            done.signal()
        }
        done.wait()
        #expect(inner.withLock { $0 }?.code == "internal")
    }

    @Test func shutdownFailsLaterCalls() throws {
        let server = try StubServer { _, _ in .raw(Self.ok, close: false) }
        defer { server.stop() }
        let c = try Self.client(server)
        _ = try c.get("k", limit: 100)
        c.shutdown()
        let e = #expect(throws: S3Error.self) { try c.get("k", limit: 100) }
        #expect(e?.code == "shutdown")
    }
}

extension S3Client {
    /// startGet waited for on this thread.
    func startAndWait(_ c: S3Client, _ key: String) throws -> [UInt8] {
        let box = Mutex<Result<[UInt8], S3Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        c.startGet(key, limit: 100) { r in
            box.withLock { $0 = r }
            done.signal()
        }
        done.wait()
        return try box.withLock { $0 }!.get()
    }
}
