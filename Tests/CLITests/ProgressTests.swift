import Foundation
import Testing

/// `-p`: progress that moves with finished work, with rate and time left; plain lines in logs,
/// a bar that fits the terminal on a TTY, bytes and rate for a stream of unknown length.
@Suite(.tags(.e2e)) struct ProgressTests {
    func source(_ dir: URL) throws -> URL {
        let src = dir.appendingPathComponent("src.raw")
        FileManager.default.createFile(atPath: src.path, contents: SourceImage.noise(48 << 20, seed: 5) + SourceImage.text(16 << 20, seed: 6))
        return src
    }

    /// Not a TTY: plain lines (here every 0.2 s instead of 10), percentages never going back, and
    /// one final line.
    @Test func plainLinesInLogs() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = try source(dir)
        let r = try Harness.qcowpress(["convert", "-p", "-c", "-o", "compression_level=9", "--threads", "1", src.path, dir.appendingPathComponent("o.qcow2").path],
                                      env: ["QCOWPRESS_PROGRESS_INTERVAL": "0.2"])
        #expect(r.status == 0, "\(r.stderr)")
        let lines = r.stderr.split(separator: "\n").map(String.init)
        #expect(lines.count >= 3, "\(r.stderr)")
        #expect(lines.allSatisfy { $0.hasPrefix("qcowpress: ") && !$0.contains("\r") })
        let pcts = lines.compactMap { l in l.split(separator: " ").dropFirst().first.flatMap { Int($0.dropLast()) } }
        #expect(pcts.count == lines.count && pcts == pcts.sorted(), "\(pcts)")
        #expect(pcts.contains { $0 > 0 && $0 < 100 }, "the bar moves before the end: \(pcts)")
        #expect(lines.last?.hasPrefix("qcowpress: 100% (64.0 MiB of 64.0 MiB)") == true && lines.last?.contains("done in") == true, "\(lines.last ?? "")")
        #expect(lines.dropLast().contains { $0.contains("left") }, "a time left is shown")
        // Without the override, a short run prints only the final line.
        let quiet = try Harness.qcowpress(["convert", "-p", src.path, dir.appendingPathComponent("q.qcow2").path])
        #expect(quiet.stderr.split(separator: "\n").count == 1, "\(quiet.stderr)")
    }

    /// A TTY 50 columns wide (script(1) gives the command a pseudo-terminal): every redraw fits.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/script"), "needs script(1) for a pseudo-terminal")) func barFitsTheTerminal() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = try source(dir)
        let cmd = "stty cols 50; '\(Harness.binary)' convert -p -c --threads 1 '\(src.path)' '\(dir.appendingPathComponent("o.qcow2").path)'"
        let r = try Harness.run("/usr/bin/script", ["-qec", cmd, "/dev/null"])
        #expect(r.status == 0, "\(r.stdout)")
        // "\r\n" is one Character in Swift: normalise the separators before splitting.
        let draws = r.stdout.replacingOccurrences(of: "\u{1B}[K", with: "").replacingOccurrences(of: "\r\n", with: "\n")
            .replacingOccurrences(of: "\r", with: "\n").split(separator: "\n").map(String.init).filter { !$0.isEmpty }
        #expect(draws.count >= 2, "\(r.stdout)")
        for d in draws { #expect(d.count < 50, "\(d.count) columns: \(d)") }
        #expect(draws.last?.hasPrefix("100.0% [") == true, "\(draws.last ?? "")")
    }

    /// A VMA archive from standard input: no total is known, so bytes read and the rate, never a
    /// percentage stuck at 100.
    @Test(.enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3")) func streamOfUnknownLength() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let archive = try VMARestoreTests.makeArchive(dir, disks: try VMARestoreTests.makeDisks(in: dir, count: 2), name: "a.vma")
        // Through cat: a pipe, whose length nobody knows (a redirected file would have a size).
        let r = try Harness.run("/bin/sh", ["-c", "cat '\(archive)' | '\(Harness.binary)' restore vma -p - '\(dir.appendingPathComponent("out").path)'"],
                                env: ["QCOWPRESS_PROGRESS_INTERVAL": "0.2"])
        #expect(r.status == 0, "\(r.stderr)")
        let last = r.stderr.split(separator: "\n").last.map(String.init) ?? ""
        #expect(last.contains(" read, ") && !last.contains("%") && last.contains("done in"), "\(r.stderr)")
    }
}
