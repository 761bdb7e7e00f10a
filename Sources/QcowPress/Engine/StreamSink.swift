import DirectIO
import Glibc
import Logging
import Qcow2Format

/// The host side of the encoder, owned by its one writer thread (no lock: nothing else touches
/// it): the packer and write buffers, the refcounts, the L1 table, who sits in the back region of
/// the current buffer, and which raw host clusters are shared. It turns worker results into placed
/// bytes and final entries (in the ``GuestMap``), resolves copies, writes L2 tables of finished
/// regions, and at the end writes the metadata and the header.
// @unchecked: its state belongs to the one writer thread it is handed to (no lock; nothing else touches it).
final class StreamSink: @unchecked Sendable {
    let queue: ResultQueue
    let pool: SlotPool
    let map: GuestMap
    let written: WrittenImage
    let output: PendingOutput
    let file: OutputFile
    let lifecycle: Lifecycle
    let ending: EncoderEnding
    let image: Image
    let geometry: ClusterGeometry
    let report: Report
    let logger: Logger
    let writer: any BufferWriter
    let cs: Int
    let bits: UInt64
    var packer: StreamPacker
    let buffers: [AlignedBuffer]
    var freeBuffers: [Int]
    var current: Int
    /// Refcount of each host cluster, never above ``refcountLimit``.
    var refcounts: [UInt16] = []
    /// What the image's refcount width holds (and 16 bits in memory: QEMU's default width).
    let refcountLimit: UInt16
    var l1: [UInt64]
    /// Slots whose bytes were placed in this round of results, given back together after it.
    var placedSlots: [Int32] = []
    var clustersZero: UInt64 = 0
    var clustersCompressed: UInt64 = 0
    var clustersRaw: UInt64 = 0
    var diskWaitNanoseconds: UInt64 = 0
    /// Zero clusters are written as the zero flag (a backing file would show through 0).
    let keepZeroFlag: Bool
    /// Who references each cluster placed in the back region of the current buffer, so the last
    /// buffer can be compacted at the end (its gap closed) and the references moved with it.
    var backItems: [Placement] = []
    /// Uncompressed host clusters referenced by more than one guest cluster, with every referrer.
    var sharers: [UInt64: [UInt64]] = [:]
    /// Entries in tables already on disk whose copied flag must be cleared at the end.
    var diskFlagClears: [UInt64] = []
    var clustersShared: UInt64 = 0
    /// File offset of each buffer being written (by tag): everything below the lowest is on disk.
    var inFlightStarts: [Int: UInt64] = [:]
    /// One cluster for reading back data that is copied rather than shared (with room for the
    /// 4 KiB alignment around it), and one to hold those bytes while they are placed.
    lazy var scratch = AlignedBuffer(capacity: cs + 8192)
    lazy var copyScratch = AlignedBuffer(capacity: cs)

    init(parts: Parts, writer: any BufferWriter) {
        (queue, pool, map, written, output, lifecycle, ending) =
            (parts.queue, parts.pool, parts.map, parts.written, parts.output, parts.lifecycle, parts.ending)
        file = parts.output.file
        (image, report, logger) = (parts.image, parts.report, parts.logger)
        geometry = parts.image.geometry
        self.writer = writer
        cs = geometry.clusterSize
        bits = UInt64(geometry.clusterBits)
        // Host cluster 0 holds the header; the data stream starts right after it.
        let (count, size) = parts.image.writeBuffers
        packer = StreamPacker(clusterSize: cs, bufferSize: size, firstHostOffset: UInt64(cs))
        buffers = (0..<count).map { _ in AlignedBuffer(capacity: size) }
        freeBuffers = Array(1..<count)
        current = 0
        l1 = Array(repeating: 0, count: Int(geometry.l1Entries(forVirtualSize: parts.image.virtualSize)))
        // With a backing file an unallocated entry means "read the backing file", so zero clusters
        // must say zero explicitly; without one, unallocated already reads as zero (as qemu-img writes).
        keepZeroFlag = parts.image.backingFile != nil
        let width = 1 << parts.image.refcountOrder
        refcountLimit = width >= 16 ? UInt16.max : UInt16((1 << width) - 1)
        refcounts = [1]  // the header cluster
    }

    func run() {
        do throws(QcowPressError) {
            if try loop() { try finalize() }
        } catch {
            ending.fail(error, committer: true)
        }
    }

    /// Processes results until the input is closed and everything has arrived (returns true), or
    /// the encoder was stopped (returns false).
    func loop() throws(QcowPressError) -> Bool {
        var items: [ResultItem] = []
        var regions: [Int] = []
        while true {
            let next = queue.next(into: &items, regionsInto: &regions)
            if next == .stopped { return false }
            for (k, item) in items.enumerated() {
                do throws(QcowPressError) { try handle(item) } catch {
                    // The results after it hold their slots still: back to the pool, which a
                    // shared group's other images keep using.
                    for rest in items[(k + 1)...] { if let slot = rest.heldSlot { placedSlots.append(slot) } }
                    pool.release(placedSlots)
                    placedSlots.removeAll()
                    throw error
                }
            }
            // Back in one go: a producer waiting for slots wakes once for the batch.
            pool.release(placedSlots)
            placedSlots.removeAll(keepingCapacity: true)
            items.removeAll(keepingCapacity: true)
            for r in regions { try flushRegion(r) }
            regions.removeAll(keepingCapacity: true)
            do {
                try reapWrites(wait: false)
            } catch {
                throw QcowPressError.from(error)
            }
            if next == .finished {
                // Anything announced after the last result is picked up here.
                for r in queue.takeRegions() { try flushRegion(r) }
                return true
            }
        }
    }

