import DirectIO
import Glibc
import Qcow2Format

extension Qcow2Encoder {
    /// Copies `bytes` into the image at guest offset `offset`. Safe to call from many tasks at once;
    /// suspends (without blocking a thread) while the memory budget is used up. The memory must stay
    /// valid until the call returns.
    public func write(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) async throws(QcowPressError) {
        try checkRange(offset, bytes.count)
        var cursor = IntakeCursor()
        while try intakeStep(offset: offset, bytes: bytes, cursor: &cursor) {
            guard let s = await pool.acquire() else { try failIfStopped() }
            cursor.spares = [s]
        }
        finishIntake(&cursor, count: bytes.count)
    }

    /// Copies `bytes` into the image at `offset` (see ``write(at:_:)-(UInt64,UnsafeRawBufferPointer)``).
    public func write(at offset: UInt64, _ bytes: [UInt8]) async throws(QcowPressError) {
        try await write(at: offset, bytes[...])
    }

    /// Copies `bytes` into the image at `offset`.
    public func write(at offset: UInt64, _ bytes: ArraySlice<UInt8>) async throws(QcowPressError) {
        try checkRange(offset, bytes.count)
        var cursor = IntakeCursor()
        func step() throws(QcowPressError) -> Bool {
            try bytes.withUnsafeBytes { p in
                Result { () throws(QcowPressError) -> Bool in try intakeStep(offset: offset, bytes: p, cursor: &cursor) }
            }.get()
        }
        while try step() {
            guard let s = await pool.acquire() else { try failIfStopped() }
            cursor.spares = [s]
        }
        finishIntake(&cursor, count: bytes.count)
    }

