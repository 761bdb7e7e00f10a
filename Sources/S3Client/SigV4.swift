import Crypto
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// AWS Signature Version 4 (header form), as AWS's "Signature Version 4 signing process" and its
/// test suite specify; S3's variant: the canonical URI is the path URI-encoded once (no second
/// encoding, no dot-segment normalisation).
enum SigV4 {
    /// The payload hash S3 accepts for requests whose body is not signed (GET, HEAD).
    static let unsignedPayload = "UNSIGNED-PAYLOAD"
    /// SHA-256 of the empty string.
    static let emptyPayloadHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

    struct Signature: Sendable {
        var authorization: String
        var canonicalRequest: String
        var stringToSign: String
    }

    /// URI-encodes per AWS: unreserved (A-Z a-z 0-9 - . _ ~) kept, '/' kept when `keepSlash`,
    /// every other byte of the UTF-8 form as %XX with uppercase hex.
    static func uriEncode(_ s: String, keepSlash: Bool) -> String {
        let hex: [UInt8] = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(s.utf8.count)
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.append(b)
            case UInt8(ascii: "/") where keepSlash:
                out.append(b)
            default:
                out.append(UInt8(ascii: "%"))
                out.append(hex[Int(b >> 4)])
                out.append(hex[Int(b & 15)])
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Name=value pairs (raw, not yet encoded), each side encoded, sorted by name then value, joined
    /// by '&'. The same string is sent as the request's query, so what is signed is what is sent.
    static func canonicalQuery(_ items: [(String, String)]) -> String {
        items.map { (uriEncode($0.0, keepSlash: false), uriEncode($0.1, keepSlash: false)) }
            .sorted { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
            .map { "\($0.0)=\($0.1)" }
            .joined(separator: "&")
    }

    /// "20150830T123600Z" for seconds since the epoch (UTC).
    static func amzDate(_ epochSeconds: Int) -> String {
        var t = time_t(epochSeconds)
        var tm = tm()
        gmtime_r(&t, &tm)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return "\(tm.tm_year + 1900)\(two(tm.tm_mon + 1))\(two(tm.tm_mday))T\(two(tm.tm_hour))\(two(tm.tm_min))\(two(tm.tm_sec))Z"
    }

    static func hex<D: Sequence>(_ d: D) -> String where D.Element == UInt8 {
        let digits: [UInt8] = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        for b in d {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func sha256Hex(_ bytes: [UInt8]) -> String { hex(SHA256.hash(data: bytes)) }

    /// The signature of one request. `path` is the raw (unencoded) absolute path, `query` the raw
    /// pairs, `headers` every header to sign (x-amz-date among them, its value `amzDate`).
    static func sign(method: String, path: String, query: [(String, String)], headers: [(String, String)],
                     payloadHash: String, amzDate: String, region: String, service: String,
                     credentials: S3Credentials) -> Signature {
        // Canonical headers: lowercase names, values trimmed with inner runs of spaces collapsed,
        // repeated names joined by ',', sorted by name.
        var merged: [String: String] = [:]
        for (name, value) in headers {
            let n = name.lowercased()
            let v = value.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
                .trimmingWhitespace()
            merged[n] = merged[n].map { "\($0),\(v)" } ?? v
        }
        let names = merged.keys.sorted()
        let canonicalHeaders = names.map { "\($0):\(merged[$0, default: ""])\n" }.joined()
        let signedHeaders = names.joined(separator: ";")
        let canonicalRequest = [
            method, uriEncode(path, keepSlash: true), canonicalQuery(query),
            canonicalHeaders, signedHeaders, payloadHash,
        ].joined(separator: "\n")
        let day = String(amzDate.prefix(8))
        let scope = "\(day)/\(region)/\(service)/aws4_request"
        let stringToSign = ["AWS4-HMAC-SHA256", amzDate, scope, sha256Hex(Array(canonicalRequest.utf8))]
            .joined(separator: "\n")
        var key = SymmetricKey(data: Array("AWS4\(credentials.secretAccessKey)".utf8))
        for part in [day, region, service, "aws4_request"] {
            key = SymmetricKey(data: Array(HMAC<SHA256>.authenticationCode(for: Array(part.utf8), using: key)))
        }
        let signature = hex(HMAC<SHA256>.authenticationCode(for: Array(stringToSign.utf8), using: key))
        let authorization = "AWS4-HMAC-SHA256 Credential=\(credentials.accessKeyID)/\(scope), "
            + "SignedHeaders=\(signedHeaders), Signature=\(signature)"
        return Signature(authorization: authorization, canonicalRequest: canonicalRequest, stringToSign: stringToSign)
    }
}

extension String {
    /// Without leading and trailing spaces and tabs.
    func trimmingWhitespace() -> String {
        let u = Array(utf8)
        var a = 0
        var b = u.count
        while a < b, u[a] == 0x20 || u[a] == 0x09 { a += 1 }
        while b > a, u[b - 1] == 0x20 || u[b - 1] == 0x09 { b -= 1 }
        return String(decoding: u[a..<b], as: UTF8.self)
    }
}
