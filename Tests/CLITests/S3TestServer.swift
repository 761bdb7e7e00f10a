import Foundation
import Testing

/// Tests/Support/s3_server.py on 127.0.0.1 (free ports): moto with authentication enforced,
/// loaded with datastores in PBS 4's S3 layout. It exits when the test process ends (its stdin is
/// a pipe this object holds; --exit-on-eof), so a suite can share one for all its tests.
final class S3TestServer: Sendable {
    static var script: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Support/s3_server.py").path
    }
    static let available: Bool = {
        for tool in ["/usr/bin/python3", "/usr/bin/openssl", "/usr/bin/curl"] where !FileManager.default.isExecutableFile(atPath: tool) {
            return false
        }
        return (try? Harness.run("/usr/bin/python3", ["-c", "import moto.server, boto3, werkzeug"]).status) == 0
    }()
    // The identities s3_server.py creates.
    static let keyID = "AKIAQCOWPRESSTEST001"
    static let secret = "qcowpress/Test+Secret/0123456789abcdefABCDEF"
    static let nobodyID = "AKIAQCOWPRESSNOBODY1"
    static let nobodySecret = "nobody/Secret+0123456789abcdefABCDEFGHIJKL"

    let process: Process
    let stdin: Pipe
    let port: Int
    let controlPort: Int
    /// SHA-256 of the certificate (colon-separated hex), "-" without --tls.
    let fingerprint: String
    let endpoint: String

    /// `loads`: `BUCKET/STORE=DIR[@REGION]`.
    init(loads: [String], tls: Bool = false) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let outFile = dir.appendingPathComponent("server.out")
        let errFile = dir.appendingPathComponent("server.err")
        _ = FileManager.default.createFile(atPath: outFile.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errFile.path, contents: nil)
        process = Process()
        stdin = Pipe()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = [Self.script, "--exit-on-eof"] + (tls ? ["--tls"] : []) + loads.flatMap { ["--load", $0] }
        process.standardOutput = try FileHandle(forWritingTo: outFile)
        process.standardError = try FileHandle(forWritingTo: errFile)
        process.standardInput = stdin
        try process.run()
        // Its line "LISTENING S3PORT CONTROLPORT FINGERPRINT KEYID" (inotify says when the file grows).
        var listening: [Substring]?
        _ = Wait.until(watching: [outFile.path], orExitOf: process.processIdentifier, timeout: 60) {
            let text = (try? String(contentsOf: outFile, encoding: .utf8)) ?? ""
            listening = text.split(separator: "\n").first(where: { $0.hasPrefix("LISTENING ") })?.split(separator: " ")
            return listening != nil
        }
        guard let parts = listening, parts.count >= 5, let p = Int(parts[1]), let c = Int(parts[2]) else {
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
            throw FixtureError(message: "s3_server.py did not start: \((try? String(contentsOf: errFile, encoding: .utf8)) ?? "")")
        }
        port = p
        controlPort = c
        fingerprint = String(parts[3])
        endpoint = "\(tls ? "https" : "http")://127.0.0.1:\(p)"
    }

    /// The full-access credentials in the environment (no session token).
    func env() -> [String: String] {
        ["AWS_ACCESS_KEY_ID": Self.keyID, "AWS_SECRET_ACCESS_KEY": Self.secret, "AWS_SESSION_TOKEN": ""]
    }

    /// A control request (POST unless `get`); its JSON answer.
    @discardableResult
    func control(_ route: String, _ query: [String: String] = [:], get: Bool = false) throws -> [String: Any] {
        var c = URLComponents()
        c.scheme = "http"
        c.host = "127.0.0.1"
        c.port = controlPort
        c.path = "/" + route
        if !query.isEmpty { c.queryItems = query.sorted { $0.key < $1.key }.map { URLQueryItem(name: $0.key, value: $0.value) } }
        let r = try Harness.run("/usr/bin/curl", ["-sS", "--fail-with-body", "-X", get ? "GET" : "POST", c.url!.absoluteString])
        guard r.status == 0, let obj = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any] else {
            throw FixtureError(message: "s3_server control \(route): \(r.stdout)\(r.stderr)")
        }
        return obj
    }

    /// Request counters over the keys containing `match`.
    func counts(_ match: String) throws -> [String: Int] {
        try control("count", ["match": match], get: true).compactMapValues { $0 as? Int }
    }

    /// Temporary credentials (STS): key id, secret, session token.
    func session() throws -> (id: String, secret: String, token: String) {
        let s = try control("session", get: true)
        guard let id = s["accessKeyID"] as? String, let secret = s["secretAccessKey"] as? String, let token = s["sessionToken"] as? String else {
            throw FixtureError(message: "s3_server /session: \(s)")
        }
        return (id, secret, token)
    }
}