    // MARK: - placing clusters

    @inline(__always)
    func addRef(_ hostOffset: UInt64) {
        let i = Int(hostOffset >> bits)
        if i >= refcounts.count {
            refcounts.append(contentsOf: repeatElement(0, count: max(i + 1 - refcounts.count, refcounts.count / 2)))
        }
        precondition(refcounts[i] < refcountLimit, "refcount of host cluster \(i) at its limit")
        refcounts[i] += 1
    }

    /// True when every host cluster of `range` can take one more reference.
    func canAddRef(_ range: ClosedRange<UInt64>) -> Bool {
        range.allSatisfy { Int($0) >= refcounts.count || refcounts[Int($0)] < refcountLimit }
    }

    func handle(_ item: ResultItem) throws(QcowPressError) {
        let state: ClusterState
        switch item.kind {
        case .copy(let src):
            try copy(dst: item.cluster, src: src)
            return
        case .zero:
            clustersZero += 1
            state = .zero
        case .raw:
            // The slot goes back once its bytes are placed, or when placing them fails.
            let slot = item.slot
            defer { placedSlots.append(slot) }
            let (p, host) = try placeAligned(owner: .data(item.cluster))
            memcpy(p, pool.pointer(slot), cs)
            clustersRaw += 1
            state = .final(L2Entry.standard(hostOffset: host, copied: true).rawValue)
        case .compressed(let length):
            let slot = item.slot
            defer { placedSlots.append(slot) }
            let entry = try placeCompressed(UnsafeRawPointer(pool.pointer(slot)), length)
            clustersCompressed += 1
            state = .final(entry)
        }
        try setFinal(item.cluster, state)
    }

    /// Records the final state of guest cluster `c`, resolves the copies that waited for it (and
    /// copies of those), and writes the tables of regions this completed.
    func setFinal(_ c: UInt64, _ state: ClusterState) throws(QcowPressError) {
        var work = [(c, state)]
        while let (cluster, s) = work.popLast() {
            let f = map.setFinal(cluster, s)
            for (dst, src) in f.copies { work.append((dst, try resolve(copyOf: src, s, into: dst))) }
            for r in f.regions { try flushRegion(r) }
        }
    }

    /// Places one cluster-aligned cluster; `owner` is who will reference it (for compaction).
    func placeAligned(owner: Placement.Owner) throws(QcowPressError) -> (UnsafeMutableRawPointer, UInt64) {
        while true {
            if let at = packer.placeAligned() {
                if at == packer.back { backItems.append(Placement(offset: at, owner: owner)) }
                let host = packer.bufferStart + UInt64(at)
                addRef(host)
                return (buffers[current].pointer + at, host)
            }
            try submitCurrent()
        }
    }

    /// Places `length` compressed bytes and returns their L2 entry (refcounts counted). A host
    /// cluster whose refcount is at its limit is not shared with the next compressed cluster.
    func placeCompressed(_ bytes: UnsafeRawPointer, _ length: Int) throws(QcowPressError) -> UInt64 {
        while true {
            let front = packer.bufferStart + UInt64(packer.front)
            if front % UInt64(cs) != 0 && !canAddRef((front >> bits)...(front >> bits)) {
                if !packer.skipToClusterBoundary() { try submitCurrent() }
                continue
            }
            if let at = packer.placeCompressed(length: length) {
                memcpy(buffers[current].pointer + at, bytes, length)
                let d = CompressedDescriptor(hostOffset: packer.bufferStart + UInt64(at), length: length, clusterBits: Int(bits))
                for c in d.hostClusterRange(clusterBits: Int(bits)) { addRef(c << bits) }
                return L2Entry.compressed(d).rawValue
            }
            if let at = packer.placeCompressedAcrossEnd(length: length) {
                // Head at the end of this buffer, tail at the start of the next (contiguous in the file).
                let head = packer.bufferSize - at
                let host = packer.bufferStart + UInt64(at)
                memcpy(buffers[current].pointer + at, bytes, head)
                try submitCurrent()
                memcpy(buffers[current].pointer, bytes + head, length - head)
                let d = CompressedDescriptor(hostOffset: host, length: length, clusterBits: Int(bits))
                for c in d.hostClusterRange(clusterBits: Int(bits)) { addRef(c << bits) }
                return L2Entry.compressed(d).rawValue
            }
            try submitCurrent()
        }
    }

