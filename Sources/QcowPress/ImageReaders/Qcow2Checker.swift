import DirectIO
import Glibc
import Qcow2Format

/// `qcowpress check`: recounts every reference in a qcow2 image (header, L1/L2 tables, data and
/// compressed clusters, refcount structures, snapshots, bitmaps) and compares with the stored
/// refcounts, as `qemu-img check` does, without repairing anything.
public struct Qcow2Checker: Sendable {
    public struct Result: Sendable, Codable {
        public var filename: String
        public var format = "qcow2"
        public var checkErrors: Int = 0
        public var corruptions: Int = 0
        public var leaks: Int = 0
        public var imageEndOffset: UInt64 = 0
        public var totalClusters: UInt64 = 0
        public var allocatedClusters: UInt64 = 0
        public var fragmentedClusters: UInt64 = 0
        public var compressedClusters: UInt64 = 0
        /// One line per problem, as qemu-img prints them.
        public var messages: [String] = []

        enum CodingKeys: String, CodingKey {
            case filename, format, messages
            case checkErrors = "check-errors"
            case corruptions, leaks
            case imageEndOffset = "image-end-offset"
            case totalClusters = "total-clusters"
            case allocatedClusters = "allocated-clusters"
            case fragmentedClusters = "fragmented-clusters"
            case compressedClusters = "compressed-clusters"
        }

        /// 0 clean, 1 check errors, 2 corruption, 3 leaks only (qemu-img's exit statuses).
        public var exitStatus: Int32 { checkErrors > 0 ? 1 : corruptions > 0 ? 2 : (leaks > 0 ? 3 : 0) }

        /// What `qemu-img check` prints on stdout, line for line: the verdict, the counts and the
        /// image end offset. The problem lines (``messages``) are qemu-img's stderr.
        public var text: String {
            var s = ""
            if corruptions == 0 && leaks == 0 && checkErrors == 0 {
                s += "No errors were found on the image.\n"
            } else {
                if corruptions > 0 {
                    s += "\n\(corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
                }
                if leaks > 0 {
                    s += "\n\(leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
                }
                if checkErrors > 0 {
                    s += "\n\(checkErrors) internal errors have occurred during the check.\n"
                }
            }
            if totalClusters > 0 && allocatedClusters > 0 {
                func pct(_ n: UInt64, _ d: UInt64) -> String {
                    let v = d == 0 ? 0 : Int((Double(n) * 10000 / Double(d)).rounded())
                    return "\(v / 100).\(v % 100 < 10 ? "0" : "")\(v % 100)%"
                }
                s += "\(allocatedClusters)/\(totalClusters) = \(pct(allocatedClusters, totalClusters)) allocated, \(pct(fragmentedClusters, allocatedClusters)) fragmented, \(pct(compressedClusters, allocatedClusters)) compressed clusters\n"
            }
            if imageEndOffset > 0 { s += "Image end offset: \(imageEndOffset)\n" }
            return s
        }
    }

    public let path: String
    public init(path: String) { self.path = path }

    /// At most this many problem lines are kept (qemu-img prints them all; a damaged 4 TiB image
    /// can have tens of millions, which would cost more memory than the check itself).
    public static let maxMessages = 10_000

    public func run() throws(QcowPressError) -> Result {
        let file: InputFile
        do { file = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        guard let h = try readQcow2Header(file, path: path, requireMagic: true, tablesInsideFile: false) else {
            throw .inputDamaged(path: path, location: "magic at offset 0 is not QFI\\xfb (not a qcow2 image)")
        }
        var state = CheckState(file: file, header: h, path: path)
        try state.check()
        return state.res
    }
}

/// References counted so far: one counter per host cluster, kept in chunks of `chunkClusters`
/// that exist only where something was referenced (a 1 MiB image truncated to 4 TiB costs one
/// chunk, not 64 Mi counters). Counters are 16-bit; the rare larger count spills to a dictionary.
struct ReferenceCounts {
    static let chunkShift: UInt64 = 15
    static let chunkClusters = 1 << Int(chunkShift)
    final class Chunk {
        var counts = [UInt16](repeating: 0, count: ReferenceCounts.chunkClusters)
    }
    private var chunks: [UInt64: Chunk] = [:]
    private var big: [UInt64: UInt64] = [:]
    /// Clusters through which references may have been counted (exclusive upper bound).
    private(set) var extent: UInt64 = 0

