import DirectIO
import Glibc

/// The VHD footer (Virtual PC / Hyper-V gen 1; big-endian; 512 bytes: at the end of every VHD,
/// with a copy at offset 0 of a dynamic one), as QEMU's `block/vpc.c` reads it.
public struct VHDFooter: Sendable, Equatable {
    public enum DiskType: UInt32, Sendable { case fixed = 2, dynamic = 3 }
    public var diskType: DiskType
    public var dataOffset: UInt64
    public var currentSize: UInt64
    public var creatorApp: String
    /// The guest size as QEMU computes it (vpc_open): CHS geometry × 512, except for creators
    /// that size by `current_size` (Hyper-V "win ", QEMU's "qem2", Disk2vhd "d2v ", XenConverter
    /// "CTXS", XenServer "tap\0") and for the largest CHS geometry (which would truncate).
    public var virtualSize: UInt64

    /// 65535 × 16 × 255 sectors: the largest CHS geometry (vpc.c VHD_MAX_GEOMETRY).
    static let maxGeometry: UInt64 = 65535 * 16 * 255
    /// 2 TiB of 512-byte sectors: QEMU's limit for a VHD (vpc.c VHD_MAX_SECTORS; EFBIG beyond).
    static let maxSectors: UInt64 = (2 << 40) / 512

    init(_ bytes: [UInt8], at offset: UInt64, path: String) throws(QcowPressError) {
        let f = FieldReader(b: bytes)
        func bad(_ field: String, _ at: Int, _ why: String) -> QcowPressError {
            .inputDamaged(path: path, location: "VHD footer (offset \(offset)) field \(field) (offset \(offset + UInt64(at))) \(why)")
        }
        guard f.text(0, 8) == "conectix" else { throw bad("cookie", 0, "is not \"conectix\" (not a VHD image)") }
        var copy = bytes
        for i in 64..<68 { copy[i] = 0 }
        let sum = ~copy.reduce(UInt32(0)) { $0 &+ UInt32($1) }
        guard sum == f.be32(64) else {
            throw bad("checksum", 64, "is 0x\(String(f.be32(64), radix: 16)), the footer sums to 0x\(String(sum, radix: 16))")
        }
        let type = f.be32(60)
        guard let t = DiskType(rawValue: type) else {
            let what = type == 4 ? "a differencing VHD image (its data lives in a parent image)" : "VHD disk type \(type)"
            throw .unsupported(path: path, what: "\(what); QcowPress reads fixed and dynamic VHD images")
        }
        diskType = t
        dataOffset = f.be64(16)
        currentSize = f.be64(48)
        creatorApp = String(decoding: bytes[28..<32], as: UTF8.self)
        var sectors = UInt64(f.be16(56)) * UInt64(bytes[58]) * UInt64(bytes[59])
        let bySize = ["win ", "qem2", "d2v ", "CTXS", "tap\0"].contains(creatorApp)
        if bySize || sectors == Self.maxGeometry { sectors = currentSize / 512 }
        guard sectors <= Self.maxSectors else { throw bad(bySize ? "current_size" : "disk_geometry", bySize ? 48 : 56, "gives \(sectors) sectors, more than a VHD holds (2 TiB)") }
        virtualSize = sectors * 512
    }

    /// Reads the footer as QEMU does: the copy at offset 0 when it is there (dynamic images),
    /// otherwise the last 512 bytes (fixed images have only that one).
    static func read(_ file: FormatFile) throws(QcowPressError) -> VHDFooter {
        let head = try file.bytes(at: 0, count: 512, what: "VHD footer copy")
        if FieldReader(b: head).text(0, 8) == "conectix" { return try VHDFooter(head, at: 0, path: file.path) }
        guard file.size >= 1024 else { throw .inputDamaged(path: file.path, location: "no VHD footer (\"conectix\") at offset 0 or at the end of the file") }
        return try VHDFooter(try file.bytes(at: file.size - 512, count: 512, what: "VHD footer"), at: file.size - 512, path: file.path)
    }
}

