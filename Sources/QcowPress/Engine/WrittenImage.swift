import DirectIO
import Qcow2Format

/// What of the image being written can be read back while it is written (live restore): where
/// each completed region's L2 table went and how far the file is on disk. The writer thread
/// publishes; readers (``Qcow2Encoder/readWritten(at:count:into:context:)``) ask. One lock, a leaf.
///
/// Nothing published here ever moves: L2 tables and clusters below ``durableEnd`` stay where they
/// are until the image is finished, and finishing freezes ``durableEnd`` first (the last buffer's
/// compaction moves only clusters above it).
final class WrittenImage: @unchecked Sendable {
    private let lock = ConditionLock()
    // Guarded by `lock`.
    /// Per region: host offset of its L2 table, 0 while none is written, `noTable` when the
    /// writer found every entry zero and wrote none.
    private var tables: [UInt64]
    private var end: UInt64 = 0
    private var frozen = false
    /// Decoded tables read back from the file, most recent last.
    private var cache: [(offset: UInt64, entries: [UInt64])] = []
    private static let noTable = UInt64.max
    /// Tables kept decoded: 8 × one cluster (512 KiB with 64 KiB clusters) covers 4 GiB of guest,
    /// more than a client's reads behind the restore front span in the live bench (nbdcopy's four
    /// connections work 128 MiB apart).
    static let cachedTables = 8

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
    /// when the table is not on disk yet. Reads the table once into `buffer` (a cluster + 8 KiB).
    func entries(_ first: UInt64, count: Int, geometry g: ClusterGeometry, file: OutputFile,
                 buffer: AlignedBuffer) throws(QcowPressError) -> [UInt64]? {
        let r = g.l1Index(ofGuestCluster: first)
        let i0 = g.l2Index(ofGuestCluster: first)
        let cs = g.clusterSize
        let (host, durable, cached): (UInt64, UInt64, [UInt64]?) = lock.withLock {
            let h = tables[r]
            return (h, end, cache.first { $0.offset == h }?.entries)
        }
        if host == Self.noTable { return Array(repeating: 0, count: count) }
        guard host != 0, host + UInt64(cs) <= durable else { return nil }
        if let cached { return Array(cached[i0..<(i0 + count)]) }
        let t: [UInt64]
        do throws(IOError) {
            let at = try file.readBlocks(offset: host, length: cs, into: buffer)
            let b = UnsafeRawBufferPointer(start: buffer.pointer + at, count: cs)
            t = (0..<(cs / 8)).map { loadBE64(b, $0 * 8) }
        } catch {
            throw QcowPressError.from(error)
        }
        lock.withLock {
            if !cache.contains(where: { $0.offset == host }) {
                cache.append((host, t))
                if cache.count > Self.cachedTables { cache.removeFirst() }
            }
        }
        return Array(t[i0..<(i0 + count)])
    }
}
