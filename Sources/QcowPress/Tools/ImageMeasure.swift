import ClusterCompression
import DirectIO

/// What `qemu-img measure` reports for a qcow2 (or raw) destination, plus QcowPress's estimate of
/// a compressed conversion.
public struct ImageMeasurement: Equatable, Sendable {
    /// Bytes the destination needs for the input's data and its metadata.
    public var required: UInt64
    /// Bytes the destination needs with every cluster allocated.
    public var fullyAllocated: UInt64
    /// qemu-img's `bitmaps` (persistent dirty bitmaps of a qcow2 v3 input; QcowPress copies none):
    /// nil when qemu-img leaves the key out.
    public var bitmaps: UInt64?
    /// Estimated bytes of `convert -c` with the same options (`measure -c`).
    public var compressed: UInt64?
    /// The estimate's stated relative error (0.05: within 5 %, at 95 % confidence).
    public var compressedError: Double?
}

/// The qcow2 destination's creation options that change a measurement (`-o`).
public struct MeasureOptions: Sendable, Equatable {
    public var clusterSize = 65536
    /// log2 of refcount_bits (4: 16-bit refcounts, the default).
    public var refcountOrder = 4
    /// extended_l2=on: 16-byte L2 entries.
    public var extendedL2 = false
    /// preallocation=full or falloc: every data cluster counts as required.
    public var fullPreallocation = false
    /// backing_file set: qemu-img counts every cluster as required (it cannot know what the
    /// backing file shares).
    public var hasBackingFile = false
    /// The codec and level of the compressed estimate.
    public var compression = CompressionSettings(algorithm: .zlib)
    public init() {}
}

/// `qemu-img measure`, computed as QEMU's qcow2_measure and raw_measure compute it.
public enum ImageMeasure {
    /// QCOW_MAX_L1_SIZE: 32 MiB of L1 table.
    static let maxL1Bytes: UInt64 = 32 << 20

    /// A new, empty qcow2 image of `size` bytes (`--size`).
    public static func qcow2(size: UInt64, options o: MeasureOptions) throws(QcowPressError) -> ImageMeasurement {
        let cs = UInt64(o.clusterSize)
        let virtual = roundUp(size, cs)
        let l2e: UInt64 = o.extendedL2 ? 16 : 8
        let l2Tables = (virtual / cs + cs / l2e - 1) / (cs / l2e)
        if l2Tables * 8 > maxL1Bytes {
            throw .invalidArgument("The image size is too large (try using a larger cluster size)")
        }
        let full = preallocSize(virtual, o)
        let required = o.fullPreallocation ? virtual : 0
        return ImageMeasurement(required: full - virtual + required, fullyAllocated: full)
    }

    /// A qcow2 conversion of `image`: the clusters its block status calls data (zero runs skipped),
    /// as qcow2_measure counts them, and the metadata of a fully allocated image. `bitmaps` is
    /// what qemu-img prints for the input (0 for a qcow2 v3 input without bitmaps, nil otherwise).
    public static func qcow2(image: any GuestImage, options o: MeasureOptions, bitmaps: UInt64?) throws(QcowPressError) -> ImageMeasurement {
        let cs = UInt64(o.clusterSize)
        let ssize = image.virtualSize
        let virtual = roundUp(ssize, cs)
        if virtual > maxVirtualSize { throw .invalidArgument("The image size is too large (\(ssize) bytes)") }
        var required: UInt64 = 0
        if o.hasBackingFile || o.fullPreallocation {
            required = virtual
        } else {
            try forEachDataRun(image, clusterSize: cs) { (offset, pnum) in required += offset % cs + pnum }
        }
        let full = preallocSize(virtual, o)
        return ImageMeasurement(required: full - virtual + required, fullyAllocated: full, bitmaps: bitmaps)
    }

    /// raw_measure: the input's virtual size (or `size` rounded up to 512), both figures.
    public static func raw(size: UInt64) -> ImageMeasurement {
        let s = roundUp(size, 512)
        return ImageMeasurement(required: s, fullyAllocated: s)
    }

    /// qcow2_measure's loop over the input: each run of data, extended to the end of its last
    /// destination cluster, as (offset, bytes). Zero runs are skipped.
    static func forEachDataRun(_ image: any GuestImage, clusterSize cs: UInt64,
                               _ body: (UInt64, UInt64) throws(QcowPressError) -> Void) throws(QcowPressError) {
        let ssize = image.virtualSize
        var offset: UInt64 = 0
        while offset < ssize {
            let s = try BlockStatusQuery.status(of: image, at: offset, limit: ssize)
            var pnum = max(s.length, 1)
            if !s.zero && s.data {
                pnum = roundUp(offset + pnum, cs) - offset
                try body(offset, pnum)
            }
            offset += pnum
        }
    }