    func get(_ c: UInt64) -> UInt64 {
        guard let ch = chunks[c >> Self.chunkShift] else { return 0 }
        let v = ch.counts[Int(c & UInt64(Self.chunkClusters - 1))]
        return v == UInt16.max ? big[c] ?? UInt64(v) : UInt64(v)
    }
    /// Adds one; returns false (unchanged) when the count is already `max`.
    mutating func increment(_ c: UInt64, max: UInt64) -> Bool {
        let k = c >> Self.chunkShift
        let ch: Chunk
        if let x = chunks[k] { ch = x } else { ch = Chunk(); chunks[k] = ch }
        extent = Swift.max(extent, c + 1)
        let i = Int(c & UInt64(Self.chunkClusters - 1))
        let v = ch.counts[i]
        let cur = v == UInt16.max ? big[c] ?? UInt64(v) : UInt64(v)
        guard cur < max else { return false }
        if cur + 1 >= UInt64(UInt16.max) {
            ch.counts[i] = UInt16.max
            big[c] = cur + 1
        } else {
            ch.counts[i] = v + 1
        }
        return true
    }
    func hasChunk(covering c: UInt64) -> Bool { chunks[c >> Self.chunkShift] != nil }
    /// First cluster of every chunk with references, ascending.
    var chunkStarts: [UInt64] { chunks.keys.sorted().map { $0 << Self.chunkShift } }
}

/// The check itself, following qemu-img's order and counting (block/qcow2-refcount.c): every
/// reference is counted in memory, then compared with the stored refcounts, then the copied flags.
struct CheckState {
    let file: InputFile
    let h: Qcow2Header
    let path: String
    let cs: UInt64
    let bits: UInt64
    let g: ClusterGeometry
    let fileSize: UInt64
    let codec: RefcountBlockCodec
    let perBlock: UInt64
    let hasDataFile: Bool
    var res: Result
    var refs = ReferenceCounts()
    var reftable: [UInt64] = []
    /// One refcount block kept for lookups (offset, bytes).
    var cachedBlock: (UInt64, [UInt8])?
    typealias Result = Qcow2Checker.Result

    init(file: InputFile, header: Qcow2Header, path: String) {
        self.file = file
        self.h = header
        self.path = path
        cs = UInt64(header.clusterSize)
        bits = UInt64(header.clusterBits)
        g = header.geometry
        fileSize = file.size
        codec = RefcountBlockCodec(refcountOrder: Int(header.refcountOrder))
        perBlock = g.clustersPerRefcountBlock(refcountOrder: Int(header.refcountOrder))
        hasDataFile = header.incompatibleFeatures.contains(.externalDataFile)
        res = Result(filename: path)
    }

    /// False once enough messages are kept: callers skip formatting the rest.
    var loud: Bool { res.messages.count <= Qcow2Checker.maxMessages }

    mutating func say(_ m: String) {
        if res.messages.count < Qcow2Checker.maxMessages {
            res.messages.append(m)
        } else if res.messages.count == Qcow2Checker.maxMessages {
            res.messages.append("(further messages not shown)")
        }
    }

