import DirectIO
import Glibc

/// A VMware disk as a guest sees it: one sparse file (monolithicSparse, streamOptimized) or a text
/// descriptor naming extents in guest order (monolithicFlat, twoGbMaxExtentSparse/Flat, vmfs):
/// FLAT extents are byte ranges of a file, SPARSE extents are read through their grain tables,
/// ZERO extents read as zeros. Reads come from several threads at once; compressed grains are
/// inflated by the thread that reads them.
public final class VMDKImage: GuestImage {
    public let path: String
    public let virtualSize: UInt64
    /// The descriptor's createType; for a lone sparse file, as qemu-img names it:
    /// "streamOptimized" when its grains are compressed, otherwise "monolithicSparse".
    public let createType: String
    /// The grain size of the first sparse extent (qemu-img info's cluster-size), nil when flat.
    public let grainSize: Int?
    /// The descriptor's CID and parentCID as qemu reads them (the first `CID` in its first
    /// 10 KiB, a hex number; nil when absent).
    public let cid: UInt32?
    public let parentCID: UInt32?
    /// The extents as `info` lists them (ZERO extents left out, as qemu leaves them out).
    let extentInfo: [ImageInfo.VMDKSpecific.Extent]
    let pieces: [Piece]

    enum Part: Sendable {
        case zero
        /// A file's bytes from `offset`; `data` are its data ranges (SEEK_DATA), extent-relative.
        case flat(FormatFile, offset: UInt64, data: [Range<UInt64>])
        case sparse(VMDKSparseExtent)
    }
    struct Piece: Sendable { let start: UInt64; let length: UInt64; let part: Part }

    /// Grain tables kept in memory for all extents together: 64 tables of 512 entries (256 KiB as
    /// decoded words) cover 2 GiB of guest at 64 KiB grains; each reading thread works inside one
    /// table's 32 MiB at a time, so 64 serve 64 threads and the zero scans ahead of them.
    static let cachedTables = 64

    init(path: String, createType: String, pieces: [Piece], descriptor: ArraySlice<UInt8>, extentInfo: [ImageInfo.VMDKSpecific.Extent]) {
        self.path = path
        self.createType = createType
        self.pieces = pieces
        self.extentInfo = extentInfo
        cid = VMDKDescriptor.hexKey("CID", in: descriptor)
        parentCID = VMDKDescriptor.hexKey("parentCID", in: descriptor)
        virtualSize = pieces.last.map { $0.start + $0.length } ?? 0
        grainSize = pieces.lazy.compactMap { if case .sparse(let s) = $0.part { Int(s.grainBytes) } else { nil } }.first
    }

    public static func open(path: String) throws(QcowPressError) -> VMDKImage {
        try open(file: try FormatFile(path: path))
    }

    /// Opens a sparse VMDK or a descriptor from `file` (a descriptor's extents are looked up in
    /// the folder of the file on disk).
    static func open(file: FormatFile) throws(QcowPressError) -> VMDKImage {
        let magic = file.size >= 4 ? FieldReader(b: try file.bytes(at: 0, count: 4, what: "VMDK magic")).le32(0) : 0
        let tables = L2TableCache(limit: cachedTables)
        if magic == VMDKSparseHeader.magic {
            let e = try VMDKSparseExtent(file: file, index: 0, guestSector: 0, tables: tables)
            if e.header.capacity == 0 && e.header.descriptorOffset != 0 {
                throw .unsupported(path: file.path, what: "a VMDK sparse file with capacity 0 that holds only a descriptor")
            }
            let kind = e.header.compressed ? "streamOptimized" : "monolithicSparse"
            // qemu looks for the embedded descriptor's keys at byte 512 whatever the header says;
            // here only when the header says there is one (grains could begin at 512 otherwise).
            let text = file.size > 512 && e.header.descriptorOffset != 0 ? try file.bytes(at: 512, count: Int(min(file.size - 512, UInt64(VMDKDescriptor.keyWindow))), what: "VMDK embedded descriptor") : []
            if VMDKDescriptor.find("parentFileNameHint", in: text[...]) {
                throw .unsupported(path: file.path, what: "a VMDK delta disk (its embedded descriptor names a parentFileNameHint): its data lives partly in a parent image; convert the chain with qemu-img")
            }
            return VMDKImage(path: file.path, createType: kind, pieces: e.size == 0 ? [] : [Piece(start: 0, length: e.size, part: .sparse(e))],
                             descriptor: text[...], extentInfo: [extentInfo(file: file.path, format: "", size: e.size, sparse: e)])
        }
        if magic == 0x4457_4F43 {  // "COWD"
            throw .unsupported(path: file.path, what: "a VMFS sparse (COWD) VMDK extent; QcowPress reads VMDK4 (KDMV) sparse extents")
        }
        guard file.size <= UInt64(VMDKDescriptor.maxBytes) else {
            throw .inputDamaged(path: file.path, location: "VMDK descriptor is \(file.size) bytes, more than \(VMDKDescriptor.maxBytes) (not a descriptor?)")
        }
        let text = try file.bytes(at: 0, count: Int(file.size), what: "VMDK descriptor")
        let d = try VMDKDescriptor(text, path: file.path)
        return try VMDKImage(descriptor: d, text: text[...], path: file.path, folderOf: file.filePath, tables: tables)
    }

