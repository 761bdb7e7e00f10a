import Foundation
@testable import S3Client
import Testing

@Suite(.tags(.fast)) struct S3TypesTests {
    @Test func credentialsDescriptionHidesTheSecret() {
        let c = S3Credentials(accessKeyID: "AKID", secretAccessKey: "s3cr3t-value", sessionToken: "tok-value")
        #expect("\(c)".contains("AKID"))
        #expect(!"\(c)".contains("s3cr3t"))
        #expect(!String(reflecting: c).contains("s3cr3t"))
        #expect(!"\(c)".contains("tok-value"))
        #expect(!String(reflecting: c).contains("tok-value"))
    }

    @Test func credentialsFromEnvironment() {
        #expect(S3Credentials.fromEnvironment([:]) == nil)
        #expect(S3Credentials.fromEnvironment(["AWS_ACCESS_KEY_ID": "id"]) == nil)
        let c = S3Credentials.fromEnvironment(["AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "sec"])
        #expect(c?.accessKeyID == "id" && c?.secretAccessKey == "sec" && c?.sessionToken == nil)
        let t = S3Credentials.fromEnvironment(["AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "sec", "AWS_SESSION_TOKEN": "tok"])
        #expect(t?.sessionToken == "tok")
    }

    static func file(_ content: String) throws -> String {
        let path = NSTemporaryDirectory() + "qp-s3cred-\(UUID().uuidString.prefix(8))"
        try Data(content.utf8).write(to: URL(fileURLWithPath: path))
        return path
    }

    @Test func credentialsFile() throws {
        for text in ["AKID\nSECRET/+x\n", "AKID\r\nSECRET/+x\r\n", "\n  AKID  \nSECRET/+x", "AKID\nSECRET/+x"] {
            let path = try Self.file(text)
            defer { unlink(path) }
            let c = try S3Credentials.fromFile(path)
            #expect(c.accessKeyID == "AKID" && c.secretAccessKey == "SECRET/+x" && c.sessionToken == nil)
        }
        let path = try Self.file("AKID\nSECRET\nTOKEN\n")
        defer { unlink(path) }
        #expect(try S3Credentials.fromFile(path).sessionToken == "TOKEN")
    }

    @Test func credentialsFileErrorsNameTheFileNotItsContent() throws {
        let missing = "/nonexistent/qp-creds"
        let e1 = #expect(throws: S3Error.self) { try S3Credentials.fromFile(missing) }
        #expect(e1?.description == "credentials: the credentials file /nonexistent/qp-creds does not exist")
        for text in ["ONLY-ONE-LINE-SECRETISH\n", "", "a\nb\nc\nd\n"] {
            let path = try Self.file(text)
            defer { unlink(path) }
            let e = #expect(throws: S3Error.self) { try S3Credentials.fromFile(path) }
            #expect(e?.code == "credentials")
            #expect(e?.description.contains(path) == true)
            #expect(e?.description.contains("ONLY-ONE") == false)
            #expect(e?.description.contains("\n") == false)
        }
    }

    @Test func aCredentialsFileTooLargeIsRefusedUnread() throws {
        let path = try Self.file(String(repeating: "x", count: 70_000))
        defer { unlink(path) }
        let e = #expect(throws: S3Error.self) { try S3Credentials.fromFile(path) }
        #expect(e?.description == "credentials: the credentials file \(path) is over 64 KiB: not a credentials file")
        let dir = #expect(throws: S3Error.self) { try S3Credentials.fromFile("/") }
        #expect(dir?.code == "credentials")
    }

    @Test func bucketsThatCannotBeHostNamesUsePathStyle() throws {
        let creds = S3Credentials(accessKeyID: "a", secretAccessKey: "b")
        let aws = try S3Endpoint(endpoint: nil, pathStyle: false, fingerprint: nil)
        for (bucket, virtual) in [("pbs-bucket", true), ("my.bucket", false), ("Upper", false), ("under_score", false), ("ab", false)] {
            let c = try S3Client(endpoint: aws, bucket: bucket, credentials: creds, streams: 1)
            defer { c.shutdown() }
            #expect(c.endpoint.pathStyle == !virtual, "\(bucket)")
        }
        let plain = try S3Client(endpoint: S3Endpoint(endpoint: "http://minio.lan:9000", pathStyle: false, fingerprint: nil),
                                 bucket: "my.bucket", credentials: creds, streams: 1)
        defer { plain.shutdown() }
        #expect(!plain.endpoint.pathStyle, "a dotted bucket is a host name over plain http")
    }

    @Test func endpoints() throws {
        let aws = try S3Endpoint(endpoint: nil, pathStyle: false, fingerprint: nil)
        #expect(aws.tls && aws.host == "s3.us-west-1.amazonaws.com" && aws.port == 443 && aws.region == "us-west-1")
        #expect(aws.hostHeader(bucket: "b") == "b.s3.us-west-1.amazonaws.com")
        #expect(aws.connectHost(bucket: "b") == "b.s3.us-west-1.amazonaws.com")
        let eu = try S3Endpoint(endpoint: nil, region: "eu-central-1", pathStyle: true, fingerprint: nil)
        #expect(eu.host == "s3.eu-central-1.amazonaws.com" && eu.hostHeader(bucket: "b") == "s3.eu-central-1.amazonaws.com")
        let local = try S3Endpoint(endpoint: "http://127.0.0.1:9000", pathStyle: false, fingerprint: nil)
        #expect(!local.tls && local.port == 9000 && local.pathStyle, "an IP address is always path style")
        #expect(local.hostHeader(bucket: "b") == "127.0.0.1:9000")
        let v6 = try S3Endpoint(endpoint: "https://[::1]:8443/", pathStyle: true, fingerprint: nil)
        #expect(v6.host == "::1" && v6.port == 8443 && v6.hostHeader(bucket: "b") == "[::1]:8443")
        let minio = try S3Endpoint(endpoint: "HTTPS://minio.example", pathStyle: false,
                                   fingerprint: "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99")
        #expect(minio.tls && minio.port == 443 && minio.hostHeader(bucket: "bk") == "bk.minio.example")
        #expect(minio.fingerprint == "aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99")
        #expect(try S3Endpoint(endpoint: "http://h", pathStyle: true, fingerprint: nil).port == 80)
    }

    @Test(arguments: [
        ("ftp://h", "https:// or http://"), ("h:9000", "https:// or http://"), ("http://", "no host"),
        ("http://h:0", "port"), ("http://h:99999", "port"), ("http://h:x", "port"), ("https://h/path", "without a path"),
        ("https://user@h", "without a path"), ("https://[::1", "unclosed"),
    ])
    func badEndpoints(_ endpoint: String, _ why: String) {
        let e = #expect(throws: S3Error.self) { try S3Endpoint(endpoint: endpoint, pathStyle: false, fingerprint: nil) }
        #expect(e?.code == "endpoint")
        #expect(e?.description.contains(why) == true, "\(e?.description ?? "")")
    }

    @Test func badFingerprintsAndRegions() {
        #expect(throws: S3Error.self) { try S3Endpoint(endpoint: nil, pathStyle: false, fingerprint: "aa:bb") }
        #expect(throws: S3Error.self) { try S3Endpoint(endpoint: nil, pathStyle: false, fingerprint: String(repeating: "zz:", count: 32)) }
        #expect(throws: S3Error.self) {
            try S3Endpoint(endpoint: "http://h:1", pathStyle: false, fingerprint: String(repeating: "ab", count: 32))
        }
        #expect(throws: S3Error.self) { try S3Endpoint(endpoint: nil, region: "us west", pathStyle: false, fingerprint: nil) }
        #expect(throws: S3Error.self) { try S3Endpoint(endpoint: nil, region: "", pathStyle: false, fingerprint: nil) }
    }

    @Test func errorDescriptionsAreOneLine() {
        let e = S3Error(code: "NoSuchKey", bucket: "bkt", key: "store/x", status: 404, message: "The key\ndoes not exist.")
        #expect(e.description == "s3://bkt/store/x: NoSuchKey: The key does not exist. (HTTP 404)")
        #expect(S3Error(code: "connection", bucket: "b", message: "m").description == "s3://b/: connection: m")
    }
}
