import DirectIO
import Glibc
import Qcow2Format

/// The writer thread: the single owner of the host stream (packer, write buffers, the ring),
/// the refcounts and the L1 table. It turns worker results into placed bytes and final L2 entries,
/// writes out L2 tables of finished regions, and at the end writes the metadata and the header.
final class StreamSink: @unchecked Sendable {
    let enc: Qcow2Encoder
    let writer: any BufferWriter
    let cs: Int
    let bits: UInt64
    var packer: StreamPacker
    let buffers: [AlignedBuffer]
    var freeBuffers: [Int]
    var current: Int
    /// Refcount of each host cluster. 16 bits: the default refcount width, and more than the
    /// references one host cluster can get from compressed clusters (≤ cluster_size / 8).
    var refcounts: [UInt16] = []
    var l1: [UInt64]
    var processed: UInt64 = 0
    var clustersZero: UInt64 = 0
    var clustersCompressed: UInt64 = 0
    var clustersRaw: UInt64 = 0
    var diskWaitNanoseconds: UInt64 = 0
    let keepZeroFlag: Bool
    /// Who references each cluster placed in the back region of the current buffer, so the last
    /// buffer can be compacted at the end (its gap closed) and the references moved with it.
    enum BackOwner { case data(UInt64), table(Int) }
    var backItems: [(offset: Int, owner: BackOwner)] = []
    /// Copies (dst ← src) waiting for their source cluster's final entry.
    var deferredCopies: [UInt64: [UInt64]] = [:]
    /// Uncompressed host clusters referenced by more than one guest cluster, with every referrer.
    var sharers: [UInt64: [UInt64]] = [:]
    /// Entries in tables already on disk whose copied flag must be cleared at the end.
    var diskFlagClears: [UInt64] = []
    var clustersShared: UInt64 = 0

    init(encoder: Qcow2Encoder, writer: any BufferWriter) {
        enc = encoder
        self.writer = writer
        cs = encoder.clusterSize
        bits = UInt64(encoder.geometry.clusterBits)
        // Host cluster 0 holds the header; the data stream starts right after it.
        packer = StreamPacker(clusterSize: cs, bufferSize: encoder.plan.bufferSize, firstHostOffset: UInt64(cs))
        buffers = (0..<MemoryPlan.bufferCount).map { _ in AlignedBuffer(capacity: encoder.plan.bufferSize) }
        freeBuffers = Array(1..<MemoryPlan.bufferCount)
        current = 0
        l1 = Array(repeating: 0, count: Int(encoder.geometry.l1Entries(forVirtualSize: encoder.options.virtualSize)))
        // With a backing file an unallocated entry means "read the backing file", so zero clusters
        // must say zero explicitly; without one, unallocated already reads as zero (as qemu-img writes).
        keepZeroFlag = encoder.options.backingFile != nil
        refcounts = [1]  // the header cluster
    }

    func run() {
        do throws(QcowPressError) {
            if try loop() { try finalize() }
        } catch {
            enc.fail(error)
        }
    }

