import DirectIO
import Foundation
import Glibc
import Logging
@testable import QcowPress
import Qcow2Format
import Synchronization
import Testing

/// The seams between the writer thread (`StreamSink`) and the rest of the engine (#27): an
/// error in the middle of a batch of results gives back the slots of the results not handled
/// yet, and a cancel that lands while the finished image is being renamed into place never
/// leaves a finished image behind an encoder that reports "cancelled".
@Suite(.tags(.fast)) struct SinkSeamTests {
    static func tempDir() throws -> URL {
        let url = URL(fileURLWithPath: "/tmp").appendingPathComponent("qp-seam-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// A cancel racing `finish()`: the watcher cancels the moment the image appears at its
    /// destination (the rename is done, the outcome may not be recorded yet). Whatever wins, the
    /// outcome and the destination agree: done and present, or failed and absent.
    @Test(.tags(.faults)) func cancelDuringCommitNeverContradictsTheDestination() async throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let data = [UInt8](repeating: 0x5A, count: 65536)
        var contradictions: [String] = []
        for round in 0..<60 {
            let dest = dir.appendingPathComponent("r\(round).qcow2").path
            var o = EncoderOptions(virtualSize: 1 << 20)
            o.memoryLimit = 32 << 20
            o.threads = 1
            let enc = try Qcow2Encoder(destination: dest, options: o)
            try await enc.write(at: 0, data)
            let stop = Atomic<Bool>(false)
            let cancelled = Atomic<Bool>(false)
            startThread(name: "qp-test-watch") {
                // Waits for the event itself (the name appearing), not for a time.
                while !stop.load(ordering: .acquiring) {
                    if access(dest, F_OK) == 0 {
                        enc.cancel()
                        cancelled.store(true, ordering: .releasing)
                        return
                    }
                }
                cancelled.store(true, ordering: .releasing)
            }
            let outcome: String
            do throws(QcowPressError) {
                _ = try await enc.finish()
                outcome = "done"
            } catch {
                outcome = error.message
            }
            stop.store(true, ordering: .releasing)
            while !cancelled.load(ordering: .acquiring) { await Task.yield() }
            let present = access(dest, F_OK) == 0
            if (outcome == "done") != present {
                contradictions.append("round \(round): \(outcome), image \(present ? "at" : "not at") the destination")
            }
        }
        #expect(contradictions.isEmpty, "\(contradictions)")
    }

    /// A disk that refuses every write.
    final class RefusingWriter: BufferWriter {
        var modeDescription: String { "refusing" }
        var inFlight: Int { 0 }
        func submit(_ buffer: AlignedBuffer, length: Int, offset: UInt64, tag: Int) throws(IOError) {
            throw IOError(errno: EIO, operation: "test write", path: "refusing")
        }
        func reap(wait: Bool) throws(IOError) -> [Int] { [] }
    }

    /// A sink over its own owners, as an encoder makes one, with write buffers of two clusters
    /// and a shared group's pool (which outlives any one image).
    static func sink(in dir: URL, group g: EncoderGroup, writer: any BufferWriter) throws -> StreamSink {
        let cs = g.clusterSize
        let geometry = ClusterGeometry(clusterSize: cs)!
        let size: UInt64 = 64 << 20
        let map = GuestMap(geometry: geometry, guestClusters: geometry.guestClusters(forVirtualSize: size)) { _ in cs }
        let queue = ResultQueue()
        let lifecycle = Lifecycle()
        let target = try OutputTarget(destination: dir.appendingPathComponent("a.qcow2").path, overwrite: false, protecting: [])
        let output = try target.open(direct: false, zeroFirstBytes: cs)
        let ending = EncoderEnding(lifecycle: lifecycle, group: g, writeBufferBytes: 0, map: map, queue: queue,
                                   output: output, logger: Logger(label: "test"), destination: target.path,
                                   spill: SpillFile(clusterSize: cs, destination: target.path))
        let parts = StreamSink.Parts(
            queue: queue, pool: g.pool, map: map, written: WrittenImage(regions: Int(geometry.l1Entries(forVirtualSize: size))),
            output: output, lifecycle: lifecycle, ending: ending,
            image: StreamSink.Image(geometry: geometry, virtualSize: size, refcountOrder: 4, backingFile: nil, backingFormat: nil,
                                    compressionType: .zlib, writeBuffers: (2, 2 * cs)),
            report: StreamSink.Report(destination: target.path, compression: "none", threads: 1, memoryLimit: g.memoryLimit,
                                      startTime: 0, notes: []),
            logger: Logger(label: "test"))
        return StreamSink(parts: parts, writer: writer)
    }

    /// The disk fails while the writer places the third of eight results of one batch: the
    /// five results after it, and the third itself, give their slots back (in a shared group,
    /// a slot kept here is lost to every other drive of the restore).
    @Test(.tags(.faults)) func aFailureInsideABatchGivesBackTheRestOfTheBatch() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let g = try EncoderGroup(threads: 1, memoryLimit: 64 << 20, clusterSize: 65536)
        defer { g.shutdown() }
        let sink = try Self.sink(in: dir, group: g, writer: RefusingWriter())
        try sink.map.reserve(0..<8)
        var batch: [ResultItem] = []
        for c in 0..<8 {
            let slot = try #require(g.pool.tryAcquire())
            memset(g.pool.pointer(slot), 0x5A, g.clusterSize)
            batch.append(ResultItem(cluster: UInt64(c), slot: slot, kind: .raw))
        }
        sink.queue.expect(8)
        sink.queue.deliver(&batch, codecNanoseconds: 0)
        sink.queue.close()
        sink.run()
        #expect(sink.lifecycle.isFailed)
        #expect(g.pool.freeCount == g.pool.count, "\(g.pool.count - g.pool.freeCount) slots kept after the writer failed")
    }
}
