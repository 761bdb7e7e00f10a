import Foundation
import QcowPress
import Testing

/// The engine through its public API: concurrent producers, any order, any alignment.
@Suite struct EncoderTests {
    static var haveQemuImg: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img") }

    func tempDir() throws -> URL {
        let url = URL(fileURLWithPath: "/tmp").appendingPathComponent("qp-enc-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    func qemuImg(_ args: [String]) throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-img")
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        return p.terminationStatus
    }

    /// A source whose pieces compress differently: zeros, text, noise.
    func makeSource(size: Int, seed: UInt64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: size)
        var x = seed | 1
        let words = [UInt8]("qcow2 cluster compressed write cache ".utf8)
        var i = 0
        while i < size {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            let run = Int(x % 50_000) + 1000
            let kind = (x >> 20) % 3
            for j in i..<min(size, i + run) {
                switch kind {
                case 0: out[j] = 0
                case 1: out[j] = words[j % words.count]
                default:
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17
                    out[j] = UInt8(truncatingIfNeeded: x)
                }
            }
            i += run
        }
        return out
    }

    /// Random pieces of random lengths (crossing cluster boundaries), shuffled, written by
    /// 8 concurrent tasks: the image equals the source for every cluster size and codec.
    @Test(.enabled(if: haveQemuImg), arguments: [512, 4096, 65536, 2 << 20], ["none", "zlib", "zstd"])
    func shuffledConcurrentWriters(clusterSize: Int, codec: String) async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let size = 5 * (1 << 20) + 3 * 512
        let source = makeSource(size: size, seed: UInt64(clusterSize))
        let raw = dir.appendingPathComponent("src.raw")
        try Data(source).write(to: raw)
        var pieces: [Range<Int>] = []
        var at = 0
        var rng = SystemRandomNumberGenerator()
        while at < size {
            let n = min(size - at, Int.random(in: 1...(3 * clusterSize / 2 + 700), using: &rng))
            pieces.append(at..<(at + n))
            at += n
        }
        pieces.shuffle(using: &rng)
        var options = EncoderOptions(virtualSize: UInt64(size))
        options.clusterSize = clusterSize
        options.compression = codec == "none" ? nil : CompressionSettings(algorithm: codec == "zlib" ? .zlib : .zstd)
        options.memoryLimit = 32 << 20
        let dst = dir.appendingPathComponent("out.qcow2").path
        let enc = try Qcow2Encoder(destination: dst, options: options)
        let shared = source
        try await withThrowingTaskGroup(of: Void.self) { group in
            for t in 0..<8 {
                let mine = stride(from: t, to: pieces.count, by: 8).map { pieces[$0] }
                group.addTask {
                    for r in mine {
                        try await enc.write(at: UInt64(r.lowerBound), shared[r])
                    }
                }
            }
            try await group.waitForAll()
        }
        let summary = try await enc.finish()
        #expect(summary.bytesIn == UInt64(size))
        #expect(try qemuImg(["check", dst]) == 0)
        #expect(try qemuImg(["compare", "-f", "raw", "-F", "qcow2", raw.path, dst]) == 0)
    }

    @Test func misuseIsAnError() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = EncoderOptions(virtualSize: 1 << 20)
        options.clusterSize = 4096
        let enc = try Qcow2Encoder(destination: dir.appendingPathComponent("x.qcow2").path, options: options)
        let data = [UInt8](repeating: 7, count: 6000)
        try await enc.write(at: 100, data)
        // Overlap inside a partial cluster, and with a completed one.
        await #expect(throws: QcowPressError.self) { try await enc.write(at: 200, data[0..<10]) }
        // Beyond the virtual size.
        await #expect(throws: QcowPressError.self) { try await enc.write(at: (1 << 20) - 10, data) }
        _ = try await enc.finish()
        await #expect(throws: QcowPressError.self) { try await enc.write(at: 500_000, data) }
        await #expect(throws: QcowPressError.self) { _ = try await enc.finish() }
    }

    @Test func cancelRemovesEverything() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = EncoderOptions(virtualSize: 64 << 20)
        options.compression = CompressionSettings(algorithm: .zlib, level: 9)
        options.memoryLimit = 4 << 20
        let enc = try Qcow2Encoder(destination: dir.appendingPathComponent("x.qcow2").path, options: options)
        let chunk = makeSource(size: 1 << 20, seed: 5)
        let writer = Task {
            for i in 0..<64 {
                try await enc.write(at: UInt64(i << 20), chunk)
            }
        }
        try await Task.sleep(nanoseconds: 50_000_000)
        enc.cancel()
        let result = await writer.result
        if case .failure(let e) = result, let q = e as? QcowPressError {
            if case .cancelled = q {} else { Issue.record("expected cancelled, got \(q)") }
        }
        await #expect(throws: QcowPressError.self) { _ = try await enc.finish() }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).isEmpty)
    }

    /// With a tiny budget, producers wait (stall seconds > 0) and the image is still right.
    @Test(.enabled(if: haveQemuImg)) func backPressureWithTinyBudget() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let size = 24 << 20
        let source = makeSource(size: size, seed: 11)
        let raw = dir.appendingPathComponent("src.raw")
        try Data(source).write(to: raw)
        var options = EncoderOptions(virtualSize: UInt64(size))
        options.compression = CompressionSettings(algorithm: .zlib, level: 9)
        options.memoryLimit = 4 << 20
        options.threads = 1
        let dst = dir.appendingPathComponent("out.qcow2").path
        let enc = try Qcow2Encoder(destination: dst, options: options)
        try await enc.write(at: 0, source)
        let s = try await enc.finish()
        #expect(s.producerStallSeconds > 0)
        #expect(try qemuImg(["compare", "-f", "raw", "-F", "qcow2", raw.path, dst]) == 0)
    }

    @Test func writeZeroesCostsNothing() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = EncoderOptions(virtualSize: 1 << 40)  // 1 TiB
        options.compression = CompressionSettings(algorithm: .zstd)
        let dst = dir.appendingPathComponent("big.qcow2").path
        let enc = try Qcow2Encoder(destination: dst, options: options)
        let data = [UInt8](repeating: 0x41, count: 65536)
        try await enc.write(at: 1 << 39, data)
        try await enc.writeZeroes(at: 0, length: 1 << 39)
        try await enc.writeZeroes(at: (1 << 39) + 65536, length: (1 << 39) - 65536)
        let s = try await enc.finish()
        #expect(s.clustersCompressed == 1)
        #expect(s.bytesOut < 1 << 20)
        if Self.haveQemuImg { #expect(try qemuImg(["check", dst]) == 0) }
    }

    @Test func existingDestinationIsRefused() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let dst = dir.appendingPathComponent("x.qcow2")
        try Data([1, 2, 3]).write(to: dst)
        #expect(throws: QcowPressError.self) { _ = try Qcow2Encoder(destination: dst.path, options: EncoderOptions(virtualSize: 1 << 20)) }
        var bad = EncoderOptions(virtualSize: 1 << 20)
        bad.clusterSize = 1000
        #expect(throws: QcowPressError.self) { _ = try Qcow2Encoder(destination: dir.appendingPathComponent("y").path, options: bad) }
    }
}
