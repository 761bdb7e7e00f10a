import Foundation
import Testing

/// The memory limit bounds the whole engine: what cannot fit is cut (fewer workers, smaller write
/// buffers) or refused with one line, never exceeded.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg, "needs qemu-img"))
struct MemoryBudgetTests {
    @Test func tooSmallALimitIsRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 4)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        let r = try Harness.qcowpress(["convert", "--threads", "1024", "--memory-limit", "4M", "-o", "cluster_size=2M", src.path, dst])
        #expect(r.status == 1)
        #expect(r.stderr.contains("memory limit 4M") && r.stderr.contains("at least"), "\(r.stderr)")
        #expect(r.stderr.split(separator: "\n").count == 1)
        #expect(try Harness.strayFiles(in: dir, except: ["src.raw"]).isEmpty)
    }

    /// Many threads asked for, a small budget: fewer workers start, peak RSS stays within the budget
    /// plus the process's fixed overhead, and the image is right.
    @Test func manyThreadsAreCutToTheBudget() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 64)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        let r = try Harness.qcowpress(["convert", "-c", "-o", "compression_type=zstd", "--threads", "256", "--memory-limit", "16M",
                                       "--output", "json", src.path, dst])
        #expect(r.status == 0, "\(r.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        let rss = json["peakRSSBytes"] as! Int
        #expect(rss < (16 + 32) << 20, "peak RSS \(rss >> 20) MiB")
        try Harness.expectGood(dst, equals: src.path)
    }
}
