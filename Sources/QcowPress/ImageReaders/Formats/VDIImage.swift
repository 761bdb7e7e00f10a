import DirectIO
import Glibc

/// The VDI header fields QcowPress uses (VirtualBox version 1.1; little-endian; offsets as in
/// QEMU's `block/vdi.c` VdiHeader).
public struct VDIHeader: Sendable, Equatable {
    static let signature: UInt32 = 0xBEDA_107F
    /// Block map entries: never allocated, and discarded (zeroed); both read as zeros.
    static let unallocated: UInt32 = 0xFFFF_FFFF
    static let zeroed: UInt32 = 0xFFFF_FFFE
    /// Largest block QcowPress accepts: VirtualBox and qemu-img write 1 MiB blocks; 256 MiB bounds
    /// the scratch a read of one block could need.
    static let maxBlockSize: UInt64 = 256 << 20

    public enum ImageType: UInt32, Sendable { case dynamic = 1, `static` = 2 }
    public var imageType: ImageType
    public var blockMapOffset: UInt64
    public var dataOffset: UInt64
    /// The disk size as stored (may be odd: QEMU rounds it up to 512, as the virtual size).
    public var diskSize: UInt64
    public var blockSize: UInt64
    public var blocksInImage: UInt64
    public var blocksAllocated: UInt64

    /// Parses and checks the 512-byte header; each error names the field and its offset.
    init(_ bytes: [UInt8], path: String, fileSize: UInt64) throws(QcowPressError) {
        let h = FieldReader(b: bytes)
        func bad(_ field: String, _ at: Int, _ why: String) -> QcowPressError {
            .inputDamaged(path: path, location: "VDI header field \(field) (offset \(at)) \(why)")
        }
        guard h.le32(64) == Self.signature else { throw bad("signature", 64, "is 0x\(String(h.le32(64), radix: 16)), not 0xbeda107f (not a VDI image)") }
        let version = h.le32(68)
        guard version == 0x0001_0001 else {
            throw .unsupported(path: path, what: "VDI version \(version >> 16).\(version & 0xFFFF) (QcowPress reads 1.1)")
        }
        let type = h.le32(76)
        guard let t = ImageType(rawValue: type) else {
            let name = type == 3 ? "an undo VDI image" : type == 4 ? "a differencing VDI image" : "VDI image type \(type)"
            throw .unsupported(path: path, what: "\(name) (QcowPress reads static and dynamic VDI images)")
        }
        imageType = t
        guard h.isZero(424, 16) && h.isZero(440, 16) else {
            throw .unsupported(path: path, what: "a differencing VDI image (link or parent UUID set at offset 424/440)")
        }
        blockMapOffset = UInt64(h.le32(340))
        dataOffset = UInt64(h.le32(344))
        let sectorSize = h.le32(360)
        diskSize = h.le64(368)
        blockSize = UInt64(h.le32(376))
        let extra = h.le32(380)
        blocksInImage = UInt64(h.le32(384))
        blocksAllocated = UInt64(h.le32(388))
        guard sectorSize == 512 else { throw bad("sector_size", 360, "is \(sectorSize), not 512") }
        guard blockSize >= 512, blockSize <= Self.maxBlockSize, blockSize & (blockSize - 1) == 0 else {
            throw bad("block_size", 376, "is \(blockSize): not a power of two from 512 to 256 MiB")
        }
        guard extra == 0 else { throw .unsupported(path: path, what: "VDI block_extra (offset 380) is \(extra), not 0") }
        guard blockMapOffset % 512 == 0, blockMapOffset >= 512 else { throw bad("offset_bmap", 340, "is \(blockMapOffset): not a multiple of 512 past the header") }
        guard dataOffset % 512 == 0 else { throw bad("offset_data", 344, "is \(dataOffset): not a multiple of 512") }
        guard diskSize <= blocksInImage * blockSize else {
            throw bad("disk_size", 368, "is \(diskSize): the block map has room for \(blocksInImage) blocks of \(blockSize) bytes")
        }
        guard blocksInImage * blockSize - diskSize < blockSize || blocksInImage == 0 && diskSize == 0 else {
            throw bad("blocks_in_image", 384, "is \(blocksInImage): more blocks than disk_size \(diskSize) needs")
        }
        let mapEnd = blockMapOffset + blocksInImage * 4
        guard mapEnd <= fileSize else {
            throw bad("offset_bmap", 340, "is \(blockMapOffset): the block map (\(blocksInImage) entries) runs past the end of the file (\(fileSize) bytes)")
        }
        guard mapEnd <= dataOffset || blocksInImage == 0 else {
            throw bad("offset_data", 344, "is \(dataOffset): it overlaps the block map (offset \(blockMapOffset), \(blocksInImage) entries)")
        }
        guard blocksAllocated <= blocksInImage else {
            throw bad("blocks_allocated", 388, "is \(blocksAllocated), more than blocks_in_image \(blocksInImage)")
        }
    }
}

