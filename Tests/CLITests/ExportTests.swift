import Foundation
import Testing

/// Full and incremental compressed backup exports.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg, "qemu-img is the oracle"))
struct ExportTests {
    @Test func chainOfThreeIncrementals() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let disk = dir.appendingPathComponent("disk.raw")
        try SourceImage.mixed(at: disk, blocks: 32, block: 256 << 10, tail: 0)
        var layers: [String] = []
        var snapshots: [String] = []
        for gen in 0..<4 {
            if gen > 0 {
                // Change ~256 KiB at a different place each generation.
                let h = try FileHandle(forWritingTo: disk)
                try h.seek(toOffset: UInt64(gen) * (1 << 20) + 4096)
                try h.write(contentsOf: SourceImage.noise(256 << 10, seed: UInt64(gen)))
                try h.close()
            }
            let snap = dir.appendingPathComponent("disk-\(gen).raw")
            try FileManager.default.copyItem(at: disk, to: snap)
            snapshots.append(snap.path)
            let dst = dir.appendingPathComponent("backup-\(gen).qcow2").path
            var args = ["export", "--output", "json"]
            if let prev = layers.last { args += ["-b", prev] }
            let r = try Harness.qcowpress(args + [disk.path, dst])
            #expect(r.status == 0, "gen \(gen): \(r.stderr)")
            layers.append(dst)
            #expect(try Harness.qemuImg(["check", dst]).status == 0)
            #expect(try Harness.qemuImg(["compare", "-F", "raw", dst, snap.path]).status == 0, "generation \(gen)")
            let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
            if gen > 0 {
                // 256 KiB of change touches 4–5 clusters of 64 KiB.
                let new = json["clustersNew"] as? Int ?? -1
                #expect((4...6).contains(new), "gen \(gen): \(new) clusters new")
                let size = try FileManager.default.attributesOfItem(atPath: dst)[.size] as! Int
                #expect(size < 700 << 10, "increment \(gen) is \(size) bytes")
                #expect(try Harness.qemuImg(["info", dst]).stdout.contains("backing file: backup-\(gen - 1).qcow2"))
            }
        }
        // Every earlier layer still reads as its own point in time.
        for (i, l) in layers.enumerated() {
            #expect(try Harness.qemuImg(["compare", "-F", "raw", l, snapshots[i]]).status == 0)
        }
        let info = try Harness.qemuImg(["info", "--output", "json", layers[0]]).stdout
        #expect(info.contains("\"compression-type\": \"zstd\""))
    }

    /// A base of another size than the source is read as qemu reads an overlay over it: past the
    /// base's end it reads zeros; past the source's end it does not matter. The base may end inside
    /// a cluster (and inside one of the copier's chunks).
    @Test(arguments: [(UInt64(4 << 20), "larger"), (UInt64(1 << 20), "smaller"), (UInt64(1_000_448), "smaller, ending mid-cluster")])
    func baseOfAnotherSize(baseSize: UInt64, what: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        // 3 MiB: noise, with a zero run over the base's end and at the base's content.
        try SourceImage.mixed(at: src, blocks: 12, block: 256 << 10, tail: 0)
        let h = try FileHandle(forWritingTo: src)
        try h.seek(toOffset: 896 << 10)
        try h.write(contentsOf: Data(count: 256 << 10))
        try h.close()
        let base = dir.appendingPathComponent("base.qcow2").path
        #expect(try Harness.qemuImg(["create", "-q", "-f", "qcow2", base, String(baseSize)]).status == 0)
        #expect(try Harness.run("/usr/bin/qemu-io", ["-c", "write -P 0xaa 0 \(baseSize)", base]).status == 0)
        let dst = dir.appendingPathComponent("inc.qcow2").path
        let r = try Harness.qcowpress(["export", "-b", base, "-f", "raw", src.path, dst])
        #expect(r.status == 0, "\(what): \(r.stderr)")
        #expect(try Harness.qemuImg(["check", dst]).status == 0, "\(what)")
        #expect(try Harness.qemuImg(["compare", "-f", "raw", "-F", "qcow2", src.path, dst]).status == 0, "\(what)")
        let info = try Harness.qemuImg(["info", "--output", "json", dst]).stdout
        #expect(info.contains("\"virtual-size\": \(12 << 18)"), "\(what): the source's size, not the base's")
    }
}
