import Foundation
import Testing

/// `--memory-limit` holds for any number of drives (#30), and a refusal names a size that runs.
@Suite(.tags(.e2e, .pbs), .enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3"))
struct MemoryDrivesTests {
    /// `count` raw drives of 2 MiB in `dir` (random, text and zeros; each chunk its own data).
    static func drives(in dir: URL, count: Int) throws -> [String: String] {
        var out: [String: String] = [:]
        let text = SourceImage.text(512 << 10, seed: 1)
        for i in 0..<count {
            let p = dir.appendingPathComponent("d\(i).raw").path
            let mark = Data(String(format: "drive %04d\n", i).utf8)
            let d = SourceImage.noise(1 << 20, seed: UInt64(i + 1)) + mark + text + Data(count: (512 << 10) - mark.count)
            try d.write(to: URL(fileURLWithPath: p))
            out[String(format: "drive-scsi%02d.img", i)] = p
        }
        return out
    }

    /// The size a refusal names: "... at least 14M is needed" → "14M".
    static func namedSize(_ stderr: String) -> String? {
        guard let r = stderr.range(of: #"at least (\d+)M is needed"#, options: .regularExpression) else { return nil }
        return String(stderr[r].dropFirst("at least ".count).prefix { $0.isNumber }) + "M"
    }

    /// 64 drives restored one after another at a small limit: every image right, and the process's
    /// peak (the summary's peakRSSBytes, getrusage) within the limit + 48 MiB. Before #30 the heap
    /// kept every drive's freed buffers (glibc's sliding mmap threshold): 100 MiB at 16M.
    @Test func sixtyFourDrivesStayWithinTheLimit() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raws = try Self.drives(in: dir, count: 64)
        let ds = try PBSFixture.datastore(in: dir, drives: raws, seed: 3)
        let out = dir.appendingPathComponent("out").path
        let r = try Harness.qcowpress(["restore", "pbs", "--datastore", ds, PBSRestoreTests.snapshot, "--all", out,
                                       "-c", "--memory-limit", "16M", "--output", "json"])
        #expect(r.status == 0, "\(r.stderr)")
        let summaries = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        #expect(summaries.count == 64)
        let peak = summaries.compactMap { ($0["image"] as? [String: Any])?["peakRSSBytes"] as? Int }.max() ?? 0
        #expect(peak > 0 && peak <= (16 + 48) << 20, "peak RSS \(peak >> 20) MiB")
        for (archive, raw) in raws {
            try Harness.expectGood(out + "/" + archive.dropLast(4) + ".qcow2", equals: raw)
        }
    }

    /// A limit too small for one chunk loader and the engine is refused with a size; that size runs.
    @Test func theSizeARestoreRefusalNamesRuns() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("d.raw").path
        try (SourceImage.noise(2 << 20, seed: 7) + SourceImage.text(2 << 20, seed: 7) + Data(count: 2 << 20))
            .write(to: URL(fileURLWithPath: raw))
        let ds = dir.appendingPathComponent("ds").path
        // PBS's own chunk size, 4 MiB: a loader holds 8 MiB.
        try PBSFixture.writeSnapshot(PBSRestoreTests.snapshot, of: ["drive-scsi0.img": raw], into: ds, chunk: 4 << 20, seed: 1)
        let dst = dir.appendingPathComponent("d.qcow2").path
        let args = ["restore", "pbs", "--datastore", ds, PBSRestoreTests.snapshot, "drive-scsi0", dst, "-c"]
        let refused = try Harness.qcowpress(args + ["--memory-limit", "8M"])
        #expect(refused.status == 1 && refused.stderr.split(separator: "\n").count == 1, "\(refused.stderr)")
        let size = try #require(Self.namedSize(refused.stderr), "\(refused.stderr)")
        let ok = try Harness.qcowpress(args + ["--memory-limit", size])
        #expect(ok.status == 0, "at the named \(size): \(ok.stderr)")
        try Harness.expectGood(dst, equals: raw)
    }

    /// `restore vma` writes every device at once, each with its smallest write buffers: 64 devices
    /// at 16M are refused with a size, and that size runs.
    @Test func theSizeAVMARefusalNamesRuns() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let disks = try VMARestoreTests.makeDisks(in: dir, count: 64)
        let archive = try VMARestoreTests.makeArchive(dir, disks: disks, name: "many.vma")
        let out = dir.appendingPathComponent("out").path
        let args = ["restore", "vma", archive, out, "-c", "-o", "compression_type=zstd"]
        let refused = try Harness.qcowpress(args + ["--memory-limit", "16M"])
        #expect(refused.status == 1 && refused.stderr.split(separator: "\n").count == 1, "\(refused.stderr)")
        let size = try #require(Self.namedSize(refused.stderr), "\(refused.stderr)")
        let ok = try Harness.qcowpress(args + ["--memory-limit", size])
        #expect(ok.status == 0, "at the named \(size): \(ok.stderr)")
        for d in disks where d.name.hasSuffix("0") || d.name.hasSuffix("7") {
            try Harness.expectGood(out + "/" + d.name + ".qcow2", equals: d.path)
        }
    }
}
