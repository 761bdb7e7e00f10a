import Foundation
import Testing

/// `export --nbd-sink`: QEMU's own backup job (qemu-storage-daemon driven over QMP) writes a disk
/// into QcowPress, full and incremental; nbdcopy writes into it as another real client; a small
/// raw client checks the edges (a client that vanishes, a cluster written twice, partial clusters
/// over a base).
@Suite(.tags(.e2e, .nbd), .enabled(if: Harness.haveQemuImg && FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"), "needs qemu-img and python3"))
struct NBDSinkTests {
    static let support = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Support")
    static var haveQSD: Bool {
        FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-storage-daemon")
            && FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-io")
    }

    /// A running `qcowpress export --nbd-sink`: its first stdout line (the URL) was read; stderr
    /// goes to a file (a daemon started later inherits pipes).
    final class Sink {
        let process = Process()
        let stdout = Pipe()
        let errPath: URL
        let url: String
        init(_ args: [String], in dir: URL, environment: [String: String] = [:]) throws {
            process.executableURL = URL(fileURLWithPath: Harness.binary)
            process.arguments = ["export"] + args
            if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
            process.standardOutput = stdout
            errPath = dir.appendingPathComponent("sink-\(UUID().uuidString).err")
            _ = FileManager.default.createFile(atPath: errPath.path, contents: nil)
            process.standardError = try FileHandle(forWritingTo: errPath)
            try process.run()
            var first = ""
            while !first.contains("\n") {
                let d = stdout.fileHandleForReading.availableData
                if d.isEmpty { break }
                first += String(decoding: d, as: UTF8.self)
            }
            // With --output json the URL comes as a JSON line {"export":…,"uri":…}.
            let line = first.split(separator: "\n").first.map(String.init) ?? ""
            if line.hasPrefix("{"), let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] {
                url = o["uri"] as? String ?? ""
            } else {
                url = line
            }
        }
        /// Waits for the exit; returns status, the rest of stdout, stderr.
        func wait() -> (status: Int32, stdout: String, stderr: String) {
            let rest = String(decoding: stdout.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            let err = (try? String(contentsOf: errPath, encoding: .utf8)) ?? ""
            return (process.terminationStatus, rest, err)
        }
        func json(_ text: String) -> [String: Any] {
            guard let brace = text.firstIndex(of: "{"),
                  let obj = try? JSONSerialization.jsonObject(with: Data(text[brace...].utf8)) as? [String: Any] else { return [:] }
            return obj
        }
    }

    /// qemu-storage-daemon with the disk `raw` as node `src`, exported writable over NBD on
    /// `guest` (the "guest", changing its disk), QMP on `qmp`. Killed with SIGKILL (it inherits a
    /// signal mask from the test runner in which SIGTERM may be blocked).
    final class Daemon {
        let process = Process()
        let qmp: String
        let guestURL: String
        init(raw: String, in dir: URL) throws {
            qmp = dir.appendingPathComponent("qmp.sock").path
            let guest = dir.appendingPathComponent("guest.sock").path
            guestURL = "nbd+unix:///guest?socket=\(guest)"
            process.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-storage-daemon")
            process.arguments = ["--chardev", "socket,path=\(qmp),server=on,wait=off,id=qmp", "--monitor", "chardev=qmp",
                                 "--blockdev", "driver=file,node-name=src-file,filename=\(raw)",
                                 "--blockdev", "driver=raw,node-name=src,file=src-file",
                                 "--nbd-server", "addr.type=unix,addr.path=\(guest)",
                                 "--export", "type=nbd,id=exp0,node-name=src,name=guest,writable=on"]
            process.standardOutput = FileHandle.nullDevice
            let err = dir.appendingPathComponent("qsd.err")
            _ = FileManager.default.createFile(atPath: err.path, contents: nil)
            process.standardError = try FileHandle(forWritingTo: err)
            try process.run()
            // Its NBD socket appears once it listens (or it ends, failing).
            _ = Wait.until(watching: [dir.path], orExitOf: process.processIdentifier, timeout: 30) {
                FileManager.default.fileExists(atPath: guest)
            }
        }
        func stop() {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        /// Runs QMP steps (JSON objects; {"wait-job": ID} waits for a job) through qmp_run.py.
        func qmp(_ steps: [[String: Any]]) throws -> Harness.Output {
            let args = try steps.map { String(decoding: try JSONSerialization.data(withJSONObject: $0), as: UTF8.self) }
            return try Harness.run("/usr/bin/python3", [NBDSinkTests.support.appendingPathComponent("qmp_run.py").path, qmp] + args)
        }
        /// blockdev-add of an nbd node on the sink, blockdev-backup into it (with `extra` steps in
        /// the same transaction), the job's completion, blockdev-del (which sends NBD_CMD_DISC).
        func backup(sink: String, job: String, sync: String, bitmap: String? = nil, addBitmap: String? = nil) throws -> Harness.Output {
            var backup: [String: Any] = ["job-id": job, "device": "src", "target": "tgt-\(job)", "sync": sync]
            if let bitmap { backup["bitmap"] = bitmap }
            var actions: [[String: Any]] = []
            if let addBitmap { actions.append(["type": "block-dirty-bitmap-add", "data": ["node": "src", "name": addBitmap]]) }
            actions.append(["type": "blockdev-backup", "data": backup])
            return try qmp([
                ["execute": "blockdev-add", "arguments": ["driver": "nbd", "node-name": "tgt-\(job)", "export": "backup",
                                                          "server": ["type": "unix", "path": sink]]],
                ["execute": "transaction", "arguments": ["actions": actions]],
                ["wait-job": job],
                ["execute": "blockdev-del", "arguments": ["node-name": "tgt-\(job)"]],
            ])
        }
    }

    static func client(_ sock: String, _ ops: [String]) throws -> Harness.Output {
        try Harness.run("/usr/bin/python3", [support.appendingPathComponent("nbd_write_client.py").path, sock, "backup"] + ops)
    }

    /// Guest byte ranges held by the image itself (not its backing file), from qemu-img map.
    static func topRanges(_ image: String) throws -> [(start: Int, length: Int, zero: Bool)] {
        let m = try Harness.qemuImg(["map", "--output=json", image])
        guard let rows = try JSONSerialization.jsonObject(with: Data(m.stdout.utf8)) as? [[String: Any]] else { return [] }
        var out: [(Int, Int, Bool)] = []
        for r in rows where r["depth"] as? Int == 0 && (r["data"] as? Bool == true || r["zero"] as? Bool == true) {
            let (s, l, z) = (r["start"] as! Int, r["length"] as! Int, r["zero"] as? Bool == true)
            if let last = out.last, last.0 + last.1 == s, last.2 == z { out[out.count - 1].1 += l } else { out.append((s, l, z)) }
        }
        return out
    }

    /// A full backup by QEMU's backup job equals the disk and is clean; the disk then changes
    /// through the daemon's own NBD export (data, write-zeroes, a 4 KiB write), and an incremental
    /// backup through the dirty bitmap onto `-b FULL` equals the changed disk, holds only the
    /// changed clusters (the zeroed ones as zero clusters hiding FULL's data) and names FULL.
    @Test(.enabled(if: NBDSinkTests.haveQSD, "needs qemu-system-common and qemu-utils"))
    func fullAndIncrementalBackupByQEMU() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("disk.raw").path
        try (SourceImage.noise(6 << 20, seed: 5) + Data(count: 2 << 20) + SourceImage.text(8 << 20, seed: 6) + SourceImage.noise(8 << 20, seed: 7))
            .write(to: URL(fileURLWithPath: raw))
        let qsd = try Daemon(raw: raw, in: dir)
        defer { qsd.stop() }
        let sockPath = dir.appendingPathComponent("sink.sock").path
        let full = dir.appendingPathComponent("full.qcow2").path

        let sink = try Sink(["--nbd-sink", sockPath, "--size", String(24 << 20), "--output", "json", full], in: dir)
        #expect(sink.url == "nbd+unix:///backup?socket=\(sockPath)", "\(sink.url)")
        let b = try qsd.backup(sink: sockPath, job: "full", sync: "full", addBitmap: "bm0")
        #expect(b.status == 0, "\(b.stdout)\(b.stderr)")
        let r = sink.wait()
        #expect(r.status == 0, "\(r.stderr)")
        let json = sink.json(r.stdout)
        let nbd = json["nbd"] as? [String: Any] ?? [:]
        #expect(nbd["connections"] as? Int == 1 && (nbd["writeRequests"] as? Int ?? 0) > 0 && nbd["requestsRefused"] as? Int == 0, "\(json)")
        #expect((json["image"] as? [String: Any])?["clustersCompressed"] as? Int ?? 0 > 0, "\(json)")
        let check = try Harness.qemuImg(["check", full])
        #expect(check.status == 0, "\(check.stdout)")
        let cmp = try Harness.qemuImg(["compare", "-U", "-f", "raw", "-F", "qcow2", raw, full])
        #expect(cmp.status == 0, "full backup = disk: \(cmp.stdout)\(cmp.stderr)")
        #expect(try Harness.qemuImg(["info", full]).stdout.contains("compression type: zstd"))
        #expect(!FileManager.default.fileExists(atPath: sockPath), "the socket is removed")

        // The guest changes its disk: new data, zeroes over data (unmapped), and 4 KiB in a cluster.
        let w = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", qsd.guestURL, "-c", "write -P 0x5a 1M 64k",
                                                     "-c", "write -z -u 2M 512k", "-c", "write -P 0x33 20M 4k"])
        #expect(w.status == 0, "\(w.stdout)\(w.stderr)")

        let inc = dir.appendingPathComponent("inc.qcow2").path
        let sink2 = try Sink(["--nbd-sink", sockPath, "-b", full, "--output", "json", inc], in: dir)
        let b2 = try qsd.backup(sink: sockPath, job: "inc", sync: "incremental", bitmap: "bm0")
        #expect(b2.status == 0, "\(b2.stdout)\(b2.stderr)")
        let r2 = sink2.wait()
        #expect(r2.status == 0, "\(r2.stderr)")
        #expect(try Harness.qemuImg(["check", inc]).status == 0)
        let cmp2 = try Harness.qemuImg(["compare", "-U", "-f", "raw", "-F", "qcow2", raw, inc])
        #expect(cmp2.status == 0, "incremental = changed disk: \(cmp2.stdout)\(cmp2.stderr)")
        let info = try Harness.qemuImg(["info", inc]).stdout
        #expect(info.contains("backing file: full.qcow2") && info.contains("backing file format: qcow2"), "\(info)")
        // Only the three changed places, the zeroed one as zero clusters.
        let top = try Self.topRanges(inc)
        #expect(top.map { [$0.start, $0.length] } == [[1 << 20, 65536], [2 << 20, 512 << 10], [20 << 20, 65536]], "\(top)")
        #expect(top.map(\.zero) == [false, true, false], "\(top)")
        let nbd2 = sink.json(r2.stdout)["nbd"] as? [String: Any] ?? [:]
        #expect(nbd2["bytesWritten"] as? Int == 2 * 65536 && nbd2["bytesZeroed"] as? Int == 512 << 10, "\(nbd2)")
    }

    /// A full backup job cancelled half-way still ends with NBD_CMD_DISC (QEMU sends it at
    /// blockdev-del): the sink sees that not every byte was written and leaves no image (exit 1).
    @Test(.enabled(if: NBDSinkTests.haveQSD, "needs qemu-system-common and qemu-utils"))
    func cancelledFullBackupLeavesNoImage() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("disk.raw").path
        try SourceImage.noise(16 << 20, seed: 12).write(to: URL(fileURLWithPath: raw))
        let qsd = try Daemon(raw: raw, in: dir)
        defer { qsd.stop() }
        let sockPath = dir.appendingPathComponent("sink.sock").path
        let out = dir.appendingPathComponent("full.qcow2").path
        let sink = try Sink(["--nbd-sink", sockPath, "--size", String(16 << 20), out], in: dir)
        // 1 MiB/s: the job is still running when it is cancelled.
        let q = try qsd.qmp([
            ["execute": "blockdev-add", "arguments": ["driver": "nbd", "node-name": "tgt", "export": "backup",
                                                      "server": ["type": "unix", "path": sockPath]]],
            ["execute": "blockdev-backup", "arguments": ["job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": 1 << 20]],
            ["execute": "block-job-cancel", "arguments": ["device": "j"]],
            ["wait-cancelled": "j"],
            ["execute": "blockdev-del", "arguments": ["node-name": "tgt"]],
        ])
        #expect(q.status == 0, "\(q.stdout)\(q.stderr)")
        let r = sink.wait()
        #expect(r.status == 1 && r.stderr.contains("was the job cancelled?") && r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
        let left = try Harness.strayFiles(in: dir, except: ["disk.raw"]).filter { !$0.hasSuffix(".err") && !$0.hasSuffix(".sock") }
        #expect(left.isEmpty, "\(left)")
    }

    /// nbdcopy (libnbd, 64 requests in flight) writes a disk with holes into the sink: data and
    /// WRITE_ZEROES in any order; the image equals the disk. `-o cluster_size=256k` makes its
    /// 64 KiB-aligned requests assemble clusters from several writes.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy"), "needs libnbd-bin"))
    func nbdcopyWritesIntoTheSink() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("disk.raw")
        try SourceImage.mixed(at: raw, blocks: 40, block: 192 << 10, tail: 4096)
        let size = try FileManager.default.attributesOfItem(atPath: raw.path)[.size] as! Int
        for cs in ["64k", "256k"] {
            let sockPath = dir.appendingPathComponent("s.sock").path
            let out = dir.appendingPathComponent("out-\(cs).qcow2").path
            let sink = try Sink(["--nbd-sink", sockPath, "--size", String(size), "-o", "cluster_size=\(cs)", out], in: dir)
            let c = try Harness.run("/usr/bin/nbdcopy", ["--requests=64", "--request-size=65536", raw.path, sink.url])
            #expect(c.status == 0, "\(c.stderr)")
            let r = sink.wait()
            #expect(r.status == 0, "\(cs): \(r.stderr)")
            try Harness.expectGood(out, equals: raw.path)
        }
    }

    /// Back-pressure: a client streams 256 MiB of incompressible data as fast as the socket takes
    /// it into a sink whose disk is slow (every write 20 ms late) and whose budget is 32M; the
    /// server stops reading while the engine is full, so the sink's peak RSS stays far below what
    /// the client sent (it would hold most of it otherwise).
    @Test func slowDiskStopsTheClientNotTheMemory() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let sockPath = dir.appendingPathComponent("s.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        let sink = try Sink(["--nbd-sink", sockPath, "--size", "256M", "--memory-limit", "32M", "--output", "json", out], in: dir,
                            environment: ["QCOWPRESS_FAULT": "write:1:delay20:sticky"])
        let c = try Self.client(sockPath, ["stream:0:268435456:1048576", "disc"])
        #expect(c.stdout.contains("ok 256"), "\(c.stdout)\(c.stderr)")
        let r = sink.wait()
        #expect(r.status == 0, "\(r.stderr)")
        let image = sink.json(r.stdout)["image"] as? [String: Any] ?? [:]
        let rss = image["peakRSSBytes"] as? Int ?? Int.max
        #expect(rss < 160 << 20, "peak RSS \(rss >> 20) MiB for 256 MiB sent")
        #expect((image["producerStallSeconds"] as? Double ?? 0) > 1, "the writes waited for the engine: \(image)")
        #expect(try Harness.qemuImg(["check", out]).status == 0)
    }

    /// A client that vanishes without NBD_CMD_DISC leaves no image and no temporary file (exit 1,
    /// one line); so does SIGTERM (exit 143).
    @Test func clientThatVanishesLeavesNothing() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let sockPath = dir.appendingPathComponent("s.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        let sink = try Sink(["--nbd-sink", sockPath, "--size", "4M", out], in: dir)
        let c = try Self.client(sockPath, ["w:0:65536:0x5a+w:65536:65536:0x5b", "drop"])
        #expect(c.stdout.hasPrefix("size 4194304 flags 0x") && c.stdout.contains("ok\nok\n"), "\(c.stdout)\(c.stderr)")
        let r = sink.wait()
        #expect(r.status == 1 && r.stderr.contains("without NBD_CMD_DISC") && r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
        #expect(try Harness.strayFiles(in: dir, except: []).filter { !$0.hasSuffix(".err") }.isEmpty, "nothing left")

        // SIGTERM while a client is connected and has written.
        let sink2 = try Sink(["--nbd-sink", sockPath, "--size", "4M", out], in: dir)
        let client = Process()
        client.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        client.arguments = [Self.support.appendingPathComponent("nbd_write_client.py").path, sockPath, "backup", "w:0:65536:0x5a", "hold"]
        let pipe = Pipe()
        client.standardOutput = pipe
        client.standardError = FileHandle.nullDevice
        try client.run()
        var seen = ""
        while !seen.contains("ok\n") {
            let d = pipe.fileHandleForReading.availableData
            if d.isEmpty { break }
            seen += String(decoding: d, as: UTF8.self)
        }
        #expect(seen.contains("ok\n"), "\(seen)")
        sink2.process.terminate()
        defer { client.waitUntilExit() }
        let r2 = sink2.wait()
        #expect(r2.status == 143, "\(r2.stderr)")
        #expect(try Harness.strayFiles(in: dir, except: []).filter { !$0.hasSuffix(".err") }.isEmpty, "nothing left after SIGTERM")
    }

    /// A second write to a cluster already written (final, or being assembled) gets an error
    /// reply; the next requests work; at NBD_CMD_DISC the image is not written (it would not be
    /// what the client wrote), exit 1. The block size advertised is the cluster size.
    @Test func rewriteIsAnErrorReplyAndNoImage() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let sockPath = dir.appendingPathComponent("s.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        let sink = try Sink(["--nbd-sink", sockPath, "--size", "4M", "-o", "cluster_size=128k", out], in: dir)
        let c = try Self.client(sockPath, ["w:0:131072:0x5a", "w:0:4096:0x11", "w:200000:1000:0x22", "w:200500:1000:0x23",
                                           "z:262144:131072", "z:262144:65536", "r:0:512", "w:131072:65536:0x24+f+t:393216:131072", "disc"])
        // Flags: has flags, flush, trim, write zeroes; no read-only, no multi-conn.
        #expect(c.stdout.hasPrefix("size 4194304 flags 0x65 preferred 131072"), "\(c.stdout)\(c.stderr)")
        #expect(c.stdout.split(separator: "\n").dropFirst().joined(separator: ",") == "ok,err 5,ok,err 5,ok,err 5,err 22,ok,ok,ok", "\(c.stdout)")
        let r = sink.wait()
        #expect(r.status == 1 && r.stderr.contains("3 requests were refused") && r.stderr.contains("already written"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(try Harness.strayFiles(in: dir, except: []).filter { !$0.hasSuffix(".err") }.isEmpty)
    }

    /// Over a base (-b), bytes of a partly written cluster that no client wrote read what the base
    /// reads; zeroes hide the base's data; untouched clusters stay unallocated.
    @Test func partialClustersOverABaseKeepTheBase() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let baseRaw = dir.appendingPathComponent("base.raw")
        try SourceImage.noise(2 << 20, seed: 11).write(to: baseRaw)
        let base = dir.appendingPathComponent("base.qcow2").path
        #expect(try Harness.qemuImg(["convert", "-O", "qcow2", baseRaw.path, base]).status == 0)
        let sockPath = dir.appendingPathComponent("s.sock").path
        let out = dir.appendingPathComponent("inc.qcow2").path
        let sink = try Sink(["--nbd-sink", sockPath, "-b", base, "-o", "cluster_size=256k", out], in: dir)
        let c = try Self.client(sockPath, ["w:300000:5000:0x5a+w:600000:70000:0x5b", "z:1048576:524288", "disc"])
        #expect(c.stdout.hasPrefix("size 2097152"), "\(c.stdout)\(c.stderr)")
        let r = sink.wait()
        #expect(r.status == 0, "\(r.stderr)")
        var expected = try Data(contentsOf: baseRaw)
        expected.replaceSubrange(300000..<305000, with: Data(repeating: 0x5a, count: 5000))
        expected.replaceSubrange(600000..<670000, with: Data(repeating: 0x5b, count: 70000))
        expected.replaceSubrange((1 << 20)..<((1 << 20) + (512 << 10)), with: Data(count: 512 << 10))
        let want = dir.appendingPathComponent("want.raw")
        try expected.write(to: want)
        try Harness.expectGood(out, equals: want.path)
        let top = try Self.topRanges(out)
        #expect(top.map { [$0.start, $0.length] } == [[262144, 524288], [1 << 20, 512 << 10]], "\(top)")

        // Zeroes over the whole image (one whole L2 region): every cluster is a zero cluster,
        // none reads the base.
        let zeroed = dir.appendingPathComponent("zeroed.qcow2").path
        let sink2 = try Sink(["--nbd-sink", sockPath, "-b", base, zeroed], in: dir)
        _ = try Self.client(sockPath, ["z:0:2097152", "disc"])
        #expect(sink2.wait().status == 0)
        let zeros = dir.appendingPathComponent("zeros.raw")
        try Data(count: 2 << 20).write(to: zeros)
        try Harness.expectGood(zeroed, equals: zeros.path)
        #expect(try Self.topRanges(zeroed).map { [$0.start, $0.length] } == [[0, 2 << 20]])
    }
}
