import Foundation
import Testing

/// `restore pbs` of backups shaped like real disks: 4 MiB chunks that repeat (within a drive and
/// across the drives of one snapshot) and hold zero clusters, partly zero clusters and data; a
/// short last chunk. Every cluster size and codec; qemu-img judges every image.
@Suite(.tags(.e2e, .pbs), .enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3"))
struct SharedChunkRestoreTests {
    static let snapshot = "vm/100/2026-11-20T10:00:00Z"
    static let chunk = 4 << 20

    /// Chunk shapes: A = 64 KiB of data then zeros (the field's reproduction), B = all data,
    /// C = text with zero holes inside clusters and whole zero clusters, D = text.
    static func shapes() -> [Data] {
        let c = chunk
        let a = SourceImage.noise(64 << 10, seed: 1) + Data(count: c - (64 << 10))
        let b = SourceImage.noise(c, seed: 2)
        var cc = SourceImage.text(c, seed: 3)
        cc.withUnsafeMutableBytes { p in
            var x: UInt64 = 99
            var at = 0
            while at < c {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                let n = Int(x % 200_000) + 512
                if x & 1 == 0 { memset(p.baseAddress! + at, 0, min(n, c - at)) }
                at += n + Int((x >> 8) % 100_000)
            }
        }
        let d = SourceImage.text(c, seed: 4)
        return [a, b, cc, d]
    }

    /// Two drives from a seeded sequence of shapes (repeats and zero chunks included, A B A first)
    /// and the datastore holding them.
    static func makeDatastore(in dir: URL, seed: UInt64) throws -> (args: [String], rawA: String, rawB: String) {
        let s = shapes()
        var x = seed | 1
        func pick() -> Data {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            return x % 6 == 5 ? Data(count: chunk) : s[Int(x % 4)]
        }
        var a = s[0] + s[1] + s[0]
        for _ in 0..<4 { a += pick() }
        a += s[2].prefix(chunk / 2 + 3 * 512)  // short last chunk, 512-aligned
        var b = s[3] + s[0]
        for _ in 0..<2 { b += pick() }
        let rawA = dir.appendingPathComponent("a.raw").path
        let rawB = dir.appendingPathComponent("b.raw").path
        try a.write(to: URL(fileURLWithPath: rawA))
        try b.write(to: URL(fileURLWithPath: rawB))
        let ds = dir.appendingPathComponent("ds").path
        let r = try Harness.run("/usr/bin/python3", [PBSFixture.script, "--datastore", ds, "--snapshot", snapshot,
                                                     "--chunk-size", String(chunk), "--drive", "drive-scsi0.img=\(rawA)",
                                                     "--drive", "drive-virtio1.img=\(rawB)", "--seed", String(seed)])
        guard r.status == 0 else { throw FixtureError(message: r.stdout + r.stderr) }
        return (["--datastore", ds], rawA, rawB)
    }

    /// The datastore of seed 11, made once for the twelve cases of the matrix below (read only;
    /// removed when the test process ends).
    static let shared: Result<(args: [String], rawA: String, rawB: String), FixtureError> = {
        do {
            let dir = try Harness.tempDir()
            sharedDir = dir.path
            atexit { if let d = SharedChunkRestoreTests.sharedDir { try? FileManager.default.removeItem(atPath: d) } }
            return .success(try makeDatastore(in: dir, seed: 11))
        } catch {
            return .failure(FixtureError(message: "making the shared datastore: \(error)"))
        }
    }()
    nonisolated(unsafe) static var sharedDir: String?

    @Test(arguments: ["512", "4k", "64k", "2M"], ["none", "zlib", "zstd"])
    func repeatedChunksWithZeroClustersRestore(cluster: String, codec: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (args, rawA, rawB) = try Self.shared.get()
        var opts = ["-o", "cluster_size=\(cluster)"]
        if codec != "none" { opts += ["-c", "-o", "compression_type=\(codec)"] }
        let out = dir.appendingPathComponent("out").path
        let r = try Harness.qcowpress(["restore", "pbs"] + args + [Self.snapshot, "--all", out, "--output", "json"] + opts)
        #expect(r.status == 0, "\(cluster) \(codec): \(r.stderr)")
        try Harness.expectGood(out + "/drive-scsi0.qcow2", equals: rawA)
        try Harness.expectGood(out + "/drive-virtio1.qcow2", equals: rawB)
        #expect(r.stdout.contains("\"chunksShared\" : 1") || r.stdout.contains("\"chunksShared\" : 2")
                    || r.stdout.contains("\"chunksShared\" : 3"), "repeated chunks are shared: \(r.stdout)")
    }

    /// Narrow refcounts (uncompressed, as qemu-img allows): a restore never overflows them.
    @Test(arguments: ["1", "2", "8"])
    func narrowRefcountsRestore(bits: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (args, rawA, _) = try Self.makeDatastore(in: dir, seed: 12)
        let dst = dir.appendingPathComponent("a.qcow2").path
        let r = try Harness.qcowpress(["restore", "pbs"] + args + [Self.snapshot, "drive-scsi0.img", dst, "-o", "refcount_bits=\(bits)"])
        #expect(r.status == 0, "refcount_bits=\(bits): \(r.stderr)")
        try Harness.expectGood(dst, equals: rawA)
        let info = try Harness.qemuImg(["info", "--output", "json", dst])
        #expect(info.stdout.contains("\"refcount-bits\": \(bits)"))
    }
}
