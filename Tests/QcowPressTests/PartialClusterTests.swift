import Foundation
@testable import QcowPress
import Testing

/// A cluster assembled from many small writes in any order (#27: merging the pieces was O(n²) in
/// their number): every byte lands, at a scale where quadratic bookkeeping would show.
@Suite(.tags(.property)) struct PartialClusterTests {
    /// Two 2 MiB clusters: the first in 4096 pieces of 512 bytes, the second in 131072 pieces of
    /// 16 bytes, all in one random order, from four producers at once. The time limit is a hang
    /// guard, far above what this takes: 4096 + 32768 pieces took 56 s when each claim scanned
    /// every earlier one.
    @Test(.timeLimit(.minutes(1))) func aClusterInThousandsOfPiecesInRandomOrder() async throws {
        let dir = URL(fileURLWithPath: "/tmp").appendingPathComponent("qp-pc-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let cs = 2 << 20
        var rng = SplitMix(seed: 27)
        let image = (0..<(2 * cs)).map { _ in UInt8.random(in: 1...255, using: &rng) }
        var pieces: [Range<Int>] = stride(from: 0, to: cs, by: 512).map { $0..<($0 + 512) }
            + stride(from: cs, to: 2 * cs, by: 16).map { $0..<($0 + 16) }
        pieces.shuffle(using: &rng)
        var o = EncoderOptions(virtualSize: UInt64(2 * cs))
        o.clusterSize = cs
        o.compression = CompressionSettings(algorithm: .zstd)
        o.memoryLimit = 64 << 20
        let path = dir.appendingPathComponent("out.qcow2").path
        let enc = try Qcow2Encoder(destination: path, options: o)
        let all = pieces
        try await withThrowingTaskGroup(of: Void.self) { group in
            for p in 0..<4 {
                group.addTask {
                    for k in stride(from: p, to: all.count, by: 4) {
                        try await enc.write(at: UInt64(all[k].lowerBound), image[all[k]])
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(enc.unwrittenRangesOfPartialClusters.isEmpty)
        _ = try await enc.finish()
        let img = try Qcow2Image(path: path)
        var got = [UInt8](repeating: 0, count: 2 * cs)
        try got.withUnsafeMutableBytes { p in try img.read(at: 0, count: 2 * cs, into: p.baseAddress!, context: ReadContext()) }
        #expect(got == image)
    }
}
