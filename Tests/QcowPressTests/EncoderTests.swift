import Foundation
import QcowPress
import Testing

/// The engine through its public API: concurrent producers, any order, any alignment.
@Suite(.tags(.e2e)) struct EncoderTests {
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

    /// An encoder writing `out.qcow2` in `dir`; `codec` "none", "zlib" or "zstd".
    func encoder(in dir: URL, size: Int, clusterSize: Int, codec: String, memoryLimit: Int) throws -> (Qcow2Encoder, String) {
        var options = EncoderOptions(virtualSize: UInt64(size))
        options.clusterSize = clusterSize
        options.compression = codec == "none" ? nil : CompressionSettings(algorithm: codec == "zlib" ? .zlib : .zstd)
        options.memoryLimit = memoryLimit
        let dst = dir.appendingPathComponent("out.qcow2").path
        return (try Qcow2Encoder(destination: dst, options: options), dst)
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
    @Test(.enabled(if: haveQemuImg, "qemu-img is the oracle"), arguments: [512, 4096, 65536, 2 << 20], ["none", "zlib", "zstd"])
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
        let (enc, dst) = try encoder(in: dir, size: size, clusterSize: clusterSize, codec: codec, memoryLimit: 32 << 20)
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
        // Cancelled mid-run: once the writer has handed over its second MiB.
        let (underWay, said) = AsyncStream<Void>.makeStream()
        let writer = Task {
            for i in 0..<64 {
                try await enc.write(at: UInt64(i << 20), chunk)
                if i == 1 { said.yield(); said.finish() }
            }
        }
        for await _ in underWay { break }
        enc.cancel()
        let result = await writer.result
        if case .failure(let e) = result, let q = e as? QcowPressError {
            if case .cancelled = q {} else { Issue.record("expected cancelled, got \(q)") }
        }
        await #expect(throws: QcowPressError.self) { _ = try await enc.finish() }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).isEmpty)
    }

    /// With a tiny budget, producers wait (stall seconds > 0) and the image is still right.
    @Test(.enabled(if: haveQemuImg, "qemu-img is the oracle")) func backPressureWithTinyBudget() async throws {
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

    @Test(.enabled(if: haveQemuImg, "qemu-img checks the image")) func writeZeroesCostsNothing() async throws {
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
        #expect(try qemuImg(["check", dst]) == 0)
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

    /// The image being written reads back (live restore): a range nobody wrote says no at once; a
    /// written range, once its bytes — and, for a region already complete, its L2 table — are on
    /// disk, reads back equal to the source: compressed, raw and zero clusters, whole zero regions,
    /// copies. The finished image is still clean and equal.
    @Test(.enabled(if: haveQemuImg, "qemu-img is the oracle"), .timeLimit(.minutes(2)), arguments: [4096, 65536], ["none", "zlib", "zstd"])
    func readsBackWhatIsOnDisk(clusterSize: Int, codec: String) async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let mib = 1 << 20
        let size = 24 * mib
        var source = makeSource(size: size, seed: UInt64(clusterSize) + 77)
        // MiB 6-7: zeros (a whole region with 4 KiB clusters); MiB 9 repeats MiB 1; MiB 10-17
        // noise that does not compress, written after every cluster of the first 10 MiB is in a
        // write buffer: it fills (and sends to the disk) every buffer holding one of them, however
        // late a worker compressed it.
        for i in (6 * mib)..<(8 * mib) { source[i] = 0 }
        for i in 0..<mib { source[9 * mib + i] = source[mib + i] }
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        for i in (10 * mib)..<(18 * mib) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            source[i] = UInt8(truncatingIfNeeded: x)
        }
        let (enc, dst) = try encoder(in: dir, size: size, clusterSize: clusterSize, codec: codec, memoryLimit: 16 << 20)
        let context = ReadContext()
        var out = [UInt8](repeating: 0xAA, count: 256 << 10)
        func readBack(_ at: Int, wait: Double) throws -> Bool {
            try out.withUnsafeMutableBytes { p in
                try enc.readWritten(at: UInt64(at), count: p.count, into: p.baseAddress!, context: context, wait: wait)
            }
        }
        #expect(try readBack(0, wait: 0) == false, "nothing written yet")
        // One MiB written: its clusters become final while their bytes still sit in a write buffer
        // (not full yet); whatever reads back meanwhile is the source.
        try source.withUnsafeBytes { p in try enc.writeBlocking(at: 0, UnsafeRawBufferPointer(rebasing: p[0..<mib])) }
        let polling = Date()
        while Date().timeIntervalSince(polling) < 0.3 {
            if try readBack(0, wait: 0) { #expect(out.elementsEqual(source[0..<out.count]), "read back before it was on disk") }
        }
        for m in 1..<20 {
            if m == 10 {
                // The encoder's progress events say when the first 10 MiB are placed.
                for await p in enc.progressUpdates(interval: 0.002) where p.done >= UInt64(10 * mib) { break }
                #expect(enc.bytesDone >= UInt64(10 * mib), "the first 10 MiB were placed")
            }
            switch m {
            case 6: try enc.writeZeroesBlocking(at: UInt64(6 * mib), length: UInt64(2 * mib))
            case 7: continue
            case 9: try enc.writeCopy(at: UInt64(9 * mib), from: UInt64(mib), length: UInt64(mib))
            default: try source.withUnsafeBytes { p in try enc.writeBlocking(at: UInt64(m * mib), UnsafeRawBufferPointer(rebasing: p[(m * mib)..<((m + 1) * mib)])) }
            }
        }
        // Never written: no at once, however long it may wait.
        let t0 = Date()
        #expect(try readBack(22 * mib, wait: 10) == false)
        #expect(Date().timeIntervalSince(t0) < 5)
        // The first 10 MiB reach the disk (the noise behind them fills their buffers).
        for at in stride(from: 0, to: 10 * mib, by: out.count) {
            #expect(try readBack(at, wait: 10), "offset \(at)")
            // memcmp: a byte-by-byte Sequence compare is slow in a debug build (10 MiB a case).
            let same = out.withUnsafeBytes { o in source.withUnsafeBytes { s in memcmp(o.baseAddress!, s.baseAddress! + at, o.count) == 0 } }
            #expect(same, "offset \(at)")
        }
        // A read that starts inside a cluster and spans several.
        var odd = [UInt8](repeating: 0, count: 3 * clusterSize + 1000)
        let oddAt = 3 * mib + 777
        let ok = try odd.withUnsafeMutableBytes { p in try enc.readWritten(at: UInt64(oddAt), count: p.count, into: p.baseAddress!, context: context, wait: 10) }
        let same = ok && odd.elementsEqual(source[oddAt..<(oddAt + odd.count)])
        #expect(same, "a read across clusters")
        for m in 20..<24 {
            try source.withUnsafeBytes { p in try enc.writeBlocking(at: UInt64(m * mib), UnsafeRawBufferPointer(rebasing: p[(m * mib)..<((m + 1) * mib)])) }
        }
        _ = try enc.finishBlocking()
        let raw = dir.appendingPathComponent("src.raw")
        try Data(source).write(to: raw)
        #expect(try qemuImg(["check", dst]) == 0)
        #expect(try qemuImg(["compare", "-f", "raw", "-F", "qcow2", raw.path, dst]) == 0)
    }

    /// Over a backing file an unallocated cluster reads the backing file: reading back refuses.
    @Test func readBackRefusesImagesOverABackingFile() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let base = dir.appendingPathComponent("base.raw").path
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: base))
        var options = EncoderOptions(virtualSize: 1 << 20)
        options.backingFile = base
        options.backingFormat = "raw"
        let enc = try Qcow2Encoder(destination: dir.appendingPathComponent("top.qcow2").path, options: options)
        try enc.writeZeroesBlocking(at: 0, length: 1 << 20)
        var out = [UInt8](repeating: 0, count: 4096)
        let ok = try out.withUnsafeMutableBytes { p in try enc.readWritten(at: 0, count: 4096, into: p.baseAddress!, context: ReadContext(), wait: 1) }
        #expect(!ok)
        _ = try enc.finishBlocking()
    }
}

