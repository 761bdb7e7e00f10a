import Foundation
@testable import S3Client
import Synchronization
import Testing

/// The client against a real S3 server (moto) that checks every signature and policy.
@Suite(.tags(.e2e), .enabled(if: Python.moto, "python3 with moto[server] and boto3 is not installed"))
struct S3MotoTests {
    let moto: MotoServer

    init() throws { moto = try MotoServer.plain.get() }

    func client(_ bucket: String = "bkt", key: String? = nil, secret: String? = nil, token: String? = nil,
                endpoint: S3Endpoint? = nil, streams: Int = 4) throws -> S3Client {
        let creds = S3Credentials(accessKeyID: key ?? MotoServer.keyID, secretAccessKey: secret ?? MotoServer.secret, sessionToken: token)
        return try S3Client(endpoint: endpoint ?? S3Endpoint(endpoint: moto.endpoint, pathStyle: true, fingerprint: nil),
                            bucket: bucket, credentials: creds, streams: streams)
    }

    static func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

    @Test func getRangeHeadAndOddKeys() throws {
        let c = try client()
        defer { c.shutdown() }
        for (key, content) in MotoServer.objects {
            #expect(try c.get(key, limit: 1 << 20) == Self.bytes(content), "\(key)")
            #expect(try c.head(key) == UInt64(content.utf8.count), "\(key)")
        }
        #expect(try c.get("store/.chunks/0123/0123abcd", range: 10..<25, limit: 100) == Self.bytes("012345678901234"))
        #expect(try c.head("no/such/key") == nil)
        let e = #expect(throws: S3Error.self) { try c.get("no/such/key", limit: 100) }
        #expect(e?.code == "NoSuchKey")
        #expect(e?.description.hasPrefix("s3://bkt/no/such/key: NoSuchKey: ") == true)
        let big = #expect(throws: S3Error.self) { try c.get("store/.chunks/0123/0123abcd", limit: 9999) }
        #expect(big?.code == "too-large")
    }

    @Test func listingsWithPagesAndPrefixes() throws {
        let c = try client()
        defer { c.shutdown() }
        let before = c.requestCount
        let many = try c.list(prefix: "store/.cnt/many/", delimiter: nil, pageSize: 2)
        #expect(many.objects.map(\.key) == (0..<7).map { "store/.cnt/many/\($0)" })
        #expect(many.objects.allSatisfy { $0.size == 2 })
        #expect(c.requestCount - before == 4, "7 keys in pages of 2")
        let root = try c.list(prefix: "store/.cnt/", delimiter: "/")
        #expect(root.objects.map(\.key) == ["store/.cnt/plain"])
        #expect(root.commonPrefixes == ["store/.cnt/dir with space/", "store/.cnt/many/", "store/.cnt/vm/"])
        #expect(try c.list(prefix: "", delimiter: "/").commonPrefixes == ["store/"])
        let cnt = try c.list(prefix: "store/.cnt/vm/100/", delimiter: "/")
        #expect(cnt.commonPrefixes == ["store/.cnt/vm/100/2024-01-02T03:04:05Z/"])
        #expect(try c.list(prefix: "nothing/", delimiter: "/").objects.isEmpty)
    }

    @Test func manyRequestsInFlight() throws {
        let c = try client(streams: 3)
        defer { c.shutdown() }
        let got = Mutex<[String: [UInt8]]>([:])
        let done = DispatchSemaphore(value: 0)
        for i in 0..<7 {
            c.startGet("store/.cnt/many/\(i)", limit: 10) { r in
                let n = got.withLock { $0["many/\(i)"] = (try? r.get()) ?? []; return $0.count }
                if n == 7 { done.signal() }
            }
        }
        done.wait()
        #expect(got.withLock { $0 } == Dictionary(uniqueKeysWithValues: (0..<7).map { ("many/\($0)", Self.bytes("m\($0)")) }))
    }

    @Test func virtualHostedStyle() throws {
        var ep = try S3Endpoint(endpoint: "http://s3.localhost:\(moto.port)", pathStyle: false, fingerprint: nil)
        ep.connectAddress = "127.0.0.1"
        let c = try client(endpoint: ep)
        defer { c.shutdown() }
        #expect(try c.get("store/.cnt/plain", limit: 100) == Self.bytes("plain object"))
        #expect(try c.list(prefix: "store/.cnt/many/", delimiter: nil).objects.count == 7)
    }

    @Test func sessionToken() throws {
        let session = try moto.session()
        let c = try client(key: session.accessKeyID, secret: session.secretAccessKey, token: session.sessionToken)
        defer { c.shutdown() }
        #expect(try c.get("store/.cnt/plain", limit: 100) == Self.bytes("plain object"))
        let bad = try client(key: session.accessKeyID, secret: session.secretAccessKey, token: "bogus-token")
        defer { bad.shutdown() }
        let e = #expect(throws: S3Error.self) { try bad.get("store/.cnt/plain", limit: 100) }
        #expect(e?.code == "InvalidToken")
        #expect(e?.description.contains(session.secretAccessKey) == false)
    }