    /// qcow2_calc_prealloc_size: header, L2 and L1 tables, refcount metadata, and the data.
    static func preallocSize(_ total: UInt64, _ o: MeasureOptions) -> UInt64 {
        let cs = UInt64(o.clusterSize)
        let aligned = roundUp(total, cs)
        let l2e: UInt64 = o.extendedL2 ? 16 : 8
        var meta = cs
        let nl2e = roundUp(aligned / cs, cs / l2e)
        meta += nl2e * l2e
        let nl1e = roundUp(nl2e * l2e / cs, cs / 8)
        meta += nl1e * 8
        meta += refcountMetadataSize(clusters: (meta + aligned) / cs, clusterSize: cs, refcountOrder: o.refcountOrder)
        return meta + aligned
    }

    /// qcow2_refcount_metadata_size: refcount blocks and table clusters that count `clusters`
    /// and themselves (the fixed point).
    static func refcountMetadataSize(clusters: UInt64, clusterSize cs: UInt64, refcountOrder: Int) -> UInt64 {
        let perTableCluster = cs / 8
        let perBlock = cs * 8 / (UInt64(1) << UInt64(refcountOrder))
        var table: UInt64 = 0, blocks: UInt64 = 0, n: UInt64 = 0, last: UInt64
        repeat {
            last = n
            blocks = (clusters + table + blocks + perBlock - 1) / perBlock
            table = (blocks + perTableCluster - 1) / perTableCluster
            n = clusters + blocks + table
        } while n != last
        return (blocks + table) * cs
    }

    /// `v` rounded up to a multiple of `a` (saturating: never traps on a hostile size).
    static func roundUp(_ v: UInt64, _ a: UInt64) -> UInt64 {
        v > UInt64.max - a ? UInt64.max / a * a : (v + a - 1) / a * a
    }

    /// Sizes past this make no qcow2 image (QEMU's 32 MiB L1 limit stops far below) and would
    /// overflow the arithmetic: refused as qemu-img refuses an image size that is too large.
    static let maxVirtualSize: UInt64 = 1 << 62
}

extension ImageMeasure {
    /// What qemu-img measure prints as `bitmaps` for a qcow2 input (qcow2_get_persistent_dirty_bitmap_size):
    /// nil for a version 2 input (qemu-img leaves the key out), otherwise for every persistent
    /// bitmap its whole bitmap and bitmap table in destination clusters, plus the directory. The
    /// bitmaps count only while the autoclear bit says they are consistent, as QEMU loads them.
    public static func bitmapsSize(of image: Qcow2Image, clusterSize cs: UInt64) throws(QcowPressError) -> UInt64? {
        guard image.header.version >= 3 else { return nil }
        guard image.header.autoclearFeatures.contains(.bitmaps) else { return 0 }
        var payload: [UInt8]?
        for case .bitmaps(let p) in image.header.extensions { payload = p }
        guard let p = payload, p.count >= 24 else { return 0 }
        func be(_ b: [UInt8], _ o: Int, _ n: Int) -> UInt64 { b[o..<(o + n)].reduce(0) { $0 << 8 | UInt64($1) } }
        let count = be(p, 0, 4), dirSize = be(p, 8, 8), dirOffset = be(p, 16, 8)
        guard dirSize <= 64 << 20, dirOffset <= image.fileSize, dirSize <= image.fileSize - dirOffset else {
            throw .inputDamaged(path: image.path, location: "bitmaps extension: directory at \(dirOffset) (\(dirSize) bytes) lies outside the file")
        }
        let buf = AlignedBuffer(capacity: max(1, Int(dirSize)))
        do { _ = try image.file.read(into: buf.pointer, length: Int(dirSize), offset: dirOffset) } catch { throw .from(error) }
        let dir = Array(UnsafeRawBufferPointer(start: buf.pointer, count: Int(dirSize)))
        var at = 0
        var total: UInt64 = 0, dirBytes: UInt64 = 0
        for i in 0..<count {
            guard at + 24 <= dir.count else {
                throw .inputDamaged(path: image.path, location: "bitmap directory entry \(i) at \(dirOffset + UInt64(at)) is truncated")
            }
            let granularityBits = be(dir, at + 17, 1), nameSize = be(dir, at + 18, 2), extra = be(dir, at + 20, 4)
            // QEMU's bounds (BME_MIN/MAX_GRANULARITY_BITS).
            guard (9...31).contains(granularityBits) else {
                throw .inputDamaged(path: image.path, location: "bitmap directory entry \(i): granularity_bits \(granularityBits) is not 9 to 31")
            }
            let bits = (image.virtualSize >> granularityBits) + (image.virtualSize & ((1 << granularityBits) - 1) == 0 ? 0 : 1)
            let bmClusters = ((bits + 7) / 8 + cs - 1) / cs
            total += bmClusters * cs + roundUp(bmClusters * 8, cs)
            dirBytes += roundUp(24 + nameSize, 8)
            at += Int(roundUp(24 + extra + nameSize, 8))
        }
        return total + roundUp(dirBytes, cs)
    }
}
