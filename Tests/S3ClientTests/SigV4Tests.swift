@testable import S3Client
import Testing

/// AWS's published Signature Version 4 test suite (docs.aws.amazon.com/general/latest/gr/
/// signature-v4-test-suite.html): region us-east-1, service "service", 2015-08-30T12:36:00Z, and
/// the S3 examples of "Signature Calculations for the Authorization Header" (examplebucket,
/// 2013-05-24). The expected signatures are AWS's.
@Suite(.tags(.fast)) struct SigV4Tests {
    static let suiteCredentials = S3Credentials(accessKeyID: "AKIDEXAMPLE",
                                                secretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    static let suiteDate = "20150830T123600Z"
    static let sessionToken = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA=="

    struct Vector: Sendable, CustomTestStringConvertible {
        var name: String
        var method = "GET"
        var path = "/"
        var query: [(String, String)] = []
        var headers: [(String, String)] = []
        var body = ""
        var signedHeaders = "host;x-amz-date"
        var signature: String
        var testDescription: String { name }
    }

    static let vectors: [Vector] = [
        Vector(name: "get-vanilla", signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        Vector(name: "get-vanilla-query-order-key-case", query: [("Param2", "value2"), ("Param1", "value1")],
               signature: "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
        Vector(name: "get-vanilla-empty-query-key", query: [("Param1", "value1")],
               signature: "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb"),
        Vector(name: "get-utf8", path: "/ሴ", signature: "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"),
        Vector(name: "get-unreserved", path: "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
               signature: "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f"),
        Vector(name: "get-vanilla-query-unreserved",
               query: [("-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                        "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")],
               signature: "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197"),
        Vector(name: "get-vanilla-utf8-query", query: [("ሴ", "bar")],
               signature: "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04"),
        Vector(name: "get-header-value-trim", headers: [("My-Header1", " value1"), ("My-Header2", "\"a   b   c\"")],
               signedHeaders: "host;my-header1;my-header2;x-amz-date",
               signature: "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"),
        Vector(name: "post-vanilla", method: "POST", signature: "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
        Vector(name: "post-header-key-sort", method: "POST", headers: [("My-Header1", "value1")],
               signedHeaders: "host;my-header1;x-amz-date",
               signature: "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c"),
        Vector(name: "post-header-value-case", method: "POST", headers: [("My-Header1", "VALUE1")],
               signedHeaders: "host;my-header1;x-amz-date",
               signature: "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d"),
        Vector(name: "post-vanilla-query-nonunreserved", method: "POST",
               query: [("@#$%^", ""), ("+", "/,?><`\";:\\|][{}")],
               signature: "66c82657c86e26fb25238d0e69f011edc4c6df5ae71119d7cb98ed9b87393c1e"),
        Vector(name: "post-sts-header-before", method: "POST", headers: [("X-Amz-Security-Token", sessionToken)],
               signedHeaders: "host;x-amz-date;x-amz-security-token",
               signature: "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead"),
        Vector(name: "post-x-www-form-urlencoded", method: "POST",
               headers: [("Content-Type", "application/x-www-form-urlencoded")], body: "Param1=value1",
               signedHeaders: "content-type;host;x-amz-date",
               signature: "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"),
        Vector(name: "post-x-www-form-urlencoded-parameters", method: "POST",
               headers: [("Content-Type", "application/x-www-form-urlencoded; charset=utf8")], body: "Param1=value1",
               signedHeaders: "content-type;host;x-amz-date",
               signature: "1a72ec8f64bd914b0e42e42607c7fbce7fb2c7465f63e3092b3b0d39fa77a6fe"),
    ]

    @Test(arguments: vectors) func awsTestSuite(_ v: Vector) {
        let headers = [("Host", "example.amazonaws.com"), ("X-Amz-Date", Self.suiteDate)] + v.headers
        let sig = SigV4.sign(method: v.method, path: v.path, query: v.query, headers: headers,
                             payloadHash: SigV4.sha256Hex(Array(v.body.utf8)), amzDate: Self.suiteDate,
                             region: "us-east-1", service: "service", credentials: Self.suiteCredentials)
        #expect(sig.authorization == "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
            + "SignedHeaders=\(v.signedHeaders), Signature=\(v.signature)")
    }

    @Test func vanillaCanonicalRequestAndStringToSign() {
        let sig = SigV4.sign(method: "GET", path: "/", query: [],
                             headers: [("Host", "example.amazonaws.com"), ("X-Amz-Date", Self.suiteDate)],
                             payloadHash: SigV4.emptyPayloadHash, amzDate: Self.suiteDate, region: "us-east-1",
                             service: "service", credentials: Self.suiteCredentials)
        #expect(sig.canonicalRequest == "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n"
            + SigV4.emptyPayloadHash)
        #expect(sig.stringToSign == "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
            + "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63")
    }

    static let s3Credentials = S3Credentials(accessKeyID: "AKIAIOSFODNN7EXAMPLE",
                                             secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")

    /// S3's "GET Object" example: GET /test.txt with Range bytes=0-9.
    @Test func s3GetObjectExample() {
        let date = "20130524T000000Z"
        let sig = SigV4.sign(method: "GET", path: "/test.txt", query: [],
                             headers: [("Host", "examplebucket.s3.amazonaws.com"), ("Range", "bytes=0-9"),
                                       ("x-amz-content-sha256", SigV4.emptyPayloadHash), ("x-amz-date", date)],
                             payloadHash: SigV4.emptyPayloadHash, amzDate: date, region: "us-east-1", service: "s3",
                             credentials: Self.s3Credentials)
        #expect(sig.authorization == "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
            + "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
            + "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    }

    /// S3's "GET Bucket (List Objects)" example: GET /?max-keys=2&prefix=J.
    @Test func s3ListObjectsExample() {
        let date = "20130524T000000Z"
        let sig = SigV4.sign(method: "GET", path: "/", query: [("prefix", "J"), ("max-keys", "2")],
                             headers: [("Host", "examplebucket.s3.amazonaws.com"),
                                       ("x-amz-content-sha256", SigV4.emptyPayloadHash), ("x-amz-date", date)],
                             payloadHash: SigV4.emptyPayloadHash, amzDate: date, region: "us-east-1", service: "s3",
                             credentials: Self.s3Credentials)
        #expect(sig.authorization.hasSuffix("Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"))
    }

    @Test func uriEncoding() {
        #expect(SigV4.uriEncode("store/.cnt/vm/100/2024-01-02T03:04:05Z/index.json.blob", keepSlash: true)
            == "store/.cnt/vm/100/2024-01-02T03%3A04%3A05Z/index.json.blob")
        #expect(SigV4.uriEncode("a b+c/d", keepSlash: false) == "a%20b%2Bc%2Fd")
        #expect(SigV4.uriEncode("é~", keepSlash: true) == "%C3%A9~")
        #expect(SigV4.canonicalQuery([("b", "2"), ("a", "x y"), ("a", "1")]) == "a=1&a=x%20y&b=2")
    }

    @Test func amzDate() {
        #expect(SigV4.amzDate(1_440_938_160) == "20150830T123600Z")
        #expect(SigV4.amzDate(1_369_353_600) == "20130524T000000Z")
    }
}
