import DirectIO

/// The header of a VMDK sparse extent (VMware "Virtual Disk Format 5.0", QEMU `block/vmdk.c`
/// VMDK4Header; little-endian; 512 bytes at offset 0, and for a stream whose header says the
/// grain directory is at the end, again in the footer). Sizes and offsets are in 512-byte sectors.
public struct VMDKSparseHeader: Sendable, Equatable {
    static let magic: UInt32 = 0x564D_444B  // "KDMV" read little-endian
    /// gdOffset of a streamOptimized header whose real grain directory is named by the footer.
    static let gdAtEnd = UInt64.max
    /// Flags: newline-detection bytes valid, redundant GD present, zeroed-grain entries (GTE 1),
    /// grains compressed, grains and tables preceded by markers.
    static let flagNewlineTest: UInt32 = 1 << 0
    static let flagZeroedGrain: UInt32 = 1 << 2
    static let flagCompressed: UInt32 = 1 << 16
    static let flagMarkers: UInt32 = 1 << 17
    /// A grain of 2 MiB at most: VMware and qemu-img write 64 KiB; the bound limits what one
    /// compressed grain's inflate and read may cost per thread (QEMU allows up to 1 GiB).
    static let maxGrainSectors: UInt64 = 4096
    /// QEMU's limit on grain-directory entries ("L1 size too big": 32 Mi entries, 128 MiB).
    static let maxGDEntries: UInt64 = 32 << 20
    /// QEMU refuses more than 512 entries per grain table ("L2 table size too big").
    static let maxGTEs: UInt32 = 512

    public var version: UInt32
    public var flags: UInt32
    /// The guest size of this extent in sectors.
    public var capacity: UInt64
    public var grainSectors: UInt64
    public var descriptorOffset: UInt64
    public var descriptorSize: UInt64
    public var gtesPerGT: UInt32
    public var redundantGDOffset: UInt64
    public var gdOffset: UInt64
    /// The sector where grains begin (metadata before it).
    public var overhead: UInt64
    public var compressAlgorithm: UInt16

    public var compressed: Bool { compressAlgorithm == 1 }
    public var hasMarkers: Bool { flags & Self.flagMarkers != 0 }
    public var hasZeroedGrains: Bool { flags & Self.flagZeroedGrain != 0 }
    public var grainBytes: UInt64 { grainSectors * 512 }
    /// Guest bytes one grain table covers.
    public var gtCoverage: UInt64 { UInt64(gtesPerGT) * grainBytes }
    public var gdEntries: UInt64 { (capacity * 512 + gtCoverage - 1) / gtCoverage }

    /// Parses 512 bytes read at `at` of `path`; each error names the field and its offset.
    init(_ bytes: [UInt8], at: UInt64, path: String) throws(QcowPressError) {
        let h = FieldReader(b: bytes)
        func bad(_ field: String, _ o: Int, _ why: String) -> QcowPressError {
            .inputDamaged(path: path, location: "VMDK header (offset \(at)) field \(field) (offset \(at + UInt64(o))) \(why)")
        }
        guard h.le32(0) == Self.magic else { throw bad("magicNumber", 0, "is not \"KDMV\" (not a VMDK sparse extent)") }
        version = h.le32(4)
        flags = h.le32(8)
        capacity = h.le64(12)
        grainSectors = h.le64(20)
        descriptorOffset = h.le64(28)
        descriptorSize = h.le64(36)
        gtesPerGT = h.le32(44)
        redundantGDOffset = h.le64(48)
        gdOffset = h.le64(56)
        overhead = h.le64(64)
        compressAlgorithm = UInt16(h.b[77]) | UInt16(h.b[78]) << 8
        guard (1...3).contains(version) else {
            throw .unsupported(path: path, what: "VMDK sparse extent version \(version) (QcowPress reads versions 1-3, as qemu-img)")
        }
        guard compressAlgorithm <= 1 else {
            throw .unsupported(path: path, what: "VMDK compressAlgorithm \(compressAlgorithm) at offset \(at + 77) (QcowPress reads deflate, 1)")
        }
        if flags & Self.flagNewlineTest != 0 && h.b[73..<77].elementsEqual([0x0A, 0x20, 0x0D, 0x0A]) == false {
            throw bad("singleEndLineChar..doubleEndLineChar2", 73, "are not \"\\n \\r\\n\": the file was damaged by a text-mode transfer")
        }
        guard grainSectors >= 1, grainSectors <= Self.maxGrainSectors, grainSectors & (grainSectors - 1) == 0 else {
            throw bad("grainSize", 20, "is \(grainSectors) sectors: not a power of two from 1 to \(Self.maxGrainSectors)")
        }
        guard gtesPerGT >= 1, gtesPerGT <= Self.maxGTEs else {
            throw bad("numGTEsPerGT", 44, "is \(gtesPerGT): not from 1 to \(Self.maxGTEs)")
        }
        guard capacity <= UInt64.max / 512 - gtCoverage,
              (capacity * 512 + gtCoverage - 1) / gtCoverage <= Self.maxGDEntries else {
            throw bad("capacity", 12, "is \(capacity) sectors: more than \(Self.maxGDEntries) grain tables of \(gtCoverage) bytes")
        }
    }