    /// Sends the full buffer to the disk and takes the next free one (waiting for a completion only
    /// when all are in flight: that wait is the disk being the bottleneck).
    func submitCurrent() throws(QcowPressError) {
        let buf = buffers[current]
        // The gap between the two ends is smaller than one cluster; zero it so output is deterministic.
        buf.zero(from: packer.front, to: packer.back)
        do {
            try writer.submit(buf, length: packer.bufferSize, offset: packer.bufferStart, tag: current)
            inFlightStarts[current] = packer.bufferStart
            packer.advance()
            backItems.removeAll(keepingCapacity: true)
            if freeBuffers.isEmpty {
                let t0 = monotonicNanoseconds()
                try reapWrites(wait: true)
                diskWaitNanoseconds += monotonicNanoseconds() - t0
            }
        } catch {
            throw QcowPressError.from(error)
        }
        guard let next = freeBuffers.popLast() else {
            throw .io(IOError(errno: EIO, operation: "write completion", path: report.destination))
        }
        current = next
    }

    /// Writes the L2 table of region `r` into the stream (skipped when every entry reads as zero).
    func flushRegion(_ r: Int) throws(QcowPressError) {
        guard let t = map.takeTable(r) else { return }
        var any = false
        for i in 0..<t.count where t.diskEntry(i, zeroFlag: keepZeroFlag) != 0 {
            any = true
            break
        }
        guard any else {
            written.regionWithoutTable(r)
            return
        }
        let (p, host) = try placeAligned(owner: .table(r))
        let out = UnsafeMutableRawBufferPointer(start: p, count: cs)
        for i in 0..<t.count { storeBE64(out, i * 8, t.diskEntry(i, zeroFlag: keepZeroFlag)) }
        l1[r] = L1Entry(l2Offset: host, copied: true).rawValue
        written.tableWritten(r, at: host)
    }

    // MARK: - where written bytes are now

    /// Host bytes already placed: a pointer into the current buffer, or (after the writes in flight
    /// are done) a copy read back from the file into `scratch`.
    func placedBytes(at offset: UInt64, count: Int) throws(QcowPressError) -> UnsafeRawPointer {
        if offset >= packer.bufferStart {
            return UnsafeRawPointer(buffers[current].pointer + Int(offset - packer.bufferStart))
        }
        if offset + UInt64(count) > packer.bufferStart {
            // A compressed cluster that runs on into the current buffer: the head from the file,
            // the rest appended from the buffer (scratch holds a cluster plus 8 KiB).
            let head = Int(packer.bufferStart - offset)
            let p = try placedBytes(at: offset, count: head)
            memcpy(UnsafeMutableRawPointer(mutating: p) + head, buffers[current].pointer, count - head)
            return p
        }
        do throws(IOError) {
            try drainWrites()
            return UnsafeRawPointer(scratch.pointer + (try file.readBlocks(offset: offset, length: count, into: scratch)))
        } catch {
            throw QcowPressError.from(error)
        }
    }

    /// Takes back the buffers whose writes finished (waiting for one when `wait`) and tells
    /// readers of the image how far it is on disk.
    func reapWrites(wait: Bool) throws(IOError) {
        let done = try writer.reap(wait: wait)
        for t in done { inFlightStarts[t] = nil }
        freeBuffers += done
        written.written(upTo: inFlightStarts.values.min() ?? packer.bufferStart)
    }

    /// Waits for every write in flight; all buffers but the current one are free afterwards.
    func drainWrites() throws(IOError) {
        try writer.drain()
        freeBuffers = (0..<buffers.count).filter { $0 != current }
        inFlightStarts.removeAll()
        written.written(upTo: packer.bufferStart)
    }

    /// Where the on-disk entry of guest cluster `c` lives, once its region's table was written
    /// (nil when the region had no table: every entry reads as zero).
    enum EntryPlace { case buffer(Int), disk(UInt64) }
    func entryPlace(of c: UInt64) -> EntryPlace? {
        let g = geometry
        let table = L1Entry(rawValue: l1[g.l1Index(ofGuestCluster: c)]).l2Offset
        if table == 0 { return nil }
        let at = table + UInt64(g.l2Index(ofGuestCluster: c) * 8)
        return at >= packer.bufferStart ? .buffer(Int(at - packer.bufferStart)) : .disk(at)
    }

    /// Reads (and with `update`, rewrites) an entry wherever its table is.
    func entry(at place: EntryPlace, update: ((UInt64) -> UInt64)? = nil) throws(QcowPressError) -> UInt64 {
        switch place {
        case .buffer(let o):
            let b = buffers[current].bytes
            let v = loadBE64(UnsafeRawBufferPointer(b), o)
            if let update { storeBE64(b, o, update(v)) }
            return v
        case .disk(let at):
            do {
                try drainWrites()
                return try entryOnDisk(at: at, update: update)
            } catch {
                throw QcowPressError.from(error)
            }
        }
    }
}

/// A cluster placed in the back region of the current buffer, and who references it.
struct Placement: Equatable {
    enum Owner: Equatable { case data(UInt64), table(Int) }
    var offset: Int
    var owner: Owner
}
