import Foundation
import QcowPress
import Testing

/// Reproducible pseudo-random numbers: SplitMix64 from a mixed seed (a failing case is re-run by its seed).
func seededRNG(seed: UInt64) -> SplitMix { SplitMix(seed: seed &* 0x9E37_79B9_7F4A_7C15 &+ 1) }

/// The engine under random mixes shaped like real disks: runs of clusters that are random, zero,
/// partly zero (zero clusters inside, zero sub-cluster ranges), copies of other runs (before or
/// after their source arrives, copies of copies, copies of runs never written), all written in
/// random order by several tasks, in random pieces, over random cluster sizes, codecs and refcount
/// widths. qemu-img judges every image: `check` clean and `compare` equal to the intended bytes.
@Suite(.tags(.property, .e2e), .enabled(if: EncoderTests.haveQemuImg, "needs qemu-img"))
struct EnginePropertyTests {
    enum RunKind { case data, zero, partlyZero, copy(of: Int), unwritten }
    struct Run { var first: Int; var clusters: Int; var kind: RunKind }
    enum Op { case write(at: Int, bytes: Range<Int>), zeroes(at: Int, length: Int), copy(dst: Int, src: Int, length: Int) }

    /// One random case; returns a description for failure messages.
    static func runCase(seed: UInt64) async throws {
        var rng = seededRNG(seed: seed)
        let clusterSize = [512, 4096, 65536, 65536, 2 << 20][Int.random(in: 0..<5, using: &rng)]
        let codec = ["none", "zlib", "zstd"][Int.random(in: 0..<3, using: &rng)]
        // Narrow refcounts (uncompressed only, as qemu-img allows): shared clusters must become
        // second copies instead of overflowing the refcount.
        let refcountOrder = codec == "none" && Bool.random(using: &rng) ? Int.random(in: 0...3, using: &rng) : 4
        let maxClusters = clusterSize >= 2 << 20 ? 12 : 160
        let clusters = Int.random(in: 4...maxClusters, using: &rng)
        // Sometimes a short last cluster (the image size a multiple of 512 only).
        let shortTail = clusterSize > 512 && Bool.random(using: &rng) ? Int.random(in: 1..<(clusterSize / 512), using: &rng) * 512 : 0
        let size = (shortTail > 0 ? clusters - 1 : clusters) * clusterSize + shortTail
        let describe = "seed \(seed): cluster \(clusterSize), \(codec), refcount order \(refcountOrder), \(clusters) clusters, size \(size)"

        // Runs of whole clusters, each of one kind.
        var runs: [Run] = []
        var c = 0
        while c < clusters {
            let n = min(clusters - c, Int.random(in: 1...6, using: &rng))
            let roll = Int.random(in: 0..<10, using: &rng)
            let candidates = runs.indices.filter { runs[$0].clusters == n && !(runs[$0].first + n == clusters && shortTail > 0) }
            var kind: RunKind
            switch roll {
            case 0...2: kind = .data
            case 3: kind = .zero
            case 4...5: kind = .partlyZero
            case 6: kind = .unwritten
            default: kind = candidates.isEmpty ? .data : .copy(of: candidates.randomElement(using: &rng)!)
            }
            // A copy's length must be whole clusters or reach the image's end.
            if case .copy = kind, c + n == clusters && shortTail > 0 { kind = .data }
            runs.append(Run(first: c, clusters: n, kind: kind))
            c += n
        }
        // Copies may also point forward: swap a few sources to later runs of the same length
        // (keeping the graph acyclic by only pointing at non-copy runs).
        for i in runs.indices {
            if case .copy = runs[i].kind, Bool.random(using: &rng) {
                let later = runs.indices.filter { j in
                    j > i && runs[j].clusters == runs[i].clusters && !(runs[j].first + runs[j].clusters == clusters && shortTail > 0)
                        && { if case .copy = runs[j].kind { return false } else { return true } }()
                }
                if let j = later.randomElement(using: &rng) { runs[i].kind = .copy(of: j) }
            }
        }

        // The intended content.
        var image = [UInt8](repeating: 0, count: size)
        func runRange(_ r: Run) -> Range<Int> { (r.first * clusterSize)..<min(size, (r.first + r.clusters) * clusterSize) }
        for r in runs {
            let range = runRange(r)
            switch r.kind {
            case .data:
                for i in range { image[i] = UInt8.random(in: 0...255, using: &rng) }
            case .partlyZero:
                // Per cluster: zero, random, or random with zero holes (text-like, compressible).
                var at = range.lowerBound
                while at < range.upperBound {
                    let end = min(range.upperBound, at + clusterSize)
                    switch Int.random(in: 0..<3, using: &rng) {
                    case 0: break
                    case 1: for i in at..<end { image[i] = UInt8.random(in: 0...255, using: &rng) }
                    default:
                        let a = Int.random(in: at..<end, using: &rng)
                        let b = Int.random(in: a..<end, using: &rng)
                        for i in a..<b { image[i] = UInt8(truncatingIfNeeded: i &* 31 &+ Int(seed)) }
                    }
                    at = end
                }
            case .zero, .unwritten, .copy: break
            }
        }
        // Copies take their source's bytes, following chains (sources resolved first).
        func resolve(_ i: Int, depth: Int = 0) -> Int {
            if case .copy(let j) = runs[i].kind, depth < runs.count { return resolve(j, depth: depth + 1) }
            return i
        }
        for (i, r) in runs.enumerated() {
            if case .copy = r.kind {
                let s = runs[resolve(i)]
                let src = runRange(s)
                image.replaceSubrange(runRange(r), with: image[src])
            }
        }

        // Operations: data in random pieces (crossing cluster edges), zero runs as writeZeroes or
        // as zero bytes, copies as writeCopy.
        var ops: [Op] = []
        for r in runs {
            let range = runRange(r)
            switch r.kind {
            case .unwritten: break
            case .zero where Bool.random(using: &rng):
                ops.append(.zeroes(at: range.lowerBound, length: range.count))
            case .copy(let j):
                ops.append(.copy(dst: range.lowerBound, src: runs[j].first * clusterSize, length: range.count))
            default:
                var at = range.lowerBound
                while at < range.upperBound {
                    let n = min(range.upperBound - at, Int.random(in: 1...(2 * clusterSize), using: &rng))
                    ops.append(.write(at: at, bytes: at..<(at + n)))
                    at += n
                }
            }
        }
        ops.shuffle(using: &rng)

        let dir = try EncoderTests().tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("intended.raw")
        try Data(image).write(to: raw)
        var options = EncoderOptions(virtualSize: UInt64(size))
        options.clusterSize = clusterSize
        options.compression = codec == "none" ? nil : CompressionSettings(algorithm: codec == "zlib" ? .zlib : .zstd)
        options.refcountOrder = refcountOrder
        // Small budgets (2 MiB clusters need ~20 MiB at the least), so producers wait for slots.
        options.memoryLimit = clusterSize >= 2 << 20 ? 40 << 20 : 16 << 20
        options.threads = Int.random(in: 1...3, using: &rng)
        let dst = dir.appendingPathComponent("out.qcow2").path
        let enc = try Qcow2Encoder(destination: dst, options: options)
        let producers = Int.random(in: 1...4, using: &rng)
        let bytes = image
        try await withThrowingTaskGroup(of: Void.self) { group in
            for t in 0..<producers {
                let mine = stride(from: t, to: ops.count, by: producers).map { ops[$0] }
                group.addTask {
                    for op in mine {
                        switch op {
                        case .write(let at, let r): try await enc.write(at: UInt64(at), bytes[r])
                        case .zeroes(let at, let n): try await enc.writeZeroes(at: UInt64(at), length: UInt64(n))
                        case .copy(let d, let s, let n): try enc.writeCopy(at: UInt64(d), from: UInt64(s), length: UInt64(n))
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        _ = try await enc.finish()
        let check = try EncoderTests().qemuImg(["check", dst])
        #expect(check == 0, "qemu-img check: \(describe)")
        let cmp = try EncoderTests().qemuImg(["compare", "-f", "raw", "-F", "qcow2", raw.path, dst])
        #expect(cmp == 0, "qemu-img compare: \(describe)")
    }

    /// 40 seeded cases per run (each names its seed; `QCOWPRESS_PROPERTY_SEED` runs 40 more from
    /// another base, for longer soaks).
    @Test(arguments: 0..<40)
    func randomMixesMakeGoodImages(n: Int) async throws {
        let base = UInt64(ProcessInfo.processInfo.environment["QCOWPRESS_PROPERTY_SEED"] ?? "") ?? 20261130
        try await Self.runCase(seed: base &+ UInt64(n))
    }

    /// Chunks A and B of the reproduction below, made once for its twelve cases (byte by byte
    /// from a seeded generator: seconds in a debug build).
    static let chunksAB: ([UInt8], [UInt8]) = {
        let chunk = 4 << 20
        var rng = seededRNG(seed: 7)
        var a = [UInt8](repeating: 0, count: chunk)
        for i in 0..<(64 << 10) { a[i] = UInt8.random(in: 0...255, using: &rng) }
        let b = (0..<chunk).map { _ in UInt8.random(in: 0...255, using: &rng) }
        return (a, b)
    }()

    /// The reproduction from the field: chunk A (64 KiB of data, then zeros to 4 MiB), chunk B
    /// (4 MiB of data), image A B A with the second A a copy of the first — declared before the
    /// first A's zero clusters are found at intake.
    @Test(arguments: [512, 4096, 65536, 2 << 20], ["none", "zlib", "zstd"])
    func copyOfChunkWithZeroClusters(clusterSize: Int, codec: String) async throws {
        let chunk = 4 << 20
        let (a, b) = Self.chunksAB
        let dir = try EncoderTests().tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("src.raw")
        try Data(a + b + a).write(to: raw)
        var options = EncoderOptions(virtualSize: UInt64(3 * chunk))
        options.clusterSize = clusterSize
        options.compression = codec == "none" ? nil : CompressionSettings(algorithm: codec == "zlib" ? .zlib : .zstd)
        let dst = dir.appendingPathComponent("out.qcow2").path
        let enc = try Qcow2Encoder(destination: dst, options: options)
        try enc.writeCopy(at: UInt64(2 * chunk), from: 0, length: UInt64(chunk))
        try await enc.write(at: UInt64(chunk), b)
        try await enc.write(at: 0, a)
        let s = try await enc.finish()
        #expect(s.clustersShared > 0)
        #expect(try EncoderTests().qemuImg(["check", dst]) == 0)
        #expect(try EncoderTests().qemuImg(["compare", "-f", "raw", "-F", "qcow2", raw.path, dst]) == 0)
    }
}

extension EnginePropertyTests {
    /// With refcount widths of 1, 2 and 4 bits a host cluster cannot take many references: copies
    /// beyond the width's limit become second copies of the data (raw ones read back from the
    /// buffer or the file), never an overflowing refcount.
    @Test(arguments: [0, 1, 2])
    func narrowRefcountsDuplicateInsteadOfOverflowing(order: Int) async throws {
        let cs = 4096
        var rng = seededRNG(seed: UInt64(order))
        let chunk = (0..<(4 * cs)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let copies = 40  // more than 2^4 - 1 references, spread over several write buffers
        let dir = try EncoderTests().tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        var image = chunk
        for _ in 0..<copies { image += chunk }
        // Filler written between copies pushes the source out of the current buffer onto the disk.
        let filler = (0..<(1 << 20)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        image += filler
        let raw = dir.appendingPathComponent("src.raw")
        try Data(image).write(to: raw)
        var options = EncoderOptions(virtualSize: UInt64(image.count))
        options.clusterSize = cs
        options.refcountOrder = order
        options.memoryLimit = 4 << 20
        let dst = dir.appendingPathComponent("out.qcow2").path
        let enc = try Qcow2Encoder(destination: dst, options: options)
        try await enc.write(at: 0, chunk)
        for k in 1...copies {
            try enc.writeCopy(at: UInt64(k * chunk.count), from: 0, length: UInt64(chunk.count))
            if k == copies / 2 { try await enc.write(at: UInt64((copies + 1) * chunk.count), filler) }
        }
        let s = try await enc.finish()
        #expect(s.clustersShared <= UInt64(4 * ((1 << (1 << order)) - 2)))
        #expect(try EncoderTests().qemuImg(["check", dst]) == 0)
        #expect(try EncoderTests().qemuImg(["compare", "-f", "raw", "-F", "qcow2", raw.path, dst]) == 0)
    }
}

extension EnginePropertyTests {
    /// Progress moves only over clusters that reached the output, in guest order: data written at
    /// the end first does not count until everything before it is done.
    @Test(.timeLimit(.minutes(1))) func bytesDoneCountsFinishedPrefixOnly() async throws {
        let dir = try EncoderTests().tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = EncoderOptions(virtualSize: 8 << 20)
        options.clusterSize = 65536
        let enc = try Qcow2Encoder(destination: dir.appendingPathComponent("p.qcow2").path, options: options)
        var rng = seededRNG(seed: 3)
        let half = (0..<(4 << 20)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        // `write` returns once the workers took all but the few clusters the queue holds to keep
        // them busy: most of the second half is placed by then.
        try await enc.write(at: 4 << 20, half)
        #expect(enc.bytesDone == 0, "nothing before offset 4 MiB is written yet")
        try await enc.writeZeroes(at: 0, length: 1 << 20)
        #expect(enc.bytesDone == 1 << 20, "zero clusters at the front count at once")
        try await enc.write(at: 1 << 20, Array(half[0..<(3 << 20)]))
        // At each of the encoder's progress events (its own samples only ever rise), bytesDone
        // itself never goes back, until all 8 MiB are done.
        var done: UInt64 = 0
        for await _ in enc.progressUpdates(interval: 0.002) {
            let d = enc.bytesDone
            #expect(d >= done)
            done = d
            if done >= 8 << 20 { break }
        }
        #expect(done == 8 << 20)
        _ = try await enc.finish()
    }
}
