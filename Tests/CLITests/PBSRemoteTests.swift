import Foundation
import Testing

/// `restore pbs --repository` against Tests/Support/pbs_server.py: a test server written from
/// proxmox-backup's sources (PBS-PROTOCOL-NOTES.md) that serves datastores made by
/// pbs_datastore.py over HTTPS (self-signed certificate) and the reader protocol on HTTP/2.
/// Every restore is checked by qemu-img (check clean, compare equal to the source).
@Suite(.tags(.e2e, .pbs), .enabled(if: Harness.haveQemuImg && PBSTestServer.available, "needs qemu-img, python3 with h2, openssl"))
struct PBSRemoteTests {
    static let snapshot = PBSRestoreTests.snapshot
    static let token = "root@pam!backup"
    static let secret = "s3cret-t0ken"

    /// An API token and a ticket login (user + password) both restore; so does a configuration
    /// given only in the environment (PBS_REPOSITORY, PBS_PASSWORD, PBS_FINGERPRINT).
    @Test func tokenTicketAndEnvironmentLogins() throws {
        let f = try PBSFixture(.init(name: "logins", chunk: 1 << 20))
        defer { f.remove() }
        let server = try PBSTestServer(store: f.datastore, extra: ["--user", "alice@pbs:alice-pw"])
        defer { server.stop() }
        let tokenDst = f.dir.appendingPathComponent("token.qcow2").path
        let t = try Harness.qcowpress(["restore", "pbs", "--repository", server.repository(Self.token), Self.snapshot, "drive-scsi0.img", tokenDst, "-c"],
                                      env: server.env(Self.secret))
        #expect(t.status == 0, "\(t.stderr)")
        try Harness.expectGood(tokenDst, equals: f.rawA)
        let ticketDst = f.dir.appendingPathComponent("ticket.qcow2").path
        let u = try Harness.qcowpress(["restore", "pbs", "--repository", server.repository("alice@pbs"), Self.snapshot, "drive-virtio1.img", ticketDst],
                                      env: server.env("alice-pw"))
        #expect(u.status == 0, "\(u.stderr)")
        try Harness.expectGood(ticketDst, equals: f.rawB)
        // Environment only; the password from --password-file when PBS_PASSWORD is absent.
        let pw = f.dir.appendingPathComponent("pbs-pw").path
        try Data("\(Self.secret)\nsecond line ignored\n".utf8).write(to: URL(fileURLWithPath: pw))
        let envDst = f.dir.appendingPathComponent("env.qcow2").path
        var env = server.env(nil)
        env["PBS_REPOSITORY"] = server.repository(Self.token)
        let e = try Harness.qcowpress(["restore", "pbs", "--password-file", pw, Self.snapshot, "drive-scsi0.img", envDst], env: env)
        #expect(e.status == 0, "\(e.stderr)")
        try Harness.expectGood(envDst, equals: f.rawA)
    }

