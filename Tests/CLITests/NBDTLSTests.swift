import Foundation
import Synchronization
import Testing

/// A test PKI made with openssl: a CA, a server certificate for 127.0.0.1, client certificates
/// (alice, bob), one for alice from another CA, an expired one and one for servers only. Each
/// client directory is in libnbd's and QEMU's layout (ca-cert.pem, client-cert.pem,
/// client-key.pem); `server` holds ca-cert.pem, server-cert.pem, server-key.pem.
struct TestPKI: Sendable {
    let dir: URL
    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }
    var server: String { path("server") }

    static let script = #"""
        set -e
        cd "$1"
        key() { openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1" -out "$2" -subj "$3" 2>/dev/null; }
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca-cert.pem -days 30 -subj "/CN=QcowPress test CA" 2>/dev/null
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout other-key.pem -out other-cert.pem -days 30 -subj "/CN=Another CA" 2>/dev/null
        # sign DIR CN KIND(server|client) DAYS CA EXTENSIONS
        sign() {
            mkdir -p "$1"; cp ca-cert.pem "$1/"
            key "$1/$3-key.pem" "$1/req.csr" "/CN=$2"
            printf '%s\n' "$6" > "$1/ext.cnf"
            openssl x509 -req -in "$1/req.csr" -CA "$5-cert.pem" -CAkey "$5-key.pem" -CAcreateserial -days "$4" -extfile "$1/ext.cnf" -out "$1/$3-cert.pem" 2>/dev/null
            rm "$1/req.csr" "$1/ext.cnf"
            chmod 600 "$1/$3-key.pem"
        }
        COMMON='basicConstraints=CA:FALSE
        keyUsage=digitalSignature,keyEncipherment'
        CLIENT="$COMMON
        extendedKeyUsage=clientAuth"
        sign server 127.0.0.1 server 30 ca "$COMMON
        extendedKeyUsage=serverAuth
        subjectAltName=IP:127.0.0.1"
        sign alice alice client 30 ca "$CLIENT"
        sign bob bob client 30 ca "$CLIENT"
        sign mallory alice client 30 other "$CLIENT"
        sign expired alice client -1 ca "$CLIENT"
        sign serveronly alice client 30 ca "$COMMON
        extendedKeyUsage=serverAuth"
        mkdir nocert; cp ca-cert.pem nocert/
        """#

    init() throws {
        dir = try Harness.tempDir()
        let r = try Harness.run("/bin/sh", ["-c", Self.script, "sh", dir.path])
        guard r.status == 0 else { throw NBDTLSTests.Failure("openssl: \(r.stderr)") }
    }
    func remove() { try? FileManager.default.removeItem(at: dir) }

    /// libnbd's URI of `export` for a client with the certificates of `who`.
    func uri(_ url: String, _ who: String) -> String { "\(url)?tls-certificates=\(path(who))" }
    /// qemu-img's `--object` and `--image-opts` for `export` at `port` with the certificates of `who`.
    func qemuArgs(port: Int, export: String, _ who: String) -> (object: [String], opts: String) {
        (["--object", "tls-creds-x509,id=tls0,dir=\(path(who)),endpoint=client"],
         "driver=nbd,host=127.0.0.1,port=\(port),export=\(export),tls-creds=tls0")
    }
}

/// Lines a child writes on a pipe, as they come; waits for a line without sleeping.
final class LineLog: Sendable {
    private let lines = Mutex<[String]>([])
    private let changed = NSCondition()

    init(_ handle: FileHandle) {
        Thread.detachNewThread { [self] in
            var partial = ""
            while true {
                let d = handle.availableData
                if d.isEmpty { break }
                partial += String(decoding: d, as: UTF8.self)
                while let nl = partial.firstIndex(of: "\n") {
                    let line = String(partial[..<nl])
                    partial = String(partial[partial.index(after: nl)...])
                    changed.lock()
                    lines.withLock { $0.append(line) }
                    changed.broadcast()
                    changed.unlock()
                }
            }
            changed.lock()
            lines.withLock { $0.append("<eof>") }
            changed.broadcast()
            changed.unlock()
        }
    }

    var all: [String] { lines.withLock { $0 } }

    /// Waits until `count` lines satisfy `match` (or the pipe ends, or `timeout` seconds pass).
    @discardableResult
    func wait(for count: Int = 1, timeout: Double = 20, _ match: (String) -> Bool) -> [String] {
        let deadline = Date(timeIntervalSinceNow: timeout)
        changed.lock()
        defer { changed.unlock() }
        while true {
            let now = lines.withLock { $0 }
            let hits = now.filter(match)
            if hits.count >= count || now.last == "<eof>" || !changed.wait(until: deadline) { return hits }
        }
    }
}

/// `serve image|pbs --tls-creds`: TLS as QEMU speaks it (NBD_OPT_STARTTLS, x509 client
/// certificates), judged by libnbd (nbdcopy, nbdinfo with nbds:// URIs) and QEMU (qemu-img,
/// qemu-io with tls-creds-x509), plus a client that misbehaves on purpose.
@Suite(.tags(.e2e, .nbd), .enabled(if: Harness.haveQemuImg && FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy")
                && FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl"), "needs qemu-img, libnbd-bin and openssl"))
struct NBDTLSTests {
    struct Failure: Error, CustomStringConvertible { var description: String; init(_ d: String) { description = d } }

    /// A running `qcowpress serve`, its URLs and its stderr as lines; stopped by `stop()`.
    final class Server {
        let process = Process()
        let urls: [String]
        let log: LineLog
        init(_ args: [String], exports: Int = 1) throws {
            process.executableURL = URL(fileURLWithPath: Harness.binary)
            process.arguments = ["serve"] + args
            let out = Pipe(), err = Pipe()
            process.standardOutput = out
            process.standardError = err
            try process.run()
            log = LineLog(err.fileHandleForReading)
            var text = ""
            while text.split(separator: "\n").count < exports {
                let d = out.fileHandleForReading.availableData
                if d.isEmpty { break }
                text += String(decoding: d, as: UTF8.self)
            }
            urls = text.split(separator: "\n").map(String.init)
        }
        var port: Int { urls.first.flatMap { $0.split(separator: ":").last?.split(separator: "/").first }.flatMap { Int($0) } ?? 0 }
        func stop() -> Int32 {
            process.terminate()
            process.waitUntilExit()
            return process.terminationStatus
        }
    }

    static func refusals(_ log: LineLog, _ count: Int, containing text: String) -> [String] {
        log.wait(for: count) { $0.contains("refused") && $0.contains(text) }
    }

    /// Good clients read what the images hold, over TLS only: nbdcopy (4 connections: multi-conn),
    /// nbdinfo (block status needs structured replies), qemu-img compare and qemu-io.
    @Test func goodClientsReadEqualBytes() throws {
        let pki = try TestPKI()
        defer { pki.remove() }
        let (raw, q) = try NBDServeTests.images(in: pki.dir)
        let server = try Server(["image", "--listen", "127.0.0.1:0", "--tls-creds", pki.server, "--tls-allow", "alice", "--tls-allow", "bob", raw, q], exports: 2)
        defer { _ = server.stop() }
        #expect(server.urls.count == 2 && server.urls.allSatisfy { $0.hasPrefix("nbds://127.0.0.1:") }, "\(server.urls)")
        try #require(server.urls.count == 2)
        for who in ["alice", "bob"] {
            let out = pki.dir.appendingPathComponent("copy-\(who).raw").path
            let copy = try Harness.run("/usr/bin/nbdcopy", ["--connections=4", pki.uri(server.urls[1], who), out])
            #expect(copy.status == 0 && FileManager.default.contentsEqual(atPath: out, andPath: raw), "\(who): \(copy.stderr)")
        }
        let info = try Harness.run("/usr/bin/nbdinfo", [pki.uri(server.urls[0], "alice")])
        #expect(info.status == 0 && info.stdout.contains("can_multi_conn: true") && info.stdout.contains("newstyle-fixed with TLS"), "\(info.stdout)\(info.stderr)")
        let map = try Harness.run("/usr/bin/nbdinfo", ["--map", pki.uri(server.urls[1], "alice")])
        #expect(map.stdout.split(separator: "\n").first?.split(whereSeparator: \.isWhitespace).map(String.init) == ["0", "3145728", "0", "data"], "\(map.stdout)\(map.stderr)")
        let (object, opts) = pki.qemuArgs(port: server.port, export: "disk.qcow2", "alice")
        let cmp = try Harness.qemuImg(["compare"] + object + ["--image-opts", opts, "driver=file,filename=\(raw)"])
        #expect(cmp.status == 0, "\(cmp.stdout)\(cmp.stderr)")
        let io = try Harness.run("/usr/bin/qemu-io", ["-r"] + object + ["--image-opts", opts, "-c", "read -P 0 4M 1M"])
        #expect(io.status == 0 && !io.stdout.contains("Pattern verification failed"), "\(io.stdout)\(io.stderr)")
        #expect(server.log.all.allSatisfy { !$0.contains("refused") }, "\(server.log.all)")
    }

    /// Every client that is not allowed is refused, the server says who and why in one line, and
    /// an allowed client reads right afterwards.
    @Test func clientsNotAllowedAreRefused() throws {
        let pki = try TestPKI()
        defer { pki.remove() }
        let (raw, _) = try NBDServeTests.images(in: pki.dir)
        let server = try Server(["image", "--listen", "127.0.0.1:0", "--tls-creds", pki.server, "--tls-allow", "alice", raw])
        defer { _ = server.stop() }
        try #require(server.urls.count == 1, "\(server.log.all)")
        let url = server.urls[0]
        let plain = try Harness.run("/usr/bin/nbdinfo", ["--size", url.replacingOccurrences(of: "nbds://", with: "nbd://")])
        #expect(plain.status != 0, "a plaintext client reads nothing: \(plain.stdout)")
        #expect(Self.refusals(server.log, 1, containing: "plaintext client").count == 1, "\(server.log.all)")
        let cases: [(who: String, reason: String)] = [
            ("nocert", "no client certificate signed by ca-cert.pem"),
            // libnbd offers no certificate of a CA the server does not name.
            ("mallory", "no client certificate signed by ca-cert.pem"),
            ("bob", "CN bob is not allowed"),
            ("expired", "expired"),
            ("serveronly", "not for TLS client authentication"),
        ]
        var seen: [String: Int] = [:]
        for c in cases {
            let r = try Harness.run("/usr/bin/nbdinfo", ["--size", pki.uri(url, c.who)])
            #expect(r.status != 0, "\(c.who) is refused: \(r.stdout)")
            seen[c.reason, default: 0] += 1
            let lines = Self.refusals(server.log, seen[c.reason] ?? 1, containing: c.reason)
            #expect(lines.count == seen[c.reason] && lines.allSatisfy { $0.hasPrefix("qcowpress serve: 127.0.0.1:") }, "\(c.who): \(server.log.all)")
        }
        // QEMU as the refused client: a CN not on the list.
        let (object, opts) = pki.qemuArgs(port: server.port, export: "disk.raw", "bob")
        let qemu = try Harness.qemuImg(["info"] + object + ["--image-opts", opts])
        #expect(qemu.status != 0, "\(qemu.stdout)")
        #expect(Self.refusals(server.log, 2, containing: "CN bob is not allowed").count == 2, "\(server.log.all)")
        let good = try Harness.run("/usr/bin/nbdinfo", ["--size", pki.uri(url, "alice")])
        #expect(good.status == 0 && good.stdout == "\(24 << 20)\n", "\(good.stderr)")
        #expect(server.log.all.filter { $0.contains("refused") }.count == 7, "one line per refusal: \(server.log.all)")
    }

    /// Garbage, options before TLS, plaintext injected behind NBD_OPT_STARTTLS, and clients that
    /// stall before or inside the handshake, all at once while a good client copies the disk:
    /// each is refused (a stall at the handshake timeout) and logged; the copy is right.
    @Test func hostileHandshakesDoNotHurtOthers() throws {
        let pki = try TestPKI()
        defer { pki.remove() }
        let (raw, _) = try NBDServeTests.images(in: pki.dir)
        let server = try Server(["image", "--listen", "127.0.0.1:0", "--tls-creds", pki.server, "--handshake-timeout", "1", raw])
        defer { _ = server.stop() }
        try #require(server.urls.count == 1, "\(server.log.all)")
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Support/nbd_tls_hostile.py").path
        let hostile = Process()
        hostile.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        hostile.arguments = [script, "127.0.0.1", String(server.port), pki.path("mallory")]
        let out = Pipe()
        hostile.standardOutput = out
        try hostile.run()
        let out1 = pki.dir.appendingPathComponent("copy.raw").path
        let copy = try Harness.run("/usr/bin/nbdcopy", ["--connections=2", pki.uri(server.urls[0], "alice"), out1])
        #expect(copy.status == 0 && FileManager.default.contentsEqual(atPath: out1, andPath: raw), "\(copy.stderr)")
        let said = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        hostile.waitUntilExit()
        var closed: [String: (reply: String, after: Double)] = [:]
        for line in said.split(separator: "\n") {
            let w = line.split(separator: " ")
            if w.count == 5, let t = Double(w[4]) { closed[String(w[0].dropLast())] = (String(w[1]), t) }
        }
        #expect(closed.count == 10, "\(said)")
        #expect(closed["plaintext-go"]?.reply == "0x80000005", "NBD_REP_ERR_TLS_REQD: \(said)")
        #expect(closed["starttls-stall"]?.reply == "0x1" && closed["starttls-injection"]?.reply == "0x1", "ACK: \(said)")
        for (name, c) in closed {
            let stalls = ["silent", "flags-only", "plaintext-go", "starttls-stall"].contains(name)
            #expect(stalls ? c.after >= 0.9 && c.after < 5 : c.after < 0.9, "\(name) closed after \(c.after) s")
        }
        let lines = server.log.wait(for: 10) { $0.contains("refused") }
        #expect(lines.count == 10 && lines.allSatisfy { $0.hasPrefix("qcowpress serve: 127.0.0.1:") }, "\(server.log.all)")
        for reason in ["no NBD handshake within 1 s", "not a fixed-newstyle NBD client", "not an NBD option", "TLS handshake failed",
                       "NBD_OPT_EXPORT_NAME without TLS", "sent data after NBD_OPT_STARTTLS", "plaintext client",
                       "client certificate (CN alice) not signed by ca-cert.pem"] {
            #expect(lines.contains { $0.contains(reason) }, "\(reason): \(lines)")
        }
        let after = try Harness.run("/usr/bin/nbdinfo", ["--size", pki.uri(server.urls[0], "alice")])
        #expect(after.status == 0, "\(after.stderr)")
    }

    /// Plaintext beyond loopback is refused in one line naming --tls-creds and --insecure;
    /// --insecure serves it; --tls-creds serves any address.
    @Test func plaintextBeyondLoopbackNeedsInsecure() throws {
        let pki = try TestPKI()
        defer { pki.remove() }
        let (raw, _) = try NBDServeTests.images(in: pki.dir)
        // A machine without `hostname` (or without a non-loopback address) tries 0.0.0.0 only.
        let ip = ((try? Harness.run("/usr/bin/hostname", ["-I"]))?.stdout ?? "").split(whereSeparator: \.isWhitespace)
            .map(String.init).first { $0.contains(".") && !$0.hasPrefix("127.") } ?? "0.0.0.0"
        for host in [ip, "0.0.0.0"] {
            // (A server that starts instead would serve until killed: the timeout ends it.)
            let r = try Harness.run("/usr/bin/timeout", ["20", Harness.binary, "serve", "image", "--listen", "\(host):0", raw])
            #expect(r.status == 1 && r.stderr.split(separator: "\n").count == 1 && r.stderr.contains("--tls-creds") && r.stderr.contains("--insecure"), "\(host): \(r.stderr)")
        }
        let insecure = try Server(["image", "--listen", "\(ip):0", "--insecure", raw])
        #expect(insecure.urls.first?.hasPrefix("nbd://\(ip):") == true, "\(insecure.urls) \(insecure.log.all)")
        let size = try Harness.run("/usr/bin/nbdinfo", ["--size", insecure.urls.first ?? ""])
        #expect(size.status == 0 && size.stdout == "\(24 << 20)\n", "\(size.stderr)")
        #expect(insecure.stop() == 0)
        let any = try Server(["image", "--listen", "0.0.0.0:0", "--tls-creds", pki.server, raw])
        defer { _ = any.stop() }
        #expect(any.urls.first?.hasPrefix("nbds://0.0.0.0:") == true, "\(any.urls) \(any.log.all)")
        let tls = try Harness.run("/usr/bin/nbdinfo", ["--size", pki.uri("nbds://127.0.0.1:\(any.port)/disk.raw", "alice")])
        #expect(tls.status == 0, "\(tls.stderr)")
    }

    /// A missing or bad credential file is one line naming it, exit 1; a key others may read is a
    /// warning.
    @Test func credentialFiles() throws {
        let pki = try TestPKI()
        defer { pki.remove() }
        let (raw, _) = try NBDServeTests.images(in: pki.dir)
        let key = pki.path("server/server-key.pem")
        try FileManager.default.moveItem(atPath: key, toPath: key + ".away")
        let missing = try Harness.qcowpress(["serve", "image", "--listen", "127.0.0.1:0", "--tls-creds", pki.server, raw])
        #expect(missing.status == 1 && missing.stderr.split(separator: "\n").count == 1 && missing.stderr.contains("server-key.pem"), "\(missing.stderr)")
        try FileManager.default.copyItem(atPath: pki.path("alice/client-key.pem"), toPath: key)
        let mismatch = try Harness.qcowpress(["serve", "image", "--listen", "127.0.0.1:0", "--tls-creds", pki.server, raw])
        #expect(mismatch.status == 1 && mismatch.stderr.split(separator: "\n").count == 1 && mismatch.stderr.contains("server-key.pem"), "\(mismatch.stderr)")
        try FileManager.default.removeItem(atPath: key)
        try FileManager.default.moveItem(atPath: key + ".away", toPath: key)
        try Data("not a certificate\n".utf8).write(to: URL(fileURLWithPath: pki.path("server/ca-cert.pem")))
        let badCA = try Harness.qcowpress(["serve", "image", "--listen", "127.0.0.1:0", "--tls-creds", pki.server, raw])
        #expect(badCA.status == 1 && badCA.stderr.split(separator: "\n").count == 1 && badCA.stderr.contains("ca-cert.pem"), "\(badCA.stderr)")
        try FileManager.default.copyItem(atPath: pki.path("ca-cert.pem"), toPath: pki.path("server/ca.tmp"))
        try FileManager.default.removeItem(atPath: pki.path("server/ca-cert.pem"))
        try FileManager.default.moveItem(atPath: pki.path("server/ca.tmp"), toPath: pki.path("server/ca-cert.pem"))
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: key)
        let server = try Server(["image", "--listen", "127.0.0.1:0", "--tls-creds", pki.server, raw])
        defer { _ = server.stop() }
        #expect(server.urls.count == 1)
        let warned = server.log.wait { $0.contains("server-key.pem") && $0.contains("chmod 600") }
        #expect(warned.count == 1, "\(server.log.all)")
        let allow = try Harness.qcowpress(["serve", "image", "--listen", "127.0.0.1:0", "--tls-allow", "alice", raw])
        #expect(allow.status == 1 && allow.stderr.contains("--tls-creds"), "\(allow.stderr)")
    }

    /// `serve pbs` over TLS: both archives of the snapshot through the shared chunk cache.
    @Test(.tags(.pbs), .enabled(if: PBSFixture.available, "needs python3"))
    func pbsArchivesOverTLS() throws {
        let pki = try TestPKI()
        defer { pki.remove() }
        let f = try PBSFixture(.init(name: "tls", chunk: 1 << 20))
        defer { f.remove() }
        let server = try Server(["pbs"] + f.datastoreArgs + ["--listen", "127.0.0.1:0", "--tls-creds", pki.server, "--cache-size", "4M", PBSRestoreTests.snapshot], exports: 2)
        defer { _ = server.stop() }
        #expect(server.urls.count == 2 && server.urls.allSatisfy { $0.hasPrefix("nbds://127.0.0.1:") }, "\(server.urls)")
        for (url, raw) in zip(server.urls, [f.rawA, f.rawB]) {
            let padded = try f.padded(raw)
            let out = f.dir.appendingPathComponent("copy.raw").path
            let copy = try Harness.run("/usr/bin/nbdcopy", ["--connections=4", pki.uri(url, "alice"), out])
            #expect(copy.status == 0 && FileManager.default.contentsEqual(atPath: out, andPath: padded), "\(copy.stderr)")
            try? FileManager.default.removeItem(atPath: out)
        }
    }
}
