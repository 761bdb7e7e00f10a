import DirectIO
import Qcow2Format

/// One run of an image's block status, as QEMU's `bdrv_block_status` reports it through the
/// backing chain (what `qemu-img map` prints, `qemu-img measure` counts).
public struct BlockStatus: Equatable, Sendable {
    /// Bytes the run covers, from the offset asked about.
    public var length: UInt64
    /// Reads data from the image (`BDRV_BLOCK_DATA`).
    public var data: Bool
    /// Reads as zeros (`BDRV_BLOCK_ZERO`).
    public var zero: Bool
    /// Allocated in the image that answered (`BDRV_BLOCK_ALLOCATED`: qemu-img map's `present`).
    public var present: Bool
    /// Where the bytes lie in ``file``, when they lie somewhere as they are (not compressed, not a
    /// hole without a place).
    public var offset: UInt64?
    /// The file that holds the bytes at ``offset`` (qemu-img map's human `File` column).
    public var file: String?
    /// How far down the backing chain the answer came from (0: the image itself).
    public var depth: Int

    /// A run of `length` bytes with these flags.
    public init(length: UInt64, data: Bool, zero: Bool, present: Bool, offset: UInt64? = nil, file: String? = nil, depth: Int = 0) {
        self.length = length
        self.data = data
        self.zero = zero
        self.present = present
        self.offset = offset
        self.file = file
        self.depth = depth
    }
}

/// An image that knows its block status as QEMU's driver for its format reports it (host offsets,
/// allocation). Images that do not adopt this are described by their extents
/// (``GuestImage/knownZeroEnd(from:limit:)``): zero runs and data runs, with no offset.
public protocol BlockStatusReporting: GuestImage {
    /// The status at `offset` (< `limit` ≤ ``GuestImage/virtualSize``), for at most `limit - offset`
    /// bytes, backing chain included.
    func blockStatus(at offset: UInt64, limit: UInt64) throws(QcowPressError) -> BlockStatus
}

/// Block status for any ``GuestImage``.
public enum BlockStatusQuery {
    /// A data run found by extents is extended in steps of this size. 64 KiB: the common cluster
    /// and grain size, so a run ends on the boundary the format's own map has.
    static let dataStep: UInt64 = 64 << 10

    /// The status of `image` at `offset`, at most `limit - offset` bytes: the image's own answer
    /// when it reports one, otherwise its extents (a known-zero run reads as zero and present; the
    /// rest as data, without an offset).
    public static func status(of image: any GuestImage, at offset: UInt64, limit: UInt64) throws(QcowPressError) -> BlockStatus {
        if let r = image as? any BlockStatusReporting { return try r.blockStatus(at: offset, limit: limit) }
        let z = try image.knownZeroEnd(from: offset, limit: limit)
        if z > offset { return BlockStatus(length: z - offset, data: false, zero: true, present: true) }
        var end = min(limit, (offset / dataStep + 1) * dataStep)
        while end < limit {
            let next = min(limit, end + dataStep)
            if try image.knownZeroEnd(from: end, limit: next) > end { break }
            end = next
        }
        return BlockStatus(length: end - offset, data: true, zero: false, present: true)
    }

    /// Raw bytes of a file in guest order: its data extents as data, its holes as zeros, both at
    /// their own offset (QEMU's file-posix status through SEEK_DATA/SEEK_HOLE).
    static func fileExtents(_ data: [Range<UInt64>], file: String, at offset: UInt64, limit: UInt64) -> BlockStatus {
        var lo = 0, hi = data.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if data[mid].upperBound > offset { hi = mid } else { lo = mid + 1 }
        }
        if lo < data.count && data[lo].lowerBound <= offset {
            // A data extent ending inside the last sector reaches the sector's end (QEMU rounds up).
            let end = min(limit, (data[lo].upperBound + 511) & ~511)
            return BlockStatus(length: end - offset, data: true, zero: false, present: true, offset: offset, file: file)
        }
        let end = lo < data.count ? min(limit, data[lo].lowerBound) : limit
        return BlockStatus(length: max(end, offset + 1) - offset, data: false, zero: true, present: true, offset: offset, file: file)
    }
}

extension RawGuestImage: BlockStatusReporting {
    /// QEMU's raw format over file-posix: data extents and holes at their own offset.
    public func blockStatus(at offset: UInt64, limit: UInt64) -> BlockStatus {
        BlockStatusQuery.fileExtents(data, file: path, at: offset, limit: limit)
    }
}

extension VHDFixedImage: BlockStatusReporting {
    /// qemu's vpc driver hands a fixed VHD to the file below (`BDRV_BLOCK_RAW`): the file's extents.
    public func blockStatus(at offset: UInt64, limit: UInt64) -> BlockStatus {
        BlockStatusQuery.fileExtents(data, file: path, at: offset, limit: limit)
    }
}

extension VHDDynamicImage: BlockStatusReporting {
    /// qemu's vpc_co_block_status: an allocated block is data to its end (the sector bitmap is not
    /// consulted) at the block's data offset; unallocated blocks read as zero.
    public func blockStatus(at offset: UInt64, limit: UInt64) -> BlockStatus {
        let i = offset / blockSize
        let inBlock = offset - i * blockSize
        if let host = hostOffset(ofBlock: i) {
            let end = min(limit, (i + 1) * blockSize)
            return BlockStatus(length: end - offset, data: true, zero: false, present: true,
                               offset: host + bitmapSize + inBlock, file: path)
        }
        let end = knownZeroEnd(from: offset, limit: limit)
        return BlockStatus(length: end - offset, data: false, zero: true, present: true)
    }
}

extension VDIImage: BlockStatusReporting {
    /// qemu's vdi_co_block_status: an allocated block is data at its place in the file; unallocated
    /// and zeroed blocks read as zero. A static image asks the file below too (`BDRV_BLOCK_RECURSE`):
    /// where the block's bytes are a hole in the file, they also read as zero.
    public func blockStatus(at offset: UInt64, limit: UInt64) -> BlockStatus {
        let i = offset / blockSize
        let inBlock = offset - i * blockSize
        guard let host = hostOffset(ofBlock: i) else {
            let end = knownZeroEnd(from: offset, limit: limit)
            return BlockStatus(length: end - offset, data: false, zero: true, present: true)
        }
        let end = min(limit, (i + 1) * blockSize)
        var s = BlockStatus(length: end - offset, data: true, zero: false, present: true, offset: host + inBlock, file: path)
        if header.imageType == .static {
            let at = file.base + host + inBlock
            let under = BlockStatusQuery.fileExtents(file.file.dataRanges(from: at, to: at + s.length), file: path,
                                                     at: at, limit: at + s.length)
            s.length = under.length
            s.zero = under.zero
        }
        return s
    }
}

extension VHDXImage: BlockStatusReporting {
    /// qemu's vhdx driver has no block status: the generic layer reports the whole image as data,
    /// allocated, without an offset (qemu-img map prints one entry; measure counts every cluster).
    /// Reported the same so map and measure agree with qemu-img.
    public func blockStatus(at offset: UInt64, limit: UInt64) -> BlockStatus {
        BlockStatus(length: limit - offset, data: true, zero: false, present: true)
    }
}
