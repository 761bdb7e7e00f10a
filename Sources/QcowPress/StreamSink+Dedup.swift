import DirectIO
import Glibc
import Qcow2Format

/// Identical data stored once: a guest cluster may be declared a copy of an earlier one, and then
/// points at the same host cluster(s). Compressed entries are shared as they are; an uncompressed
/// host cluster loses its copied flag everywhere once it has two referrers (qcow2: copied means
/// refcount exactly 1). Refcounts count every reference.
extension StreamSink {
    func copyEntry(dst: UInt64, src: UInt64) throws(QcowPressError) {
        guard let e = try currentEntry(of: src) else {
            deferredCopies[src, default: []].append(dst)
            return
        }
        try resolveCopy(dst: dst, src: src, entry: e)
    }

    func resolveCopy(dst: UInt64, src: UInt64, entry e: UInt64) throws(QcowPressError) {
        let newEntry: UInt64
        let l2 = L2Entry(rawValue: e)
        if e == 0 || e == MapMarker.zero || (!l2.isCompressed && l2.hostOffset == 0) {
            newEntry = MapMarker.zero
            clustersZero += 1
        } else if l2.isCompressed {
            newEntry = e
            for c in l2.compressedDescriptor(clusterBits: Int(bits)).hostClusterRange(clusterBits: Int(bits)) {
                try addSharedRef(c << bits)
            }
            clustersShared += 1
        } else {
            let host = l2.hostOffset
            newEntry = host
            try addSharedRef(host)
            if sharers[host] == nil {
                sharers[host] = [src]
                try clearCopiedFlag(of: src)
            }
            sharers[host]!.append(dst)
            clustersShared += 1
        }
        try setFinal(dst, newEntry)
    }

    /// Adds a reference, refusing to go past what a 16-bit refcount holds.
    func addSharedRef(_ host: UInt64) throws(QcowPressError) {
        let i = Int(host >> bits)
        guard refcounts[i] < UInt16.max else {
            throw .misuse("host cluster at \(host) would exceed \(UInt16.max) references")
        }
        refcounts[i] += 1
    }

    /// The final entry of a cluster, or nil while it is still on its way (or never written).
    func currentEntry(of c: UInt64) throws(QcowPressError) -> UInt64? {
        let g = enc.geometry
        let r = g.l1Index(ofGuestCluster: c)
        let i = g.l2Index(ofGuestCluster: c)
        let inMemory: (found: Bool, value: UInt64) = enc.mapLock.withLock {
            if let t = enc.tables[r] { return (true, t.entries[i]) }
            return (false, 0)
        }
        if inMemory.found {
            let e = inMemory.value
            return e == 0 || e == MapMarker.pending ? nil : e
        }
        let completed = enc.mapLock.withLock { enc.completedRegions.contains(r) }
        guard completed else { return nil }
        let table = L1Entry(rawValue: l1[r]).l2Offset
        if table == 0 { return MapMarker.zero }
        let at = table + UInt64(i * 8)
        if at >= packer.bufferStart {
            return loadBE64(UnsafeRawBufferPointer(buffers[current].bytes), Int(at - packer.bufferStart))
        }
        do {
            try writer.drain()
            freeBuffers = Array(Set(freeBuffers + (0..<buffers.count).filter { $0 != current }))
            return try entryOnDisk(at: at)
        } catch {
            throw QcowPressError.from(error)
        }
    }

    func clearCopiedFlag(of c: UInt64) throws(QcowPressError) {
        let g = enc.geometry
        let r = g.l1Index(ofGuestCluster: c)
        let i = g.l2Index(ofGuestCluster: c)
        let done: Bool = enc.mapLock.withLock {
            guard let t = enc.tables[r] else { return false }
            t.entries[i] &= ~L2Entry.copiedFlag
            return true
        }
        if done { return }
        let at = L1Entry(rawValue: l1[r]).l2Offset + UInt64(i * 8)
        if at >= packer.bufferStart {
            let b = buffers[current].bytes
            storeBE64(b, Int(at - packer.bufferStart), loadBE64(UnsafeRawBufferPointer(b), Int(at - packer.bufferStart)) & ~L2Entry.copiedFlag)
        } else {
            diskFlagClears.append(at)
        }
    }

    /// Applies the copied-flag clears recorded for tables already on disk (after everything is written).
    func applyDiskFlagClears() throws(IOError) {
        for at in diskFlagClears {
            try entryOnDisk(at: at) { $0 & ~L2Entry.copiedFlag }
        }
    }
}
