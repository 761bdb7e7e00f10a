import DirectIO
import Glibc
import Qcow2Format
import Synchronization

extension Qcow2Image: BlockStatusReporting {
    /// qcow2_co_block_status through the chain, as `qemu-img map` walks it: normal clusters are
    /// data at their host offset, compressed clusters data without one, zero clusters zero (with
    /// the host offset of a preallocated one), unallocated clusters what the backing file says one
    /// level deeper, or zero and not present at the bottom of the chain and past the backing
    /// file's end.
    public func blockStatus(at offset: UInt64, limit: UInt64) throws(QcowPressError) -> BlockStatus {
        let bits = UInt64(geometry.clusterBits)
        let c = offset >> bits
        let inCluster = offset - (c << bits)
        let clusterEnd = min(limit, (c + 1) << bits)
        let r = geometry.l1Index(ofGuestCluster: c)
        if r >= l1.count || l1[r] == 0 {
            // A run of absent L2 tables is unallocated as a whole.
            var next = r + 1
            while next < l1.count && l1[next] == 0 { next += 1 }
            let end = next >= l1.count ? limit : min(limit, UInt64(next) * geometry.bytesPerL2)
            return try below(at: offset, limit: end)
        }
        let host = dataFile === file ? path : dataFile.path
        switch try state(ofCluster: c) {
        case .unallocated:
            return try below(at: offset, limit: clusterEnd)
        case .zero:
            let h = try entryHostOffset(ofCluster: c)
            return BlockStatus(length: clusterEnd - offset, data: false, zero: true, present: true,
                               offset: h == 0 ? nil : h + inCluster, file: h == 0 ? nil : host)
        case .data(let h):
            return try recurse(BlockStatus(length: clusterEnd - offset, data: true, zero: false, present: true, offset: h + inCluster, file: host))
        case .compressed:
            return BlockStatus(length: clusterEnd - offset, data: true, zero: false, present: true)
        case .subclusters(let h, let bitmap):
            let sub = UInt64(cs / 32)
            let s = inCluster / sub
            let end = min(clusterEnd, (c << bits) + (s + 1) * sub)
            let at = h == 0 ? nil : h + inCluster
            if bitmap & (1 << s) != 0 {
                return try recurse(BlockStatus(length: end - offset, data: true, zero: false, present: true, offset: at, file: host))
            }
            if bitmap & (1 << (32 + s)) != 0 {
                return BlockStatus(length: end - offset, data: false, zero: true, present: true, offset: at, file: at == nil ? nil : host)
            }
            return try below(at: offset, limit: end)
        }
    }

    /// Data at a host offset in an image that looks metadata-preallocated: where the data file has
    /// a hole (or ends), the bytes read as zero too, and the run ends where the file's extent does.
    func recurse(_ s: BlockStatus) throws(QcowPressError) -> BlockStatus {
        guard let at = s.offset, let extents = try Qcow2PreallocationView.of(self).fileData else { return s }
        let under = BlockStatusQuery.fileExtents(extents, file: s.file ?? path, at: at, limit: at + s.length)
        var r = s
        r.length = under.length
        r.zero = under.zero
        return r
    }

    /// The host offset field of cluster `c`'s L2 entry (a preallocated zero cluster has one).
    func entryHostOffset(ofCluster c: UInt64) throws(QcowPressError) -> UInt64 {
        guard let t = try l2Table(geometry.l1Index(ofGuestCluster: c)) else { return 0 }
        let i = geometry.l2Index(ofGuestCluster: c) * (geometry.extendedL2 ? 2 : 1)
        return L2Entry(rawValue: t[i]).hostOffset
    }

    /// What the backing file says for a range this image leaves unallocated, one level deeper;
    /// without a backing file, and past its end, zero and not present (QEMU adds
    /// `BDRV_BLOCK_ZERO` there).
    func below(at offset: UInt64, limit: UInt64) throws(QcowPressError) -> BlockStatus {
        guard let b = backing, offset < b.virtualSize else {
            return BlockStatus(length: limit - offset, data: false, zero: true, present: false)
        }
        var s = try BlockStatusQuery.status(of: b, at: offset, limit: min(limit, b.virtualSize))
        s.depth += 1
        return s
    }
}

