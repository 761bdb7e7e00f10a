import Foundation
@testable import S3Client
import Testing

/// The same requests signed by this client and by botocore's S3SigV4Auth (fixed time and
/// credentials): the Authorization headers must be equal. botocore builds its URL from the raw key
/// with its own quoting, so the canonical URI is checked too.
@Suite(.tags(.fast), .enabled(if: Python.botocore, "python3 with botocore is not installed"))
struct BotocoreTests {
    struct Case: Encodable {
        var name: String
        var method = "GET"
        /// What botocore sees: scheme://host[:port] of the request, written out here by hand.
        var base: String
        var bucket = "bkt"
        var key: String
        var query: [[String]] = []
        var headers: [String: String] = [:]
        var region = "us-west-1"
        var keyId = "AKIAEXAMPLEKEYID0001"
        var secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
        var token: String? = nil
        /// For this client only.
        var endpoint: String?
        var pathStyle = false
        var list = false
    }

    static let fixedTime = 1_796_644_800  // 2026-12-07T12:00:00Z

    static let script = #"""
    import sys, json, datetime
    from urllib.parse import quote
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    fixed = datetime.datetime(2026, 12, 7, 12, 0, 0, tzinfo=datetime.timezone.utc)
    botocore.auth.get_current_datetime = lambda *a, **k: fixed
    for c in json.load(sys.stdin):
        path = c["path"]
        url = c["base"] + quote(path, safe="/~")
        req = AWSRequest(method=c["method"], url=url, headers=dict(c["headers"]), params=dict(c["query"]))
        auth = botocore.auth.S3SigV4Auth(Credentials(c["keyId"], c["secret"], c.get("token")), "s3", c["region"])
        auth.add_auth(req)
        print(c["name"] + "\t" + req.headers["Authorization"])
    """#

    static let cases: [Case] = [
        Case(name: "virtual-hosted chunk", base: "https://pbs-bucket.s3.us-west-1.amazonaws.com", bucket: "pbs-bucket",
             key: "store/.chunks/0123/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"),
        Case(name: "path style, ':' in the key, range, port", base: "http://127.0.0.1:9000",
             key: "store/.cnt/vm/100/2024-01-02T03:04:05Z/drive-scsi0.img.fidx", headers: ["Range": "bytes=0-4095"],
             region: "eu-central-1", endpoint: "http://127.0.0.1:9000", pathStyle: true),
        Case(name: "spaces, unicode, reserved characters, session token", base: "https://minio.example:8443",
             key: "dir with space/a:b+c=d&e é~(1)*!'.blob", token: "FQoGZXIvYXdzEBYaD+/session=token",
             endpoint: "https://minio.example:8443", pathStyle: true),
        Case(name: "HEAD", method: "HEAD", base: "https://bkt.s3.ap-southeast-2.amazonaws.com", key: "store/.cnt/vm/100/owner",
             region: "ap-southeast-2"),
        Case(name: "ListObjectsV2 page", base: "https://bkt.s3.us-west-1.amazonaws.com", key: "",
             query: [["list-type", "2"], ["prefix", "store/.cnt/ns/a b/"], ["delimiter", "/"],
                     ["continuation-token", "1ABC/+def=="]], list: true),
        Case(name: "ListObjectsV2 path style", base: "http://localhost:4566", key: "",
             query: [["list-type", "2"], ["prefix", "store/.chunks/"], ["max-keys", "2"]],
             endpoint: "http://localhost:4566", pathStyle: true, list: true),
    ]

    struct Wire: Encodable {
        var name, method, base, path, region, keyId, secret: String
        var query: [[String]]
        var headers: [String: String]
        var token: String?
    }

    @Test func sameAuthorizationAsBotocore() throws {
        var wire: [Wire] = []
        var ours: [String: String] = [:]
        for c in Self.cases {
            let endpoint = try S3Endpoint(endpoint: c.endpoint, region: c.region, pathStyle: c.pathStyle, fingerprint: nil)
            let client = try S3Client(endpoint: endpoint, bucket: c.bucket,
                                      credentials: S3Credentials(accessKeyID: c.keyId, secretAccessKey: c.secret, sessionToken: c.token),
                                      streams: 1, now: { Self.fixedTime }, retry: .init())
            defer { client.shutdown() }
            let path = c.list ? client.pathStyleRoot : client.objectPath(c.key)
            let op = Operation(method: c.method == "HEAD" ? .HEAD : .GET, path: path,
                               query: c.query.map { ($0[0], $0[1]) }, headers: c.headers.map { ($0.key, $0.value) },
                               limit: 0, key: c.key)
            let head = client.signedHead(op)
            ours[c.name] = head.headers.first(name: "Authorization")
            let botoPath = c.pathStyle ? "/\(c.bucket)" + (c.list ? "" : "/\(c.key)") : "/\(c.key)"
            wire.append(Wire(name: c.name, method: c.method, base: c.base, path: botoPath, region: c.region, keyId: c.keyId,
                             secret: c.secret, query: c.query, headers: c.headers, token: c.token))
        }
        let input = String(decoding: try JSONEncoder().encode(wire), as: UTF8.self)
        let r = try Python.run(Self.script, args: [], stdin: input)
        try #require(r.status == 0, "botocore script failed: \(r.err)")
        var seen = 0
        for line in r.out.split(separator: "\n") {
            let parts = line.split(separator: "\t", maxSplits: 1).map(String.init)
            try #require(parts.count == 2)
            #expect(ours[parts[0]] == parts[1], "\(parts[0])")
            seen += 1
        }
        #expect(seen == Self.cases.count)
    }
}
