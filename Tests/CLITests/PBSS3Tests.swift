import Foundation
import Testing

/// `restore pbs --s3` and `serve pbs --s3` against Tests/Support/s3_server.py: moto with every
/// signature checked, holding datastores made by pbs_datastore.py in PBS 4's S3 layout. One HTTP
/// and one HTTPS server for the whole suite (started on first use, gone when the test process
/// ends); each test reads its own datastore name so that counters and faults stay its own.
@Suite(.tags(.e2e, .pbs), .enabled(if: Harness.haveQemuImg && S3TestServer.available, "needs qemu-img, curl, openssl, python3 with moto[server] and boto3"))
struct PBSS3Tests {
    static let snapshot = PBSRestoreTests.snapshot
    static let later = "vm/100/2026-11-21T10:00:00Z"

    /// The datastores and the servers, made once.
    final class World: Sendable {
        let plain: PBSFixture
        let encrypted: PBSFixture
        let http: S3TestServer
        let https: S3TestServer
        /// The digests (hex) of drive A's second (text) and third (noise) chunks.
        let textDigest: String
        let noiseDigest: String

        init() throws {
            plain = try PBSFixture(.init(name: "s3 plain", chunk: 1 << 20))
            try plain.addLaterSnapshot(PBSS3Tests.later)
            encrypted = try PBSFixture(.init(name: "s3 encrypted", chunk: 1 << 20, kdf: "scrypt", ns: "team/a"))
            let index = try Data(contentsOf: URL(fileURLWithPath: plain.datastore + "/vm/100/2026-11-20T10:00:00Z/drive-scsi0.img.fidx"))
            func digest(_ i: Int) -> String { index[(4096 + i * 32)..<(4096 + (i + 1) * 32)].map { String(format: "%02x", $0) }.joined() }
            textDigest = digest(1)
            noiseDigest = digest(2)
            let p = plain.datastore
            let loads = ["pbs-bucket/store=\(p)", "pbs-bucket/enc=\(encrypted.datastore)", "pbs-bucket/count=\(p)",
                         "pbs-bucket/drops=\(p)", "pbs-bucket/throttle=\(p)", "pbs-bucket/missing=\(p)", "pbs-bucket/corrupt=\(p)",
                         "pbs-bucket/serve=\(p)", "pbs-bucket/live=\(p)", "pbs-eu/store=\(p)@eu-central-1"]
            http = try S3TestServer(loads: loads)
            https = try S3TestServer(loads: ["pbs-bucket/store=\(p)"], tls: true)
            try http.control("delete", ["bucket": "pbs-bucket", "key": "missing/.chunks/\(textDigest.prefix(4))/\(textDigest)"])
            try http.control("corrupt", ["bucket": "pbs-bucket", "key": "corrupt/.chunks/\(noiseDigest.prefix(4))/\(noiseDigest)"])
        }
    }
    static let world = Result { try World() }

    /// The command-line options of datastore `store` in `bucket` on the HTTP server.
    static func s3(_ w: World, _ store: String = "store", bucket: String = "pbs-bucket") -> [String] {
        ["--s3", "s3://\(bucket)/\(store)", "--endpoint", w.http.endpoint, "--path-style"]
    }

    static func out(_ name: String) throws -> (URL, String) {
        let d = try Harness.tempDir()
        return (d, d.appendingPathComponent(name).path)
    }