/// Identical chunks stored once: copies share host clusters; refcounts count every reference
/// (qemu-img check stays clean, including the copied flags), and the image reads right.
@Suite(.tags(.e2e)) struct DedupTests {
    @Test(.enabled(if: EncoderTests.haveQemuImg, "qemu-img is the oracle"), arguments: [4096, 65536], ["none", "zstd"])
    func copiesShareHostClusters(clusterSize: Int, codec: String) async throws {
        let t = EncoderTests()
        let dir = try t.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let chunk = 256 << 10
        let chunks = 24
        let size = chunks * chunk
        // Chunk kinds: 0..3 distinct patterns; the image repeats them.
        let patterns = (0..<4).map { k -> [UInt8] in
            if k == 3 { return [UInt8](repeating: 0, count: chunk) }
            return t.makeSource(size: chunk, seed: UInt64(100 + k))
        }
        let noise: [UInt8] = (0..<chunk).map { _ in UInt8.random(in: 0...255) }
        let order = (0..<chunks).map { $0 % 5 == 4 ? 4 : ($0 * 7) % 4 }
        var image = [UInt8]()
        for k in order { image += k == 4 ? noise : patterns[k] }
        let raw = dir.appendingPathComponent("src.raw")
        try Data(image).write(to: raw)
        var options = EncoderOptions(virtualSize: UInt64(size))
        options.clusterSize = clusterSize
        options.compression = codec == "none" ? nil : CompressionSettings(algorithm: .zstd)
        let dst = dir.appendingPathComponent("out.qcow2").path
        let enc = try Qcow2Encoder(destination: dst, options: options)
        var firstAt: [Int: Int] = [:]
        // Copies are sometimes declared before their source is written (deferred in the engine).
        var pendingCopies: [(Int, Int)] = []
        for (i, k) in order.enumerated() {
            if let f = firstAt[k] {
                if i % 3 == 0 {
                    try enc.writeCopy(at: UInt64(i * chunk), from: UInt64(f * chunk), length: UInt64(chunk))
                } else {
                    pendingCopies.append((i, f))
                }
            } else {
                firstAt[k] = i
                try await enc.write(at: UInt64(i * chunk), k == 4 ? noise : patterns[k])
            }
        }
        for (i, f) in pendingCopies { try enc.writeCopy(at: UInt64(i * chunk), from: UInt64(f * chunk), length: UInt64(chunk)) }
        let s = try await enc.finish()
        #expect(s.clustersShared > 0)
        #expect(try t.qemuImg(["check", dst]) == 0)
        #expect(try t.qemuImg(["compare", "-f", "raw", "-F", "qcow2", raw.path, dst]) == 0)
        // Stored once: the image holds about one copy of each distinct chunk.
        let fileSize = try FileManager.default.attributesOfItem(atPath: dst)[.size] as! Int
        #expect(fileSize < 5 * chunk + (1 << 20))
    }
}
