import Foundation
import Testing

/// Runs the real `qcowpress` binary and the qemu-img oracle.
enum Harness {
    /// The binary built next to the test bundle (same build directory).
    static let binary: String = {
        if let p = ProcessInfo.processInfo.environment["QCOWPRESS_BIN"] { return p }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        while dir.path != "/" {
            let candidate = dir.appendingPathComponent("qcowpress").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return "qcowpress"
    }()

    struct Output {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    @discardableResult
    static func run(_ exe: String, _ args: [String], env: [String: String] = [:], stdin: FileHandle? = nil) throws -> Output {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe.hasPrefix("/") ? exe : "/usr/bin/\(exe)")
        p.arguments = args
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        p.environment = e
        let out = Pipe()
        let err = Pipe()
        p.standardOutput = out
        p.standardError = err
        if let stdin { p.standardInput = stdin }
        try p.run()
        // Read both pipes fully, at the same time, before waiting: a child that fills one pipe
        // (qemu-img check writes its ERROR lines to stderr, often more than a pipe holds) while
        // the other is being drained must not block.
        let errReader = PipeReader(err.fileHandleForReading)
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let r = errReader.wait()
        p.waitUntilExit()
        return Output(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: r, as: UTF8.self))
    }

    static func qcowpress(_ args: [String], env: [String: String] = [:]) throws -> Output {
        try run(binary, args, env: env)
    }

    static func qemuImg(_ args: [String]) throws -> Output {
        try run("/usr/bin/qemu-img", args)
    }

    static var haveQemuImg: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img") }

    /// A fresh directory for one test, removed by the caller's defer.
    static func tempDir() throws -> URL {
        let base = ProcessInfo.processInfo.environment["QCOWPRESS_TEST_DIR"] ?? "/tmp"
        let url = URL(fileURLWithPath: base).appendingPathComponent("qp-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// Asserts the image is clean and equal to the source, as qemu-img sees it.
    static func expectGood(_ image: String, equals source: String, sourceFormat: String = "raw",
                           sourceLocation: SourceLocation = #_sourceLocation) throws {
        let check = try qemuImg(["check", image])
        #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)", sourceLocation: sourceLocation)
        let cmp = try qemuImg(["compare", "-f", sourceFormat, "-F", "qcow2", source, image])
        #expect(cmp.status == 0, "qemu-img compare: \(cmp.stdout) \(cmp.stderr)", sourceLocation: sourceLocation)
    }

    /// Files in a directory other than the ones named (to find leaked temporary files).
    static func strayFiles(in dir: URL, except: Set<String>) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { !except.contains($0) }
    }
}

/// Reads a pipe to its end on its own thread.
final class PipeReader: @unchecked Sendable {
    private var data = Data()
    private let done = DispatchSemaphore(value: 0)
    init(_ h: FileHandle) {
        Thread.detachNewThread { [self] in
            data = h.readDataToEndOfFile()
            done.signal()
        }
    }
    func wait() -> Data {
        done.wait()
        return data
    }
}

/// Deterministic test images.
enum SourceImage {
    /// Pseudo-random bytes from a seed (xorshift), fast and repeatable.
    static func noise(_ n: Int, seed: UInt64) -> Data {
        var x = seed | 1
        var d = Data(count: n)
        d.withUnsafeMutableBytes { (p: UnsafeMutableRawBufferPointer) in
            let words = n / 8
            let w = p.baseAddress!.assumingMemoryBound(to: UInt64.self)
            for i in 0..<words {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                w[i] = x
            }
            for i in (words * 8)..<n { p[i] = UInt8(truncatingIfNeeded: i &* 31) }
        }
        return d
    }

    /// Text-like data that compresses about 3:1.
    static func text(_ n: Int, seed: UInt64) -> Data {
        let alphabet = [UInt8]("the quick brown fox jumps over a lazy dog 0123456789\n".utf8)
        var x = seed | 1
        var d = Data(count: n)
        d.withUnsafeMutableBytes { (p: UnsafeMutableRawBufferPointer) in
            for i in 0..<n {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                p[i] = alphabet[Int(x % UInt64(alphabet.count))]
            }
        }
        return d
    }

    /// Zeros, text, random data and a hole, in blocks of `block` bytes, plus `tail` unaligned bytes.
    static func mixed(at url: URL, blocks: Int, block: Int = 256 << 10, tail: Int = 1234, seed: UInt64 = 42) throws {
        FileManager.default.createFile(atPath: url.path, contents: nil)
        let h = try FileHandle(forWritingTo: url)
        defer { try? h.close() }
        for i in 0..<blocks {
            switch i % 4 {
            case 0: try h.seek(toOffset: UInt64((i + 1) * block))  // hole (sparse)
            case 1: try h.write(contentsOf: text(block, seed: seed &+ UInt64(i)))
            case 2: try h.write(contentsOf: noise(block, seed: seed &+ UInt64(i)))
            default: try h.write(contentsOf: Data(count: block))  // written zeros
            }
            if i % 4 == 0 { continue }
        }
        try h.seek(toOffset: UInt64(blocks * block))
        try h.write(contentsOf: text(tail, seed: seed))
    }
}
