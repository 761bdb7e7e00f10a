import Foundation
import Glibc
import Testing

/// Huge sparse images (#30): 16 TiB raw files on ext4 and 64 TiB qcow2 images with a little
/// scattered data convert and export to images qemu-img finds equal and clean. What they cost is
/// checked by counts in SparseCostTests (no timed test); these check the bytes.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg, "qemu-img is the oracle"))
struct SparseImageTests {
    static let tib: UInt64 = 1 << 40
    /// ext4's largest file is 16 TiB less one block: 1 MiB less keeps the size a multiple of 512.
    static let size16 = 16 * tib - (1 << 20)

    /// A sparse raw file of `size` bytes; each piece is written at its offset (zeros included:
    /// they are allocated data in the file, a zero cluster inside data).
    static func sparseRaw(_ path: String, size: UInt64, _ pieces: [(UInt64, Data)]) throws {
        let fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0o644)
        try #require(fd >= 0)
        defer { close(fd) }
        try #require(ftruncate(fd, off_t(size)) == 0, "ftruncate to \(size): errno \(errno)")
        for (at, d) in pieces {
            let n = d.withUnsafeBytes { pwrite(fd, $0.baseAddress, d.count, off_t(at)) }
            try #require(n == d.count)
        }
    }

    /// Partial clusters (unaligned starts and ends, one across a 4 MiB chunk boundary), three
    /// clusters whose middle one is zeros, and the image's last bytes.
    static func scattered(size: UInt64, seed: UInt64) -> [(UInt64, Data)] {
        [(5 << 20 + 123, SourceImage.noise(5000, seed: seed)),
         (3 * tib, SourceImage.noise(65536, seed: seed + 1) + Data(count: 65536) + SourceImage.noise(65536, seed: seed + 2)),
         (9 * tib + (4 << 20) - 100, SourceImage.noise(300, seed: seed + 3)),
         (size - 5000, SourceImage.noise(5000, seed: seed + 4))]
    }

    @Test func a16TiBSparseRawConvertsAndExports() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("sparse.raw").path
        try Self.sparseRaw(src, size: Self.size16, Self.scattered(size: Self.size16, seed: 30))
        let out = dir.appendingPathComponent("out.qcow2").path
        let c = try Harness.qcowpress(["convert", "-c", src, out])
        #expect(c.status == 0, "\(c.stderr)")
        try Harness.expectGood(out, equals: src)
        let exported = dir.appendingPathComponent("export.qcow2").path
        let e = try Harness.qcowpress(["export", out, exported])
        #expect(e.status == 0, "\(e.stderr)")
        try Harness.expectGood(exported, equals: src)
    }

    /// A 64 TiB qcow2 made by qemu (absent L2 tables almost everywhere, a zero cluster, data in a
    /// few clusters) converts and exports equal.
    @Test func a64TiBQcow2WithHugeUnallocatedRangesConvertsAndExports() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.qcow2").path
        #expect(try Harness.qemuImg(["create", "-q", "-f", "qcow2", src, "64T"]).status == 0)
        let io = try Harness.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x66 1T 100k", "-c", "write -z 1025G 64k",
                                             "-c", "write -P 0x77 40T 64k", "-c", "write -P 0x88 \(64 * Self.tib - 3072) 3k", src])
        #expect(io.status == 0, "\(io.stderr)")
        let out = dir.appendingPathComponent("out.qcow2").path
        let c = try Harness.qcowpress(["convert", "-c", src, out])
        #expect(c.status == 0, "\(c.stderr)")
        try Harness.expectGood(out, equals: src, sourceFormat: "qcow2")
        let exported = dir.appendingPathComponent("export.qcow2").path
        let e = try Harness.qcowpress(["export", src, exported])
        #expect(e.status == 0, "\(e.stderr)")
        try Harness.expectGood(exported, equals: src, sourceFormat: "qcow2")
    }

    /// Over a 16 TiB backing file (-B), only what differs is written: data the base lacks, and
    /// zeros where the base has data (those must read as zero, not through to the base).
    @Test func a16TiBSparseRawOverABackingFileKeepsOnlyTheDifference() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let shared = SourceImage.noise(70000, seed: 7)
        let base = dir.appendingPathComponent("base.raw").path
        try Self.sparseRaw(base, size: Self.size16, [(2 * Self.tib + 512, shared), (7 * Self.tib, SourceImage.noise(200_000, seed: 8))])
        let src = dir.appendingPathComponent("src.raw").path
        try Self.sparseRaw(src, size: Self.size16, [(2 * Self.tib + 512, shared), (11 * Self.tib + 4096, SourceImage.noise(9000, seed: 9))])
        let out = dir.appendingPathComponent("out.qcow2").path
        let c = try Harness.qcowpress(["convert", "-B", "base.raw", "-F", "raw", src, out])
        #expect(c.status == 0, "\(c.stderr)")
        let check = try Harness.qemuImg(["check", out])
        #expect(check.status == 0, "\(check.stdout) \(check.stderr)")
        let cmp = try Harness.qemuImg(["compare", "-f", "raw", "-F", "qcow2", src, out])
        #expect(cmp.status == 0, "\(cmp.stdout) \(cmp.stderr)")
    }
}