    /// An encrypted backup in a namespace, every drive (`--all`): equal to the local restore.
    @Test func encryptedNamespaceAllEqualsLocal() throws {
        let f = try PBSFixture(.init(name: "encrypted ns", chunk: 1 << 20, kdf: "scrypt", ns: "team/a"))
        defer { f.remove() }
        let server = try PBSTestServer(store: f.datastore)
        defer { server.stop() }
        let remote = f.dir.appendingPathComponent("remote").path
        let local = f.dir.appendingPathComponent("local").path
        let keyArgs = ["--ns", "team/a", "--keyfile", f.dir.appendingPathComponent("key.json").path,
                       "--password-file", f.dir.appendingPathComponent("pw").path]
        let r = try Harness.qcowpress(["restore", "pbs", "--repository", server.repository(Self.token)] + keyArgs + [Self.snapshot, "--all", remote, "-c"],
                                      env: server.env(Self.secret, passwordInEnv: true))
        #expect(r.status == 0, "\(r.stderr)")
        let l = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [Self.snapshot, "--all", local, "-c"])
        #expect(l.status == 0, "\(l.stderr)")
        for (drive, raw) in [("drive-scsi0", f.rawA), ("drive-virtio1", f.rawB)] {
            try Harness.expectGood(remote + "/\(drive).qcow2", equals: raw)
            let cmp = try Harness.qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", local + "/\(drive).qcow2", remote + "/\(drive).qcow2"])
            #expect(cmp.status == 0, "\(cmp.stdout)")
        }
        let conf = try String(contentsOfFile: remote + "/qemu-server.conf", encoding: .utf8)
        #expect(conf == (try String(contentsOfFile: local + "/qemu-server.conf", encoding: .utf8)))
        // Without the key: refused before anything is written.
        let noKey = try Harness.qcowpress(["restore", "pbs", "--repository", server.repository(Self.token), "--ns", "team/a",
                                           Self.snapshot, "drive-scsi0.img", f.dir.appendingPathComponent("nokey.qcow2").path],
                                          env: server.env(Self.secret))
        #expect(noKey.status == 1 && noKey.stderr.contains("--keyfile"), "\(noKey.stderr)")
    }

    /// `--list` of a group (its snapshots, oldest first) and of a snapshot (its archives), text and JSON.
    @Test func listings() throws {
        let f = try PBSFixture(.init(name: "listing", chunk: 1 << 20))
        defer { f.remove() }
        let later = "vm/100/2026-11-21T10:00:00Z"
        try f.addLaterSnapshot(later)
        let server = try PBSTestServer(store: f.datastore)
        defer { server.stop() }
        let repo = ["--repository", server.repository(Self.token)]
        let group = try Harness.qcowpress(["restore", "pbs"] + repo + ["vm/100", "--list"], env: server.env(Self.secret))
        #expect(group.status == 0 && group.stdout == "\(Self.snapshot)\n\(later)\n", "\(group.stdout)\(group.stderr)")
        let json = try Harness.qcowpress(["restore", "pbs"] + repo + ["vm/100", "--list", "--output", "json"], env: server.env(Self.secret))
        #expect((try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String]) == [Self.snapshot, later])
        let archives = try Harness.qcowpress(["restore", "pbs"] + repo + [Self.snapshot, "--list"], env: server.env(Self.secret))
        let localList = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [Self.snapshot, "--list"])
        #expect(archives.status == 0 && archives.stdout == localList.stdout, "\(archives.stdout)\(archives.stderr)")
        let none = try Harness.qcowpress(["restore", "pbs"] + repo + ["vm/999", "--list"], env: server.env(Self.secret))
        #expect(none.status == 1 && none.stderr.contains("vm/999"), "\(none.stderr)")
    }

    /// Each refusal: exit 1, one line naming the cause, no output left behind.
    @Test func refusals() throws {
        let f = try PBSFixture(.init(name: "refusals", chunk: 1 << 20))
        defer { f.remove() }
        // A chunk the server corrupts: the first random (incompressible) chunk of drive A.
        let index = try Data(contentsOf: URL(fileURLWithPath: f.datastore + "/vm/100/2026-11-20T10:00:00Z/drive-scsi0.img.fidx"))
        let digest = index[(4096 + 2 * 32)..<(4096 + 3 * 32)].map { String(format: "%02x", $0) }.joined()
        let server = try PBSTestServer(store: f.datastore, extra: ["--token", "nobody@pbs!ro:ro-secret", "--no-access", "nobody@pbs!ro",
                                                                   "--corrupt", digest])
        defer { server.stop() }
        let dst = f.dir.appendingPathComponent("out.qcow2").path
        let closed = try PBSTestServer.closedPort()
        var fpWrong = server.env(Self.secret)
        fpWrong["PBS_FINGERPRINT"] = String(repeating: "ab:", count: 31) + "ab"
        var fpMissing = server.env(Self.secret)
        fpMissing["PBS_FINGERPRINT"] = ""
        let cases: [(String, [String], [String: String], String)] = [
            ("wrong fingerprint", [server.repository(Self.token), Self.snapshot, "drive-scsi0.img"], fpWrong, server.fingerprint),
            ("missing fingerprint", [server.repository(Self.token), Self.snapshot, "drive-scsi0.img"], fpMissing, server.fingerprint),
            ("wrong secret", [server.repository(Self.token), Self.snapshot, "drive-scsi0.img"], server.env("wrong"), "refused the API token"),
            ("no access", [server.repository("nobody@pbs!ro"), Self.snapshot, "drive-scsi0.img"], server.env("ro-secret"), "no access"),
            ("closed port", ["\(Self.token)@127.0.0.1:\(closed):store", Self.snapshot, "drive-scsi0.img"], server.env(Self.secret), "refused"),
            ("corrupt chunk", [server.repository(Self.token), Self.snapshot, "drive-scsi0.img"], server.env(Self.secret), digest),
            ("missing archive", [server.repository(Self.token), Self.snapshot, "drive-sata7.img"], server.env(Self.secret), "not in the manifest"),
            ("missing snapshot", [server.repository(Self.token), "vm/100/2020-01-01T00:00:00Z", "drive-scsi0.img"], server.env(Self.secret), "does not exist"),
        ]
        for (name, args, env, expected) in cases {
            let r = try Harness.qcowpress(["restore", "pbs", "--repository"] + args + [dst], env: env)
            #expect(r.status == 1, "\(name): status \(r.status): \(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1, "\(name): \(r.stderr)")
            #expect(r.stderr.contains(expected), "\(name): \(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dst), "\(name)")
            #expect(try Harness.strayFiles(in: f.dir, except: ["a.raw", "b.raw", "ds"]).isEmpty, "\(name)")
        }
    }

    /// A connection dropped mid-restore (twice) is opened again: the restore is equal, and chunks
    /// received before a drop are not asked for again (only those in flight are).
    @Test func droppedConnectionIsResumed() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("n.raw").path
        try SourceImage.noise(64 << 16, seed: 9).write(to: URL(fileURLWithPath: raw))  // 64 distinct 64 KiB chunks
        let ds = dir.appendingPathComponent("ds").path
        let mk = try Harness.run("/usr/bin/python3", [PBSFixture.script, "--datastore", ds, "--snapshot", Self.snapshot, "--chunk-size", String(64 << 10),
                                                      "--drive", "drive-scsi0.img=\(raw)", "--seed", "3"])
        #expect(mk.status == 0, "\(mk.stderr)")
        let server = try PBSTestServer(store: ds, extra: ["--drop-after", "10", "--drops", "2"])
        defer { server.stop() }
        let dst = dir.appendingPathComponent("out.qcow2").path
        let streams = 4, loaders = 2
        let r = try Harness.qcowpress(["restore", "pbs", "--repository", server.repository(Self.token), Self.snapshot, "drive-scsi0.img", dst,
                                       "--streams", String(streams), "--loaders", String(loaders)], env: server.env(Self.secret))
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(dst, equals: raw)
        let log = server.log()
        let requests = log.filter { $0.hasPrefix("CHUNK ") }
        #expect(log.filter { $0.hasPrefix("DROP") }.count == 2, "\(log)")
        #expect(Set(requests).count == 64)
        // Re-asked: at most what was in flight at each drop (window ahead + loaders waiting).
        #expect(requests.count <= 64 + 2 * (streams + loaders + 1), "\(requests.count) chunk requests")
        #expect(log.filter { $0.hasPrefix("READER") }.count == 3, "three reader sessions: \(log)")
        // A server that drops every connection: bounded retries, then one line and nothing left.
        let flaky = try PBSTestServer(store: ds, extra: ["--drop-after", "1", "--drops", "1000"])
        defer { flaky.stop() }
        let dst2 = dir.appendingPathComponent("flaky.qcow2").path
        let g = try Harness.qcowpress(["restore", "pbs", "--repository", flaky.repository(Self.token), Self.snapshot, "drive-scsi0.img", dst2],
                                      env: flaky.env(Self.secret))
        #expect(g.status == 1 && g.stderr.contains("gave up after 5 reconnections") && g.stderr.split(separator: "\n").count == 1, "\(g.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dst2))
        #expect(try Harness.strayFiles(in: dir, except: ["n.raw", "ds", "out.qcow2"]).isEmpty)
        #expect(flaky.log().filter { $0.hasPrefix("READER") }.count == 6, "the first session and 5 more")
    }

    /// With 100 ms added to every chunk answer, requests in flight overlap: the same restore takes
    /// far less longer than 64 × 100 ms (one at a time) more than at 0 ms. Measured against a run at
    /// 0 ms in the same test so that a loaded machine slows both (seen here: 0.9 s vs 0.6 s by
    /// hand with load average 7 on 2 cores).
    @Test func latencyIsHidden() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("n.raw").path
        try SourceImage.noise(64 << 16, seed: 11).write(to: URL(fileURLWithPath: raw))
        let ds = dir.appendingPathComponent("ds").path
        let mk = try Harness.run("/usr/bin/python3", [PBSFixture.script, "--datastore", ds, "--snapshot", Self.snapshot, "--chunk-size", String(64 << 10),
                                                      "--drive", "drive-scsi0.img=\(raw)", "--seed", "3"])
        #expect(mk.status == 0, "\(mk.stderr)")
        var seconds: [Double] = []
        for latency in [0, 100] {
            let server = try PBSTestServer(store: ds, extra: ["--latency-ms", String(latency)])
            defer { server.stop() }
            let dst = dir.appendingPathComponent("out\(latency).qcow2").path
            let t0 = Date()
            let r = try Harness.qcowpress(["restore", "pbs", "--repository", server.repository(Self.token), Self.snapshot, "drive-scsi0.img", dst],
                                          env: server.env(Self.secret))
            seconds.append(Date().timeIntervalSince(t0))
            #expect(r.status == 0, "\(r.stderr)")
            try Harness.expectGood(dst, equals: raw)
        }
        #expect(seconds[1] - seconds[0] < 64 * 0.1 / 4, "\(seconds) s for 64 chunks at 0 and 100 ms each")
    }
}

