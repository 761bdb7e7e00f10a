import Foundation
import Glibc
import Synchronization
import Testing

/// `export --nbd-sink` never stalls: writes in any order into clusters larger than the writes
/// complete within `--memory-limit` (partly written clusters beyond what the slots may hold are
/// assembled in a spill file beside the destination); a spill that fails is an error reply and no
/// image; an odd `--size` keeps every byte; an interrupt says what was left behind.
@Suite(.tags(.e2e, .nbd), .enabled(if: Harness.haveQemuImg, "needs qemu-img"))
struct NBDSinkSpillTests {
    typealias Sink = NBDSinkTests.Sink

    /// A disk of `chunks` 64 KiB chunks: pseudo-random data, every fifth chunk zero (so zero
    /// detection runs inside assembled clusters too).
    static func disk(chunks: Int, seed: UInt64) -> Data {
        var d = SourceImage.noise(chunks << 16, seed: seed)
        for k in stride(from: 3, to: chunks, by: 5) { d.resetBytes(in: (k << 16)..<((k + 1) << 16)) }
        return d
    }

    /// The chunk indexes 0..<n in an order shuffled by a seeded SplitMix64.
    static func shuffled(_ n: Int, seed: UInt64) -> [Int] {
        var rng = SplitMix(seed: seed)
        return Array(0..<n).shuffled(using: &rng)
    }

    static func pieces(_ d: Data, _ order: [Int]) -> [(offset: UInt64, bytes: Data)] {
        order.map { k in (UInt64(k << 16), d.subdata(in: (k << 16)..<((k + 1) << 16))) }
    }

    /// Runs the client's part; if it fails (a write not answered in time: the sink stalled), the
    /// sink is killed so the test fails instead of waiting for it forever.
    static func client<T>(of sink: Sink, _ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch {
            kill(sink.process.processIdentifier, SIGKILL)
            _ = sink.wait()
            throw error
        }
    }

    /// 64 MiB in 64 KiB writes in random order (8 in flight) into 2 MiB clusters at
    /// `--memory-limit 32M` (a few slots, half of them for partial clusters): every write is answered,
    /// the image equals the disk and is clean, and the summary counts the spilled clusters.
    /// Before the spill, the sink stopped answering after a few dozen writes.
    @Test func randomOrderWritesIntoLargeClustersComplete() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let chunks = 1024
        let disk = Self.disk(chunks: chunks, seed: 30)
        let raw = dir.appendingPathComponent("disk.raw")
        try disk.write(to: raw)
        let sock = dir.appendingPathComponent("s.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        let sink = try Sink(["--nbd-sink", sock, "--size", "64M", "-o", "cluster_size=2M", "--memory-limit", "32M", "--output", "json", out], in: dir)
        let client = try NBDWriteClient(socket: sock)
        #expect(client.size == 64 << 20)
        let errors = try Self.client(of: sink) { try client.write(Self.pieces(disk, Self.shuffled(chunks, seed: 31))) }
        #expect(errors.isEmpty, "\(errors)")
        try client.disconnect()
        let r = sink.wait()
        #expect(r.status == 0, "\(r.stderr)")
        let image = sink.json(r.stdout)["image"] as? [String: Any] ?? [:]
        #expect((image["clustersSpilled"] as? Int ?? 0) > 0, "\(image)")
        #expect((image["spillPeakBytes"] as? Int ?? Int.max) <= 64 << 20, "\(image)")
        try Harness.expectGood(out, equals: raw.path)
        #expect(try Harness.strayFiles(in: dir, except: ["disk.raw", "out.qcow2"]).filter { !$0.hasSuffix(".err") }.isEmpty)
    }

