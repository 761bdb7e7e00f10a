import BackupSources
import Foundation
@testable import QcowPress
import Synchronization
import Testing

/// The chunk cache's byte count (what it evicts by) is the sum of the chunks it holds, after any
/// mix of loads, hits, pinned bodies and evictions from several threads (#27: `used` was counted
/// twice on one path).
@Suite(.tags(.fast, .pbs)) struct PBSChunkCacheAccountingTests {
    /// Plain (uncompressed, unencrypted) blobs in memory, keyed by digest.
    struct MemoryStore: PBSChunkStore {
        let blobs: [ArraySlice<UInt8>: [UInt8]]
        func location(of digest: ArraySlice<UInt8>) -> String { "memory:\(digest.count)" }
        func fetch(_ digest: ArraySlice<UInt8>, into buffer: inout [UInt8], what: String) throws(SourceError) -> Int {
            guard let b = blobs[digest] else { throw SourceError(.damaged, path: "memory", "\(what): no such chunk") }
            if buffer.count < b.count { buffer = [UInt8](repeating: 0, count: b.count) }
            b.withUnsafeBytes { src in buffer.withUnsafeMutableBytes { $0.copyMemory(from: src) } }
            return b.count
        }
        var isRemote: Bool { false }

        static func blob(_ payload: [UInt8]) -> [UInt8] {
            let magic = PBSBlob.magics.first { $0.kind == .plain }!.magic
            let crc = payload.withUnsafeBytes { PBSBlob.crc32($0) }
            return withUnsafeBytes(of: magic.bigEndian, Array.init) + withUnsafeBytes(of: crc.littleEndian, Array.init) + payload
        }
    }

    /// `count` chunks of different lengths (4 to 64 KiB), with their digests.
    static func chunks(_ count: Int) -> (PBSChunkReader, [(digest: ArraySlice<UInt8>, length: Int)]) {
        var blobs: [ArraySlice<UInt8>: [UInt8]] = [:]
        var list: [(ArraySlice<UInt8>, Int)] = []
        let probe = PBSChunkReader(store: MemoryStore(blobs: [:]), key: nil)
        for i in 0..<count {
            let length = 4096 * (1 + (i * 7) % 16)
            let payload = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
            let d = ArraySlice(payload.withUnsafeBytes { probe.digest(of: $0) })
            blobs[d] = MemoryStore.blob(payload)
            list.append((d, length))
        }
        return (PBSChunkReader(store: MemoryStore(blobs: blobs), key: nil), list)
    }

    @Test func usedBytesAreTheHeldChunks() throws {
        let (reader, list) = Self.chunks(40)
        // Room for a handful of chunks: most loads evict.
        let cache = PBSChunkCache(reader: reader, capacity: 256 << 10, indexes: [])
        var rng = SystemRandomNumberGenerator()
        for step in 0..<400 {
            let (d, n) = list[Int.random(in: 0..<list.count, using: &rng)]
            switch step % 3 {
            case 0: _ = try cache.chunk(d, length: n, what: "chunk")
            case 1: _ = try cache.withChunk(d, length: n, what: "chunk") { $0.count }
            default: _ = cache.cachedChunk(d, length: n)
            }
            let a = cache.accounting
            #expect(a.used == a.held, "step \(step): counts \(a.used) bytes, holds \(a.held)")
            if a.used != a.held { return }
        }
    }

    /// Four threads loading, pinning (bodies that run while others evict) and hitting at once.
    @Test func usedBytesAreTheHeldChunksUnderConcurrency() throws {
        let (reader, list) = Self.chunks(24)
        let cache = PBSChunkCache(reader: reader, capacity: 192 << 10, indexes: [])
        let errors = Mutex<[String]>([])
        let done = DispatchSemaphore(value: 0)
        for t in 0..<4 {
            Thread {
                defer { done.signal() }
                var rng = SystemRandomNumberGenerator()
                for step in 0..<300 {
                    let (d, n) = list[Int.random(in: 0..<list.count, using: &rng)]
                    do throws(QcowPressError) {
                        if (step + t) % 2 == 0 {
                            _ = try cache.withChunk(d, length: n, what: "chunk") { p in p.reduce(0) { $0 &+ Int($1) } }
                        } else {
                            _ = try cache.chunk(d, length: n, what: "chunk")
                        }
                    } catch {
                        errors.withLock { $0.append(error.message) }
                        return
                    }
                }
            }.start()
        }
        for _ in 0..<4 { done.wait() }
        #expect(errors.withLock { $0 }.isEmpty)
        let a = cache.accounting
        #expect(a.used == a.held, "counts \(a.used) bytes, holds \(a.held)")
        #expect(a.used <= cache.capacity, "nothing pinned any more: within capacity")
    }
}
