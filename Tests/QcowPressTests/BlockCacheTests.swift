import Foundation
import QcowPress
import Synchronization
import Testing

/// `BlockCache` (serve image --cache-size): what it returns equals the image, a cached block is
/// decoded once, the budget is kept by evicting the least recently used block, two readers of one
/// block share one decode, and large requests go straight to the image.
@Suite(.tags(.fast)) struct BlockCacheTests {
    /// A guest image of pattern bytes (byte at offset o is o*7 mod 251) that counts its reads.
    final class CountingImage: GuestImage, @unchecked Sendable {
        let path = "counting"
        let virtualSize: UInt64
        let reads = Atomic<Int>(0)
        init(size: UInt64) { virtualSize = size }
        func isKnownZero(at offset: UInt64, count: Int) throws(QcowPressError) -> Bool { false }
        func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError) {
            reads.add(1, ordering: .relaxed)
            usleep(2000)  // Time is the subject: a slow decode, so concurrent readers of one block overlap.
            let p = into.assumingMemoryBound(to: UInt8.self)
            for i in 0..<count {
                let o = offset + UInt64(i)
                p[i] = o < virtualSize ? UInt8((o &* 7) % 251) : 0
            }
        }
        static func expected(_ offset: UInt64, _ count: Int) -> [UInt8] {
            (0..<count).map { UInt8(((offset + UInt64($0)) &* 7) % 251) }
        }
    }

    func read(_ c: BlockCache, _ img: CountingImage, _ at: UInt64, _ n: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: n)
        try out.withUnsafeMutableBytes { p in
            try c.read(img, blockSize: 65536, at: at, count: n, into: p.baseAddress!, context: ReadContext())
        }
        return out
    }

    @Test func cachedBlocksAreDecodedOnceAndEqualTheImage() throws {
        let img = CountingImage(size: 1 << 20)
        let c = BlockCache(capacity: 4 * 65536)
        // Straddles two blocks.
        #expect(try read(c, img, 65536 - 100, 4096) == CountingImage.expected(65536 - 100, 4096))
        #expect(img.reads.load(ordering: .relaxed) == 2)
        for k in 0..<10 {
            #expect(try read(c, img, 65536 + UInt64(k) * 4096, 4096) == CountingImage.expected(65536 + UInt64(k) * 4096, 4096))
        }
        #expect(img.reads.load(ordering: .relaxed) == 2, "hits decode nothing")
        #expect(c.stats.hits == 10 && c.stats.misses == 2)
    }

    @Test func budgetEvictsLeastRecentlyUsed() throws {
        let img = CountingImage(size: 1 << 20)
        let c = BlockCache(capacity: 3 * 65536)
        for b in 0..<3 { _ = try read(c, img, UInt64(b) << 16, 512) }   // blocks 0, 1, 2
        _ = try read(c, img, 0, 512)                                     // 0 is now the most recent
        _ = try read(c, img, 3 << 16, 512)                               // evicts 1
        #expect(img.reads.load(ordering: .relaxed) == 4)
        _ = try read(c, img, 0, 512)
        _ = try read(c, img, 2 << 16, 512)
        #expect(img.reads.load(ordering: .relaxed) == 4, "0 and 2 stayed")
        #expect(try read(c, img, 1 << 16, 512) == CountingImage.expected(1 << 16, 512))
        #expect(img.reads.load(ordering: .relaxed) == 5, "1 was evicted")
    }

    @Test func concurrentReadersShareOneDecode() throws {
        let img = CountingImage(size: 1 << 20)
        let c = BlockCache(capacity: 1 << 20)
        let bad = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            for b in 0..<16 {
                let at = UInt64(b) << 16 + UInt64(t) * 512
                if (try? read(c, img, at, 512)) != CountingImage.expected(at, 512) { bad.add(1, ordering: .relaxed) }
            }
        }
        #expect(bad.load(ordering: .relaxed) == 0)
        #expect(img.reads.load(ordering: .relaxed) == 16, "each block decoded once")
    }

    @Test func largeRequestsBypassTheCache() throws {
        let img = CountingImage(size: 4 << 20)
        let c = BlockCache(capacity: 1 << 20)
        #expect(try read(c, img, 12345, BlockCache.bypassBytes) == CountingImage.expected(12345, BlockCache.bypassBytes))
        #expect(img.reads.load(ordering: .relaxed) == 1 && c.stats.misses == 0)
    }
}