/// Opens a VHD as the right reader for its disk type.
public enum VHDImage {
    public static func open(path: String) throws(QcowPressError) -> any GuestImage {
        try open(file: try FormatFile(path: path))
    }

    static func open(file: FormatFile) throws(QcowPressError) -> any GuestImage {
        let footer = try VHDFooter.read(file)
        switch footer.diskType {
        case .fixed: return try VHDFixedImage(file: file, footer: footer)
        case .dynamic: return try VHDDynamicImage(file: file, footer: footer)
        }
    }
}

/// A fixed VHD: the guest's bytes, then the footer. Holes in the file (SEEK_DATA) are holes of
/// the image, found when it is opened, as for ``RawGuestImage``.
public final class VHDFixedImage: GuestImage {
    public var path: String { file.path }
    public let virtualSize: UInt64
    public let footer: VHDFooter
    let file: FormatFile
    let data: [Range<UInt64>]

    init(file: FormatFile, footer: VHDFooter) throws(QcowPressError) {
        self.file = file
        self.footer = footer
        virtualSize = footer.virtualSize
        guard file.size >= 512, virtualSize <= file.size - 512 else {
            throw .inputDamaged(path: file.path, location: "VHD footer field current_size/disk_geometry: the fixed disk's \(footer.virtualSize) bytes do not fit before the footer (file \(file.size) bytes)")
        }
        data = file.dataRanges(to: virtualSize)
    }

    public func isKnownZero(at offset: UInt64, count: Int) throws(QcowPressError) -> Bool {
        count <= 0 || knownZeroEnd(from: offset, limit: offset + UInt64(count)) == offset + UInt64(count)
    }

    public func knownZeroEnd(from offset: UInt64, limit: UInt64) -> UInt64 {
        guard offset < limit else { return limit }
        guard offset < virtualSize else { return limit }
        guard let next = data.first(where: { $0.upperBound > offset }) else { return limit }
        return next.lowerBound <= offset ? offset : min(next.lowerBound, limit)
    }

    public func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError) {
        let n = offset >= virtualSize ? 0 : Int(min(UInt64(count), virtualSize - offset))
        if n > 0 { try file.read(at: offset, count: n, into: into) }
        if n < count { memset(into + n, 0, count - n) }
    }
}

/// A dynamic VHD: dynamic header (`cxsparse`), block allocation table (u32 sector numbers,
/// 0xffffffff unallocated: reads as zeros), each block a sector bitmap padded to 512 bytes and
/// then the data. A sector whose bitmap bit is clear reads as zeros (the image has no parent).
public final class VHDDynamicImage: BlockMappedImage {
    public var path: String { file.path }
    public let virtualSize: UInt64
    public let footer: VHDFooter
    let file: FormatFile
    let blockSize: UInt64
    let bitmapSize: UInt64
    let bat: [UInt32]
    /// Largest block accepted: Hyper-V and qemu-img write 2 MiB (512 KiB for small images);
    /// 256 MiB bounds what one block's bitmap and reads may cost.
    static let maxBlockSize: UInt64 = 256 << 20