    /// Reads `n` bytes at `off`; what lies past the end of the file reads as zeros (as QEMU's file
    /// driver does).
    func read(_ off: UInt64, _ n: Int) throws(QcowPressError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        guard off < fileSize, n > 0 else { return out }
        let len = Int(min(UInt64(n), fileSize - off))
        let r: Swift.Result<Int, IOError> = out.withUnsafeMutableBytes { p in
            Swift.Result { () throws(IOError) -> Int in try file.read(into: p.baseAddress!, length: len, offset: off) }
        }
        do { _ = try r.get() } catch { throw .from(error) }
        return out
    }
    func be64(_ a: [UInt8], _ i: Int) -> UInt64 { a.withUnsafeBytes { loadBE64($0, i) } }
    /// `n` bytes at `off` as big-endian 64-bit words (zeros past the end of the file).
    func words(_ off: UInt64, _ n: Int) throws(QcowPressError) -> [UInt64] {
        let bytes = try read(off, n)
        return bytes.withUnsafeBytes { p in
            [UInt64](unsafeUninitializedCapacity: n / 8) { w, count in
                for i in 0..<(n / 8) { w[i] = UInt64(bigEndian: p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
                count = n / 8
            }
        }
    }

    /// Counts one reference to every cluster of [off, off+len) (qcow2_inc_refcounts_imrt).
    mutating func ref(_ off: UInt64, _ len: UInt64) {
        guard len > 0, off <= UInt64(Int64.max), len <= UInt64(Int64.max) - off else {
            if len > 0 {
                res.corruptions += 1
                if loud { say("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x\(String(off, radix: 16)) size 0x\(String(len, radix: 16))") }
            }
            return
        }
        // The last cluster may be partly allocated: less than a cluster past the end is fine.
        if off + len >= fileSize && off + len - fileSize >= cs {
            res.corruptions += 1
            if loud { say("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x\(String(off, radix: 16)) size 0x\(String(len, radix: 16))") }
            return
        }
        let maxRef = codec.maxRefcount
        var c = off >> bits
        let last = (off + len - 1) >> bits
        while c <= last {
            if !refs.increment(c, max: maxRef) {
                res.corruptions += 1
                if loud { say("ERROR: overflow cluster offset=0x\(String(c << bits, radix: 16))") }
            }
            c += 1
        }
    }

    /// The stored refcount of cluster `c`, or nil when its refcount block entry is unaligned
    /// (QEMU cannot read it: "Can't get refcount").
    mutating func stored(_ c: UInt64) throws(QcowPressError) -> UInt64? {
        let i = c / perBlock
        guard i < UInt64(reftable.count) else { return 0 }
        let b = reftable[Int(i)] & ~UInt64(0x1FF)
        if b == 0 { return 0 }
        // Unaligned, or beyond what a block request can address: QEMU cannot read the block.
        if b % cs != 0 || b > UInt64(Int64.max) - (1 << 31) { return nil }
        if cachedBlock?.0 != b { cachedBlock = (b, try read(b, Int(cs))) }
        let k = Int(c % perBlock)
        return cachedBlock!.1.withUnsafeBytes { codec.get($0, k) }
    }

    enum ClusterType { case compressed, zeroPlain, zeroAlloc, normal, unallocated }
    func type(_ e: UInt64) -> ClusterType {
        if e & L2Entry.compressedFlag != 0 { return .compressed }
        if e & L2Entry.zeroFlag != 0 && !g.extendedL2 { return e & L2Entry.offsetMask != 0 ? .zeroAlloc : .zeroPlain }
        if e & L2Entry.offsetMask == 0 { return hasDataFile && e & L2Entry.copiedFlag != 0 ? .normal : .unallocated }
        return .normal
    }

    mutating func checkL2(_ l2: UInt64, active: Bool) throws(QcowPressError) {
        // A table past the end of the file reads as zeros: nothing in it to count or check.
        guard l2 < fileSize else { return }
        let table = try words(l2, Int(cs))
        let words = g.extendedL2 ? 2 : 1
        var nextContiguous: UInt64 = 0
        for j in 0..<g.l2Entries {
            let e = table[j * words]
            let bitmap = g.extendedL2 ? table[j * 2 + 1] : 0
            if e == 0 && bitmap == 0 { continue }
            let t = type(e)
            if t != .compressed && e & L2Entry.standardReservedMask != 0 {
                res.corruptions += 1
                if loud { say("ERROR found l2 entry with reserved bits set: \(String(e, radix: 16))") }
            }
            switch t {
            case .compressed:
                if e & L2Entry.copiedFlag != 0 {
                    res.corruptions += 1
                    let d = L2Entry(rawValue: e).compressedDescriptor(clusterBits: g.clusterBits)
                    if loud { say("ERROR: coffset=0x\(String(d.hostOffset, radix: 16)): copied flag must never be set for compressed clusters") }
                }
                if hasDataFile {
                    res.corruptions += 1
                    if loud { say("ERROR compressed cluster \(j) with data file, entry=0x\(String(e, radix: 16))") }
                    continue
                }
                if bitmap != 0 {
                    res.corruptions += 1
                    if loud { say("ERROR compressed cluster \(j) with non-zero subcluster allocation bitmap, entry=0x\(String(e, radix: 16))") }
                    continue
                }
                let d = L2Entry(rawValue: e).compressedDescriptor(clusterBits: g.clusterBits)
                ref(d.hostOffset, UInt64(d.readLength))
                if active {
                    res.allocatedClusters += 1
                    res.compressedClusters += 1
                    res.fragmentedClusters += 1
                }
            case .zeroAlloc, .normal:
                let off = e & L2Entry.offsetMask
                if (bitmap >> 32) & bitmap != 0 {
                    res.corruptions += 1
                    if loud { say("ERROR offset=\(String(off, radix: 16)): Allocated cluster has corrupted subcluster allocation bitmap") }
                }
                if off % cs != 0 {
                    res.corruptions += 1
                    let data = g.extendedL2 ? bitmap & 0xFFFF_FFFF != 0 : e & L2Entry.zeroFlag == 0
                    if loud { say("ERROR offset=\(String(off, radix: 16)): \(data ? "Data" : "Preallocated") cluster is not properly aligned; L2 entry corrupted.") }
                }
                if active {
                    res.allocatedClusters += 1
                    if nextContiguous != 0 && off != nextContiguous { res.fragmentedClusters += 1 }
                    nextContiguous = off + cs
                }
                if !hasDataFile { ref(off, cs) }
            case .zeroPlain:
                break
            case .unallocated:
                if bitmap & 0xFFFF_FFFF != 0 {
                    res.corruptions += 1
                    if loud { say("ERROR: Unallocated cluster has non-zero subcluster allocation map") }
                }
            }
        }
    }

    mutating func checkL1(_ l1Offset: UInt64, _ l1Size: Int, active: Bool) throws(QcowPressError) {
        guard l1Size > 0 else { return }
        ref(l1Offset, UInt64(l1Size) * 8)
        let l1 = try words(l1Offset, l1Size * 8)
        for i in 0..<l1Size {
            let e = l1[i]
            // QEMU skips only all-zero entries: one with just flags set names the L2 table at 0.
            guard e != 0 else { continue }
            if e & L1Entry.reservedMask != 0 {
                res.corruptions += 1
                if loud { say("ERROR found L1 entry with reserved bits set: \(String(e, radix: 16))") }
            }
            let l2 = e & L1Entry.offsetMask
            ref(l2, cs)
            if l2 % cs != 0 {
                res.corruptions += 1
                if loud { say("ERROR l2_offset=\(String(l2, radix: 16)): Table is not cluster aligned; L1 entry corrupted") }
            }
            try checkL2(l2, active: active)
        }
    }

    mutating func check() throws(QcowPressError) {
        res.totalClusters = g.guestClusters(forVirtualSize: h.size & ~511)
        let nClusters = (fileSize + cs - 1) / cs
        if nClusters > UInt64(Int32.max) {
            res.checkErrors += 1
            if loud { say("ERROR: the image file has \(nClusters) clusters, more than qemu-img checks (\(Int32.max))") }
            return
        }
        let rt = try read(h.refcountTableOffset, Int(UInt64(h.refcountTableClusters) * cs))
        reftable = (0..<(rt.count / 8)).map { be64(rt, $0 * 8) }

        ref(0, cs)
        try checkL1(h.l1TableOffset, Int(h.l1Size), active: true)

        // Internal snapshots: each snapshot's L1 and everything it reaches, then the table.
        if hasDataFile && h.nbSnapshots > 0 {
            res.corruptions += 1
            if loud { say("ERROR \(h.nbSnapshots) snapshots in image with data file") }
        }
        if h.nbSnapshots > 0 {
            var at = h.snapshotsOffset
            let start = at
            for s in 0..<Int(h.nbSnapshots) {
                guard fits(at, 40, within: fileSize) else {
                    res.corruptions += 1
                    if loud { say("ERROR snapshot \(s) header at 0x\(String(at, radix: 16)) is past the end of the file") }
                    break
                }
                at = (at + 7) & ~7
                let sh = try read(at, 40)
                let l1Off = be64(sh, 0)
                let l1Size = sh.withUnsafeBytes { Int(loadBE32($0, 8)) }
                let idLen = sh.withUnsafeBytes { Int(loadBE16($0, 12)) }
                let nameLen = sh.withUnsafeBytes { Int(loadBE16($0, 14)) }
                let extra = sh.withUnsafeBytes { Int(loadBE32($0, 36)) }
                if l1Off % cs != 0 {
                    res.corruptions += 1
                    if loud { say("ERROR snapshot \(s) l1_offset=0x\(String(l1Off, radix: 16)): L1 table is not cluster aligned; snapshot table entry corrupted") }
                } else if l1Size > Int(Qcow2Header.maxL1Size) {
                    res.corruptions += 1
                    if loud { say("ERROR snapshot \(s) l1_size=\(l1Size): L1 table is too large; snapshot table entry corrupted") }
                } else {
                    try checkL1(l1Off, l1Size, active: false)
                }
                at += UInt64(40 + extra + idLen + nameLen)
            }
            ref(start, at - start)
        }

        ref(h.refcountTableOffset, UInt64(reftable.count) * 8)

        // Bitmaps extension: directory, tables, data clusters.
        for case .bitmaps(let d) in h.extensions where d.count >= 24 {
            let n = d.withUnsafeBytes { Int(loadBE32($0, 0)) }
            let dirSize = d.withUnsafeBytes { loadBE64($0, 8) }
            let dirOff = d.withUnsafeBytes { loadBE64($0, 16) }
            guard dirSize < 64 << 20, fits(dirOff, dirSize, within: fileSize) else {
                res.corruptions += 1
                if loud { say("ERROR bitmap directory at 0x\(String(dirOff, radix: 16)) is past the end of the file") }
                continue
            }
            ref(dirOff, dirSize)
            let dir = try read(dirOff, Int(dirSize))
            var p = 0
            for _ in 0..<n where p + 24 <= dir.count {
                let tOff = be64(dir, p)
                let tSize = dir.withUnsafeBytes { Int(loadBE32($0, p + 8)) }
                let nameSize = dir.withUnsafeBytes { Int(loadBE16($0, p + 18)) }
                let extra = dir.withUnsafeBytes { Int(loadBE32($0, p + 20)) }
                ref(tOff, UInt64(tSize) * 8)
                if fits(tOff, UInt64(tSize) * 8, within: fileSize) {
                    let t = try read(tOff, tSize * 8)
                    for k in 0..<tSize {
                        let e = be64(t, k * 8) & L1Entry.offsetMask
                        if e != 0 { ref(e, cs) }
                    }
                }
                p += (24 + extra + nameSize + 7) & ~7
            }
        }

        // Refcount blocks (check_refblocks): aligned, inside the image, referenced exactly once.
        var arrayClusters = max(nClusters, refs.extent)
        for (i, raw) in reftable.enumerated() {
            let off = raw & ~UInt64(0x1FF)
            if raw & 0x1FF != 0 {
                res.corruptions += 1
                if loud { say("ERROR refcount table entry \(i) has reserved bits set") }
                continue
            }
            if off % cs != 0 {
                res.corruptions += 1
                if loud { say("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted") }
                continue
            }
            if off >> bits >= arrayClusters {
                res.corruptions += 1
                if loud { say("ERROR refcount block \(i) is outside image") }
                continue
            }
            guard off != 0 else { continue }
            ref(off, cs)
            arrayClusters = max(arrayClusters, refs.extent)
            let n = refs.get(off >> bits)
            if n != 1 {
                res.corruptions += 1
                if loud { say("ERROR refcount block \(i) refcount=\(n)") }
            }
        }

        // Compare stored and counted refcounts over every cluster QEMU would (compare_refcounts),
        // skipping ranges with neither a refcount block nor a reference.
        var highest: UInt64 = 0
        var c: UInt64 = 0
        let chunkStarts = refs.chunkStarts
        var nextChunk = 0
        while c < arrayClusters {
            let bi = c / perBlock
            let blockEnd = min(arrayClusters, (bi + 1) * perBlock)
            let entry = bi < UInt64(reftable.count) ? reftable[Int(bi)] & ~UInt64(0x1FF) : 0
            if entry != 0 && (entry % cs != 0 || entry > UInt64(Int64.max) - (1 << 31)) {
                // Unreadable refcounts: one internal error per cluster, as qemu-img counts them.
                res.checkErrors += Int(blockEnd - c)
                var k = c
                while k < blockEnd && res.messages.count <= Qcow2Checker.maxMessages {
                    if loud { say("Can't get refcount for cluster \(k): Input/output error") }
                    k += 1
                }
                c = blockEnd
                continue
            }
            if entry == 0 && !refs.hasChunk(covering: c) {
                // Nothing stored here and nothing counted in this chunk: skip to what comes next.
                while nextChunk < chunkStarts.count && chunkStarts[nextChunk] <= c { nextChunk += 1 }
                let next = nextChunk < chunkStarts.count ? min(blockEnd, chunkStarts[nextChunk]) : blockEnd
                c = max(next, c + 1)
                continue
            }
            let s = try stored(c) ?? 0
            let r = refs.get(c)
            if s > 0 || r > 0 { highest = c }
            if s < r {
                res.corruptions += 1
                if loud { say("ERROR cluster \(c) refcount=\(s) reference=\(r)") }
            } else if s > r {
                res.leaks += 1
                if loud { say("Leaked cluster \(c) refcount=\(s) reference=\(r)") }
            }
            c += 1
        }

        // The copied flag must say "refcount is exactly 1" (check_oflag_copied).
        if !(h.compatibleFeatures.contains(.lazyRefcounts) && h.incompatibleFeatures.contains(.dirty)) {
            try checkCopiedFlags()
        }
        res.imageEndOffset = (highest + 1) * cs
    }

    mutating func checkCopiedFlags() throws(QcowPressError) {
        let l1Size = Int(h.l1Size)
        guard l1Size > 0 else { return }
        let l1 = try self.words(h.l1TableOffset, l1Size * 8)
        let words = g.extendedL2 ? 2 : 1
        for i in 0..<l1Size {
            let e = l1[i]
            let l2 = e & L1Entry.offsetMask
            guard l2 != 0 else { continue }
            guard let n = try stored(l2 >> bits) else { continue }
            if (n == 1) != (e & L1Entry.copiedFlag != 0) {
                res.corruptions += 1
                if loud { say("ERROR OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(String(e, radix: 16)) refcount=\(n)") }
            }
            guard l2 < fileSize else { continue }
            let table = try self.words(l2, Int(cs))
            for j in 0..<g.l2Entries {
                let le = table[j * words]
                if le == 0 { continue }
                let t = type(le)
                guard t == .normal || t == .zeroAlloc else { continue }
                let rc: UInt64
                if hasDataFile { rc = 1 } else {
                    guard let v = try stored((le & L2Entry.offsetMask) >> bits) else { continue }
                    rc = v
                }
                if (rc == 1) != (le & L2Entry.copiedFlag != 0) {
                    res.corruptions += 1
                    if loud { say("ERROR OFLAG_COPIED data cluster: l2_entry=\(String(le, radix: 16)) refcount=\(rc)") }
                }
            }
        }
    }
}
