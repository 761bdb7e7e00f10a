import DirectIO
import Glibc
import Qcow2Format

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
}