    /// Checks the descriptor's and the grains' places against the file (a footer's header has its real gdOffset).
    func checkPlacement(fileSize: UInt64, at: UInt64, path: String) throws(QcowPressError) {
        func bad(_ field: String, _ o: Int, _ why: String) -> QcowPressError {
            .inputDamaged(path: path, location: "VMDK header (offset \(at)) field \(field) (offset \(at + UInt64(o))) \(why)")
        }
        let sectors = fileSize / 512
        if descriptorOffset != 0 {
            guard descriptorOffset <= sectors, descriptorSize <= sectors - descriptorOffset else {
                throw bad("descriptorOffset", 28, "is \(descriptorOffset) (\(descriptorSize) sectors): the embedded descriptor lies past the end of the file (\(fileSize) bytes)")
            }
        }
        guard overhead <= sectors else {
            throw bad("overHead", 64, "is \(overhead) sectors: the file (\(fileSize) bytes) is truncated")
        }
        // The grain directory is checked where it is read (VMDKGrainDirectory: it has a copy).
    }

    /// The header a reader uses: the one at 0, or for a stream whose header says the directory
    /// is at the end (gdOffset all ones), the footer's (`footer marker, header, end-of-stream
    /// marker` in the last 1536 bytes, as QEMU's vmdk_open_vmdk4 reads it).
    static func read(_ file: FormatFile) throws(QcowPressError) -> (header: VMDKSparseHeader, at: UInt64) {
        let first = try VMDKSparseHeader(try file.bytes(at: 0, count: 512, what: "VMDK header"), at: 0, path: file.path)
        guard first.gdOffset == gdAtEnd else {
            try first.checkPlacement(fileSize: file.size, at: 0, path: file.path)
            return (first, 0)
        }
        guard file.size >= 2048 else {
            throw .inputDamaged(path: file.path, location: "VMDK header gdOffset (offset 56) says the grain directory is in the footer, but the file (\(file.size) bytes) is too short to hold one")
        }
        let at = file.size - 1536
        let tail = FieldReader(b: try file.bytes(at: at, count: 1536, what: "VMDK footer"))
        guard tail.le32(8) == 0, tail.le32(12) == VMDKMarker.footer else {
            throw .inputDamaged(path: file.path, location: "VMDK footer marker (offset \(at)) is missing (size \(tail.le32(8)), type \(tail.le32(12)); want 0 and 3): the stream is truncated or was not closed")
        }
        guard tail.le64(1024) == 0, tail.le32(1032) == 0, tail.le32(1036) == VMDKMarker.endOfStream else {
            throw .inputDamaged(path: file.path, location: "VMDK end-of-stream marker (offset \(at + 1024)) is missing after the footer")
        }
        let footer = try VMDKSparseHeader(Array(tail.b[512..<1024]), at: at + 512, path: file.path)
        guard footer.gdOffset != gdAtEnd else {
            throw .inputDamaged(path: file.path, location: "VMDK footer (offset \(at + 512)) field gdOffset (offset \(at + 568)) is all ones too: no grain directory")
        }
        try footer.checkPlacement(fileSize: file.size, at: at + 512, path: file.path)
        return (footer, at + 512)
    }
}

/// Stream markers (VMware "Virtual Disk Format 5.0", streamOptimized): 12 bytes (LBA or sector
/// count u64, size u32) then, when size is 0, a type u32 padded to 512 bytes; a grain marker has
/// size > 0 and is followed by that many bytes of zlib data.
enum VMDKMarker {
    static let endOfStream: UInt32 = 0
    static let grainTable: UInt32 = 1
    static let grainDirectory: UInt32 = 2
    static let footer: UInt32 = 3
    /// The bytes of a grain marker before its compressed data.
    static let grainHeaderBytes = 12
}
