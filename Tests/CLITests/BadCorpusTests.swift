import Foundation
import Testing

/// Fixtures/bad: every damaged file gives exactly its expected one-line error, exit 1, no output.
@Suite(.tags(.e2e, .faults)) struct BadCorpusTests {
    static var dir: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/bad")
    }
    static var cases: [[String]] {
        guard let text = try? String(contentsOf: dir.appendingPathComponent("expected.tsv"), encoding: .utf8) else { return [] }
        return text.split(separator: "\n").map { $0.split(separator: "\t", omittingEmptySubsequences: false).map(String.init) }
    }

    @Test func corpusIsPresent() { #expect(Self.cases.count >= 25) }

    @Test(arguments: cases)
    func givesItsExpectedLine(row: [String]) throws {
        let out = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: out) }
        let args = row[1].split(separator: " ").map { word -> String in
            switch word {
            case "{}": row[0]
            case "{out}": out.appendingPathComponent("out.qcow2").path
            case "{outdir}": out.appendingPathComponent("outdir").path
            default: String(word)
            }
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Harness.binary)
        p.arguments = args
        p.currentDirectoryURL = Self.dir
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        let data = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        #expect(p.terminationStatus == 1, "\(row[0])")
        #expect(String(decoding: data, as: UTF8.self) == row[2] + "\n", "\(row[0])")
        let left = (try? FileManager.default.subpathsOfDirectory(atPath: out.path)) ?? []
        #expect(left.isEmpty || left == ["outdir"], "\(row[0]) left \(left)")
    }
}

/// Every parser under the mutation fuzzer for 300 runs, 3 s at most (fuzz/run.sh runs them for longer).
@Suite(.tags(.e2e, .faults)) struct FuzzSmokeTests {
    static var fuzzer: String { URL(fileURLWithPath: Harness.binary).deletingLastPathComponent().appendingPathComponent("qcowpress-fuzz").path }

    @Test(arguments: ["qcow2-header", "qcow2-entries", "qcow2-image", "fidx", "blob", "manifest", "keyfile", "vma",
                      "vmdk", "vmdk-stream", "vhdx", "vhd", "vdi", "ova-tar", "ovf", "s3-xml", "image-tools"])
    func runsWithoutFindings(target: String) throws {
        let root = BadCorpusTests.dir.deletingLastPathComponent()
        let r = try Harness.run(Self.fuzzer, [target, root.appendingPathComponent("fuzz/\(target)").path, "--runs", "300", "--seconds", "3"])
        #expect(r.status == 0, "\(target): \(r.stdout) \(r.stderr)")
        // It really ran: 300 executions, or at least 100 when 3 s ran out first (a busy machine).
        let runs = r.stdout.split(separator: " ").firstIndex(of: "runs").flatMap { i in
            Int(r.stdout.split(separator: " ")[i - 1])
        } ?? 0
        #expect(runs >= 100, "\(target): \(r.stdout)")
    }

    /// A trapping input is a finding: the fuzzer dies by the signal, saves the input, and does not
    /// claim a clean run.
    @Test func aCrashIsReported() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("seeds"), withIntermediateDirectories: true)
        try Data("CRASH now".utf8).write(to: dir.appendingPathComponent("seeds/a"))
        let r = try Harness.run("/bin/sh", ["-c", "cd '\(dir.path)' && exec '\(Self.fuzzer)' self-test seeds --seconds 3"])
        #expect(r.status != 0)
        #expect(!r.stdout.contains("0 crashes"))
        #expect(FileManager.default.fileExists(atPath: dir.appendingPathComponent("fuzz-crash-self-test.bin").path))
    }
}

/// SIGKILL at random moments never leaves a complete-looking DST (scripts/crash-test.sh; CI runs 8).
@Suite(.tags(.e2e, .faults), .enabled(if: Harness.haveQemuImg && FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"), "needs qemu-img and python3"))
struct CrashTests {
    @Test func killNineLeavesNoCompleteLookingImage() throws {
        let root = BadCorpusTests.dir.deletingLastPathComponent().deletingLastPathComponent()
        let r = try Harness.run("/bin/bash", [root.appendingPathComponent("scripts/crash-test.sh").path, "8", "3", "96"],
                                env: ["QCOWPRESS_BIN": Harness.binary])
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
    }
}