/// A VirtualBox disk image (static or dynamic), read as a guest sees it: unallocated and zeroed
/// blocks read as zeros without a read. The block map (4 bytes a block: 4 MiB for a 1 TiB disk) is
/// read and checked when the image is opened.
public final class VDIImage: BlockMappedImage {
    public let path: String
    public let virtualSize: UInt64
    public let header: VDIHeader
    let file: FormatFile
    let map: [UInt32]
    var blockSize: UInt64 { header.blockSize }

    public convenience init(path: String) throws(QcowPressError) {
        try self.init(file: try FormatFile(path: path))
    }

    init(file: FormatFile) throws(QcowPressError) {
        let path = file.path
        self.path = path
        self.file = file
        let h = try VDIHeader(try file.bytes(at: 0, count: 512, what: "VDI header"), path: path, fileSize: file.size)
        header = h
        virtualSize = (h.diskSize + 511) & ~511  // as QEMU: an odd disk size rounds up to a sector
        let raw = try file.bytes(at: h.blockMapOffset, count: Int(h.blocksInImage * 4), what: "VDI block map")
        let fields = FieldReader(b: raw)
        var map = [UInt32](repeating: 0, count: Int(h.blocksInImage))
        var owner = [UInt32](repeating: UInt32.max, count: map.count)  // the guest block in each data block
        for i in 0..<map.count {
            let e = fields.le32(i * 4)
            map[i] = e
            guard e < VDIHeader.zeroed else { continue }
            // The part of the block the guest can see must be in the file.
            let visible = min(h.blockSize, (virtualSize - min(virtualSize, UInt64(i) * h.blockSize)))
            let host = h.dataOffset + UInt64(e) * h.blockSize
            guard UInt64(e) < h.blocksInImage, host + visible <= file.size else {
                throw .inputDamaged(path: path, location: "VDI block map entry \(i) (offset \(h.blockMapOffset + UInt64(i) * 4)) is \(e): block data at \(host) lies past the end of the file (\(file.size) bytes)")
            }
            // Two guest blocks in one data block: a damaged map (VirtualBox and qemu-img never share).
            guard owner[Int(e)] == UInt32.max else {
                throw .inputDamaged(path: path, location: "VDI block map entry \(i) (offset \(h.blockMapOffset + UInt64(i) * 4)) is \(e): entry \(owner[Int(e)]) points to the same data block")
            }
            owner[Int(e)] = UInt32(i)
        }
        self.map = map
    }

    func hostOffset(ofBlock i: UInt64) -> UInt64? {
        guard i < UInt64(map.count), map[Int(i)] < VDIHeader.zeroed else { return nil }
        return header.dataOffset + UInt64(map[Int(i)]) * header.blockSize
    }

    func readAllocated(block i: UInt64, host: UInt64, inBlock: UInt64, count: Int, into: UnsafeMutableRawPointer) throws(QcowPressError) {
        try file.read(at: host + inBlock, count: count, into: into)
    }

    /// "static" or "dynamic".
    public var subformat: String { header.imageType == .static ? "static" : "dynamic" }
}
