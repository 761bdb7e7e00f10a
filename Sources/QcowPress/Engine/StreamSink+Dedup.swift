import DirectIO
import Glibc
import Qcow2Format

/// Identical data stored once: a guest cluster may be declared a copy of another, and then points
/// at the same host cluster(s). Compressed entries are shared as they are; an uncompressed host
/// cluster loses its copied flag everywhere once it has two referrers (qcow2: copied means
/// refcount exactly 1). Refcounts count every reference and never pass what the image's refcount
/// width holds: a copy that would, becomes a second copy of the data.
extension StreamSink {
    /// A copy dst ← src: resolved now when src is final, or when it becomes final (its state is
    /// then handed to ``setFinal(_:_:)``'s worklist).
    func copy(dst: UInt64, src: UInt64) throws(QcowPressError) {
        switch map.source(src, for: dst) {
        case .waiting:
            return
        case .known(let s):
            try setFinal(dst, try resolve(copyOf: src, s, into: dst))
        case .written:
            try setFinal(dst, try resolve(copyOf: src, try writtenState(of: src), into: dst))
        }
    }

    /// The state of a cluster whose region's table was already written.
    func writtenState(of c: UInt64) throws(QcowPressError) -> ClusterState {
        guard let place = entryPlace(of: c) else { return try unwritten(c) }
        let e = try entry(at: place)
        if e == 0 { return try unwritten(c) }
        let l2 = L2Entry(rawValue: e)
        if !l2.isCompressed && (e & L2Entry.zeroFlag != 0 || l2.hostOffset == 0) { return .zero }
        return .final(e)
    }

    /// A source that was never written reads as zero; over a backing file it would read the backing
    /// file's bytes at the source's offset, which a copy cannot express.
    func unwritten(_ src: UInt64) throws(QcowPressError) -> ClusterState {
        if keepZeroFlag { throw .misuse("copy from guest cluster \(src), which was never written (it would read the backing file)") }
        return .zero
    }

    /// The state a copy of `src` (in state `s`) gets: zero, the same host cluster(s) with one more
    /// reference, or — when a refcount is at its limit — a fresh copy of the bytes.
    func resolve(copyOf src: UInt64, _ s: ClusterState, into dst: UInt64) throws(QcowPressError) -> ClusterState {
        guard case .final(let e) = s else {
            clustersZero += 1
            return .zero
        }
        let l2 = L2Entry(rawValue: e)
        if l2.isCompressed {
            let d = l2.compressedDescriptor(clusterBits: Int(bits))
            let hosts = d.hostClusterRange(clusterBits: Int(bits))
            guard canAddRef(hosts) else {
                // The descriptor's read length covers the whole stream (and at most 511 bytes more,
                // which QEMU's and our decoders ignore once the cluster is complete).
                let n = min(d.readLength, cs - 1)
                // Copied out first: placing may submit the buffer the bytes are in.
                memcpy(copyScratch.pointer, try placedBytes(at: d.hostOffset, count: n), n)
                return .final(try placeCompressed(UnsafeRawPointer(copyScratch.pointer), n))
            }
            for c in hosts { addRef(c << bits) }
            clustersShared += 1
            return s
        }
        let host = l2.hostOffset
        guard canAddRef((host >> bits)...(host >> bits)) else {
            memcpy(copyScratch.pointer, try placedBytes(at: host, count: cs), cs)
            let (p, at) = try placeAligned(owner: .data(dst))
            memcpy(p, copyScratch.pointer, cs)
            return .final(L2Entry.standard(hostOffset: at, copied: true).rawValue)
        }
        addRef(host)
        if sharers[host] == nil {
            sharers[host] = [src]
            try clearCopiedFlag(of: src)
        }
        sharers[host]!.append(dst)
        clustersShared += 1
        return .final(host)  // shared: no copied flag
    }

    func clearCopiedFlag(of c: UInt64) throws(QcowPressError) {
        if map.clearCopiedInMemory(c) { return }
        guard let place = entryPlace(of: c) else { return }
        switch place {
        case .buffer: _ = try entry(at: place) { $0 & ~L2Entry.copiedFlag }
        case .disk(let at): diskFlagClears.append(at)
        }
    }

    /// Applies the copied-flag clears recorded for tables already on disk (after everything is written).
    func applyDiskFlagClears() throws(IOError) {
        for at in diskFlagClears {
            try entryOnDisk(at: at) { $0 & ~L2Entry.copiedFlag }
        }
    }
}
