import DirectIO
import Qcow2Format

/// What of the image being written can be read back while it is written (live restore): where
/// each completed region's L2 table went and how far the file is on disk. The writer thread
/// publishes; readers (``Qcow2Encoder/readWritten(at:count:into:context:)``) ask. One lock, a leaf.
///
/// Nothing published here ever moves: L2 tables and clusters below ``durableEnd`` stay where they
/// are until the image is finished, and finishing freezes ``durableEnd`` first (the last buffer's
/// compaction moves only clusters above it).
// @unchecked: readers wait on its condition for the durable end (a Mutex has none); every var only inside `lock`.
final class WrittenImage: @unchecked Sendable {
    private let lock = ConditionLock()
    // Guarded by `lock`.
    /// Per region: host offset of its L2 table, 0 while none is written, `noTable` when the
    /// writer found every entry zero and wrote none.
    private var tables: [UInt64]
    private var end: UInt64 = 0
    private var frozen = false
    private static let noTable = UInt64.max
    /// Tables read back from the file: 8 × one cluster (512 KiB with 64 KiB clusters) covers
    /// 4 GiB of guest, more than a client's reads behind the restore front span in the live bench
    /// (nbdcopy's four connections work 128 MiB apart).
    private let cache = L2TableCache(limit: 8)

    init(regions: Int) {
        tables = Array(repeating: 0, count: max(1, regions))
    }

    /// The writer placed region `r`'s table at `host` (on disk once ``durableEnd`` passes it).
    func tableWritten(_ r: Int, at host: UInt64) {
        lock.withLock { tables[r] = host }
    }

    /// The writer wrote no table for region `r`: every entry reads as zero.
    func regionWithoutTable(_ r: Int) {
        lock.withLock { tables[r] = Self.noTable }
    }

    /// Every byte below `end` is on disk (every write below it completed).
    func written(upTo end: UInt64) {
        lock.withLock {
            if !frozen && end > self.end {
                self.end = end
                lock.broadcast()
            }
        }
    }

    /// Stops ``durableEnd`` where it is: the image is being finished.
    func freeze() {
        lock.withLock {
            frozen = true
            lock.broadcast()
        }
    }

    /// Waits until the durable end passes `end`, at most until `deadline` (monotonic
    /// nanoseconds); false when it did not (time is up, or the image is being finished).
    func waitForProgress(beyond end: UInt64, deadline: UInt64) -> Bool {
        lock.withLock {
            while self.end <= end && !frozen {
                let now = monotonicNanoseconds()
                guard now < deadline else { return false }
                _ = lock.wait(seconds: Double(deadline - now) / 1e9)
            }
            return self.end > end
        }
    }

    var durableEnd: UInt64 { lock.withLock { end } }

    /// The entries of clusters [first, first + count) (one region) from its table on disk; nil
    /// when the table is not below `durable` yet. Reads the table once into `buffer` (a cluster +
    /// 8 KiB).
    func entries(_ first: UInt64, count: Int, durable: UInt64, geometry g: ClusterGeometry, file: OutputFile,
                 buffer: AlignedBuffer) throws(QcowPressError) -> [UInt64]? {
        let i0 = g.l2Index(ofGuestCluster: first)
        let cs = g.clusterSize
        let host = lock.withLock { tables[g.l1Index(ofGuestCluster: first)] }
        if host == Self.noTable { return Array(repeating: 0, count: count) }
        guard host != 0, host + UInt64(cs) <= durable else { return nil }
        let t = try cache.table(at: host) { () throws(QcowPressError) -> [UInt64] in
            do throws(IOError) {
                let at = try file.readBlocks(offset: host, length: cs, into: buffer)
                return L2TableCache.decode(UnsafeRawBufferPointer(start: buffer.pointer + at, count: cs))
            } catch {
                throw QcowPressError.from(error)
            }
        }
        return Array(t[i0..<(i0 + count)])
    }
}