extension PBSRemoteTests {
    /// A ticket that expires during a restore (the server refuses it when the dropped connection
    /// is opened again) is replaced by a new login; the restore ends equal.
    @Test func expiredTicketIsRenewed() throws {
        let f = try PBSFixture(.init(name: "ticket expiry", chunk: 1 << 20))
        defer { f.remove() }
        let server = try PBSTestServer(store: f.datastore, extra: ["--user", "alice@pbs:alice-pw", "--ticket-uses", "1",
                                                                   "--drop-after", "2", "--drops", "1"])
        defer { server.stop() }
        let dst = f.dir.appendingPathComponent("t.qcow2").path
        let r = try Harness.qcowpress(["restore", "pbs", "--repository", server.repository("alice@pbs"), Self.snapshot, "drive-scsi0.img", dst,
                                       "--streams", "1", "--loaders", "1"], env: server.env("alice-pw"))
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(dst, equals: f.rawA)
        let log = server.log()
        #expect(log.filter { $0.hasPrefix("LOGIN") }.count == 2 && log.filter { $0.hasPrefix("DROP") }.count == 1, "\(log)")
    }

    /// Repository syntax as proxmox-backup-client's: errors name the part that is wrong; the
    /// defaults (user root@pam, port 8007) apply when parts are left out.
    @Test func repositorySyntax() throws {
        let f = try PBSFixture(.init(name: "syntax", chunk: 1 << 20))
        defer { f.remove() }
        let server = try PBSTestServer(store: f.datastore)
        defer { server.stop() }
        for (repo, expected) in [("a:b:c:d", "IPv6 address in brackets"), ("x@y@z@host:store", "USER@REALM"),
                                 ("host:99999:store", "port '99999'"), ("host:-store", "datastore '-store'"),
                                 ("[::1:store", "lacks its ']'"), ("ho st:store", "host 'ho st'")] {
            let r = try Harness.qcowpress(["restore", "pbs", "--repository", repo, "vm/100", "--list"], env: server.env(Self.secret))
            #expect(r.status == 1 && r.stderr.contains(expected) && r.stderr.split(separator: "\n").count == 1, "\(repo): \(r.stderr)")
        }
        // No user: root@pam logs in with a password (this server has no such user: refused).
        let noUser = try Harness.qcowpress(["restore", "pbs", "--repository", "127.0.0.1:\(server.port):store", "vm/100", "--list"],
                                           env: server.env("pw"))
        #expect(noUser.status == 1 && noUser.stderr.contains("password of root@pam"), "\(noUser.stderr)")
        // --datastore and --repository together, or neither (and no PBS_REPOSITORY): usage errors.
        let both = try Harness.qcowpress(["restore", "pbs", "--datastore", f.datastore, "--repository", server.repository(Self.token), "vm/100", "--list"])
        #expect(both.status == 1 && both.stderr.contains("one of --datastore"), "\(both.stderr)")
        let neither = try Harness.qcowpress(["restore", "pbs", "vm/100", "--list"], env: ["PBS_REPOSITORY": ""])
        #expect(neither.status == 1 && neither.stderr.contains("--repository"), "\(neither.stderr)")
    }

