import DirectIO
import Glibc

/// A Hyper-V VHDX image (fixed or dynamic; [MS-VHDX], QEMU `block/vhdx.c`), read as a guest sees
/// it: payload blocks not present, undefined, zero or unmapped read as zeros without a read and
/// are holes for the copier; fully present blocks are read from their place (1 MiB-aligned, so
/// whole-block reads go around the page cache). Differencing images are refused by name. A log
/// with entries to replay is refused with how to replay it (the source is never written).
///
/// The BAT is read and checked when the image is opened and kept as 8 bytes a payload block (plus
/// a sorted copy of the present ones while checking for overlaps): the BAT lies inside the file
/// (checked), so this is bounded by the file's size: 512 KiB for a 2 TiB disk of 32 MiB blocks
/// (Hyper-V's default), 16 MiB with 1 MiB blocks.
public final class VHDXImage: BlockMappedImage {
    public var path: String { file.path }
    public let virtualSize: UInt64
    let file: FormatFile
    let metadata: VHDXMetadata
    /// Host offset of each guest block, 0 when it reads as zero.
    let blocks: [UInt64]
    var blockSize: UInt64 { metadata.blockSize }

    /// BAT entry states ([MS-VHDX] 2.5.1.1); 5 is "unmapped" in the 0.95 draft (QEMU reads zeros).
    enum State: UInt64 { case notPresent = 0, undefined = 1, zero = 2, unmapped = 3, unmappedV095 = 5, fullyPresent = 6, partiallyPresent = 7 }

    public convenience init(path: String) throws(QcowPressError) {
        try self.init(file: try FormatFile(path: path))
    }

    /// Opens the image in `file` (a file, or a window of one: a disk inside an OVA's tar).
    init(file: FormatFile) throws(QcowPressError) {
        self.file = file
        let path = file.path
        let id = try file.bytes(at: 0, count: 8, what: "VHDX file identifier")
        guard id == Array("vhdxfile".utf8) else {
            throw .inputDamaged(path: path, location: "VHDX file identifier (offset 0) is not \"vhdxfile\" (not a VHDX image)")
        }
        let header = try VHDXHeader.current(file)
        let log = try VHDXLog.check(file, header: header)
        let regions = try VHDXRegionTable.read(file, taken: log.map { [("the log", $0)] } ?? [])
        metadata = try VHDXMetadata(file, region: regions.metadata)
        virtualSize = metadata.virtualSize
        let m = metadata
        let entries = m.batEntries
        guard entries <= regions.bat.length / 8 else {
            throw .inputDamaged(path: path, location: "VHDX BAT region (offset \(regions.bat.offset)) is \(regions.bat.length) bytes, too small for the \(entries) entries a \(m.virtualSize)-byte disk of \(m.blockSize)-byte blocks needs")
        }
        // The BAT is read in windows in entry order (the indices only grow), so only the 8 bytes a
        // block kept below stay, not a second copy of the whole table.
        let window: UInt64 = 1 << 17  // entries: 1 MiB of BAT a read
        var bat = FieldReader(b: []), batStart: UInt64 = 0
        func batEntry(_ index: UInt64) throws(QcowPressError) -> UInt64 {
            if bat.b.isEmpty || index < batStart || index >= batStart + UInt64(bat.b.count / 8) {
                batStart = index
                let n = min(window, entries - index)
                bat = FieldReader(b: try file.bytes(at: regions.bat.offset + index * 8, count: Int(n * 8), what: "VHDX BAT"))
            }
            return bat.le64(Int(index - batStart) * 8)
        }
        var blocks = [UInt64](repeating: 0, count: Int(m.dataBlocks))
        let taken = [("the VHDX header area", 0..<VHDXLayout.headerAreaEnd), ("the BAT region", regions.bat.offset..<(regions.bat.offset + regions.bat.length)),
                     ("the metadata region", regions.metadata.offset..<(regions.metadata.offset + regions.metadata.length))] + (log.map { [("the log", $0)] } ?? [])
        for i in 0..<blocks.count {
            let index = UInt64(i) + UInt64(i) / m.chunkRatio
            let e = try batEntry(index)
            let at = regions.bat.offset + index * 8
            func bad(_ why: String) -> QcowPressError {
                .inputDamaged(path: path, location: "VHDX BAT entry \(index) (offset \(at), block \(i)) \(why)")
            }
            guard let state = State(rawValue: e & 7) else { throw bad("has state \(e & 7), not a payload block state") }
            switch state {
            case .fullyPresent: break
            case .partiallyPresent: throw bad("is partially present, which only a differencing image has")
            default: continue
            }
            let host = e & ~(VHDXLayout.mib - 1)
            // The part of the block the guest sees must be in the file (a last block may be short).
            let visible = min(m.blockSize, m.virtualSize - UInt64(i) * m.blockSize)
            guard host <= file.size, visible <= file.size - host else {
                throw bad("points to offset \(host): the block lies past the end of the file (\(file.size) bytes)")
            }
            let range = host..<(host + m.blockSize)
            if let (other, _) = taken.first(where: { $0.1.overlaps(range) }) { throw bad("points to offset \(host): the block overlaps \(other)") }
            blocks[i] = host
        }
        // Sector bitmap entries (a differencing image's; unused here): a present one inside the file, as QEMU checks.
        for c in stride(from: m.chunkRatio, to: entries, by: Int(m.chunkRatio + 1)) where try batEntry(c) & 7 == 6 {
            let host = try batEntry(c) & ~(VHDXLayout.mib - 1)
            guard host <= file.size, VHDXLayout.mib <= file.size - host else {
                throw .inputDamaged(path: path, location: "VHDX BAT entry \(c) (offset \(regions.bat.offset + c * 8), a sector bitmap) points to offset \(host), past the end of the file (\(file.size) bytes)")
            }
        }
        // Two blocks whose data overlap: sorted host offsets closer than a block (the entries are
        // found again only to name them).
        let sorted = blocks.filter { $0 != 0 }.sorted()
        for k in sorted.indices.dropFirst() where sorted[k] - sorted[k - 1] < m.blockSize {
            let a = blocks.firstIndex(of: sorted[k - 1]) ?? 0, b = blocks.lastIndex(of: sorted[k]) ?? 0
            throw .inputDamaged(path: path, location: "VHDX BAT entries of blocks \(a) and \(b) (offsets \(regions.bat.offset + (UInt64(a) + UInt64(a) / m.chunkRatio) * 8) and \(regions.bat.offset + (UInt64(b) + UInt64(b) / m.chunkRatio) * 8)) point to overlapping data (\(sorted[k - 1]) and \(sorted[k]))")
        }
        self.blocks = blocks
    }

    func hostOffset(ofBlock i: UInt64) -> UInt64? {
        guard i < UInt64(blocks.count), blocks[Int(i)] != 0 else { return nil }
        return blocks[Int(i)]
    }

    func readAllocated(block i: UInt64, host: UInt64, inBlock: UInt64, count: Int, into: UnsafeMutableRawPointer) throws(QcowPressError) {
        try file.read(at: host + inBlock, count: count, into: into)
    }

    /// "fixed" (LeaveBlocksAllocated) or "dynamic".
    public var subformat: String { metadata.leaveBlocksAllocated ? "fixed" : "dynamic" }
    /// The payload block size, as qemu-img info's cluster-size.
    public var blockBytes: Int { Int(metadata.blockSize) }
    public var logicalSectorSize: Int { Int(metadata.logicalSectorSize) }
}
