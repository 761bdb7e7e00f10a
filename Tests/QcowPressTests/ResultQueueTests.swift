import Foundation
@testable import QcowPress
import Testing

/// Every cluster slot comes back to the pool when an encoder stops, whatever it was doing: a
/// worker's results arriving after the stop, clusters being assembled from partial writes,
/// producers copying into them at that moment (#27). A shared group's pool outlives the encoder,
/// so a slot lost here is lost for every other drive of the restore.
@Suite(.tags(.fast)) struct ResultQueueTests {
    static func tempDir() throws -> URL {
        let url = URL(fileURLWithPath: "/tmp").appendingPathComponent("qp-rq-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// Waits (bounded) until every slot of `pool` is free; true when they all came back.
    static func allSlotsReturn(_ pool: SlotPool, within seconds: Double = 20) -> Bool {
        pool.waitUntilAllFree(within: seconds)
    }

    /// A worker's batch delivered after the writer stopped is refused and stays with the worker
    /// (which gives the slots back); it never sits in a queue nobody reads.
    @Test func resultsDeliveredAfterStopAreHandedBack() {
        let pool = SlotPool(slotSize: 4096, count: 2)
        let q = ResultQueue()
        let s = pool.tryAcquire()!
        _ = q.stop()
        var out = [ResultItem(cluster: 7, slot: s, kind: .raw)]
        q.deliver(&out, codecNanoseconds: 0)
        #expect(out.map(\.cluster) == [7], "the refused batch stays with the worker")
        var items: [ResultItem] = []
        var regions: [Int] = []
        #expect(q.next(into: &items, regionsInto: &regions) == .stopped)
        #expect(q.stop().isEmpty)
    }

    func sharedEncoder(_ g: EncoderGroup, in dir: URL, _ name: String, clusters: Int, codec: CompressionSettings?) throws -> Qcow2Encoder {
        var o = EncoderOptions(virtualSize: UInt64(clusters * g.clusterSize))
        o.clusterSize = g.clusterSize
        o.compression = codec
        o.memoryLimit = g.memoryLimit
        o.group = g
        return try Qcow2Encoder(destination: dir.appendingPathComponent(name).path, options: o)
    }

    /// Clusters being assembled from partial writes hold slots; cancelling the encoder gives them
    /// back to the group's pool.
    @Test func cancelReleasesPartlyFilledClusters() async throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let g = try EncoderGroup(threads: 1, memoryLimit: 64 << 20, clusterSize: 65536)
        defer { g.shutdown() }
        let enc = try sharedEncoder(g, in: dir, "a.qcow2", clusters: 16, codec: nil)
        let piece = [UInt8](repeating: 0xA5, count: 512)
        for c in 0..<3 { try await enc.write(at: UInt64(c * 65536 + 4096), piece) }
        #expect(g.pool.freeCount == g.pool.count - 3)
        enc.cancel()
        #expect(g.pool.freeCount == g.pool.count, "\(g.pool.count - g.pool.freeCount) slots kept by a cancelled encoder")
    }

    /// Encoders of a shared group cancelled while workers compress their clusters and producers
    /// copy pieces into partial clusters: once every producer returned, every slot comes back.
    @Test func cancelDuringWorkReturnsEverySlot() async throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let g = try EncoderGroup(threads: 2, memoryLimit: 48 << 20, clusterSize: 65536,
                                 compression: CompressionSettings(algorithm: .zstd, level: 9), images: 1)
        defer { g.shutdown() }
        var noise = [UInt8](repeating: 0, count: 64 * 65536)
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        for i in 0..<noise.count {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            noise[i] = UInt8(truncatingIfNeeded: x % 7)  // compressible, so compression takes real work
        }
        let bytes = noise
        for round in 0..<6 {
            let enc = try sharedEncoder(g, in: dir, "r\(round).qcow2", clusters: 64, codec: g.compression)
            await withTaskGroup(of: Void.self) { tasks in
                // Whole clusters, handed to the workers.
                tasks.addTask { try? await enc.write(at: 0, bytes[0..<(32 * 65536)]) }
                // Partial clusters in 4 KiB pieces, from two producers.
                for p in 0..<2 {
                    tasks.addTask {
                        for k in stride(from: p, to: 32 * 16, by: 2) {
                            let at = 32 * 65536 + k * 4096
                            do { try await enc.write(at: UInt64(at), bytes[at..<(at + 4096)]) } catch { return }
                        }
                    }
                }
                tasks.addTask {
                    await Task.yield()
                    enc.cancel()
                }
            }
            #expect(Self.allSlotsReturn(g.pool), "round \(round): \(g.pool.count - g.pool.freeCount) of \(g.pool.count) slots never came back")
        }
    }
}
