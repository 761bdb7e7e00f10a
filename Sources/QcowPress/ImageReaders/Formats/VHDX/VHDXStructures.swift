import DirectIO
import Glibc

/// The fixed places and identifiers of a VHDX file ([MS-VHDX]; little-endian; GUIDs stored as
/// Microsoft writes them: the first three groups little-endian, the last two as bytes).
enum VHDXLayout {
    static let headerOffsets: [UInt64] = [64 << 10, 128 << 10]
    static let headerSize = 4096
    static let regionTableOffsets: [UInt64] = [192 << 10, 256 << 10]
    static let regionTableSize = 64 << 10
    /// The file identifier, both headers and both region tables: no region may lie here.
    static let headerAreaEnd: UInt64 = 320 << 10
    static let metadataTableSize = 64 << 10
    static let mib: UInt64 = 1 << 20
    /// 64 TiB: the largest virtual disk [MS-VHDX] allows (and qemu-img creates).
    static let maxVirtualSize: UInt64 = 64 << 40
    /// Sectors one sector-bitmap block covers: 2^23 (a 1 MiB bitmap, one bit a sector).
    static let sectorsPerChunk: UInt64 = 1 << 23

    static let bat = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
    static let metadata = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
    static let fileParameters = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
    static let virtualDiskSize = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
    static let page83 = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
    static let logicalSectorSize = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
    static let physicalSectorSize = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
    static let parentLocator = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

    static func le16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }

    /// The 16 bytes of a GUID written as text, in the file's byte order.
    static func guid(_ s: String) -> [UInt8] {
        let hex = Array(s.utf8.filter { $0 != UInt8(ascii: "-") })
        func byte(_ i: Int) -> UInt8 {
            func nib(_ c: UInt8) -> UInt8 { c <= UInt8(ascii: "9") ? c - UInt8(ascii: "0") : (c | 0x20) - UInt8(ascii: "a") + 10 }
            return nib(hex[2 * i]) << 4 | nib(hex[2 * i + 1])
        }
        let b = (0..<16).map(byte)
        return [b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6]] + Array(b[8..<16])
    }

    /// A GUID in the file's byte order, as text.
    static func text(_ g: ArraySlice<UInt8>) -> String {
        let b = Array(g)
        let order = [3, 2, 1, 0, -1, 5, 4, -1, 7, 6, -1, 8, 9, -1, 10, 11, 12, 13, 14, 15]
        return order.map { $0 < 0 ? "-" : String(b[$0] >> 4, radix: 16) + String(b[$0] & 0xF, radix: 16) }.joined().uppercased()
    }
}

/// One of the two VHDX headers (`head`, at 64 KiB and 128 KiB; CRC-32C over its 4 KiB).
struct VHDXHeader: Equatable {
    var bytes: [UInt8]
    var sequence: UInt64
    var logGuid: [UInt8]
    var logLength: UInt64
    var logOffset: UInt64

    /// Parses the 4 KiB at `offset`; nil with the reason when it is not a valid header.
    static func parse(_ b: [UInt8], offset: UInt64) -> (VHDXHeader?, String) {
        let f = FieldReader(b: b)
        guard f.text(0, 4) == "head" else { return (nil, "signature (offset \(offset)) is not \"head\"") }
        let sum = CRC32C.checksum(b, zeroingFieldAt: 4)
        guard sum == f.le32(4) else {
            return (nil, "checksum (offset \(offset + 4)) is 0x\(String(f.le32(4), radix: 16)), its CRC-32C is 0x\(String(sum, radix: 16))")
        }
        guard VHDXLayout.le16(b, 66) == 1 else { return (nil, "version (offset \(offset + 66)) is \(VHDXLayout.le16(b, 66)), not 1") }
        return (VHDXHeader(bytes: b, sequence: f.le64(8), logGuid: Array(b[48..<64]), logLength: UInt64(f.le32(68)), logOffset: f.le64(72)), "")
    }

    /// The current header: the valid one with the higher sequence number (equal numbers only
    /// when the two are identical, as Disk2VHD writes them).
    static func current(_ file: FormatFile) throws(QcowPressError) -> VHDXHeader {
        var found: [VHDXHeader?] = []
        var why: [String] = []
        for at in VHDXLayout.headerOffsets {
            let (h, reason) = parse(try file.bytes(at: at, count: VHDXLayout.headerSize, what: "VHDX header"), offset: at)
            found.append(h)
            why.append(reason)
        }
        switch (found[0], found[1]) {
        case (nil, nil):
            throw .inputDamaged(path: file.path, location: "no valid VHDX header: first header \(why[0]); second header \(why[1])")
        case (let a?, nil): return a
        case (nil, let b?): return b
        case (let a?, let b?):
            if a.sequence != b.sequence { return a.sequence > b.sequence ? a : b }
            guard a.bytes == b.bytes else {
                throw .inputDamaged(path: file.path, location: "VHDX headers at offsets 65536 and 131072 both have sequence number \(a.sequence) but differ")
            }
            return a
        }
    }
}