    /// Opens the extents a descriptor at `path` names, in its folder. A file named twice as a
    /// sparse extent, FLAT ranges of one file that overlap, or an extent that is the descriptor
    /// itself are refused (a loop or a damaged descriptor).
    convenience init(descriptor d: VMDKDescriptor, text: ArraySlice<UInt8>, path: String, folderOf disk: String, tables: L2TableCache) throws(QcowPressError) {
        let folder = disk.lastIndex(of: "/").map { String(disk[...$0]) } ?? ""
        var pieces: [Piece] = []
        var infos: [ImageInfo.VMDKSpecific.Extent] = []
        var used: [String: [Range<UInt64>]] = [:]  // identity: byte ranges taken (sparse: everything)
        used[Qcow2Image.identity(disk)] = [0..<UInt64.max]
        var start: UInt64 = 0
        for (i, x) in d.extents.enumerated() {
            func bad(_ why: String) -> QcowPressError {
                .inputDamaged(path: path, location: "VMDK descriptor line \(x.line): extent \"\(x.fileName ?? "")\" \(why)")
            }
            let length = x.sectors * 512
            let part: Part
            if x.type == .zero {
                part = .zero
            } else {
                let name = folder + (x.fileName ?? "")
                guard let st = try? FileStatus.of(path: name) else { throw bad("is missing (looked for \(name))") }
                guard st.kind == .regular || st.kind == .blockDevice else { throw bad("is not a regular file or block device (\(name))") }
                let file = try FormatFile(path: name)
                // Sparse extents own their whole file; FLAT ones a byte range (offset ≤ 2^64/512 − sectors).
                let off = x.offset * 512
                let taken = x.type == .sparse ? 0..<UInt64.max : off..<(off + length)
                let id = Qcow2Image.identity(name)
                if let other = used[id]?.first(where: { $0.overlaps(taken) }) {
                    throw bad(other == 0..<UInt64.max ? "is the descriptor or a sparse extent named before (a loop or a damaged descriptor)" : "overlaps bytes \(other.lowerBound)..<\(other.upperBound) of an extent named before")
                }
                used[id, default: []].append(taken)
                if x.type == .sparse {
                    let e = try VMDKSparseExtent(file: file, index: i, guestSector: start / 512, tables: tables)
                    guard e.size == length else {
                        throw bad("has \(x.sectors) sectors, but its header's capacity (offset 12) is \(e.header.capacity)")
                    }
                    part = .sparse(e)
                    infos.append(Self.extentInfo(file: name, format: x.type.rawValue, size: length, sparse: e))
                } else {
                    guard off <= file.size, length <= file.size - off else {
                        throw bad("needs \(length) bytes from offset \(off), but the file has \(file.size)")
                    }
                    let data = file.dataRanges(to: off + length).compactMap { r in
                        r.upperBound > off ? (max(r.lowerBound, off) - off)..<(r.upperBound - off) : nil
                    }
                    part = .flat(file, offset: off, data: data)
                    infos.append(Self.extentInfo(file: name, format: x.type.rawValue, size: length, sparse: nil))
                }
            }
            guard length <= UInt64.max - start else { throw bad("makes the disk larger than 2^64 bytes") }
            if length == 0 { continue }
            pieces.append(Piece(start: start, length: length, part: part))
            start += length
        }
        self.init(path: path, createType: d.createType, pieces: pieces, descriptor: text, extentInfo: infos)
    }

