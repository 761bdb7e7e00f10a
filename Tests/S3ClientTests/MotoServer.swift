import Foundation
import Synchronization

/// pbss3's S3 test server (Tests/Support/s3_server.py: moto with authentication enforced, adapted
/// where stock moto differs from AWS), started on free ports for this test process and stopped
/// when it ends (--exit-on-eof: the server exits when its stdin closes). The first line it prints
/// says it is ready; nothing here sleeps.
final class MotoServer: Sendable {
    let port: Int
    let controlPort: Int
    /// The certificate's SHA-256 (PBS form) with TLS, else nil.
    let fingerprint: String?
    private let process: Process
    private let stdin: FileHandle

    /// The identities s3_server.py creates (its documented fixed test keys).
    static let keyID = "AKIAQCOWPRESSTEST001"
    static let secret = "qcowpress/Test+Secret/0123456789abcdefABCDEF"
    static let deniedKeyID = "AKIAQCOWPRESSNOBODY1"
    static let deniedSecret = "nobody/Secret+0123456789abcdefABCDEFGHIJKL"

    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Support/s3_server.py").path

    /// The files loaded into bucket "bkt" as datastore "store": relative path → content. The server
    /// names `.chunks/…` `store/.chunks/…` and everything else `store/.cnt/…` (PBS 4's layout).
    static let files: [String: String] = [
        "plain": "plain object",
        "vm/100/2024-01-02T03:04:05Z/index.json.blob": "index with a colon",
        "dir with space/a:b+c=d&e é~(1).blob": "odd key",
        ".chunks/0123/0123abcd": String(repeating: "0123456789", count: 1000),
    ].merging((0..<7).map { ("many/\($0)", "m\($0)") }, uniquingKeysWith: { a, _ in a })

    /// Object key → content.
    static var objects: [String: String] {
        Dictionary(uniqueKeysWithValues: files.map { ($0.key.hasPrefix(".chunks/") ? "store/\($0.key)" : "store/.cnt/\($0.key)", $0.value) })
    }

    static let plain = shared(tls: false)
    static let tls = shared(tls: true)

    private static func shared(tls: Bool) -> Result<MotoServer, any Error> { Result { try MotoServer(tls: tls) } }

    private init(tls: Bool) throws {
        let dir = NSTemporaryDirectory() + "qp-s3client-\(UUID().uuidString.prefix(8))"
        for (rel, content) in Self.files {
            let path = dir + "/" + rel
            try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try Data(content.utf8).write(to: URL(fileURLWithPath: path))
        }
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", Self.script, "--exit-on-eof", "--load", "bkt/store=\(dir)", "--load", "other-bucket/store=\(dir)@eu-central-1"]
            + (tls ? ["--tls"] : [])
        let inPipe = Pipe(), outPipe = Pipe()
        p.standardInput = inPipe
        p.standardOutput = outPipe
        p.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try p.run()
        // "LISTENING <s3-port> <control-port> <fingerprint or -> <key id>", once both ports accept.
        var line = Data()
        while true {
            let byte = outPipe.fileHandleForReading.readData(ofLength: 1)
            if byte.isEmpty || byte == Data("\n".utf8) { break }
            line.append(byte)
        }
        let fields = String(decoding: line, as: UTF8.self).split(separator: " ").map(String.init)
        guard fields.count == 5, fields[0] == "LISTENING", let port = Int(fields[1]), let control = Int(fields[2]) else {
            p.terminate()
            p.waitUntilExit()
            throw MotoError(why: "s3_server.py did not start (status \(p.terminationStatus)): '\(String(decoding: line, as: UTF8.self))'")
        }
        self.port = port
        controlPort = control
        fingerprint = fields[3] == "-" ? nil : fields[3]
        process = p
        stdin = inPipe.fileHandleForWriting
    }

    struct MotoError: Error, CustomStringConvertible {
        var why: String
        var description: String { why }
    }

    var endpoint: String { "\(fingerprint == nil ? "http" : "https")://127.0.0.1:\(port)" }

    /// A fresh STS session (key id, secret, token) from the control port.
    func session() throws -> S3SessionForTest {
        let r = try Python.run("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())",
                               args: ["http://127.0.0.1:\(controlPort)/session"])
        guard r.status == 0 else { throw MotoError(why: "GET /session failed: \(r.err)") }
        return try JSONDecoder().decode(S3SessionForTest.self, from: Data(r.out.utf8))
    }
}

struct S3SessionForTest: Decodable {
    var accessKeyID: String
    var secretAccessKey: String
    var sessionToken: String
}
