import ClusterCompression
import DirectIO
import Glibc

/// One VMDK sparse extent (monolithicSparse, streamOptimized, or a twoGbMaxExtentSparse piece):
/// grain directory (u32 sector numbers of grain tables, read and checked when the extent is
/// opened: 4 bytes per 32 MiB of guest with qemu-img's and VMware's 64 KiB grains), grain tables
/// (u32 sector numbers of grains: 0 unallocated, 1 zeroed when the header's flag 2 is set) loaded
/// when first used and kept in a bounded cache, and grains: plain, or for streamOptimized a
/// 12-byte marker (LBA, size) and a zlib stream, inflated by the thread that reads it.
final class VMDKSparseExtent: Sendable {
    let file: FormatFile
    let header: VMDKSparseHeader
    /// The guest bytes of this extent (capacity × 512).
    let size: UInt64
    /// Where this extent starts in the guest, in sectors (grain markers may carry either LBA).
    let guestSector: UInt64
    let gd: [UInt32]
    let gdAt: UInt64
    /// The redundant grain directory, for a table of `gd` that cannot be used (``VMDKGrainDirectory``).
    let redundant: VMDKRedundantDirectory?
    let tables: L2TableCache
    /// This extent's key bits in the shared table cache (table offsets are below 2^41).
    let cacheKey: UInt64
    var grainBytes: UInt64 { header.grainBytes }

    /// Span of one coalesced read of compressed grains: 2 MiB holds 64 grains of 64 KiB at 50 %
    /// (a 4 MiB engine chunk in two reads); larger spans only grow each thread's scratch.
    static let spanBytes: UInt64 = 2 << 20

    init(file: FormatFile, index: Int, guestSector: UInt64, tables: L2TableCache) throws(QcowPressError) {
        self.file = file
        let (h, at) = try VMDKSparseHeader.read(file)
        header = h
        size = h.capacity * 512
        self.guestSector = guestSector
        self.tables = tables
        cacheKey = UInt64(index) << 42
        let (directory, redundant) = try VMDKGrainDirectory.open(file, header: h, headerAt: at)
        gd = directory.entries
        gdAt = directory.at
        self.redundant = redundant
    }

    enum Grain: Equatable { case unallocated, zero, data(UInt64) }

    /// Where grain `g` lives (for a compressed extent: its marker, or its zlib data without markers).
    func grain(_ g: UInt64) throws(QcowPressError) -> Grain {
        let t = Int(g / UInt64(header.gtesPerGT))
        guard t < gd.count, gd[t] != 0 else { return .unallocated }
        let table = try tables.table(at: cacheKey | UInt64(gd[t])) { () throws(QcowPressError) -> [UInt64] in try loadTable(t) }
        let e = table[Int(g % UInt64(header.gtesPerGT))]
        if e == 0 { return .unallocated }
        if e == 1 && header.hasZeroedGrains { return .zero }
        return .data(e * 512)
    }

    /// Grain table `t`, every entry for a grain inside the extent checked against the file; the
    /// redundant copy when the primary one cannot be used.
    func loadTable(_ t: Int) throws(QcowPressError) -> [UInt64] {
        do {
            return try readTable(t, sector: UInt64(gd[t]), what: "VMDK grain table \(t)")
        } catch {
            guard let redundant else { throw error }
            return try redundant.table(t, after: error) { (sector, what) throws(QcowPressError) in try readTable(t, sector: sector, what: what) }
        }
    }

    private func readTable(_ t: Int, sector: UInt64, what: String) throws(QcowPressError) -> [UInt64] {
        let at = sector * 512
        let n = Int(header.gtesPerGT)
        let raw = FieldReader(b: try file.bytes(at: at, count: n * 4, what: what))
        var out = [UInt64](repeating: 0, count: n)
        for i in 0..<n {
            let e = UInt64(raw.le32(i * 4))
            out[i] = e
            let start = (UInt64(t) * UInt64(n) + UInt64(i)) * grainBytes
            guard e > 1 || (e == 1 && !header.hasZeroedGrains), start < size else { continue }
            // Plain grains must be whole in the file; a compressed one needs its marker there
            // (its length is checked when it is read).
            let need = header.compressed ? UInt64(VMDKMarker.grainHeaderBytes) : min(grainBytes, size - start)
            guard e * 512 + need <= file.size else {
                throw .inputDamaged(path: file.path, location: "\(what) entry \(i) (offset \(at + UInt64(i) * 4)) is \(e): grain at \(e * 512) lies past the end of the file (\(file.size) bytes)")
            }
        }
        return out
    }

    /// Where the run of zero-reading bytes from `from` ends (extent-relative), at most `limit`;
    /// whole grain tables absent from the directory are skipped at once.
    func knownZeroEnd(from: UInt64, limit: UInt64) throws(QcowPressError) -> UInt64 {
        var at = from
        while at < limit {
            let g = at / grainBytes
            let t = g / UInt64(header.gtesPerGT)
            if t < UInt64(gd.count), gd[Int(t)] == 0 {
                at = (t + 1) * header.gtCoverage
                continue
            }
            if case .data = try grain(g) { return at }
            at = (g + 1) * grainBytes
        }
        return limit
    }

    /// A grain's piece of one read: guest grain, its host place, where it goes.
    struct Piece { var grain: UInt64; var host: UInt64; var inGrain: Int; var count: Int; var dst: UnsafeMutableRawPointer }

