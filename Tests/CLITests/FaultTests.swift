import Foundation
import Testing

/// Forced syscall failures through the binary's seam (QCOWPRESS_FAULT): a clear one-line error,
/// exit 1, no destination and no temporary file left behind, on every write path.
@Suite struct FaultTests {
    @Test(arguments: ["uring", "pwrite", "buffered"], ["ENOSPC", "EIO"])
    func writeFailures(io: String, kind: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 24, block: 512 << 10)
        for index in [1, 2, 3, 5] {
            let dst = dir.appendingPathComponent("dst.qcow2").path
            let r = try Harness.qcowpress(["convert", "-c", "--io", io, src.path, dst], env: ["QCOWPRESS_FAULT": "write:\(index):\(kind)"])
            #expect(r.status == 1, "write \(index) \(kind) via \(io): status \(r.status) \(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
            let expected = kind == "ENOSPC" ? "No space left on device" : "Input/output error"
            #expect(r.stderr.contains(expected), "\(r.stderr)")
            #expect(try Harness.strayFiles(in: dir, except: ["src.raw"]).isEmpty)
        }
    }

    @Test(arguments: ["uring", "pwrite"])
    func shortWritesAndEINTRStillProduceGoodImages(io: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 24, block: 512 << 10)
        for fault in ["write:1:short", "write:2:EINTR", "write:3:short"] {
            let dst = dir.appendingPathComponent("dst.qcow2").path
            let r = try Harness.qcowpress(["convert", "-c", "--io", io, "--force", src.path, dst], env: ["QCOWPRESS_FAULT": fault])
            #expect(r.status == 0, "\(fault): \(r.stderr)")
            if Harness.haveQemuImg { try Harness.expectGood(dst, equals: src.path) }
        }
    }

    @Test func readFailureNamesTheSource() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 24, block: 512 << 10)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        let r = try Harness.qcowpress(["convert", "-c", src.path, dst], env: ["QCOWPRESS_FAULT": "read:3:EIO"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("src.raw") && r.stderr.contains("Input/output error"), "\(r.stderr)")
        #expect(try Harness.strayFiles(in: dir, except: ["src.raw"]).isEmpty)
    }

    /// SIGTERM mid-conversion: exit 143 and the temporary file is gone.
    @Test func sigtermRemovesTemporaryOutput() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        // Text only: slow enough at zlib level 9 with one thread to be caught mid-way.
        FileManager.default.createFile(atPath: src.path, contents: SourceImage.text(48 << 20, seed: 9))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Harness.binary)
        p.arguments = ["convert", "-c", "-o", "compression_level=9", "--threads", "1", src.path, dir.appendingPathComponent("dst.qcow2").path]
        try p.run()
        usleep(400_000)
        p.terminate()
        p.waitUntilExit()
        #expect(p.terminationStatus == 143 || p.terminationStatus == 0)
        if p.terminationStatus == 143 {
            #expect(try Harness.strayFiles(in: dir, except: ["src.raw"]).isEmpty)
        }
    }
}
