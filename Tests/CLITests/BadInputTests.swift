import Foundation
import Testing

/// Bad input: one line on stderr naming the problem, exit status 1, and no destination.
@Suite(.tags(.e2e, .faults)) struct BadInputTests {
    /// `usage`: a usage error, whose line is followed by "See 'qcowpress CMD --help'.".
    func expectRefused(_ args: [String], in dir: URL, mentions: String, env: [String: String] = [:],
                       keep: Set<String> = ["src.raw"], usage: Bool = false, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try Harness.qcowpress(args, env: env)
        #expect(r.status == 1, "status \(r.status) for \(args): \(r.stderr)", sourceLocation: sourceLocation)
        let lines = r.stderr.split(separator: "\n")
        #expect(lines.count == (usage ? 2 : 1), "stderr: \(r.stderr)", sourceLocation: sourceLocation)
        if usage { #expect(lines.last == "See 'qcowpress \(args[0]) --help'.", "stderr: \(r.stderr)", sourceLocation: sourceLocation) }
        #expect(r.stderr.hasPrefix("qcowpress: "), sourceLocation: sourceLocation)
        #expect(r.stderr.contains(mentions), "'\(r.stderr)' should mention '\(mentions)'", sourceLocation: sourceLocation)
        #expect(try Harness.strayFiles(in: dir, except: keep).isEmpty, sourceLocation: sourceLocation)
    }

    @Test func usageAndInputErrors() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 4)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        try expectRefused(["convert", dir.appendingPathComponent("missing.raw").path, dst], in: dir, mentions: "missing.raw")
        try expectRefused(["convert", dir.path, dst], in: dir, mentions: "directory")
        try expectRefused(["convert", "-o", "cluster_size=3000", src.path, dst], in: dir, mentions: "cluster_size")
        try expectRefused(["convert", "-o", "cluster_size=256", src.path, dst], in: dir, mentions: "cluster_size")
        try expectRefused(["convert", "-o", "cluster_size=4M", src.path, dst], in: dir, mentions: "cluster_size")
        try expectRefused(["convert", "-o", "bogus=1", src.path, dst], in: dir, mentions: "bogus")
        try expectRefused(["convert", "-c", "-o", "compression_level=10", src.path, dst], in: dir, mentions: "compression_level")
        try expectRefused(["convert", "-c", "-o", "compression_type=zstd,compression_level=20", src.path, dst], in: dir, mentions: "compression_level")
        try expectRefused(["convert", "-c", "-o", "compression_type=lz4", src.path, dst], in: dir, mentions: "compression_type")
        try expectRefused(["convert", "--io", "magic", src.path, dst], in: dir, mentions: "--io")
        try expectRefused(["convert", "--bogus-flag", src.path, dst], in: dir, mentions: "bogus", usage: true)
        try expectRefused(["convert", "-f", "qcow2", src.path, dst], in: dir, mentions: "magic")
        try expectRefused(["info", dir.appendingPathComponent("nope.qcow2").path], in: dir, mentions: "nope.qcow2")
    }

    @Test func unreadableSource() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 2)
        if getuid() != 0 {
            chmod(src.path, 0)
            try expectRefused(["convert", src.path, dir.appendingPathComponent("d.qcow2").path], in: dir, mentions: "Permission denied")
        } else {
            // Root reads any file: run the command as nobody (setpriv, util-linux) instead.
            chmod(dir.path, 0o777)
            chmod(src.path, 0)
            let r = try Harness.run("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", Harness.binary,
                                                         "convert", src.path, dir.appendingPathComponent("d.qcow2").path])
            #expect(r.status == 1 && r.stderr.contains("Permission denied") && r.stderr.contains("src.raw"), "\(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1)
            #expect(try Harness.strayFiles(in: dir, except: ["src.raw"]).isEmpty)
        }
    }

    @Test(.enabled(if: Harness.haveQemuImg, "qemu-img judges the forced conversion"))
    func existingDestinationNeedsForce() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 4)
        let dst = dir.appendingPathComponent("dst.qcow2")
        try Data("precious".utf8).write(to: dst)
        try expectRefused(["convert", src.path, dst.path], in: dir, mentions: "already exists", keep: ["src.raw", "dst.qcow2"])
        #expect(try Data(contentsOf: dst) == Data("precious".utf8))
        let r = try Harness.qcowpress(["convert", "--force", src.path, dst.path])
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(dst.path, equals: src.path)
    }

    @Test func damagedQcow2HeaderIsNamed() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        var bytes = [UInt8](repeating: 0, count: 4096)
        bytes[0...3] = [0x51, 0x46, 0x49, 0xFB]
        bytes[7] = 3
        bytes[23] = 40  // cluster_bits
        let bad = dir.appendingPathComponent("src.raw")
        try Data(bytes).write(to: bad)
        try expectRefused(["info", bad.path], in: dir, mentions: "cluster_bits at offset 20 is 40")
    }
}
