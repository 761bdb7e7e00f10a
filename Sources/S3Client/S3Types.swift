import Foundation

/// An access key: the id, the secret and, for temporary credentials, the session token. Its
/// descriptions show the key id only: the secret and the token never reach a log line or an error.
public struct S3Credentials: Sendable, CustomStringConvertible, CustomDebugStringConvertible {
    public var accessKeyID: String
    public var secretAccessKey: String
    public var sessionToken: String?

    public init(accessKeyID: String, secretAccessKey: String, sessionToken: String? = nil) {
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
        self.sessionToken = sessionToken
    }

    public var description: String {
        "S3Credentials(accessKeyID: \(accessKeyID), secret: <hidden>\(sessionToken == nil ? "" : ", session token: <hidden>"))"
    }
    public var debugDescription: String { description }

    /// From AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, or nil when absent.
    public static func fromEnvironment(_ env: [String: String]) -> S3Credentials? {
        guard let id = env["AWS_ACCESS_KEY_ID"], !id.isEmpty,
              let secret = env["AWS_SECRET_ACCESS_KEY"], !secret.isEmpty else { return nil }
        let token = env["AWS_SESSION_TOKEN"].flatMap { $0.isEmpty ? nil : $0 }
        return S3Credentials(accessKeyID: id, secretAccessKey: secret, sessionToken: token)
    }

    /// A file of two lines: key id, secret (error names the file, never its content). A third
    /// non-empty line, when present, is the session token. Blank lines around them, trailing
    /// spaces and CRLF line ends are accepted.
    public static func fromFile(_ path: String) throws(S3Error) -> S3Credentials {
        // A credentials file is two short lines; reading at most this much keeps a wrong path
        // (a device, a disk image) from being read whole.
        let maxSize = 64 << 10
        guard let handle = FileHandle(forReadingAtPath: path) else {
            let why = FileManager.default.fileExists(atPath: path) ? "cannot be read" : "does not exist"
            throw S3Error(code: "credentials", bucket: "", message: "the credentials file \(path) \(why)")
        }
        defer { try? handle.close() }
        let data: Data
        do {
            data = try handle.read(upToCount: maxSize + 1) ?? Data()
        } catch {
            throw S3Error(code: "credentials", bucket: "", message: "the credentials file \(path) cannot be read")
        }
        guard data.count <= maxSize else {
            throw S3Error(code: "credentials", bucket: "", message: "the credentials file \(path) is over \(maxSize >> 10) KiB: not a credentials file")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw S3Error(code: "credentials", bucket: "", message: "the credentials file \(path) is not UTF-8 text")
        }
        let lines = text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" || $0 == "\r" })
            .map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty }
        guard lines.count == 2 || lines.count == 3 else {
            throw S3Error(code: "credentials", bucket: "", message:
                "the credentials file \(path) must hold two lines (key id, secret), it holds \(lines.count) non-empty line\(lines.count == 1 ? "" : "s")")
        }
        return S3Credentials(accessKeyID: lines[0], secretAccessKey: lines[1], sessionToken: lines.count == 3 ? lines[2] : nil)
    }
}

/// One failure, as one line: `s3://bucket/key: <Code>: message`. `code` is S3's error code when
/// the server sent one (NoSuchKey, NoSuchBucket, AccessDenied, SignatureDoesNotMatch,
/// InvalidAccessKeyId, SlowDown, …), otherwise one of the client's own: "connection", "tls",
/// "timeout", "http" (a status without an S3 error document), "too-large", "protocol",
/// "endpoint", "credentials", "shutdown". Never holds the secret.
public struct S3Error: Error, Sendable, CustomStringConvertible {
    public var code: String
    public var bucket: String
    public var key: String?
    public var status: Int?
    public var message: String

    public init(code: String, bucket: String, key: String? = nil, status: Int? = nil, message: String) {
        self.code = code
        self.bucket = bucket
        self.key = key
        self.status = status
        self.message = message
    }

    public var description: String {
        var where_ = ""
        if !bucket.isEmpty { where_ = "s3://\(bucket)/\(key ?? ""): " }
        let msg = message.replacingOccurrences(of: "\n", with: " ")
        let st = status.map { " (HTTP \($0))" } ?? ""
        return "\(where_)\(code): \(msg)\(st)"
    }
}

/// One object of a listing.
public struct S3Object: Sendable, Equatable {
    public var key: String
    public var size: UInt64
    public init(key: String, size: UInt64) {
        self.key = key
        self.size = size
    }
}