    /// Processes results until the input is closed and everything has arrived (returns true), or
    /// the encoder was stopped (returns false).
    func loop() throws(QcowPressError) -> Bool {
        var items: [Qcow2Encoder.ResultItem] = []
        var regions: [Int] = []
        while true {
            let (stop, finished): (Bool, Bool) = enc.resultLock.withLock {
                while enc.results.isEmpty && enc.readyRegions.isEmpty && !enc.writerStop
                    && !(enc.inputClosed && processed == enc.expected) {
                    enc.resultLock.wait()
                }
                swap(&items, &enc.results)
                swap(&regions, &enc.readyRegions)
                return (enc.writerStop, enc.inputClosed && processed + UInt64(items.count) == enc.expected)
            }
            if stop { return false }
            for item in items { try handle(item) }
            processed += UInt64(items.count)
            items.removeAll(keepingCapacity: true)
            for r in regions { try flushRegion(r) }
            regions.removeAll(keepingCapacity: true)
            do {
                freeBuffers += try writer.reap(wait: false)
            } catch {
                throw QcowPressError.from(error)
            }
            if finished {
                // Anything announced after the last result is picked up here.
                let late: [Int] = enc.resultLock.withLock {
                    let r = enc.readyRegions
                    enc.readyRegions = []
                    return r
                }
                for r in late { try flushRegion(r) }
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
        refcounts[i] += 1
    }

    func handle(_ item: Qcow2Encoder.ResultItem) throws(QcowPressError) {
        let entry: UInt64
        switch item.kind {
        case .copy(let src):
            try copyEntry(dst: item.cluster, src: src)
            return
        case .zero:
            clustersZero += 1
            entry = MapMarker.zero
        case .raw:
            let (p, host) = try placeAligned(owner: .data(item.cluster))
            memcpy(p, enc.pool.pointer(item.slot), cs)
            enc.pool.release(item.slot)
            addRef(host)
            clustersRaw += 1
            entry = L2Entry.standard(hostOffset: host, copied: true).rawValue
        case .compressed(let length):
            let (p, host) = try placeCompressed(length)
            memcpy(p, enc.pool.pointer(item.slot), length)
            enc.pool.release(item.slot)
            let d = CompressedDescriptor(hostOffset: host, length: length, clusterBits: Int(bits))
            for c in d.hostClusterRange(clusterBits: Int(bits)) { addRef(c << bits) }
            clustersCompressed += 1
            entry = L2Entry.compressed(d).rawValue
        }
        try setFinal(item.cluster, entry)
    }

    /// Records the final entry of guest cluster `c`, resolves copies waiting for it, and writes
    /// the region's table when this was its last cluster.
    func setFinal(_ c: UInt64, _ entry: UInt64) throws(QcowPressError) {
        let geometry = enc.geometry
        let r = geometry.l1Index(ofGuestCluster: c)
        let complete: Bool = enc.mapLock.withLock {
            guard let t = enc.tables[r] else { return false }
            t.entries[geometry.l2Index(ofGuestCluster: c)] = entry
            t.done += 1
            return t.isComplete
        }
        if let waiting = deferredCopies.removeValue(forKey: c) {
            for d in waiting { try resolveCopy(dst: d, src: c, entry: entry) }
        }
        if complete { try flushRegion(r) }
    }

    func placeAligned(owner: BackOwner) throws(QcowPressError) -> (UnsafeMutableRawPointer, UInt64) {
        while true {
            if let at = packer.placeAligned() {
                if at == packer.back { backItems.append((at, owner)) }
                return (buffers[current].pointer + at, packer.bufferStart + UInt64(at))
            }
            try submitCurrent()
        }
    }

    func placeCompressed(_ length: Int) throws(QcowPressError) -> (UnsafeMutableRawPointer, UInt64) {
        while true {
            if let at = packer.placeCompressed(length: length) {
                return (buffers[current].pointer + at, packer.bufferStart + UInt64(at))
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
            packer.advance()
            backItems.removeAll(keepingCapacity: true)
            if freeBuffers.isEmpty {
                let t0 = monotonicNanoseconds()
                freeBuffers += try writer.reap(wait: true)
                diskWaitNanoseconds += monotonicNanoseconds() - t0
            }
        } catch {
            throw QcowPressError.from(error)
        }
        guard let next = freeBuffers.popLast() else {
            throw .io(IOError(errno: EIO, operation: "write completion", path: enc.destination))
        }
        current = next
    }

    /// Writes the L2 table of region `r` into the stream (skipped when every entry reads as zero).
    func flushRegion(_ r: Int) throws(QcowPressError) {
        guard let t: L2Table = enc.mapLock.withLock({
            guard let t = enc.tables[r] else { return nil }
            enc.tables[r] = nil
            enc.completedRegions.insert(r)
            return t
        }) else { return }
        var any = false
        for i in 0..<t.count {
            var e = t.entries[i]
            if e == MapMarker.pending { e = 0 }  // only after a failure; never in a finished image
            if e == MapMarker.zero && !keepZeroFlag { e = 0 }
            t.entries[i] = e
            if e != 0 { any = true }
        }
        guard any else { return }
        let (p, host) = try placeAligned(owner: .table(r))
        let out = UnsafeMutableRawBufferPointer(start: p, count: cs)
        for i in 0..<t.count { storeBE64(out, i * 8, t.entries[i]) }
        addRef(host)
        l1[r] = L1Entry(l2Offset: host, copied: true).rawValue
    }
}
