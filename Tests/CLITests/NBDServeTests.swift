import Foundation
import QcowPress
import Testing

/// `serve image` judged by real NBD peers: qemu-img (compare through nbd+unix and nbd://),
/// libnbd's nbdinfo (--list, --map) and nbdcopy (4 connections), and a hostile client.
@Suite(.tags(.e2e, .nbd), .enabled(if: Harness.haveQemuImg && FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdinfo")
                && FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy"), "needs qemu-img and libnbd-bin"))
struct NBDServeTests {
    /// A running `qcowpress serve image`, stopped (SIGTERM) by `stop()`.
    final class Server {
        let process = Process()
        let urls: [String]
        /// `stderr`: a file that gets the server's stderr (else it is dropped).
        init(_ args: [String], exports: Int? = nil, env: [String: String] = [:], stderr: String? = nil) throws {
            process.executableURL = URL(fileURLWithPath: Harness.binary)
            process.arguments = ["serve"] + (exports == nil ? ["image"] : []) + args
            if !env.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(env) { $1 } }
            let out = Pipe()
            process.standardOutput = out
            if let stderr {
                FileManager.default.createFile(atPath: stderr, contents: nil)
                process.standardError = FileHandle(forWritingAtPath: stderr)
            } else {
                process.standardError = FileHandle.nullDevice
            }
            try process.run()
            var text = ""
            let wanted = exports ?? args.filter { !$0.hasPrefix("-") }.count - (args.contains("--socket") || args.contains("--listen") ? 1 : 0)
            while text.split(separator: "\n").count < wanted {
                let d = out.fileHandleForReading.availableData
                if d.isEmpty { break }
                text += String(decoding: d, as: UTF8.self)
            }
            urls = text.split(separator: "\n").map(String.init)
        }
        func stop() -> Int32 {
            process.terminate()
            process.waitUntilExit()
            return process.terminationStatus
        }
    }

    static func images(in dir: URL) throws -> (raw: String, qcow2: String) {
        let raw = dir.appendingPathComponent("disk.raw")
        // Data, a hole, text, a hole to the end: block status must show the holes.
        let h = try FileHandle(forWritingTo: { FileManager.default.createFile(atPath: raw.path, contents: nil); return raw }())
        try h.write(contentsOf: SourceImage.noise(3 << 20, seed: 1))
        try h.seek(toOffset: 10 << 20)
        try h.write(contentsOf: SourceImage.text(70_000, seed: 2))
        try h.truncate(atOffset: 24 << 20)
        try h.close()
        let q = dir.appendingPathComponent("disk.qcow2").path
        #expect(try Harness.qemuImg(["convert", "-c", "-O", "qcow2", raw.path, q]).status == 0)
        return (raw.path, q)
    }

    /// `--cache-size`: small requests (nbdcopy with 4 KiB and 64 KiB requests) through a cache of
    /// decoded clusters smaller than the image read what the image holds; so does no cache; a bad
    /// size is refused in one line.
    @Test func clusterCacheServesWhatTheImageHolds() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (raw, q) = try Self.images(in: dir)
        for cache in ["1M", "0"] {
            let sock = dir.appendingPathComponent("c\(cache).sock").path
            let server = try Server(["--socket", sock, "--cache-size=\(cache)", q])
            for req in ["4096", "65536"] {
                let out = dir.appendingPathComponent("copy-\(cache)-\(req).raw").path
                let copy = try Harness.run("/usr/bin/nbdcopy", ["--connections=2", "--request-size=\(req)", server.urls.first ?? "", out])
                #expect(copy.status == 0, "\(copy.stderr)")
                #expect(FileManager.default.contentsEqual(atPath: out, andPath: raw), "cache \(cache), requests of \(req)")
            }
            #expect(server.stop() == 0)
        }
        let bad = try Harness.qcowpress(["serve", "image", "--socket", dir.appendingPathComponent("b.sock").path, "--cache-size", "lots", q])
        #expect(bad.status == 1 && bad.stderr.contains("--cache-size"), "\(bad.stderr)")
    }

    @Test func realPeersReadWhatTheImagesHold() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (raw, q) = try Self.images(in: dir)
        let sock = dir.appendingPathComponent("s.sock").path
        let server = try Server(["--socket", sock, raw, q])
        #expect(server.urls == ["nbd+unix:///disk.raw?socket=\(sock)", "nbd+unix:///disk.qcow2?socket=\(sock)"])
        let list = try Harness.run("/usr/bin/nbdinfo", ["--list", "nbd+unix:///?socket=\(sock)"])
        #expect(list.status == 0 && list.stdout.contains("export=\"disk.raw\"") && list.stdout.contains("export=\"disk.qcow2\""), "\(list.stdout)")
        #expect(list.stdout.contains("can_multi_conn: true") && list.stdout.contains("is_read_only: true"))
        for url in server.urls {
            let cmp = try Harness.qemuImg(["compare", raw, url])
            #expect(cmp.status == 0, "\(url): \(cmp.stdout) \(cmp.stderr)")
            let out = dir.appendingPathComponent("copy.raw").path
            let copy = try Harness.run("/usr/bin/nbdcopy", ["--connections=4", url, out])
            #expect(copy.status == 0, "\(copy.stderr)")
            #expect(FileManager.default.contentsEqual(atPath: out, andPath: raw), "nbdcopy of \(url)")
            try? FileManager.default.removeItem(atPath: out)
            // Holes where the source reads zero: 3 MiB of data, then a hole up to 10 MiB.
            let map = try Harness.run("/usr/bin/nbdinfo", ["--map", url])
            let rows = map.stdout.split(separator: "\n").map { $0.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init) }
            #expect(rows.first == ["0", "3145728", "0", "data"], "\(map.stdout)")
            #expect(rows.dropFirst().first?.prefix(3) == ["3145728", "7340032", "3"], "\(map.stdout)")
        }
        #expect(server.stop() == 0, "SIGTERM ends a server with status 0")
        #expect(!FileManager.default.fileExists(atPath: sock), "the socket is removed")
    }

    @Test func tcpWithAnyPort() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (raw, q) = try Self.images(in: dir)
        let server = try Server(["--listen", "127.0.0.1:0", q])
        defer { _ = server.stop() }
        #expect(server.urls.count == 1 && server.urls[0].hasPrefix("nbd://127.0.0.1:") && !server.urls[0].hasPrefix("nbd://127.0.0.1:0/"), "\(server.urls)")
        if let url = server.urls.first {
            #expect(try Harness.qemuImg(["compare", raw, url]).status == 0)
        }
    }

    /// Garbage, absurd lengths, reads past the end, unknown commands, writes on a read-only export,
    /// clients that vanish mid-request: each gets an error reply or a closed connection, and the
    /// next client reads right. The server's memory stays small throughout.
    @Test func hostileClientsDoNotHurtOthers() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (raw, q) = try Self.images(in: dir)
        let sock = dir.appendingPathComponent("s.sock").path
        let server = try Server(["--socket", sock, q])
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Support/nbd_hostile.py").path
        let r = try Harness.run("/usr/bin/python3", [script, sock, "disk.qcow2", String(24 << 20)])
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.split(separator: "\n").count == 16, "\(r.stdout)")
        let status = try String(contentsOfFile: "/proc/\(server.process.processIdentifier)/status", encoding: .utf8)
        let hwm = status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") }.flatMap { $0.split(separator: " ").compactMap { Int($0) }.first } ?? 0
        #expect(hwm < 128 << 10, "peak RSS \(hwm) KiB")
        #expect(try Harness.qemuImg(["compare", raw, "nbd+unix:///disk.qcow2?socket=\(sock)"]).status == 0)
        #expect(server.stop() == 0)
    }

    @Test func badArgumentsAreOneLine() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = dir.appendingPathComponent("not-a-socket")
        try Data("keep me".utf8).write(to: file)
        let raw = dir.appendingPathComponent("x.raw")
        try Data(count: 65536).write(to: raw)
        let r = try Harness.qcowpress(["serve", "image", "--socket", file.path, raw.path])
        #expect(r.status == 1 && r.stderr.contains("not a socket") && r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
        #expect(try Data(contentsOf: file) == Data("keep me".utf8), "a file in the socket's place is never removed")
        let missing = try Harness.qcowpress(["serve", "image", "--socket", dir.appendingPathComponent("s").path, dir.appendingPathComponent("nope.raw").path])
        #expect(missing.status == 1 && missing.stderr.contains("nope.raw"), "\(missing.stderr)")
    }
}