    init(file: FormatFile, footer: VHDFooter) throws(QcowPressError) {
        self.file = file
        self.footer = footer
        virtualSize = footer.virtualSize
        let at = footer.dataOffset
        func bad(_ field: String, _ o: Int, _ why: String) -> QcowPressError {
            .inputDamaged(path: file.path, location: "VHD dynamic header (offset \(at)) field \(field) (offset \(at &+ UInt64(o))) \(why)")
        }
        let h = FieldReader(b: try file.bytes(at: at, count: 1024, what: "VHD dynamic header (footer data_offset)"))
        guard h.text(0, 8) == "cxsparse" else { throw bad("cookie", 0, "is not \"cxsparse\"") }
        blockSize = UInt64(h.be32(32))
        guard blockSize >= 512, blockSize <= Self.maxBlockSize, blockSize & (blockSize - 1) == 0 else {
            throw bad("block_size", 32, "is \(blockSize): not a power of two from 512 to 256 MiB")
        }
        bitmapSize = (blockSize / (8 * 512) + 511) & ~511
        let entries = UInt64(h.be32(28))
        guard entries * blockSize >= virtualSize else {
            throw bad("max_table_entries", 28, "is \(entries): \(entries) blocks of \(blockSize) bytes hold less than the disk's \(virtualSize) bytes")
        }
        let table = h.be64(16)
        guard table <= file.size, entries * 4 <= file.size - table else {
            throw bad("table_offset", 16, "is \(table): the block allocation table (\(entries) entries) runs past the end of the file (\(file.size) bytes)")
        }
        let raw = FieldReader(b: try file.bytes(at: table, count: Int(entries * 4), what: "VHD block allocation table"))
        var bat = [UInt32](repeating: 0, count: Int(entries))
        var allocated: [(offset: UInt64, entry: Int)] = []
        for i in 0..<bat.count {
            let e = raw.be32(i * 4)
            bat[i] = e
            // As QEMU: every allocated block, bitmap and whole data, lies inside the file.
            guard e != 0xFFFF_FFFF else { continue }
            guard UInt64(e) * 512 + bitmapSize + blockSize <= file.size else {
                throw .inputDamaged(path: file.path, location: "VHD block allocation table entry \(i) (offset \(table + UInt64(i) * 4)) is \(e): block at \(UInt64(e) * 512) lies past the end of the file (\(file.size) bytes)")
            }
            allocated.append((UInt64(e) * 512, i))
        }
        // Blocks (bitmap and data) overlapping each other or the table: a damaged table.
        allocated.sort { $0.offset < $1.offset }
        for k in allocated.indices {
            let (o, i) = allocated[k]
            let overlapsPrevious = k > 0 && o - allocated[k - 1].offset < bitmapSize + blockSize
            guard !overlapsPrevious, o >= table + entries * 4 || o + bitmapSize + blockSize <= table else {
                let what = overlapsPrevious ? "the block of entry \(allocated[k - 1].entry)" : "the block allocation table"
                throw .inputDamaged(path: file.path, location: "VHD block allocation table entry \(i) (offset \(table + UInt64(i) * 4)): block at \(o) overlaps \(what)")
            }
        }
        self.bat = bat
    }

    func hostOffset(ofBlock i: UInt64) -> UInt64? {
        guard i < UInt64(bat.count), bat[Int(i)] != 0xFFFF_FFFF else { return nil }
        return UInt64(bat[Int(i)]) * 512
    }

    func readAllocated(block i: UInt64, host: UInt64, inBlock: UInt64, count: Int, into: UnsafeMutableRawPointer) throws(QcowPressError) {
        let first = inBlock / 512, last = (inBlock + UInt64(count) + 511) / 512
        let bitmap = try file.bytes(at: host + first / 8, count: Int((last + 7) / 8 - first / 8), what: "VHD sector bitmap of block \(i)")
        func present(_ s: UInt64) -> Bool { bitmap[Int(s / 8 - first / 8)] & (0x80 >> UInt8(s % 8)) != 0 }
        var pos = 0
        while pos < count {
            let s = (inBlock + UInt64(pos)) / 512
            let on = present(s)
            var end = min(count, Int((s + 1) * 512 - inBlock))
            while end < count && present((inBlock + UInt64(end)) / 512) == on { end = min(count, end + 512) }
            if on {
                try file.read(at: host + bitmapSize + inBlock + UInt64(pos), count: end - pos, into: into + pos)
            } else {
                memset(into + pos, 0, end - pos)
            }
            pos = end
        }
    }

    /// The block size, as qemu-img info's cluster-size.
    public var blockBytes: Int { Int(blockSize) }
}
