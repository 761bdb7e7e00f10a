import Foundation
import Testing

/// `restore vma` against archives made by Tests/Support/make_vma.py (an independent writer that
/// follows pve-qemu's vma-writer.c; see VMA-FORMAT-NOTES.md).
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3"))
struct VMARestoreTests {
    static var script: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Support/make_vma.py").path
    }

    /// Three disks (sizes not multiples of 64 KiB, one mostly zero), a config, shuffled clusters.
    static func makeDisks(in dir: URL, count: Int) throws -> [(name: String, path: String)] {
        var out: [(String, String)] = []
        let sizes = [3 * 65536 + 5 * 4096 + 512, 40 * 65536 + 1024, 2 * 65536]
        for i in 0..<count {
            var d = Data()
            let size = sizes[i % 3]
            while d.count < size {
                switch (d.count / 65536 + i) % 4 {
                case 0: d += Data(count: 65536)
                case 1: d += SourceImage.text(65536, seed: UInt64(i * 100 + d.count))
                case 2: d += SourceImage.noise(65536, seed: UInt64(i * 100 + d.count))
                default: d += Data(count: 4096) + SourceImage.text(8192, seed: 9) + Data(count: 65536 - 12288)
                }
            }
            if i == 1 { d = Data(count: size - 4096) + SourceImage.noise(4096, seed: 4) }  // mostly zero
            let p = dir.appendingPathComponent("disk\(i).raw").path
            try d.prefix(size).write(to: URL(fileURLWithPath: p))
            out.append(("drive-scsi\(i)", p))
        }
        return out
    }

    static func makeArchive(_ dir: URL, disks: [(name: String, path: String)], name: String, extra: [String] = []) throws -> String {
        let conf = dir.appendingPathComponent("qemu-server.conf")
        try Data("boot: order=scsi0\nmemory: 2048\n".utf8).write(to: conf)
        let out = dir.appendingPathComponent(name).path
        var args = [script, out, "--config", "qemu-server.conf=\(conf.path)", "--shuffle", "7"] + extra
        for d in disks { args += ["--device", "\(d.name)=\(d.path)"] }
        let r = try Harness.run("/usr/bin/python3", args)
        guard r.status == 0 else { throw FixtureError(message: r.stdout + r.stderr) }
        return out
    }

    @Test(arguments: ["a.vma", "a.vma.zst", "a.vma.gz"], [[String](), ["-c"], ["-c", "-o", "compression_type=zstd"]])
    func restoresEveryDevice(archiveName: String, codec: [String]) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let disks = try Self.makeDisks(in: dir, count: 3)
        let archive = try Self.makeArchive(dir, disks: disks, name: archiveName)
        let out = dir.appendingPathComponent("out").path
        let r = try Harness.qcowpress(["restore", "vma", archive, out] + codec)
        #expect(r.status == 0, "\(r.stderr)")
        for d in disks { try Harness.expectGood(out + "/" + d.name + ".qcow2", equals: d.path) }
        #expect(try String(contentsOfFile: out + "/qemu-server.conf", encoding: .utf8).contains("memory: 2048"))
    }

    @Test(arguments: ["a.vma", "a.vma.zst", "a.vma.gz"])
    func readsFromAPipe(archiveName: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let disks = try Self.makeDisks(in: dir, count: 1)
        let archive = try Self.makeArchive(dir, disks: disks, name: archiveName)
        let out = dir.appendingPathComponent("out").path
        let r = try Harness.run(Harness.binary, ["restore", "vma", "-", out, "-c"], stdin: try FileHandle(forReadingFrom: URL(fileURLWithPath: archive)))
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(out + "/drive-scsi0.qcow2", equals: disks[0].path)
    }

    @Test func oneDeviceAndExistingOutput() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let disks = try Self.makeDisks(in: dir, count: 3)
        let archive = try Self.makeArchive(dir, disks: disks, name: "a.vma", extra: ["--per-extent", "59"])
        let out = dir.appendingPathComponent("out").path
        let r = try Harness.qcowpress(["restore", "vma", "--device", "drive-scsi2", archive, out])
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(out + "/drive-scsi2.qcow2", equals: disks[2].path)
        #expect(!FileManager.default.fileExists(atPath: out + "/drive-scsi0.qcow2"))
        let again = try Harness.qcowpress(["restore", "vma", "--device", "drive-scsi2", archive, out])
        #expect(again.status == 1 && again.stderr.contains("already exists"))
        let forced = try Harness.qcowpress(["restore", "vma", "--force", archive, out])
        #expect(forced.status == 0, "\(forced.stderr)")
        let unknown = try Harness.qcowpress(["restore", "vma", "--device", "nope", archive, out + "2"])
        #expect(unknown.status == 1 && unknown.stderr.contains("nope"))
    }

    /// A compressed archive cut where its integrity check is (gzip's CRC-32 and length, zstd's
    /// frame checksum): every archive byte still decodes, but the check is gone — refused, as zcat
    /// and zstd -d refuse it (it restored with exit 0 before).
    @Test(arguments: [("a.vma.gz", 8), ("a.vma.zst", 4)])
    func compressedStreamCutBeforeItsCheckIsRefused(name: String, cut: Int) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let disks = try Self.makeDisks(in: dir, count: 1)
        let plain = try Self.makeArchive(dir, disks: disks, name: "a.vma")
        let gz = name.hasSuffix(".gz")
        let packed = try Harness.run(gz ? "/usr/bin/gzip" : "/usr/bin/zstd", gz ? ["-k", "-n", "-f", plain] : ["-q", "-f", "--check", plain, "-o", plain + ".zst"])
        #expect(packed.status == 0, "\(packed.stderr)")
        let whole = try Data(contentsOf: URL(fileURLWithPath: plain + (gz ? ".gz" : ".zst")))
        let archive = dir.appendingPathComponent("cut-" + name).path
        try whole.prefix(whole.count - cut).write(to: URL(fileURLWithPath: archive))
        let out = dir.appendingPathComponent("out").path
        let r = try Harness.qcowpress(["restore", "vma", archive, out, "-c"])
        #expect(r.status == 1 && r.stderr.contains("truncated") && r.stderr.split(separator: "\n").count == 1, "\(name): \(r.status) \(r.stderr)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: out)) ?? []).isEmpty)
        // The whole stream restores.
        try whole.write(to: URL(fileURLWithPath: archive))
        #expect(try Harness.qcowpress(["restore", "vma", archive, out, "-c"]).status == 0)
    }

    @Test(arguments: ["magic", "header-md5", "extent-md5", "truncate-header", "truncate-extent", "bad-devid",
                      "cluster-beyond-size", "missing-cluster", "repeated-cluster", "extent-uuid", "block-count",
                      "duplicate-device-name", "device-name-slash", "config-name-dotdot"])
    func damagedArchiveIsRefused(mode: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let disks = try Self.makeDisks(in: dir, count: 2)
        for name in ["a.vma", "a.vma.zst"] {
            let archive = try Self.makeArchive(dir, disks: disks, name: name, extra: ["--corrupt", mode])
            let out = dir.appendingPathComponent("out-\(name)")
            let r = try Harness.qcowpress(["restore", "vma", archive, out.path, "-c"])
            #expect(r.status == 1, "\(mode) \(name): status \(r.status) \(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1, "\(mode): \(r.stderr)")
            #expect(r.stderr.contains("offset"), "\(mode): \(r.stderr)")
            // Nothing complete-looking, nothing outside OUTDIR.
            let left = (try? FileManager.default.contentsOfDirectory(atPath: out.path)) ?? []
            #expect(left.isEmpty, "\(mode): left \(left)")
            #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("evil.qcow2").path))
        }
    }
}