/// `serve pbs`: every archive of a snapshot through one chunk cache of fixed size.
@Suite(.tags(.e2e, .nbd, .pbs), .enabled(if: Harness.haveQemuImg && PBSFixture.available && FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy"),
                "needs qemu-img, python3 and libnbd-bin"))
struct PBSServeTests {
    @Test func servesEveryArchiveThroughOneCache() throws {
        let f = try PBSFixture(.init(name: "serve", chunk: 1 << 20))
        defer { f.remove() }
        let sock = f.dir.appendingPathComponent("p.sock").path
        let log = f.dir.appendingPathComponent("serve.err").path
        let server = try NBDServeTests.Server(["pbs"] + f.datastoreArgs + ["--socket", sock, "--cache-size", "4M", PBSRestoreTests.snapshot],
                                              exports: 2, stderr: log)
        #expect(server.urls == ["nbd+unix:///drive-scsi0?socket=\(sock)", "nbd+unix:///drive-virtio1?socket=\(sock)"], "\(server.urls)")
        for (url, raw) in zip(server.urls, [f.rawA, f.rawB]) {
            let padded = try f.padded(raw)
            let cmp = try Harness.qemuImg(["compare", "-f", "raw", padded, url])
            #expect(cmp.status == 0, "\(url): \(cmp.stdout)\(cmp.stderr)")
            let out = f.dir.appendingPathComponent("copy.raw").path
            let copy = try Harness.run("/usr/bin/nbdcopy", ["--connections=4", url, out])
            #expect(copy.status == 0 && FileManager.default.contentsEqual(atPath: out, andPath: padded), "\(copy.stderr)")
            try? FileManager.default.removeItem(atPath: out)
        }
        // Zero chunks are holes, from the index alone.
        let map = try Harness.run("/usr/bin/nbdinfo", ["--map", server.urls[0]])
        #expect(map.stdout.contains("hole,zero"), "\(map.stdout)")
        #expect(server.stop() == 0)
        // Both drives hold three distinct chunks with data (text, noise, the short last one; the
        // second drive repeats two of them) and the 4 MiB cache holds all three: every chunk was
        // loaded once, whatever read it, through whichever export.
        let said = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(said.hasPrefix("qcowpress serve: 3 chunk loads, ") && said.hasSuffix(" cache hits\n"), "\(said)")
    }