    /// Three connections at once, each writing its share of the chunks in its own random order
    /// (one thread each), all ending with NBD_CMD_DISC: the image equals the disk.
    @Test func severalConnectionsWriteOutOfOrder() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let chunks = 512
        let disk = Self.disk(chunks: chunks, seed: 40)
        let raw = dir.appendingPathComponent("disk.raw")
        try disk.write(to: raw)
        let sock = dir.appendingPathComponent("s.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        let sink = try Sink(["--nbd-sink", sock, "--size", "32M", "-o", "cluster_size=1M", "--memory-limit", "24M", "--output", "json", out], in: dir)
        // Every client attaches before any disconnects (the sink decides when the last one leaves).
        let clients = try (0..<3).map { _ in try NBDWriteClient(socket: sock) }
        let order = Self.shuffled(chunks, seed: 41)
        let results = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: clients.count) { i in
            let mine = order.enumerated().filter { $0.offset % clients.count == i }.map(\.element)
            let outcome: String
            do {
                let errors = try clients[i].write(Self.pieces(disk, mine), window: 4)
                outcome = errors.isEmpty ? "ok" : "errors \(errors)"
            } catch {
                outcome = "\(error)"
            }
            results.withLock { $0.append(outcome) }
        }
        try Self.client(of: sink) {
            let r = results.withLock { $0 }
            if r != ["ok", "ok", "ok"] { throw NBDWriteClient.Failure(description: "\(r)") }
        }
        for c in clients { try c.disconnect() }
        let r = sink.wait()
        #expect(r.status == 0, "\(r.stderr)")
        let nbd = sink.json(r.stdout)["nbd"] as? [String: Any] ?? [:]
        #expect(nbd["connections"] as? Int == 3, "\(nbd)")
        #expect((sink.json(r.stdout)["image"] as? [String: Any])?["clustersSpilled"] as? Int ?? 0 > 0)
        try Harness.expectGood(out, equals: raw.path)
    }

    /// The spill file's first write fails (ENOSPC, injected): that write gets an error reply,
    /// and at NBD_CMD_DISC the sink exits 1 with one line naming the spill file; no image, no
    /// temporary file.
    @Test(.tags(.faults)) func spillWriteFailureIsAnErrorReplyAndNoImage() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let sock = dir.appendingPathComponent("s.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        // Few slots at this budget, half of them for partial clusters: the 6th partly written
        // cluster spills at the latest, and that is the process's first data write (no cluster
        // is complete before).
        let sink = try Sink(["--nbd-sink", sock, "--size", "64M", "-o", "cluster_size=2M", "--memory-limit", "32M", out], in: dir,
                            environment: ["QCOWPRESS_FAULT": "write:1:ENOSPC"])
        let client = try NBDWriteClient(socket: sock)
        let firsts = (0..<6).map { k in (offset: UInt64(k) << 21, bytes: Data(repeating: UInt8(k + 1), count: 65536)) }
        let errors = try Self.client(of: sink) { try client.write(firsts, window: 1) }
        #expect(!errors.isEmpty && errors.allSatisfy { $0 == UInt32(ENOSPC) }, "the first spilled write and those after it: \(errors)")
        try client.disconnect()
        let r = sink.wait()
        let lines = r.stderr.split(separator: "\n")
        #expect(r.status == 1 && lines.count == 1, "\(r.stderr)")
        #expect(r.stderr.contains("out.qcow2 not written") && r.stderr.contains("spill file") && r.stderr.contains("No space left on device"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(try Harness.strayFiles(in: dir, except: []).filter { !$0.hasSuffix(".err") }.isEmpty)
    }

    /// `--size 1000001`: the image's virtual size is rounded up to 1000448 (512 bytes, as
    /// qemu-img create and the file export), the client sees 1000001 bytes and writes them all,
    /// and the image holds every one (the rest reads as zero).
    @Test func oddSizeKeepsEveryByte() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let size = 1_000_001
        let disk = SourceImage.noise(size, seed: 50)
        let raw = dir.appendingPathComponent("disk.raw")
        try disk.write(to: raw)
        let sock = dir.appendingPathComponent("s.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        let sink = try Sink(["--nbd-sink", sock, "--size", String(size), out], in: dir)
        let client = try NBDWriteClient(socket: sock)
        #expect(client.size == UInt64(size))
        let pieces = stride(from: 0, to: size, by: 65536).reversed().map { at in
            (offset: UInt64(at), bytes: disk.subdata(in: at..<min(size, at + 65536)))
        }
        #expect(try Self.client(of: sink) { try client.write(pieces) }.isEmpty)
        try client.disconnect()
        let r = sink.wait()
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try Harness.qemuImg(["info", out]).stdout.contains("(1000448 bytes)"))
        try Harness.expectGood(out, equals: raw.path)
    }

    /// SIGINT while a client is attached and clusters are spilled: exit 130, one line saying
    /// nothing was left behind, and nothing is (no image, no temporary file, no socket).
    @Test func interruptSaysWhatWasLeftBehind() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let sock = dir.appendingPathComponent("s.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        let sink = try Sink(["--nbd-sink", sock, "--size", "64M", "-o", "cluster_size=2M", "--memory-limit", "32M", out], in: dir)
        let client = try NBDWriteClient(socket: sock)
        let firsts = (0..<8).map { k in (offset: UInt64(k) << 21, bytes: SourceImage.noise(65536, seed: UInt64(k + 60))) }
        #expect(try Self.client(of: sink) { try client.write(firsts) }.isEmpty)
        kill(sink.process.processIdentifier, SIGINT)
        let r = sink.wait()
        #expect(r.status == 130, "\(r.stderr)")
        #expect(r.stderr == "qcowpress: interrupted: \(out) not written; nothing left behind\n", "\(r.stderr)")
        #expect(try Harness.strayFiles(in: dir, except: []).filter { !$0.hasSuffix(".err") }.isEmpty)
    }
}

