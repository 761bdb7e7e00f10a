import Foundation
import NIOCore
import NIOHTTP1

/// One S3 call as the retry loop sees it.
struct Operation: Sendable {
    var method: HTTPMethod
    /// The raw (unencoded) absolute path.
    var path: String
    /// Raw name/value pairs.
    var query: [(String, String)]
    /// Headers besides Host and the x-amz ones (Range); signed too.
    var headers: [(String, String)]
    var limit: Int
    /// The key (or prefix) errors name.
    var key: String
    /// HEAD: a 404 is an answer (the key does not exist), not an error.
    var notFoundIsNil = false
}

extension S3Client {
    /// The request head for `op`, signed now.
    func signedHead(_ op: Operation) -> HTTPRequestHead {
        let amzDate = SigV4.amzDate(now())
        let host = endpoint.hostHeader(bucket: bucket)
        var signed: [(String, String)] = [
            ("host", host),
            ("x-amz-content-sha256", SigV4.emptyPayloadHash),
            ("x-amz-date", amzDate),
        ]
        if let token = credentials.sessionToken { signed.append(("x-amz-security-token", token)) }
        signed += op.headers
        let sig = SigV4.sign(method: op.method.rawValue, path: op.path, query: op.query, headers: signed,
                             payloadHash: SigV4.emptyPayloadHash, amzDate: amzDate, region: endpoint.region,
                             service: "s3", credentials: credentials)
        var uri = SigV4.uriEncode(op.path, keepSlash: true)
        if !op.query.isEmpty { uri += "?" + SigV4.canonicalQuery(op.query) }
        var headers = HTTPHeaders(signed)
        headers.add(name: "Authorization", value: sig.authorization)
        headers.add(name: "User-Agent", value: "qcowpress-s3")
        return HTTPRequestHead(version: .http1_1, method: op.method, uri: uri, headers: headers)
    }

    /// Sends `op` until it has an answer: a 2xx response (or a 404 for a HEAD), or an error after
    /// the retries. `done` runs once.
    func perform(_ op: Operation, attempt: Int = 1, stale: Int = 0,
                 done: @escaping @Sendable (Result<S3HTTPResponse, S3Error>) -> Void) {
        let job = S3Pool.Job(makeHead: { self.signedHead(op) }, limit: op.limit) { result, reused in
            switch result {
            case .success(let r):
                if (200..<300).contains(r.status) || (op.notFoundIsNil && r.status == 404) {
                    done(.success(r))
                    return
                }
                let e = self.error(from: r, op: op)
                if Self.retriedStatuses.contains(r.status), attempt < self.retry.maxAttempts {
                    self.scheduleRetry(op, attempt: attempt, done: done)
                } else {
                    done(.failure(self.gaveUp(e, attempt: attempt, retriable: Self.retriedStatuses.contains(r.status))))
                }
            case .failure(let t):
                switch t {
                case .dropped(_, sawResponse: false) where reused && stale < self.retry.staleRetries:
                    self.perform(op, attempt: attempt, stale: stale + 1, done: done)
                case .dropped where attempt < self.retry.maxAttempts:
                    self.scheduleRetry(op, attempt: attempt, done: done)
                default:
                    done(.failure(self.gaveUp(self.error(from: t, op: op), attempt: attempt,
                                              retriable: { if case .dropped = t { return true } else { return false } }())))
                }
            }
        }
        pool.submit(job)
    }

    /// 500 InternalError, 502 and 504 from a proxy in front, 503 SlowDown / ServiceUnavailable.
    static let retriedStatuses: Set<Int> = [500, 502, 503, 504]

    private func scheduleRetry(_ op: Operation, attempt: Int,
                               done: @escaping @Sendable (Result<S3HTTPResponse, S3Error>) -> Void) {
        let d = min(retry.backoffBase * Double(1 << attempt), retry.backoffCap)
        let delay = Double.random(in: (d / 2)...d)
        group.next().scheduleTask(in: .nanoseconds(Int64(delay * 1e9))) {
            self.perform(op, attempt: attempt + 1, done: done)
        }
    }

    private func gaveUp(_ e: S3Error, attempt: Int, retriable: Bool) -> S3Error {
        guard retriable, attempt > 1 else { return e }
        var e = e
        e.message += " (after \(attempt) attempts)"
        return e
    }

    /// An S3Error for an error response: S3's code and message from its XML document, else one
    /// from the status. The region the server names in x-amz-bucket-region is added when it is not
    /// ours (the usual cause of PermanentRedirect and AuthorizationHeaderMalformed).
    func error(from r: S3HTTPResponse, op: Operation) -> S3Error {
        var code: String
        var message: String
        if let doc = S3ErrorDocument.parse(r.body) {
            code = doc.code
            message = doc.message.isEmpty ? "HTTP status \(r.status)" : doc.message
        } else {
            switch r.status {
            case 301: code = "PermanentRedirect"
            case 400: code = "BadRequest"
            case 403: code = "AccessDenied"
            case 404: code = "NotFound"
            case 503: code = "SlowDown"
            default: code = "http"
            }
            message = "HTTP status \(r.status) without an S3 error document"
        }
        if let region = r.headers.first(name: "x-amz-bucket-region"), region != endpoint.region {
            message += "; the bucket is in region \(region), not \(endpoint.region)"
        }
        return S3Error(code: scrub(code), bucket: bucket, key: op.key, status: r.status, message: scrub(message))
    }

    func error(from t: S3TransportError, op: Operation) -> S3Error {
        let (code, message): (String, String)
        switch t {
        case .connect(let why): (code, message) = ("connection", why)
        case .tls(let why): (code, message) = ("tls", "\(endpoint): \(why)")
        case .dropped(let why, _): (code, message) = ("connection", "\(endpoint): \(why)")
        case .timeout(let why): (code, message) = ("timeout", "\(endpoint): \(why)")
        case .tooLarge(let n): (code, message) = ("too-large", "the object is \(n) bytes or more, over the limit of \(op.limit)")
        case .shutdown: (code, message) = ("shutdown", "the client was shut down")
        }
        return S3Error(code: code, bucket: bucket, key: op.key, message: scrub(message))
    }

    /// `s` with the secret and the session token cut out, should a server ever echo them.
    func scrub(_ s: String) -> String {
        var s = s
        for secret in [credentials.secretAccessKey, credentials.sessionToken ?? ""] where secret.count >= 4 {
            s = s.replacingOccurrences(of: secret, with: "<hidden>")
        }
        return s
    }
}