    /// A chunk that fails verification: a client copying the drive gets an I/O error (not wrong
    /// bytes, not a hang), and the server goes on serving.
    @Test func damagedChunksAreReadErrors() throws {
        let f = try PBSFixture(.init(name: "serve damaged", chunk: 1 << 20, corrupt: "chunk-digest"))
        defer { f.remove() }
        let sock = f.dir.appendingPathComponent("d.sock").path
        let server = try NBDServeTests.Server(["pbs"] + f.datastoreArgs + ["--socket", sock, PBSRestoreTests.snapshot], exports: 2)
        let out = f.dir.appendingPathComponent("copy.raw").path
        let copy = try Harness.run("/usr/bin/timeout", ["60", "/usr/bin/nbdcopy", "--connections=4", server.urls[0], out])
        #expect(copy.status != 0 && copy.status != 124, "status \(copy.status): \(copy.stderr)")
        #expect(copy.stderr.contains("Input/output error"), "\(copy.stderr)")
        let size = try Harness.run("/usr/bin/nbdinfo", ["--size", server.urls[0]])
        #expect(size.status == 0 && !size.stdout.isEmpty, "\(size.stderr)")
        #expect(server.stop() == 0)
    }

    /// `restore pbs --live`: the drives are readable over NBD from the start; a client copying a
    /// whole drive during the restore reads it right, makes the restore load chunks ahead of its
    /// order, and no chunk is fetched twice; the images end complete and clean.
    @Test func liveRestoreServesWhileItWrites() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        // 24 distinct 1 MiB chunks, two zero ones, one repeated.
        let (rawA, ds) = try Self.liveDrive(in: dir, distinct: 24)
        let sock = dir.appendingPathComponent("l.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        // A slow disk (every write 100 ms late) and a small budget: the restore takes seconds and
        // the client gets ahead of it.
        let (p, stdout, errPath, first) = try Self.launch(
            ["restore", "pbs", "--datastore", ds, "--live", sock, "--loaders", "1", "--memory-limit", "16M", "--output", "json",
             PBSRestoreTests.snapshot, "drive-scsi0.img", out], in: dir)
        // --output json: stdout is JSON lines, the export's URL first.
        let announced = try JSONSerialization.jsonObject(with: Data(first.split(separator: "\n")[0].utf8)) as? [String: Any]
        #expect(announced?["uri"] as? String == "nbd+unix:///drive-scsi0?socket=\(sock)" && announced?["export"] as? String == "drive-scsi0", "\(first)")
        let copy = dir.appendingPathComponent("copy.raw").path
        let c = try Harness.run("/usr/bin/nbdcopy", ["--connections=4", "nbd+unix:///drive-scsi0?socket=\(sock)", copy])
        #expect(c.status == 0, "\(c.stderr)")
        #expect(FileManager.default.contentsEqual(atPath: copy, andPath: rawA), "the client read the source")
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "\((try? String(contentsOf: errPath, encoding: .utf8)) ?? "")")
        let text = first + String(decoding: stdout.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let lines = text.split(separator: "\n")
        #expect(lines.count == 2 && lines.allSatisfy { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) != nil }, "stdout is JSON lines: \(text)")
        guard let last = lines.last, let json = try JSONSerialization.jsonObject(with: Data(last.utf8)) as? [String: Any] else {
            Issue.record("no JSON summary: \(text)")
            return
        }
        #expect((json["chunksServedAheadOfOrder"] as? Int ?? 0) >= 1, "\(json)")
        // The client read every chunk with data (nbdcopy skips the two zero ones, holes).
        #expect((25...27).contains(json["chunksServed"] as? Int ?? 0), "\(json)")
        // The restore loaded each of the 24 distinct chunks once (whoever asked first), and so
        // did the cache: what the client read after the restore passed it and the 5-chunk cache
        // let it go came back from the image being written, not from the datastore again.
        let drives = json["drives"] as? [[String: Any]] ?? []
        #expect(drives.first?["chunksRead"] as? Int == 24, "\(json)")
        #expect(json["cacheLoads"] as? Int == 24, "\(json)")
        #expect(json["readsFromImage"] is Int, "\(json)")
        #expect(drives.first?["chunksShared"] as? Int == 1 && drives.first?["chunksZero"] as? Int == 2, "\(json)")
        try Harness.expectGood(out, equals: rawA)
        #expect(!FileManager.default.fileExists(atPath: sock))
    }