/// What QEMU's qcow2 driver decides once per open image for its block status: whether the image
/// looks metadata-preallocated (qcow2_detect_metadata_preallocation: at least
/// max(allocated clusters × 10/9, allocated + 2) clusters with a reference, where the allocated
/// clusters are the file's blocks on disk). Then a data cluster's bytes that are a hole in the
/// file also read as zero (`BDRV_BLOCK_RECURSE`). Kept per image while it lives.
final class Qcow2PreallocationView: Sendable {
    /// The file's data extents (SEEK_DATA), when the image looks preallocated.
    let fileData: [Range<UInt64>]?

    private static let views = Mutex<[ObjectIdentifier: (image: WeakQcow2, view: Qcow2PreallocationView)]>([:])

    init(fileData: [Range<UInt64>]?) { self.fileData = fileData }

    static func of(_ image: Qcow2Image) throws(QcowPressError) -> Qcow2PreallocationView {
        let id = ObjectIdentifier(image)
        if let v = views.withLock({ $0[id] }), v.image.image === image { return v.view }
        let view = Qcow2PreallocationView(fileData: try detect(image) ? image.dataFile.dataRanges() : nil)
        views.withLock { all in
            all = all.filter { $0.value.image.image != nil }
            all[id] = (WeakQcow2(image), view)
        }
        return view
    }

    /// Counts referenced clusters from the refcount blocks, up to the threshold.
    static func detect(_ q: Qcow2Image) throws(QcowPressError) -> Bool {
        let cs = UInt64(q.cs)
        let allocated = (try? FileStatus.of(path: q.path))?.allocated ?? q.fileSize
        let real = allocated / cs
        let threshold = max(real * 10 / 9, real + 2)
        let endCluster = (q.fileSize + cs - 1) / cs
        let tableBytes = Int(min(UInt64(q.header.refcountTableClusters) * cs, q.fileSize))
        let order = UInt64(q.header.refcountOrder)
        let perBlock = (cs * 8) >> order
        let table = AlignedBuffer(capacity: max(tableBytes, 8))
        let block = AlignedBuffer(capacity: Int(cs))
        do { _ = try q.file.read(into: table.pointer, length: tableBytes, offset: q.header.refcountTableOffset) } catch { throw .from(error) }
        var count: UInt64 = 0
        var i = 0
        while i * 8 < tableBytes && UInt64(i) * perBlock < endCluster && count < threshold {
            let at = loadBE64(UnsafeRawBufferPointer(start: table.pointer, count: tableBytes), i * 8) & ~(cs - 1) & ((1 << 56) - 1)
            defer { i += 1 }
            guard at != 0, at + cs <= q.fileSize else { continue }
            do { _ = try q.file.read(into: block.pointer, length: Int(cs), offset: at) } catch { throw .from(error) }
            let bytes = UnsafeRawBufferPointer(start: block.pointer, count: Int(cs))
            var j: UInt64 = 0
            while j < perBlock && UInt64(i) * perBlock + j < endCluster && count < threshold {
                let v: UInt64
                switch order {
                case 0...2:  // packed in bytes, lowest bits first (QEMU's get_refcount_ro0..2)
                    let bitAt = j << order
                    v = UInt64(bytes[Int(bitAt / 8)] >> UInt8(bitAt % 8)) & ((1 << (1 << order)) - 1)
                case 3: v = UInt64(bytes[Int(j)])
                case 4: v = UInt64(loadBE16(bytes, Int(j) * 2))
                case 5: v = UInt64(loadBE32(bytes, Int(j) * 4))
                default: v = loadBE64(bytes, Int(j) * 8)
                }
                if v != 0 { count += 1 }
                j += 1
            }
        }
        return count >= threshold
    }
}

/// A weak reference (the view cache must not keep images open).
final class WeakQcow2: Sendable {
    weak let image: Qcow2Image?
    init(_ image: Qcow2Image) { self.image = image }
}