/// A client that connects to the sink and never negotiates is dropped after
/// `--handshake-timeout` (one line on stderr), and the sink goes on to serve the real client.
@Suite(.tags(.e2e, .nbd), .enabled(if: Harness.haveQemuImg, "needs qemu-img"))
struct NBDSinkHandshakeTests {
    @Test func silentClientIsDroppedAndTheBackupGoesOn() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let sock = dir.appendingPathComponent("s.sock").path
        let out = dir.appendingPathComponent("out.qcow2").path
        let sink = try NBDSinkTests.Sink(["--nbd-sink", sock, "--size", "1M", "--handshake-timeout", "0.3", out], in: dir)
        let silent = try NBDWriteClient.connect(sock, timeout: 20)
        defer { close(silent) }
        let t0 = Wait.now()
        // The greeting, then nothing from us: the sink closes the connection.
        #expect(try NBDWriteClient.read(silent, 18).count == 18)
        var byte: UInt8 = 0
        var r = 0
        repeat { r = recv(silent, &byte, 1, 0) } while r > 0 || (r < 0 && errno == EINTR)
        #expect(r == 0, "the sink closed the silent connection (recv: \(r), errno \(errno))")
        let waited = Wait.now() - t0
        #expect(waited >= 0.25 && waited < 10, "\(waited) s")
        let disk = SourceImage.noise(1 << 20, seed: 70)
        let raw = dir.appendingPathComponent("disk.raw")
        try disk.write(to: raw)
        let client = try NBDWriteClient(socket: sock)
        #expect(try NBDSinkSpillTests.client(of: sink) { try client.write([(0, disk)]) }.isEmpty)
        try client.disconnect()
        let result = sink.wait()
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stderr == "qcowpress: a client of the unix socket: refused: no NBD handshake within 300 ms\n", "\(result.stderr)")
        try Harness.expectGood(out, equals: raw.path)
    }

    @Test func handshakeTimeoutNeedsTheSink() throws {
        let r = try Harness.qcowpress(["export", "--handshake-timeout", "5", "a.raw", "b.qcow2"])
        #expect(r.status != 0 && r.stderr.contains("--handshake-timeout needs --nbd-sink"), "\(r.stderr)")
    }
}