    @Test func restoresInEveryCodec() throws {
        let w = try Self.world.get()
        let (dir, dst) = try Self.out("a.qcow2")
        defer { try? FileManager.default.removeItem(at: dir) }
        for codec in [[], ["-c"], ["-c", "-o", "compression_type=zstd"]] {
            try? FileManager.default.removeItem(atPath: dst)
            let r = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w) + [Self.snapshot, "drive-scsi0.img", dst, "--output", "json"] + codec,
                                          env: w.http.env())
            #expect(r.status == 0, "\(codec): \(r.stderr)")
            try Harness.expectGood(dst, equals: w.plain.rawA)
        }
    }

    /// A clean restore asks for each distinct chunk once (counted at the server).
    @Test func oneRequestPerChunk() throws {
        let w = try Self.world.get()
        let (dir, out) = try Self.out("all")
        defer { try? FileManager.default.removeItem(at: dir) }
        let r = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w, "count") + [Self.snapshot, "--all", out], env: w.http.env())
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(out + "/drive-scsi0.qcow2", equals: w.plain.rawA)
        try Harness.expectGood(out + "/drive-virtio1.qcow2", equals: w.plain.rawB)
        let c = try w.http.counts("count/.chunks/")
        #expect(c["distinctChunks"]! > 0 && c["chunkGets"] == c["distinctChunks"], "\(c)")
    }

    /// An encrypted backup in a namespace, every drive: equal to the local restore, config included.
    @Test func encryptedNamespaceAll() throws {
        let w = try Self.world.get()
        let f = w.encrypted
        let (dir, out) = try Self.out("enc")
        defer { try? FileManager.default.removeItem(at: dir) }
        let keyArgs = ["--ns", "team/a", "--keyfile", f.dir.appendingPathComponent("key.json").path,
                       "--password-file", f.dir.appendingPathComponent("pw").path]
        let r = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w, "enc") + keyArgs + [Self.snapshot, "--all", out, "-c"], env: w.http.env())
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(out + "/drive-scsi0.qcow2", equals: f.rawA)
        try Harness.expectGood(out + "/drive-virtio1.qcow2", equals: f.rawB)
        #expect(FileManager.default.fileExists(atPath: out + "/qemu-server.conf"))
        let noKey = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w, "enc") + ["--ns", "team/a", Self.snapshot, "drive-scsi0.img", out + "/x.qcow2"],
                                          env: w.http.env())
        #expect(noKey.status == 1 && noKey.stderr.contains("--keyfile"), "\(noKey.stderr)")
    }

    /// `--list` of a namespace (child namespaces, groups), of a group (snapshots, oldest first)
    /// and of a snapshot (archives, as from the local datastore); text and JSON; and --verify-only.
    @Test func listingsAndVerify() throws {
        let w = try Self.world.get()
        let env = w.http.env()
        func run(_ store: String, _ args: [String]) throws -> Harness.Output {
            try Harness.qcowpress(["restore", "pbs"] + Self.s3(w, store) + args, env: env)
        }
        let root = try run("enc", ["--list"])
        #expect(root.status == 0 && root.stdout == "ns team\n", "\(root.stdout)\(root.stderr)")
        let ns = try run("enc", ["--ns", "team", "--list"])
        #expect(ns.status == 0 && ns.stdout == "ns team/a\n", "\(ns.stdout)\(ns.stderr)")
        let groups = try run("enc", ["--ns", "team/a", "--list", "--output", "json"])
        let obj = try JSONSerialization.jsonObject(with: Data(groups.stdout.utf8)) as? [String: [String]]
        #expect(obj?["groups"] == ["vm/100"] && obj?["namespaces"] == [], "\(groups.stdout)\(groups.stderr)")
        let localRoot = try Harness.qcowpress(["restore", "pbs", "--datastore", w.encrypted.datastore, "--list"])
        #expect(localRoot.stdout == root.stdout, "the local datastore lists the same: \(localRoot.stdout)\(localRoot.stderr)")
        let snaps = try run("store", ["vm/100", "--list"])
        #expect(snaps.status == 0 && snaps.stdout == "\(Self.snapshot)\n\(Self.later)\n", "\(snaps.stdout)\(snaps.stderr)")
        let archives = try run("store", [Self.snapshot, "--list"])
        let local = try Harness.qcowpress(["restore", "pbs"] + w.plain.datastoreArgs + [Self.snapshot, "--list"])
        #expect(archives.status == 0 && archives.stdout == local.stdout, "\(archives.stdout)\(archives.stderr)")
        let none = try run("store", ["vm/999", "--list"])
        #expect(none.status == 1 && none.stderr.contains("vm/999") && none.stderr.contains("does not exist"), "\(none.stderr)")
        let verify = try run("store", [Self.snapshot, "--verify-only"])
        #expect(verify.status == 0 && verify.stdout.contains("verified"), "\(verify.stdout)\(verify.stderr)")
    }

    /// Credentials from a file, a session token, a bucket in a second region.
    @Test func credentialFileSessionTokenAndRegion() throws {
        let w = try Self.world.get()
        let (dir, dst) = try Self.out("c.qcow2")
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = dir.appendingPathComponent("creds").path
        try Data("\(S3TestServer.keyID)\n\(S3TestServer.secret)\n".utf8).write(to: URL(fileURLWithPath: file))
        let noEnv = ["AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": ""]
        let f = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w) + ["--s3-credentials", file, Self.snapshot, "drive-virtio1.img", dst], env: noEnv)
        #expect(f.status == 0, "\(f.stderr)")
        try Harness.expectGood(dst, equals: w.plain.rawB)
        let session = try w.http.session()
        let tokenDst = dir.appendingPathComponent("t.qcow2").path
        let t = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w) + [Self.snapshot, "drive-virtio1.img", tokenDst],
                                      env: ["AWS_ACCESS_KEY_ID": session.id, "AWS_SECRET_ACCESS_KEY": session.secret, "AWS_SESSION_TOKEN": session.token])
        #expect(t.status == 0, "\(t.stderr)")
        try Harness.expectGood(tokenDst, equals: w.plain.rawB)
        let badToken = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w) + [Self.snapshot, "drive-virtio1.img", dir.appendingPathComponent("bt.qcow2").path],
                                             env: ["AWS_ACCESS_KEY_ID": session.id, "AWS_SECRET_ACCESS_KEY": session.secret, "AWS_SESSION_TOKEN": "x" + session.token])
        Self.expectRefusal(badToken, "InvalidToken", secrets: [session.secret, session.token], dst: nil)
        let euDst = dir.appendingPathComponent("eu.qcow2").path
        let eu = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w, bucket: "pbs-eu") + ["--region", "eu-central-1", Self.snapshot, "drive-virtio1.img", euDst],
                                       env: w.http.env())
        #expect(eu.status == 0, "\(eu.stderr)")
        try Harness.expectGood(euDst, equals: w.plain.rawB)
        let wrongRegion = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w, bucket: "pbs-eu") + [Self.snapshot, "drive-virtio1.img", dir.appendingPathComponent("wr.qcow2").path],
                                                env: w.http.env())
        Self.expectRefusal(wrongRegion, "eu-central-1", dst: dir.appendingPathComponent("wr.qcow2").path)
    }

    /// HTTPS: a pinned fingerprint restores; the self-signed certificate is refused without it or
    /// with another pin.
    @Test func httpsPinnedAndUntrusted() throws {
        let w = try Self.world.get()
        let (dir, dst) = try Self.out("s.qcow2")
        defer { try? FileManager.default.removeItem(at: dir) }
        let base = ["restore", "pbs", "--s3", "s3://pbs-bucket/store", "--endpoint", w.https.endpoint, "--path-style"]
        let ok = try Harness.qcowpress(base + ["--s3-fingerprint", w.https.fingerprint, Self.snapshot, "drive-virtio1.img", dst], env: w.https.env())
        #expect(ok.status == 0, "\(ok.stderr)")
        try Harness.expectGood(dst, equals: w.plain.rawB)
        let bad = dir.appendingPathComponent("bad.qcow2").path
        let untrusted = try Harness.qcowpress(base + [Self.snapshot, "drive-virtio1.img", bad], env: w.https.env())
        Self.expectRefusal(untrusted, "", dst: bad)
        let other = try Harness.qcowpress(base + ["--s3-fingerprint", String(repeating: "ab:", count: 31) + "ab", Self.snapshot, "drive-virtio1.img", bad],
                                          env: w.https.env())
        Self.expectRefusal(other, "", dst: bad)
    }

    /// Exit 1, one line on stderr holding `expected`, nothing on stdout, no secret anywhere, no
    /// destination left.
    static func expectRefusal(_ r: Harness.Output, _ expected: String, secrets: [String] = [S3TestServer.secret, S3TestServer.nobodySecret],
                              dst: String?, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status == 1, "status \(r.status): \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr.split(separator: "\n").count == 1 && r.stdout.isEmpty, "\(r.stdout)\(r.stderr)", sourceLocation: sourceLocation)
        #expect(expected.isEmpty || r.stderr.contains(expected), "wanted '\(expected)': \(r.stderr)", sourceLocation: sourceLocation)
        for s in secrets where !s.isEmpty {
            #expect(!r.stderr.contains(s) && !r.stdout.contains(s), "a secret in the output: \(r.stderr)", sourceLocation: sourceLocation)
        }
        if let dst { #expect(!FileManager.default.fileExists(atPath: dst), "\(dst) left", sourceLocation: sourceLocation) }
    }

    @Test func refusals() throws {
        let w = try Self.world.get()
        let (dir, dst) = try Self.out("r.qcow2")
        defer { try? FileManager.default.removeItem(at: dir) }
        let id = S3TestServer.keyID
        let cases: [(String, [String], [String: String], String)] = [
            ("wrong secret", Self.s3(w), ["AWS_ACCESS_KEY_ID": id, "AWS_SECRET_ACCESS_KEY": S3TestServer.secret + "x"], "SignatureDoesNotMatch"),
            ("unknown key id", Self.s3(w), ["AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000", "AWS_SECRET_ACCESS_KEY": S3TestServer.secret], "InvalidAccessKeyId"),
            ("access denied", Self.s3(w), ["AWS_ACCESS_KEY_ID": S3TestServer.nobodyID, "AWS_SECRET_ACCESS_KEY": S3TestServer.nobodySecret], "AccessDenied"),
            ("no credentials", Self.s3(w), ["AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""], "AWS_ACCESS_KEY_ID"),
            ("missing bucket", Self.s3(w, bucket: "no-such-bucket"), w.http.env(), "NoSuchBucket"),
            ("wrong datastore", Self.s3(w, "stroe"), w.http.env(), "no datastore 'stroe'"),
            ("missing snapshot", Self.s3(w), w.http.env(), "snapshot does not exist"),
            ("missing chunk", Self.s3(w, "missing"), w.http.env(), "missing/.chunks/\(w.textDigest.prefix(4))/\(w.textDigest)"),
            ("corrupt chunk", Self.s3(w, "corrupt"), w.http.env(), "corrupt/.chunks/\(w.noiseDigest.prefix(4))/\(w.noiseDigest)"),
        ]
        for (name, args, env, expected) in cases {
            let snap = name == "missing snapshot" ? "vm/100/2020-01-01T00:00:00Z" : Self.snapshot
            let r = try Harness.qcowpress(["restore", "pbs"] + args + [snap, "drive-scsi0.img", dst], env: env)
            #expect(r.status == 1, "\(name)")
            Self.expectRefusal(r, expected, dst: dst)
        }
        // NoSuchKey names the key.
        let missing = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w, "missing") + [Self.snapshot, "drive-scsi0.img", dst], env: w.http.env())
        #expect(missing.stderr.contains("NoSuchKey"), "\(missing.stderr)")
        // The secret never goes on the command line: there is no option for it.
        let arg = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w) + ["--secret", "x", Self.snapshot, "drive-scsi0.img", dst], env: w.http.env())
        #expect(arg.status != 0)
    }

    /// Connections dropped under chunk requests, and 503 SlowDown: retried, restored whole, each
    /// chunk delivered once.
    @Test func droppedConnectionsAndThrottling() throws {
        let w = try Self.world.get()
        let (dir, _) = try Self.out("x")
        defer { try? FileManager.default.removeItem(at: dir) }
        for (store, mode) in [("drops", "drop"), ("throttle", "503")] {
            try w.http.control("fault", ["mode": mode, "count": "3", "match": "\(store)/.chunks/"])
            let dst = dir.appendingPathComponent("\(store).qcow2").path
            let r = try Harness.qcowpress(["restore", "pbs"] + Self.s3(w, store) + [Self.snapshot, "drive-scsi0.img", dst, "-c"], env: w.http.env())
            #expect(r.status == 0, "\(mode): \(r.stderr)")
            try Harness.expectGood(dst, equals: w.plain.rawA)
            let c = try w.http.counts("\(store)/.chunks/")
            #expect(c["faults"] == 3, "\(mode): \(c)")
        }
    }

    /// `serve pbs --s3`: every drive over NBD, read back equal to the source.
    @Test func servesOverNBD() throws {
        let w = try Self.world.get()
        let (dir, sock) = try Self.out("s.sock")
        defer { try? FileManager.default.removeItem(at: dir) }
        let nbd = try NBDServeTests.Server(["pbs"] + Self.s3(w, "serve") + ["--socket", sock, "--cache-size", "4M", Self.snapshot],
                                           exports: 2, env: w.http.env())
        #expect(nbd.urls == ["nbd+unix:///drive-scsi0?socket=\(sock)", "nbd+unix:///drive-virtio1?socket=\(sock)"], "\(nbd.urls)")
        for (url, raw) in zip(nbd.urls, [w.plain.rawA, w.plain.rawB]) {
            let copy = dir.appendingPathComponent("copy.raw").path
            try? FileManager.default.removeItem(atPath: copy)
            let c = try Harness.qemuImg(["convert", "-f", "raw", "-O", "raw", url, copy])
            #expect(c.status == 0, "\(c.stderr)")
            let size = try FileManager.default.attributesOfItem(atPath: raw)[.size] as! UInt64
            try FileHandle(forWritingTo: URL(fileURLWithPath: copy)).truncate(atOffset: size)
            #expect(FileManager.default.contentsEqual(atPath: copy, andPath: raw), "\(url)")
        }
        #expect(nbd.stop() == 0)
    }

    /// `restore pbs --s3 --live`: a client copies the drive over NBD while it is restored.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy"), "needs libnbd-bin"))
    func liveRestore() throws {
        let w = try Self.world.get()
        let (dir, sock) = try Self.out("l.sock")
        defer { try? FileManager.default.removeItem(at: dir) }
        let out = dir.appendingPathComponent("out.qcow2").path
        let (p, _, errPath, first) = try PBSServeTests.launch(
            ["restore", "pbs"] + Self.s3(w, "live") + ["--live", sock, "--loaders", "2", Self.snapshot, "drive-scsi0.img", out],
            in: dir, env: w.http.env())
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() } }
        #expect(first.hasPrefix("nbd+unix:///drive-scsi0?socket=\(sock)"), "\(first) \((try? String(contentsOf: errPath, encoding: .utf8)) ?? "")")
        let copy = dir.appendingPathComponent("copy.raw").path
        let c = try Harness.run("/usr/bin/nbdcopy", ["--connections=4", "nbd+unix:///drive-scsi0?socket=\(sock)", copy])
        #expect(c.status == 0, "\(c.stderr)")
        #expect(FileManager.default.contentsEqual(atPath: copy, andPath: w.plain.rawA), "the client read the source")
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "\((try? String(contentsOf: errPath, encoding: .utf8)) ?? "")")
        try Harness.expectGood(out, equals: w.plain.rawA)
    }
}