    /// The same as ``write(at:_:)-(UInt64,UnsafeRawBufferPointer)`` for callers on their own OS
    /// threads: blocks while the budget is used up.
    public func writeBlocking(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws(QcowPressError) {
        try checkRange(offset, bytes.count)
        var cursor = IntakeCursor()
        while try intakeStep(offset: offset, bytes: bytes, cursor: &cursor) {
            // As many slots as are free (up to what the rest of the write may need), in one wait.
            let left = (bytes.count - cursor.pos + clusterSize - 1) / clusterSize + 1
            cursor.spares = pool.acquireBlocking(upTo: left)
            if cursor.spares.isEmpty { try failIfStopped() }
        }
        finishIntake(&cursor, count: bytes.count)
    }

    /// Whole clusters read straight into cluster slots, with no copy through a reader's buffer:
    /// `read(at, buffers)` fills the buffers it is given (one per cluster, in guest order, each
    /// the cluster's guest bytes) from guest offset `at`; it is called once per round of slots. `offset` must be cluster-aligned and `count` cover
    /// whole clusters or reach the end of the image. For producers on their own OS threads: blocks
    /// while the budget is used up.
    func fillBlocking(at offset: UInt64, count: Int,
                      read: (UInt64, [UnsafeMutableRawBufferPointer]) throws(QcowPressError) -> Void) throws(QcowPressError) {
        try checkRange(offset, count)
        let cs = UInt64(clusterSize)
        let end = offset + UInt64(count)
        guard offset % cs == 0, end % cs == 0 || end == options.virtualSize else {
            throw .misuse("fillBlocking needs whole clusters")
        }
        try lifecycle.checkOpen()
        // At most 64 slots (4 MiB of 64 KiB clusters: one O_DIRECT request as large as the copy
        // loop's chunk) and an eighth of the pool per round; fewer when fewer are free (a round
        // never waits for a batch to gather: measured here, waiting for 64 free slots at once made
        // fast deflate 12 % slower, and 16-slot rounds made uncompressed reads 35 % slower).
        let perRound = max(1, min(64, pool.count / 8))
        var c = offset / cs
        let last = (end + cs - 1) / cs
        var zero: UInt64 = 0
        var batch: [WorkItem] = []
        while c < last {
            let slots = pool.acquireBlocking(upTo: Int(min(UInt64(perRound), last - c)))
            if slots.isEmpty { try failIfStopped() }
            let k = slots.count
            let buffers = slots.enumerated().map { j, s in
                UnsafeMutableRawBufferPointer(start: pool.pointer(s), count: validBytes(c + UInt64(j)))
            }
            var next = 0
            do throws(QcowPressError) {
                try read(c * cs, buffers)
                for (j, s) in slots.enumerated() {
                    next = j + 1
                    let cluster = c + UInt64(j)
                    let b = buffers[j]
                    if isAllZero(b.baseAddress!, b.count) {
                        pool.release(s)
                        queue.post(try map.markZero(cluster, cluster + 1))
                        zero += 1
                        continue
                    }
                    try queueFull(cluster, slot: s, filled: b.count, into: &batch)
                    if batch.count >= Self.batchSize { flush(&batch) }
                }
            } catch {
                for s in slots[next...] { pool.release(s) }
                flush(&batch)
                throw error
            }
            flush(&batch)
            c += UInt64(k)
        }
        queue.count(bytes: UInt64(count), zeroClusters: zero)
    }

    /// Queues whole cluster `c`, known not to be all zero, whose first `filled` guest bytes are in
    /// `slot` (the rest of the slot is zeroed): claims its entry, giving the slot back if that fails.
    func queueFull(_ c: UInt64, slot: Int32, filled: Int, into batch: inout [WorkItem]) throws(QcowPressError) {
        do throws(QcowPressError) { try map.reserve(c) } catch {
            pool.release(slot)
            throw error
        }
        if filled < clusterSize { memset(pool.pointer(slot) + filled, 0, clusterSize - filled) }
        batch.append(WorkItem(cluster: c, slot: slot, checkedNonZero: true))
    }

    /// Progress of one write call through its clusters.
    struct IntakeCursor {
        var pos = 0
        var batch: [WorkItem] = []
        /// Slots acquired (by waiting) for the next clusters that need one.
        var spares: [Int32] = []
        /// Whole clusters found zero so far (counted once, at the end of the call).
        var zeroClusters: UInt64 = 0
        /// A spilled cluster this call completed, waiting for a slot to be read back into.
        var readback: (cluster: UInt64, region: Int32)? = nil
    }

    /// Takes clusters from `cursor.pos` on, using only slots free right now (or the spares).
    /// Returns true when it stopped because it needs a slot: the caller waits for one and calls
    /// again. Nothing is reserved for a cluster until its slot is in hand, so a retry is clean.
    func intakeStep(offset: UInt64, bytes: UnsafeRawBufferPointer, cursor: inout IntakeCursor) throws(QcowPressError) -> Bool {
        var c = (offset + UInt64(cursor.pos)) >> UInt64(geometry.clusterBits)
        do throws(QcowPressError) {
            try lifecycle.checkOpen()
            if try !readBackCompleted(&cursor) { return true }
            while cursor.pos < bytes.count {
                let (a, b, full) = span(cluster: c, offset: offset + UInt64(cursor.pos), remaining: bytes.count - cursor.pos)
                let src = bytes.baseAddress! + cursor.pos
                if full && isAllZero(src, b - a) {
                    queue.post(try map.markZero(c, c + 1))
                    cursor.zeroClusters += 1
                } else if full {
                    guard let slot = takeSlot(&cursor) else { return true }
                    memcpy(pool.pointer(slot), src, b - a)
                    try queueFull(c, slot: slot, filled: b - a, into: &cursor.batch)
                } else if try !intakePartial(c, a..<b, src, &cursor) {
                    return true
                }
                if cursor.batch.count >= Self.batchSize { flush(&cursor.batch) }
                cursor.pos += b - a
                c += 1
                if try !readBackCompleted(&cursor) { return true }
            }
        } catch {
            flush(&cursor.batch)
            pool.release(cursor.spares)
            cursor.spares = []
            // The encoder's own failure, the first one, rather than what stopping it caused here.
            throw lifecycle.failure ?? error
        }
        return false
    }

    /// A spare slot, or one free right now; nil after handing queued work to the workers (so
    /// the caller's wait can be satisfied by them).
    @inline(__always)
    func takeSlot(_ cursor: inout IntakeCursor) -> Int32? {
        if let s = cursor.spares.popLast() { return s }
        if let s = pool.tryAcquire() { return s }
        flush(&cursor.batch)
        return nil
    }

    func finishIntake(_ cursor: inout IntakeCursor, count: Int) {
        flush(&cursor.batch)
        pool.release(cursor.spares)
        cursor.spares = []
        queue.count(bytes: UInt64(count), zeroClusters: cursor.zeroClusters)
    }

    /// Throws the encoder's failure (or `.cancelled`): called when the engine stopped under a
    /// producer.
    func failIfStopped() throws(QcowPressError) -> Never {
        try lifecycle.checkOpen()
        throw .cancelled
    }

    /// The guest byte ranges not written so far inside clusters that are partly written, in guest
    /// order. At ``finish()`` those bytes read as zero; a caller writing over a backing file can
    /// write them from the backing file first (so they keep reading what it reads). Call it when
    /// no write is in flight.
    public var unwrittenRangesOfPartialClusters: [Range<UInt64>] { map.partialGaps() }

    /// Declares `length` bytes at `offset` to be zero: no data is copied, compressed or written.
    /// Only whole clusters inside the range are marked; the partial ends are written as zero bytes.
    public func writeZeroes(at offset: UInt64, length: UInt64) async throws(QcowPressError) {
        let (head, tail) = try zeroWholeClusters(at: offset, length: length)
        for r in [head, tail] where !r.isEmpty {
            try await write(at: r.lowerBound, UnsafeRawBufferPointer(rebasing: zeroBytes[0..<Int(r.count)]))
        }
    }

    /// Blocking form of ``writeZeroes(at:length:)``.
    public func writeZeroesBlocking(at offset: UInt64, length: UInt64) throws(QcowPressError) {
        let (head, tail) = try zeroWholeClusters(at: offset, length: length)
        for r in [head, tail] where !r.isEmpty {
            try writeBlocking(at: r.lowerBound, UnsafeRawBufferPointer(rebasing: zeroBytes[0..<Int(r.count)]))
        }
    }

    // MARK: - internals

    /// Zeros for the unaligned ends of a zero range (each shorter than two clusters ≤ 4 MiB).
    /// calloc'd once and only ever read, so its pages stay the kernel's shared zero page.
    nonisolated(unsafe) static let zeroBytesStorage = UnsafeRawBufferPointer(start: calloc(1, 4 << 20), count: 4 << 20)
    var zeroBytes: UnsafeRawBufferPointer { Self.zeroBytesStorage }

    /// Clusters handed to the workers at once: amortises the lock and wake-up (~64 KiB × 8 = 512 KiB
    /// of work per hand-over at the default cluster size), small enough to keep both cores fed.
    static let batchSize = 8

    func checkRange(_ offset: UInt64, _ count: Int) throws(QcowPressError) {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        if overflow || end > options.virtualSize {
            throw .misuse("write of \(count) bytes at offset \(offset) is beyond the virtual size \(options.virtualSize)")
        }
    }

    /// The part of cluster `c` a write starting at guest `offset` covers: [a, b) inside the cluster,
    /// and whether it covers every valid byte of it.
    @inline(__always)
    func span(cluster c: UInt64, offset: UInt64, remaining: Int) -> (Int, Int, Bool) {
        let a = Int(offset - (c << UInt64(geometry.clusterBits)))
        let valid = validBytes(c)
        let b = min(valid, a + remaining)
        return (a, b, a == 0 && b == valid)
    }

    /// Declares that the `length` bytes at `destination` are identical to the bytes written at
    /// `source` (earlier or still in flight): the destination's clusters point at the same host
    /// clusters, and nothing is copied, compressed or written. Both offsets must be cluster-aligned
    /// and `length` a multiple of the cluster size (or reach the end of the image).
    public func writeCopy(at destination: UInt64, from source: UInt64, length: UInt64) throws(QcowPressError) {
        let cs = UInt64(clusterSize)
        guard destination % cs == 0, source % cs == 0, length > 0 else {
            throw .misuse("writeCopy needs cluster-aligned offsets (cluster size \(cs))")
        }
        try checkRange(destination, Int(length))
        try checkRange(source, Int(length))
        guard length % cs == 0 || destination + length == options.virtualSize else {
            throw .misuse("writeCopy length \(length) is not a multiple of the cluster size")
        }
        let n = (length + cs - 1) / cs
        let d0 = destination / cs
        let s0 = source / cs
        if d0 < s0 + n && s0 < d0 + n { throw .misuse("writeCopy ranges overlap") }
        try lifecycle.checkOpen()
        // Every destination cluster claimed in one step, or none (a reader never sees half).
        try map.reserve(d0..<(d0 + n))
        let items = (0..<n).map { k in ResultItem(cluster: d0 + k, slot: nil, kind: .copy(from: s0 + k)) }
        queue.post(Finalized(), copies: items)
        queue.count(bytes: length)
    }

    /// Marks the whole clusters of [offset, offset+length) zero; returns the unaligned head and tail.
    func zeroWholeClusters(at offset: UInt64, length: UInt64) throws(QcowPressError) -> (Range<UInt64>, Range<UInt64>) {
        try checkRange(offset, 0)
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > options.virtualSize {
            throw .misuse("zero range of \(length) bytes at offset \(offset) is beyond the virtual size \(options.virtualSize)")
        }
        let cs = UInt64(clusterSize)
        let first = (offset + cs - 1) / cs
        // The image's last cluster counts as whole when the range reaches the virtual size.
        let lastEnd = end == options.virtualSize ? guestClusters : end / cs
        if first >= lastEnd { return (offset..<end, end..<end) }
        let head = offset..<min(end, first * cs)
        let tail = min(end, max(lastEnd * cs, head.upperBound))..<end
        try lifecycle.checkOpen()
        queue.post(try map.markZero(first, lastEnd))
        queue.count(bytes: tail.lowerBound - head.upperBound, zeroClusters: lastEnd - first)
        return (head, tail)
    }

    /// Hands a batch of complete clusters to the workers.
    func flush(_ batch: inout [WorkItem]) {
        guard !batch.isEmpty else { return }
        queue.expect(batch.count)
        group.submit(self, batch)
        batch.removeAll(keepingCapacity: true)
    }
}