    /// The piece holding guest byte `offset` (which is below virtualSize).
    func pieceIndex(_ offset: UInt64) -> Int {
        var lo = 0, hi = pieces.count
        while hi - lo > 1 {
            let mid = (lo + hi) / 2
            if pieces[mid].start <= offset { lo = mid } else { hi = mid }
        }
        return lo
    }

    public func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError) {
        var pos = 0
        while pos < count {
            let at = offset + UInt64(pos)
            guard at < virtualSize else {
                memset(into + pos, 0, count - pos)
                return
            }
            let p = pieces[pieceIndex(at)]
            let rel = at - p.start
            let n = Int(min(UInt64(count - pos), p.length - rel))
            switch p.part {
            case .zero: memset(into + pos, 0, n)
            case .flat(let f, let off, _): try f.read(at: off + rel, count: n, into: into + pos)
            case .sparse(let e): try e.read(at: rel, count: n, into: into + pos, context: context)
            }
            pos += n
        }
    }

    /// Straight into the buffers (an encoder's cluster slots): compressed grains of every buffer
    /// in one extent are read together and inflated in place, without a gather copy.
    public func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer], context: ReadContext) throws(QcowPressError) {
        var at = offset
        var pending: [VMDKSparseExtent.Piece] = []
        var pendingExtent: VMDKSparseExtent?
        func finish() throws(QcowPressError) {
            if let e = pendingExtent { try e.readCompressed(pending, context: context) }
            (pending, pendingExtent) = ([], nil)
        }
        for b in buffers {
            var pos = 0
            while pos < b.count {
                let here = at + UInt64(pos)
                guard here < virtualSize else {
                    memset(b.baseAddress! + pos, 0, b.count - pos)
                    break
                }
                let p = pieces[pieceIndex(here)]
                let rel = here - p.start
                let n = Int(min(UInt64(b.count - pos), p.length - rel))
                if case .sparse(let e) = p.part {
                    if pendingExtent !== e { try finish() }
                    pendingExtent = e
                    try e.collect(at: rel, count: n, into: b.baseAddress! + pos, compressed: &pending)
                } else {
                    try read(at: here, count: n, into: b.baseAddress! + pos, context: context)
                }
                pos += n
            }
            at += UInt64(b.count)
        }
        try finish()
    }

    public func isKnownZero(at offset: UInt64, count: Int) throws(QcowPressError) -> Bool {
        guard count > 0 else { return true }
        return try knownZeroEnd(from: offset, limit: offset + UInt64(count)) == offset + UInt64(count)
    }

    /// By grain directory and table entries and flat files' holes, never by reading data.
    public func knownZeroEnd(from offset: UInt64, limit: UInt64) throws(QcowPressError) -> UInt64 {
        var at = offset
        while at < limit {
            guard at < virtualSize else { return limit }
            let p = pieces[pieceIndex(at)]
            let rel = at - p.start
            let relLimit = min(p.length, limit - p.start)
            let end: UInt64
            switch p.part {
            case .zero: end = relLimit
            case .sparse(let e): end = try e.knownZeroEnd(from: rel, limit: relLimit)
            case .flat(_, _, let data):
                if let next = data.first(where: { $0.upperBound > rel }) {
                    end = next.lowerBound <= rel ? rel : min(next.lowerBound, relLimit)
                } else {
                    end = relLimit
                }
            }
            if end < relLimit { return p.start + end }
            at = p.start + relLimit
        }
        return limit
    }
}
