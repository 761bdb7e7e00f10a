import DirectIO
import Glibc

/// The metadata region's items QcowPress needs (table `metadata`, 64 KiB at the region's start;
/// items at offsets from the region's start): file parameters, virtual disk size, logical and
/// physical sector size. Page 83 data is required to be present but not read.
struct VHDXMetadata {
    var blockSize: UInt64
    /// LeaveBlocksAllocated: a fixed VHDX (every block present, at creation).
    var leaveBlocksAllocated: Bool
    var virtualSize: UInt64
    var logicalSectorSize: UInt64
    var physicalSectorSize: UInt64

    init(_ file: FormatFile, region r: VHDXRegion) throws(QcowPressError) {
        let path = file.path
        guard r.length >= UInt64(VHDXLayout.metadataTableSize) else {
            throw .inputDamaged(path: path, location: "VHDX metadata region (offset \(r.offset)) is \(r.length) bytes, smaller than its 64 KiB table")
        }
        let t = FieldReader(b: try file.bytes(at: r.offset, count: VHDXLayout.metadataTableSize, what: "VHDX metadata table"))
        guard t.text(0, 8) == "metadata" else {
            throw .inputDamaged(path: path, location: "VHDX metadata table (offset \(r.offset)) signature is not \"metadata\"")
        }
        let count = Int(VHDXLayout.le16(t.b, 10))
        guard count <= 2047 else {
            throw .inputDamaged(path: path, location: "VHDX metadata table field entry_count (offset \(r.offset + 10)) is \(count), more than 2047")
        }
        let known: [([UInt8], String, Int)] = [
            (VHDXLayout.fileParameters, "file parameters", 8), (VHDXLayout.virtualDiskSize, "virtual disk size", 8),
            (VHDXLayout.page83, "page 83 data", 16), (VHDXLayout.logicalSectorSize, "logical sector size", 4),
            (VHDXLayout.physicalSectorSize, "physical sector size", 4), (VHDXLayout.parentLocator, "parent locator", 20),
        ]
        var items: [String: FieldReader] = [:]
        for i in 0..<count {
            let o = 32 + 32 * i
            let guid = Array(t.b[o..<(o + 16)])
            let at = r.offset + UInt64(o)
            guard let (_, name, need) = known.first(where: { $0.0 == guid }) else {
                if t.le32(o + 24) & 4 != 0 {
                    throw .unsupported(path: path, what: "a VHDX metadata item QcowPress does not know (\(VHDXLayout.text(guid[...])), entry \(i) at offset \(at)) is marked required")
                }
                continue
            }
            guard items[name] == nil else { throw .inputDamaged(path: path, location: "VHDX metadata entry \(i) (offset \(at)): a second \(name) item") }
            let off = UInt64(t.le32(o + 16)), len = UInt64(t.le32(o + 20))
            guard off >= UInt64(VHDXLayout.metadataTableSize), len >= UInt64(need), off + len <= r.length else {
                throw .inputDamaged(path: path, location: "VHDX metadata entry \(i) (offset \(at)): the \(name) item (\(len) bytes at \(off)) does not lie inside the metadata region (\(r.length) bytes) after its table")
            }
            if name == "page 83 data" || name == "parent locator" {
                items[name] = FieldReader(b: [])
                continue
            }
            items[name] = FieldReader(b: try file.bytes(at: r.offset + off, count: need, what: "VHDX metadata item \(name)"))
        }
        for (_, name, _) in known.dropLast() where items[name] == nil {
            throw .inputDamaged(path: path, location: "VHDX metadata table (offset \(r.offset)) has no \(name) item")
        }
        guard let params = items["file parameters"], let size = items["virtual disk size"],
              let logical = items["logical sector size"], let physical = items["physical sector size"] else {
            throw .inputDamaged(path: path, location: "VHDX metadata table (offset \(r.offset)) lacks a required item")
        }
        // The item's place, for messages.
        func bad(_ name: String, _ why: String) -> QcowPressError {
            .inputDamaged(path: path, location: "VHDX metadata item \(name) \(why)")
        }
        if params.le32(4) & 2 != 0 || items["parent locator"] != nil {
            throw .unsupported(path: path, what: "a differencing VHDX image (its data lives in a parent image); QcowPress reads fixed and dynamic VHDX images")
        }
        blockSize = UInt64(params.le32(0))
        leaveBlocksAllocated = params.le32(4) & 1 != 0
        guard blockSize >= VHDXLayout.mib, blockSize <= 256 * VHDXLayout.mib, blockSize & (blockSize - 1) == 0 else {
            throw bad("file parameters", "block size is \(blockSize): not a power of two from 1 MiB to 256 MiB")
        }
        logicalSectorSize = UInt64(logical.le32(0))
        guard logicalSectorSize == 512 || logicalSectorSize == 4096 else { throw bad("logical sector size", "is \(logicalSectorSize), not 512 or 4096") }
        physicalSectorSize = UInt64(physical.le32(0))
        guard physicalSectorSize == 512 || physicalSectorSize == 4096 else { throw bad("physical sector size", "is \(physicalSectorSize), not 512 or 4096") }
        virtualSize = size.le64(0)
        guard virtualSize <= VHDXLayout.maxVirtualSize else { throw bad("virtual disk size", "is \(virtualSize), more than 64 TiB") }
        guard virtualSize % logicalSectorSize == 0 else {
            throw bad("virtual disk size", "is \(virtualSize), not a multiple of the logical sector size \(logicalSectorSize)")
        }
    }

    /// Payload blocks between two sector-bitmap entries in the BAT: 2^23 × logical sector size ÷
    /// block size (a power of two from 16 to 32768 with the limits above).
    var chunkRatio: UInt64 { VHDXLayout.sectorsPerChunk * logicalSectorSize / blockSize }
    var dataBlocks: UInt64 { (virtualSize + blockSize - 1) / blockSize }
    /// BAT entries of a non-differencing image: every payload block, and a sector-bitmap entry
    /// after each full chunk but the last.
    var batEntries: UInt64 { dataBlocks == 0 ? 0 : dataBlocks + (dataBlocks - 1) / chunkRatio }
}
