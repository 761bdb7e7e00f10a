import Foundation
import Testing

/// Reading every image kind qemu-img 7.x makes, judged by qemu-img compare against qemu's own view.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg, "qemu-img is the oracle"))
struct Qcow2ReaderTests {
    static let kinds: [[String]] = [
        ["-o", "compat=0.10"],
        ["-o", "cluster_size=512"],
        ["-c", "-o", "cluster_size=4096"],
        ["-c", "-o", "compression_type=zstd"],
        ["-c", "-o", "cluster_size=2M"],
        ["-o", "extended_l2=on"],
        ["-o", "refcount_bits=1"],
        ["-o", "refcount_bits=64,lazy_refcounts=on"],
    ]

    /// Converts `image` with qcowpress to qcow2 (compressed) and to raw; both must read like it.
    func expectConvertsLikeQemu(_ image: String, in dir: URL, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let q = dir.appendingPathComponent("out-\(UUID().uuidString).qcow2").path
        let r = try Harness.qcowpress(["convert", "-c", "-o", "compression_type=zstd", image, q])
        #expect(r.status == 0, "\(r.stderr)", sourceLocation: sourceLocation)
        let c1 = try Harness.qemuImg(["compare", image, q])
        #expect(c1.status == 0, "\(c1.stdout)", sourceLocation: sourceLocation)
        let raw = dir.appendingPathComponent("out-\(UUID().uuidString).raw").path
        let r2 = try Harness.qcowpress(["convert", "-O", "raw", image, raw])
        #expect(r2.status == 0, "\(r2.stderr)", sourceLocation: sourceLocation)
        let c2 = try Harness.qemuImg(["compare", "-F", "raw", image, raw])
        #expect(c2.status == 0, "\(c2.stdout)", sourceLocation: sourceLocation)
        let ours = try Harness.qcowpress(["check", image])
        let theirs = try Harness.qemuImg(["check", image])
        #expect(ours.status == theirs.status, "check: ours \(ours.status) qemu \(theirs.status)\n\(ours.stdout)", sourceLocation: sourceLocation)
    }

    @Test(arguments: kinds)
    func readsImageKinds(options: [String]) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 12, block: 160 << 10, tail: 512)
        let img = dir.appendingPathComponent("img.qcow2").path
        #expect(try Harness.qemuImg(["convert", "-O", "qcow2"] + options + [src.path, img]).status == 0)
        // Zero clusters, partial (subcluster) writes and discards on top.
        try Harness.qemuIO(img, ["write -z 64k 128k", "write -P 0x5a 300k 4k", "write -P 0x11 1000k 1k", "discard 1536k 64k"])
        try expectConvertsLikeQemu(img, in: dir)
    }

    @Test func readsChainsSnapshotsAndExternalData() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("base.raw")
        try SourceImage.mixed(at: src, blocks: 16, block: 256 << 10)
        let base = dir.appendingPathComponent("base.qcow2").path
        #expect(try Harness.qemuImg(["convert", "-c", "-O", "qcow2", src.path, base]).status == 0)
        let mid = dir.appendingPathComponent("mid.qcow2").path
        #expect(try Harness.qemuImg(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid]).status == 0)
        try Harness.qemuIO(mid, ["write -P 0x55 1M 512k", "write -z 3M 64k"])
        // A raw backing file under a qcow2 with extended L2 and a snapshot.
        let top = dir.appendingPathComponent("top.qcow2").path
        #expect(try Harness.qemuImg(["create", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2", "-F", "qcow2", top]).status == 0)
        try Harness.qemuIO(top, ["write -P 0x66 2M 4k", "write -z 100k 8k"])
        #expect(try Harness.qemuImg(["snapshot", "-c", "s1", top]).status == 0)
        try Harness.qemuIO(top, ["write -P 0x77 3M 64k"])
        try expectConvertsLikeQemu(top, in: dir)
        let rawBacked = dir.appendingPathComponent("rawbacked.qcow2").path
        #expect(try Harness.qemuImg(["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", rawBacked]).status == 0)
        try Harness.qemuIO(rawBacked, ["write -P 0x21 512k 64k"])
        try expectConvertsLikeQemu(rawBacked, in: dir)
        let ext = dir.appendingPathComponent("ext.qcow2").path
        // Absolute: qemu-img resolves a relative data_file name against its current directory,
        // QcowPress against the image's directory (as for backing files).
        let extData = dir.appendingPathComponent("ext.raw").path
        #expect(try Harness.qemuImg(["create", "-f", "qcow2", "-o", "data_file=\(extData),data_file_raw=on", ext, "4M"]).status == 0)
        try Harness.qemuIO(ext, ["write -P 0x12 0 1M", "write -P 0x13 2M 64k"])
        try expectConvertsLikeQemu(ext, in: dir)
        // -B keeps the chain: the output holds only what differs from mid.
        let kept = dir.appendingPathComponent("kept.qcow2").path
        #expect(try Harness.qcowpress(["convert", "-B", "mid.qcow2", top, kept]).status == 0)
        #expect(try Harness.qemuImg(["compare", top, kept]).status == 0)
        #expect(try Harness.qemuImg(["info", kept]).stdout.contains("backing file: mid.qcow2"))
        // --no-backing reads unallocated clusters as zeros.
        let nb = dir.appendingPathComponent("nb.qcow2").path
        #expect(try Harness.qcowpress(["convert", "--no-backing", mid, nb]).status == 0)
        let json = "json:{\"driver\":\"qcow2\",\"backing\":null,\"file\":{\"driver\":\"file\",\"filename\":\"\(mid)\"}}"
        let cmp = try Harness.qemuImg(["compare", "-F", "qcow2", json, nb])
        #expect(cmp.status == 0, "\(cmp.stdout)\(cmp.stderr)")
    }
}
