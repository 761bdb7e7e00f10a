import Foundation
import Testing

/// Forced syscall failures through the binary's seam (QCOWPRESS_FAULT): a clear one-line error,
/// exit 1, no destination and no temporary file left behind, on every write path.
@Suite(.tags(.e2e, .faults)) struct FaultTests {
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

    @Test(.enabled(if: Harness.haveQemuImg, "qemu-img judges the images"), arguments: ["uring", "pwrite"])
    func shortWritesAndEINTRStillProduceGoodImages(io: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 24, block: 512 << 10)
        for fault in ["write:1:short", "write:2:EINTR", "write:3:short"] {
            let dst = dir.appendingPathComponent("dst.qcow2").path
            let r = try Harness.qcowpress(["convert", "-c", "--io", io, "--force", src.path, dst], env: ["QCOWPRESS_FAULT": fault])
            #expect(r.status == 0, "\(fault): \(r.stderr)")
            try Harness.expectGood(dst, equals: src.path)
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

    /// SIGTERM / SIGINT mid-conversion: exit 143 / 130 and the temporary file is gone.
    @Test(arguments: [SIGTERM, SIGINT])
    func signalRemovesTemporaryOutput(signal: Int32) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        // Text only: slow enough at zlib level 9 with one thread to be caught mid-way.
        FileManager.default.createFile(atPath: src.path, contents: SourceImage.text(8 << 20, seed: 9))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Harness.binary)
        p.arguments = ["convert", "-c", "-o", "compression_level=9", "--threads", "1", src.path, dir.appendingPathComponent("dst.qcow2").path]
        // A slow disk (every write 200 ms late) keeps the run going until the signal arrives.
        p.environment = ["QCOWPRESS_FAULT": "write:1:delay200:sticky"]
        try p.run()
        // Signal only once the conversion is under way (its temporary file exists), so the test
        // does not depend on how fast the process starts on a loaded machine.
        let started = try Wait.until(watching: [dir.path], orExitOf: p.processIdentifier) {
            !(try Harness.strayFiles(in: dir, except: ["src.raw"])).isEmpty
        }
        #expect(started, "the conversion never showed its temporary file")
        kill(p.processIdentifier, signal)
        p.waitUntilExit()
        #expect(p.terminationStatus == 128 + signal)
        #expect(try Harness.strayFiles(in: dir, except: ["src.raw"]).isEmpty)
    }
}

extension FaultTests {
    /// A slow disk (every write delayed): producers wait (back-pressure) and memory stays within
    /// the budget plus the process's fixed overhead.
    @Test(arguments: ["uring", "pwrite"])
    func budgetHoldsUnderASlowDisk(io: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        FileManager.default.createFile(atPath: src.path, contents: SourceImage.noise(48 << 20, seed: 3))
        let dst = dir.appendingPathComponent("dst.qcow2").path
        let r = try Harness.qcowpress(["convert", "--io", io, "--memory-limit", "16M", "--output", "json", src.path, dst],
                                      env: ["QCOWPRESS_FAULT": "write:1:delay30:sticky"])
        #expect(r.status == 0, "\(r.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        let rss = json["peakRSSBytes"] as! Int
        // 16 MiB budget + ~30 MiB of runtime, libraries and the readers' 8 MiB of chunk buffers.
        #expect(rss < 64 << 20, "peak RSS \(rss >> 20) MiB")
        #expect((json["producerStallSeconds"] as! Double) > 0.1)
        #expect((json["diskBusySeconds"] as! Double) > 0.1)
        try Harness.expectGood(dst, equals: src.path)
    }

    /// ENOSPC, EIO and EINTR at every write index of a small conversion, on both write paths:
    /// a failure is one line, exit 1, nothing left; EINTR is retried and the image is good.
    @Test(arguments: ["uring", "pwrite"])
    func everyWriteIndex(io: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 12, block: 1 << 20)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        var index = 1
        while index < 64 {
            let r = try Harness.qcowpress(["convert", "-c", "--io", io, src.path, dst], env: ["QCOWPRESS_FAULT": "write:\(index):ENOSPC"])
            if r.status == 0 { break }  // past the last write: the fault never fired
            #expect(r.status == 1 && r.stderr.contains("No space left on device") && r.stderr.split(separator: "\n").count == 1, "write \(index): \(r.stderr)")
            #expect(try Harness.strayFiles(in: dir, except: ["src.raw"]).isEmpty, "write \(index)")
            let eio = try Harness.qcowpress(["convert", "-c", "--io", io, src.path, dst], env: ["QCOWPRESS_FAULT": "write:\(index):EIO"])
            #expect(eio.status == 1 && eio.stderr.contains("Input/output error"), "write \(index): \(eio.stderr)")
            let intr = try Harness.qcowpress(["convert", "-c", "--io", io, "--force", src.path, dst], env: ["QCOWPRESS_FAULT": "write:\(index):EINTR"])
            #expect(intr.status == 0, "EINTR at write \(index): \(intr.stderr)")
            try? FileManager.default.removeItem(atPath: dst)
            index += 1
        }
        #expect(index > 3, "a conversion makes several writes")
        try Harness.expectGood(dst, equals: src.path)
    }
}