    /// `serve pbs --repository`: every archive over NBD, read through the server.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy"), "needs libnbd-bin"))
    func serveFromServer() throws {
        let f = try PBSFixture(.init(name: "serve remote", chunk: 1 << 20))
        defer { f.remove() }
        let server = try PBSTestServer(store: f.datastore)
        defer { server.stop() }
        let sock = f.dir.appendingPathComponent("p.sock").path
        let nbd = try NBDServeTests.Server(["pbs", "--repository", server.repository(Self.token), "--socket", sock, "--cache-size", "4M", Self.snapshot],
                                           exports: 2, env: server.env(Self.secret))
        #expect(nbd.urls == ["nbd+unix:///drive-scsi0?socket=\(sock)", "nbd+unix:///drive-virtio1?socket=\(sock)"], "\(nbd.urls)")
        for (url, raw) in zip(nbd.urls, [f.rawA, f.rawB]) {
            let padded = try f.padded(raw)
            let cmp = try Harness.qemuImg(["compare", "-f", "raw", padded, url])
            #expect(cmp.status == 0, "\(url): \(cmp.stdout)\(cmp.stderr)")
        }
        #expect(nbd.stop() == 0)
    }

    /// `restore pbs --repository --live`: a client copies the drive over NBD while it is restored
    /// from the server (every chunk answer 20 ms late); both end equal to the source.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy"), "needs libnbd-bin"))
    func liveRestoreFromServer() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (rawA, ds) = try PBSServeTests.liveDrive(in: dir, distinct: 16)
        let server = try PBSTestServer(store: ds, extra: ["--latency-ms", "20"])
        defer { server.stop() }
        let sock = dir.appendingPathComponent("l.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        let (p, _, errPath, first) = try PBSServeTests.launch(
            ["restore", "pbs", "--repository", server.repository(Self.token), "--live", sock, "--loaders", "2",
             Self.snapshot, "drive-scsi0.img", out], in: dir, env: server.env(Self.secret))
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() } }
        #expect(first.hasPrefix("nbd+unix:///drive-scsi0?socket=\(sock)"), "\(first) \((try? String(contentsOf: errPath, encoding: .utf8)) ?? "")")
        let copy = dir.appendingPathComponent("copy.raw").path
        let c = try Harness.run("/usr/bin/nbdcopy", ["--connections=4", "nbd+unix:///drive-scsi0?socket=\(sock)", copy])
        #expect(c.status == 0, "\(c.stderr)")
        #expect(FileManager.default.contentsEqual(atPath: copy, andPath: rawA), "the client read the source")
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "\((try? String(contentsOf: errPath, encoding: .utf8)) ?? "")")
        try Harness.expectGood(out, equals: rawA)
    }
}