    /// A drive of `distinct` random 1 MiB chunks, two zero chunks and a repeat of the first
    /// chunk, and a datastore holding it.
    static func liveDrive(in dir: URL, distinct: Int) throws -> (raw: String, datastore: String) {
        let raw = dir.appendingPathComponent("a.raw").path
        let noise = SourceImage.noise(distinct << 20, seed: 8)
        try (noise + Data(count: 2 << 20) + noise.prefix(1 << 20)).write(to: URL(fileURLWithPath: raw))
        return (raw, try datastore(in: dir, drive: raw))
    }

    /// A datastore in `dir` holding one snapshot of one drive (`drive-scsi0.img`) in 1 MiB chunks.
    static func datastore(in dir: URL, drive raw: String) throws -> String {
        try PBSFixture.datastore(in: dir, drives: ["drive-scsi0.img": raw], seed: 4)
    }

    /// Starts qcowpress on a slow disk (every write 100 ms late) with stdout on a pipe (its first
    /// line, the first export's URL, is returned) and stderr in a file (a daemon started later
    /// inherits pipes, so a stderr pipe would never reach end of file).
    static func launch(_ args: [String], in dir: URL, env: [String: String] = [:]) throws -> (Process, Pipe, URL, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Harness.binary)
        p.arguments = args
        p.environment = ["QCOWPRESS_FAULT": "write:1:delay100:sticky"].merging(env) { $1 }
        let stdout = Pipe()
        p.standardOutput = stdout
        let errPath = dir.appendingPathComponent("qp.err")
        FileManager.default.createFile(atPath: errPath.path, contents: nil)
        p.standardError = try FileHandle(forWritingTo: errPath)
        try p.run()
        var first = ""
        while !first.contains("\n") {
            let d = stdout.fileHandleForReading.availableData
            if d.isEmpty { break }
            first += String(decoding: d, as: UTF8.self)
        }
        return (p, stdout, errPath, first)
    }

    /// Two drives, each under a QEMU overlay: the first is switched as soon as it is complete,
    /// while the second is still being restored, and its export is no longer offered; then the
    /// second is switched, and the JSON summary names both.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-storage-daemon")
                   && FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdinfo"), "needs qemu-system-common and libnbd-bin"))
    func liveRestoreSwitchesEachDriveWhenComplete() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let rawA = dir.appendingPathComponent("a.raw").path
        let rawB = dir.appendingPathComponent("b.raw").path
        try (SourceImage.noise(3 << 20, seed: 5) + Data(count: 1 << 20)).write(to: URL(fileURLWithPath: rawA))
        try SourceImage.noise(40 << 20, seed: 6).write(to: URL(fileURLWithPath: rawB))
        let ds = try PBSFixture.datastore(in: dir, drives: ["drive-scsi0.img": rawA, "drive-virtio1.img": rawB], seed: 4)
        let live = dir.appendingPathComponent("live.sock").path
        let qmp = dir.appendingPathComponent("qmp.sock").path
        let outDir = dir.appendingPathComponent("out").path
        let (qp, stdout, errPath, first) = try Self.launch(
            ["restore", "pbs", "--datastore", ds, "--live", live, "--qmp", qmp, "--node", "drive-scsi0=ovlA", "--node", "drive-virtio1=ovlB",
             "--loaders", "1", "--memory-limit", "16M", "--output", "json", "-p", PBSRestoreTests.snapshot, "--all", outDir], in: dir,
            env: ["QCOWPRESS_PROGRESS_INTERVAL": "0.2"])
        #expect(first.contains("drive-scsi0"), "\(first)")
        var blockdevs: [String] = []
        for (drive, node, size) in [("drive-scsi0", "ovlA", 4 << 20), ("drive-virtio1", "ovlB", 40 << 20)] {
            let overlay = dir.appendingPathComponent("\(node).qcow2").path
            let url = "nbd+unix:///\(drive)?socket=\(live)"
            #expect(try Harness.qemuImg(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", url, "-u", overlay, String(size)]).status == 0)
            blockdevs += ["--blockdev", "driver=nbd,node-name=nbd-\(node),server.type=unix,server.path=\(live),export=\(drive),read-only=on",
                          "--blockdev", "driver=file,node-name=\(node)-file,filename=\(overlay)",
                          "--blockdev", "driver=qcow2,node-name=\(node),file=\(node)-file,backing=nbd-\(node)"]
        }
        let qsd = Process()
        qsd.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-storage-daemon")
        qsd.arguments = ["--chardev", "socket,path=\(qmp),server=on,wait=off,id=qmp", "--monitor", "chardev=qmp"] + blockdevs
        qsd.standardOutput = FileHandle.nullDevice
        qsd.standardError = FileHandle.nullDevice
        try qsd.run()
        defer { kill(qsd.processIdentifier, SIGKILL); qsd.waitUntilExit() }
        // The first drive's switch comes while the second is still restoring (40 writes of 100 ms).
        // Its stderr is a file: inotify says when it grows (or qcowpress ends).
        var err = ""
        _ = Wait.until(watching: [errPath.path], orExitOf: qp.processIdentifier, timeout: 30) {
            err = (try? String(contentsOf: errPath, encoding: .utf8)) ?? ""
            return err.contains("ovlA now reads")
        }
        #expect(err.contains("ovlA now reads") && qp.isRunning, "switched while the next drive restores: \(err)")
        #expect(!err.contains("ovlB now reads"))
        if qp.isRunning {
            let list = try Harness.run("/usr/bin/nbdinfo", ["--list", "--json", "nbd+unix://?socket=\(live)"])
            #expect(!list.stdout.contains("\"drive-scsi0\"") && list.stdout.contains("\"drive-virtio1\""), "only the drive still restoring is offered: \(list.stdout)")
        }
        let json = String(decoding: stdout.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        qp.waitUntilExit()
        err = (try? String(contentsOf: errPath, encoding: .utf8)) ?? ""
        #expect(qp.terminationStatus == 0, "\(err)")
        #expect(err.contains("ovlB now reads"), "\(err)")
        // Progress over both drives (44 MiB), moving before the end, with a final line.
        let progress = err.split(separator: "\n").filter { $0.hasPrefix("qcowpress: live: ") }
        #expect(progress.contains { $0.contains("% (") && !$0.contains(" 100% ") } && progress.last?.contains("100% (44.0 MiB of 44.0 MiB)") == true, "\(err)")
        #expect(json.contains("\"switched\":[\"drive-scsi0\",\"drive-virtio1\"]"), "\(json)")
        for (node, drive, raw) in [("ovlA", "drive-scsi0", rawA), ("ovlB", "drive-virtio1", rawB)] {
            let info = try Harness.qemuImg(["info", "-U", dir.appendingPathComponent("\(node).qcow2").path])
            #expect(info.stdout.contains("backing file: \(outDir)/\(drive).qcow2"), "\(info.stdout)")
            try Harness.expectGood("\(outDir)/\(drive).qcow2", equals: raw)
        }
    }
}