    /// Reads [offset, offset + count) of this extent (inside it) into `into`.
    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError) {
        var compressed: [Piece] = []
        try collect(at: offset, count: count, into: into, compressed: &compressed)
        try readCompressed(compressed, context: context)
    }

    /// Fills [offset, offset + count) except compressed grains, which are appended to
    /// `compressed` for ``readCompressed`` (so that one read covers the grains of many buffers).
    func collect(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, compressed: inout [Piece]) throws(QcowPressError) {
        var pos = 0
        // A run of plain grains contiguous in the file and in the guest: one read.
        var run: (host: UInt64, dst: UnsafeMutableRawPointer, count: Int)?
        func flush() throws(QcowPressError) {
            if let r = run { try file.read(at: r.host, count: r.count, into: r.dst) }
            run = nil
        }
        while pos < count {
            let at = offset + UInt64(pos)
            let g = at / grainBytes
            let inGrain = Int(at - g * grainBytes)
            let n = min(count - pos, Int(grainBytes) - inGrain)
            switch try grain(g) {
            case .unallocated, .zero:
                memset(into + pos, 0, n)
            case .data(let host):
                if header.compressed {
                    compressed.append(Piece(grain: g, host: host, inGrain: inGrain, count: n, dst: into + pos))
                } else if let r = run, r.host + UInt64(r.count) == host + UInt64(inGrain), r.dst + r.count == into + pos {
                    run = (r.host, r.dst, r.count + n)
                } else {
                    try flush()
                    run = (host + UInt64(inGrain), into + pos, n)
                }
            }
            pos += n
        }
        try flush()
    }

    /// Compressed grains, sorted by place in the file: read in spans of ``spanBytes`` (a
    /// stream's grains lie one after another, so a span is one read), each inflated here.
    func readCompressed(_ unsorted: [Piece], context: ReadContext) throws(QcowPressError) {
        guard !unsorted.isEmpty else { return }
        let pieces = unsorted.sorted { $0.host < $1.host }
        let maxData = Int(grainBytes) * 2  // as QEMU: a grain's zlib data is at most two grains
        let inflater = ZlibGrainInflater()
        var i = 0
        while i < pieces.count {
            let start = pieces[i].host & ~4095
            var j = i + 1
            while j < pieces.count && pieces[j].host - start < Self.spanBytes { j += 1 }
            var end = min(file.size, (pieces[j - 1].host + 4096 + 4095) & ~4095)
            // Through the page cache: memory 512 bytes past a page boundary makes FormatFile read
            // buffered. The engine asks for a few grains at a time (its free cluster slots), and
            // O_DIRECT reads that small waited on the disk each time: measured on the 3 GiB bench
            // disk as a stream, 31.9 s wall with 14.3 s of CPU; the kernel's readahead keeps the
            // sequential stream ahead of the readers instead.
            let mem = context.compressedBuffer(Int(end - start) + maxData + 8192 + 512).pointer + 512
            try file.read(at: start, count: Int(end - start), into: mem)
            var k = i
            while k < j {
                // Pieces of one grain (an encoder's small cluster slots) share one inflate.
                let p = pieces[k]
                var l = k + 1
                while l < j && pieces[l].host == p.host { l += 1 }
                let at = Int(p.host - start)
                var len = Int(min(UInt64(maxData), file.size - p.host))
                var data = at
                if header.hasMarkers {
                    if UInt64(at + VMDKMarker.grainHeaderBytes) > end - start {
                        try file.read(at: end, count: Int(p.host + 12 - end), into: mem + Int(end - start))
                        end = p.host + 12
                    }
                    let m = FieldReader(b: Array(UnsafeRawBufferPointer(start: mem + at, count: 12)))
                    let lba = m.le64(0)
                    len = Int(m.le32(8))
                    for q in pieces[k..<l] {
                        let sector = q.grain * header.grainSectors
                        guard lba == sector || lba == sector + guestSector else {
                            throw .inputDamaged(path: file.path, location: "VMDK grain marker at offset \(p.host) has LBA \(lba); the grain table places it at sector \(sector)")
                        }
                    }
                    guard len > 0, len <= maxData, p.host + 12 + UInt64(len) <= file.size else {
                        throw .inputDamaged(path: file.path, location: "VMDK grain marker at offset \(p.host) has size \(len): not from 1 to \(maxData) bytes inside the file (\(file.size) bytes)")
                    }
                    data = at + 12
                }
                let dataEnd = UInt64(data + len)
                if dataEnd > end - start {
                    try file.read(at: end, count: Int(start + dataEnd - end), into: mem + Int(end - start))
                    end = start + dataEnd
                }
                try inflate(pieces[k..<l], UnsafeRawBufferPointer(start: mem + data, count: len), inflater, context)
                k = l
            }
            i = j
        }
    }

    /// Inflates one grain into its piece (straight into the destination when the piece is the
    /// whole grain) or once into scratch and copied to each piece.
    private func inflate(_ group: ArraySlice<Piece>, _ src: UnsafeRawBufferPointer, _ inflater: ZlibGrainInflater, _ context: ReadContext) throws(QcowPressError) {
        let p = group[group.startIndex]
        let visible = Int(min(grainBytes, size - p.grain * grainBytes))
        let whole = group.count == 1 && p.inGrain == 0 && p.count == Int(grainBytes)
        let out = whole ? p.dst : context.buffer(Int(grainBytes)).pointer
        let got: Int
        do {
            got = try inflater.inflate(src, into: UnsafeMutableRawBufferPointer(start: out, count: Int(grainBytes)))
        } catch {
            throw .inputDamaged(path: file.path, location: "VMDK grain at offset \(p.host) (guest sector \(p.grain * header.grainSectors)): \(error.description)")
        }
        guard got >= visible else {
            throw .inputDamaged(path: file.path, location: "VMDK grain at offset \(p.host) inflates to \(got) bytes, not the grain's \(visible)")
        }
        if !whole {
            for q in group { memcpy(q.dst, out + q.inGrain, q.count) }
        }
    }
}