/// Tests/Support/pbs_server.py on 127.0.0.1 (a free port, a fresh self-signed certificate); its
/// stderr (one line per reader session, chunk request and drop) goes to a file.
final class PBSTestServer {
    static var script: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Support/pbs_server.py").path
    }
    static let available: Bool = {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"),
              FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl") else { return false }
        return (try? Harness.run("/usr/bin/python3", ["-c", "import h2"]).status) == 0
    }()

    let process = Process()
    let port: Int
    let fingerprint: String
    let logFile: URL
    let dir: URL

    init(store: String, extra: [String] = []) throws {
        dir = try Harness.tempDir()
        logFile = dir.appendingPathComponent("server.log")
        let outFile = dir.appendingPathComponent("server.out")
        _ = FileManager.default.createFile(atPath: logFile.path, contents: nil)
        _ = FileManager.default.createFile(atPath: outFile.path, contents: nil)
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = [Self.script, "--store", "store=\(store)", "--token", "\(PBSRemoteTests.token):\(PBSRemoteTests.secret)"] + extra
        process.standardOutput = try FileHandle(forWritingTo: outFile)
        process.standardError = try FileHandle(forWritingTo: logFile)
        process.standardInput = FileHandle.nullDevice
        try process.run()
        // Its line "LISTENING PORT FINGERPRINT" on stdout (a file: inotify says when it grows).
        var listening: [Substring]?
        _ = Wait.until(watching: [outFile.path], orExitOf: process.processIdentifier, timeout: 20) {
            let text = (try? String(contentsOf: outFile, encoding: .utf8)) ?? ""
            listening = text.split(separator: "\n").first(where: { $0.hasPrefix("LISTENING ") })?.split(separator: " ")
            return listening != nil
        }
        guard let parts = listening, parts.count >= 3 else {
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
            throw FixtureError(message: "pbs_server.py did not start: \((try? String(contentsOf: logFile, encoding: .utf8)) ?? "")")
        }
        port = Int(parts[1]) ?? 0
        fingerprint = String(parts[2])
    }

    func repository(_ auth: String) -> String { "\(auth)@127.0.0.1:\(port):store" }

    /// The environment of a client: the fingerprint, and the secret in PBS_PASSWORD.
    func env(_ secret: String?, passwordInEnv: Bool = true) -> [String: String] {
        var e = ["PBS_FINGERPRINT": fingerprint, "PBS_REPOSITORY": ""]
        if let secret, passwordInEnv { e["PBS_PASSWORD"] = secret }
        return e
    }

    func log() -> [String] {
        ((try? String(contentsOf: logFile, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }

    /// SIGKILL: a child of the test runner may have SIGTERM blocked.
    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(at: dir)
    }

    /// A port with nothing listening (bound, then closed).
    static func closedPort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return Int(UInt16(bigEndian: addr.sin_port))
    }
}