/// A region table entry: where the BAT or the metadata region lies.
struct VHDXRegion {
    var offset: UInt64
    var length: UInt64
}


/// The region table (`regi`, 64 KiB at 192 KiB, a copy at 256 KiB; CRC-32C over the 64 KiB).
enum VHDXRegionTable {
    /// The BAT and metadata regions of the first valid table; each region inside the file and
    /// overlapping no other region, the header area or `taken` (the log).
    static func read(_ file: FormatFile, taken: [(String, Range<UInt64>)]) throws(QcowPressError) -> (bat: VHDXRegion, metadata: VHDXRegion) {
        var why: [String] = []
        for at in VHDXLayout.regionTableOffsets {
            let b = try file.bytes(at: at, count: VHDXLayout.regionTableSize, what: "VHDX region table")
            let f = FieldReader(b: b)
            guard f.text(0, 4) == "regi" else { why.append("signature (offset \(at)) is not \"regi\""); continue }
            let sum = CRC32C.checksum(b, zeroingFieldAt: 4)
            guard sum == f.le32(4) else {
                why.append("checksum (offset \(at + 4)) is 0x\(String(f.le32(4), radix: 16)), its CRC-32C is 0x\(String(sum, radix: 16))")
                continue
            }
            return try entries(f, at: at, file: file, taken: taken)
        }
        throw .inputDamaged(path: file.path, location: "no valid VHDX region table: first table \(why[0]); second table \(why[1])")
    }

    static func entries(_ f: FieldReader, at: UInt64, file: FormatFile, taken: [(String, Range<UInt64>)]) throws(QcowPressError) -> (bat: VHDXRegion, metadata: VHDXRegion) {
        let count = Int(f.le32(8))
        // [MS-VHDX]: at most 2047 entries (32 bytes each after the 16-byte header fill 64 KiB).
        guard count <= 2047 else { throw .inputDamaged(path: file.path, location: "VHDX region table (offset \(at)) field entry_count (offset \(at + 8)) is \(count), more than 2047") }
        var used = [("the VHDX header area", 0..<VHDXLayout.headerAreaEnd)] + taken
        var bat: VHDXRegion?, metadata: VHDXRegion?
        for i in 0..<count {
            let o = 16 + 32 * i
            let guid = Array(f.b[o..<(o + 16)])
            let r = VHDXRegion(offset: f.le64(o + 16), length: UInt64(f.le32(o + 24)))
            let field = "VHDX region table entry \(i) (offset \(at + UInt64(o)))"
            let name = guid == VHDXLayout.bat ? "BAT" : guid == VHDXLayout.metadata ? "metadata" : "region \(VHDXLayout.text(guid[...]))"
            guard r.offset <= file.size, r.length <= file.size - r.offset else {
                throw .inputDamaged(path: file.path, location: "\(field): the \(name) region (\(r.length) bytes at offset \(r.offset)) lies past the end of the file (\(file.size) bytes)")
            }
            let range = r.offset..<(r.offset + r.length)
            if let (other, _) = used.first(where: { $0.1.overlaps(range) }) {
                throw .inputDamaged(path: file.path, location: "\(field): the \(name) region (\(r.length) bytes at offset \(r.offset)) overlaps \(other)")
            }
            used.append(("the \(name) region", range))
            if guid == VHDXLayout.bat || guid == VHDXLayout.metadata {
                guard (guid == VHDXLayout.bat ? bat : metadata) == nil else {
                    throw .inputDamaged(path: file.path, location: "\(field): a second \(name) region")
                }
                if guid == VHDXLayout.bat { bat = r } else { metadata = r }
            } else if f.le32(o + 28) & 1 != 0 {
                throw .unsupported(path: file.path, what: "a VHDX region QcowPress does not know (\(VHDXLayout.text(guid[...])), entry \(i) of the region table at offset \(at)) is marked required")
            }
        }
        guard let bat, let metadata else {
            throw .inputDamaged(path: file.path, location: "VHDX region table (offset \(at)) has no \(bat == nil ? "BAT" : "metadata") region")
        }
        return (bat, metadata)
    }
}