    @Test func refusalsNameTheCodeAndNeverTheSecret() throws {
        let wrongSecret = "Wr0ngSecretValue/ShouldNeverBePrinted+x"
        let wrong = try client(secret: wrongSecret)
        defer { wrong.shutdown() }
        let sig = #expect(throws: S3Error.self) { try wrong.get("store/.cnt/plain", limit: 100) }
        #expect(sig?.code == "SignatureDoesNotMatch")
        #expect(sig?.status == 403)
        let unknown = try client(key: "AKIAUNKNOWNKEY000000")
        defer { unknown.shutdown() }
        let ukey = #expect(throws: S3Error.self) { try unknown.list(prefix: "", delimiter: nil) }
        #expect(ukey?.code == "InvalidAccessKeyId")
        let denied = try client(key: MotoServer.deniedKeyID, secret: MotoServer.deniedSecret)
        defer { denied.shutdown() }
        let d1 = #expect(throws: S3Error.self) { try denied.get("store/.cnt/plain", limit: 100) }
        #expect(d1?.code == "AccessDenied")
        let d2 = #expect(throws: S3Error.self) { try denied.head("store/.cnt/plain") }
        #expect(d2?.code == "AccessDenied")
        let d3 = #expect(throws: S3Error.self) { try denied.list(prefix: "", delimiter: "/") }
        #expect(d3?.code == "AccessDenied")
        let missing = try client("no-such-bucket")
        defer { missing.shutdown() }
        let nb = #expect(throws: S3Error.self) { try missing.get("plain", limit: 100) }
        #expect(nb?.code == "NoSuchBucket")
        #expect(nb?.description.hasPrefix("s3://no-such-bucket/plain: NoSuchBucket: ") == true)
        for e in [sig, ukey, d1, d2, d3, nb] {
            let text = "\(e.map { "\($0)" } ?? "") \(String(reflecting: e))"
            #expect(!text.contains(wrongSecret))
            #expect(!text.contains(MotoServer.secret))
            #expect(!text.contains(MotoServer.deniedSecret))
            #expect(!text.contains("\n"))
        }
    }

    @Test func aBucketInAnotherRegion() throws {
        let wrongRegion = try client("other-bucket")
        defer { wrongRegion.shutdown() }
        let e = #expect(throws: S3Error.self) { try wrongRegion.get("store/.cnt/plain", limit: 100) }
        #expect(e?.code == "AuthorizationHeaderMalformed")
        #expect(e?.message.contains("eu-central-1") == true)
        let right = try client("other-bucket", endpoint: S3Endpoint(endpoint: moto.endpoint, region: "eu-central-1", pathStyle: true, fingerprint: nil))
        defer { right.shutdown() }
        #expect(try right.get("store/.cnt/plain", limit: 100) == Self.bytes("plain object"))
    }
}

/// HTTPS: a self-signed certificate is refused by the system CAs, accepted when pinned by its
/// SHA-256 fingerprint, refused when another fingerprint is pinned.
@Suite(.tags(.e2e), .enabled(if: Python.moto, "python3 with moto[server] and boto3 is not installed"))
struct S3TLSTests {
    let moto: MotoServer

    init() throws { moto = try MotoServer.tls.get() }

    func get(fingerprint: String?) throws -> [UInt8] {
        let c = try S3Client(endpoint: S3Endpoint(endpoint: moto.endpoint, pathStyle: true, fingerprint: fingerprint), bucket: "bkt",
                             credentials: S3Credentials(accessKeyID: MotoServer.keyID, secretAccessKey: MotoServer.secret), streams: 2)
        defer { c.shutdown() }
        return try c.get("store/.cnt/plain", limit: 100)
    }

    @Test func pinnedFingerprint() throws {
        let fp = try #require(moto.fingerprint)
        #expect(try get(fingerprint: fp) == Array("plain object".utf8))
        #expect(try get(fingerprint: fp.uppercased().replacingOccurrences(of: ":", with: "")) == Array("plain object".utf8))
    }

    @Test func untrustedCertificate() throws {
        let e = #expect(throws: S3Error.self) { try get(fingerprint: nil) }
        #expect(e?.code == "tls")
        let fp = try #require(moto.fingerprint)
        #expect(e?.message == "https://127.0.0.1:\(moto.port): the server's certificate (SHA-256 fingerprint \(fp)) is not trusted by "
            + "the system CAs; check the fingerprint and pin it to trust this certificate")
        #expect(e?.description.contains("\n") == false)
    }

    @Test func theWrongSchemeIsOneLine() throws {
        let creds = S3Credentials(accessKeyID: MotoServer.keyID, secretAccessKey: MotoServer.secret)
        let plainToTLS = try S3Client(endpoint: S3Endpoint(endpoint: "http://127.0.0.1:\(moto.port)", pathStyle: true, fingerprint: nil),
                                      bucket: "bkt", credentials: creds, streams: 1, now: { Int(time(nil)) },
                                      retry: .init(backoffBase: 0.001, backoffCap: 0.002))
        defer { plainToTLS.shutdown() }
        let e1 = #expect(throws: S3Error.self) { try plainToTLS.get("store/.cnt/plain", limit: 100) }
        #expect(e1?.code == "connection")
        let plain = try MotoServer.plain.get()
        let tlsToPlain = try S3Client(endpoint: S3Endpoint(endpoint: "https://127.0.0.1:\(plain.port)", pathStyle: true, fingerprint: nil),
                                      bucket: "bkt", credentials: creds, streams: 1)
        defer { tlsToPlain.shutdown() }
        let e2 = #expect(throws: S3Error.self) { try tlsToPlain.get("store/.cnt/plain", limit: 100) }
        #expect(e2?.code == "tls")
        #expect(e2?.message == "https://127.0.0.1:\(plain.port): the server does not speak TLS (is the endpoint http://?)")
        for e in [e1, e2] { #expect(e?.description.contains("\n") == false) }
    }

    @Test func wrongPinnedFingerprint() throws {
        let fp = try #require(moto.fingerprint)
        let wrong = String(repeating: "ab:", count: 31) + "ab"
        let e = #expect(throws: S3Error.self) { try get(fingerprint: wrong) }
        #expect(e?.code == "tls")
        #expect(e?.message.contains(fp) == true, "names the certificate's fingerprint: \(e?.message ?? "")")
    }
}
