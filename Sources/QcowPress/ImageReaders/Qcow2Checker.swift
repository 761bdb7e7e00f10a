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

        /// 0 clean, 2 corruption, 3 leaks only (qemu-img's exit statuses).
        public var exitStatus: Int32 { corruptions > 0 || checkErrors > 0 ? 2 : (leaks > 0 ? 3 : 0) }

        public var text: String {
            var s = messages.map { $0 + "\n" }.joined()
            if corruptions == 0 && leaks == 0 && checkErrors == 0 {
                s += "No errors were found on the image.\n"
            } else {
                if !messages.isEmpty { s += "\n" }
                if corruptions > 0 {
                    s += "\(corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
                }
                if leaks > 0 {
                    s += "\(leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
                }
            }
            if totalClusters > 0 {
                func pct(_ n: UInt64, _ d: UInt64) -> String {
                    let v = d == 0 ? 0 : Int((Double(n) * 10000 / Double(d)).rounded())
                    return "\(v / 100).\(v % 100 < 10 ? "0" : "")\(v % 100)%"
                }
                s += "\(allocatedClusters)/\(totalClusters) = \(pct(allocatedClusters, totalClusters)) allocated, \(pct(fragmentedClusters, allocatedClusters)) fragmented, \(pct(compressedClusters, allocatedClusters)) compressed clusters\n"
            }
            s += "Image end offset: \(imageEndOffset)\n"
            return s
        }
    }

    public let path: String
    public init(path: String) { self.path = path }

    public func run() throws(QcowPressError) -> Result {
        let file: InputFile
        do { file = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        let fileSize = file.size
        func read(_ off: UInt64, _ n: Int) throws(QcowPressError) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: n)
            let r: Swift.Result<Int, IOError> = out.withUnsafeMutableBytes { p in
                Swift.Result { () throws(IOError) -> Int in try file.read(into: p.baseAddress!, length: n, offset: off) }
            }
            do { _ = try r.get() } catch { throw .from(error) }
            return out
        }
        let h = try readQcow2Header(file, path: path)
        let cs = UInt64(h.clusterSize)
        let bits = UInt64(h.clusterBits)
        let g = h.geometry
        var res = Result(filename: path)
        let nClusters = Int((fileSize + cs - 1) / cs)
        var refs = [UInt32](repeating: 0, count: nClusters)

        func ref(_ off: UInt64, _ len: UInt64, _ what: String) {
            guard len > 0 else { return }
            guard fits(off, len, within: UInt64(nClusters) << bits) else {
                res.corruptions += 1
                res.messages.append("ERROR \(what) at offset \(off) is past the end of the image file")
                return
            }
            let first = off >> bits
            let last = (off + len - 1) >> bits
            for c in first...last {
                if c >= UInt64(nClusters) {
                    res.corruptions += 1
                    res.messages.append("ERROR \(what) at offset \(off) is past the end of the image file")
                    return
                }
                refs[Int(c)] &+= 1
            }
        }
        func be64(_ a: [UInt8], _ i: Int) -> UInt64 { a.withUnsafeBytes { loadBE64($0, i) } }

        ref(0, cs, "header")
        ref(h.l1TableOffset, UInt64(h.l1Size) * 8, "L1 table")
        ref(h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs, "refcount table")
        let reftable = try read(h.refcountTableOffset, Int(UInt64(h.refcountTableClusters) * cs))
        var refblocks: [UInt64] = []
        for i in 0..<(reftable.count / 8) {
            let b = be64(reftable, i * 8) & L1Entry.offsetMask
            refblocks.append(b)
            guard b != 0 else { continue }
            if b % cs != 0 {
                res.corruptions += 1
                res.messages.append("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                refblocks[i] = 0
                continue
            }
            ref(b, cs, "refcount block \(i)")
        }

        // Data reachable from an L1 table; `active` also gathers statistics and copied-flag checks.
        var copiedChecks: [(entryAt: UInt64, target: UInt64, copied: Bool, what: String)] = []
        var seenL2 = Set<UInt64>()
        func walk(l1Offset: UInt64, l1Size: Int, active: Bool) throws(QcowPressError) {
            guard l1Size > 0 else { return }
            if !fits(l1Offset, UInt64(l1Size) * 8, within: fileSize) {
                res.corruptions += 1
                res.messages.append("ERROR L1 table at offset \(l1Offset) is past the end of the image file")
                return
            }
            let l1 = try read(l1Offset, l1Size * 8)
            var nextContiguous: UInt64 = 0
            for i in 0..<l1Size {
                let e = L1Entry(rawValue: be64(l1, i * 8))
                let l2 = e.l2Offset
                guard l2 != 0 else { continue }
                if l2 % cs != 0 || !fits(l2, cs, within: fileSize) {
                    res.corruptions += 1
                    res.messages.append("ERROR L2 table offset \(l2) (L1 entry \(i)) is unaligned or past the end of the file")
                    continue
                }
                ref(l2, cs, "L2 table")
                if active { copiedChecks.append((l1Offset + UInt64(i * 8), l2, e.copied, "L1 entry \(i)")) }
                if !active && seenL2.contains(l2) {
                    // Shared with a table already walked: its clusters were counted once per L1 already.
                }
                seenL2.insert(l2)
                let table = try read(l2, Int(cs))
                let words = g.extendedL2 ? 2 : 1
                for j in 0..<(g.l2Entries) {
                    let raw = be64(table, j * 8 * words)
                    let entry = L2Entry(rawValue: raw)
                    let at = l2 + UInt64(j * 8 * words)
                    if entry.isCompressed {
                        let d = entry.compressedDescriptor(clusterBits: g.clusterBits)
                        ref(d.hostOffset, UInt64(d.readLength), "compressed cluster")
                        if active {
                            res.allocatedClusters += 1
                            res.compressedClusters += 1
                            if nextContiguous != 0 && d.hostOffset >> bits != nextContiguous >> bits { res.fragmentedClusters += 1 }
                            nextContiguous = d.hostOffset + UInt64(d.readLength)
                        }
                        continue
                    }
                    let host = entry.hostOffset
                    guard host != 0 else { continue }
                    if host % cs != 0 {
                        res.corruptions += 1
                        res.messages.append("ERROR offset=\(host): Cluster is not properly aligned; L2 entry corrupted")
                        continue
                    }
                    if h.externalDataFile == nil { ref(host, cs, "data cluster") }
                    if active {
                        if !entry.readsAsZero {
                            res.allocatedClusters += 1
                            if nextContiguous != 0 && host != nextContiguous { res.fragmentedClusters += 1 }
                            nextContiguous = host + cs
                        }
                        if h.externalDataFile == nil { copiedChecks.append((at, host, entry.copied, "L2 entry")) }
                    }
                }
            }
        }
        try walk(l1Offset: h.l1TableOffset, l1Size: Int(h.l1Size), active: true)

        // Internal snapshots: table, each snapshot's L1 and everything it reaches.
        if h.nbSnapshots > 0 {
            var at = h.snapshotsOffset
            let start = at
            for s in 0..<Int(h.nbSnapshots) {
                guard fits(at, 40, within: fileSize) else {
                    res.corruptions += 1
                    res.messages.append("ERROR snapshot \(s) header at \(at) is past the end of the file")
                    break
                }
                let sh = try read(at, 40)
                let l1Off = be64(sh, 0)
                let l1Size = sh.withUnsafeBytes { Int(loadBE32($0, 8)) }
                let idLen = sh.withUnsafeBytes { Int(loadBE16($0, 12)) }
                let nameLen = sh.withUnsafeBytes { Int(loadBE16($0, 14)) }
                let extra = sh.withUnsafeBytes { Int(loadBE32($0, 36)) }
                ref(l1Off, UInt64(l1Size) * 8, "snapshot \(s) L1 table")
                try walk(l1Offset: l1Off, l1Size: min(l1Size, Int(Qcow2Header.maxL1Size)), active: false)
                at += UInt64((40 + extra + idLen + nameLen + 7) & ~7)
            }
            ref(start, at - start, "snapshot table")
        }

        // Bitmaps extension: directory, tables, data clusters.
        for case .bitmaps(let d) in h.extensions where d.count >= 24 {
            let n = d.withUnsafeBytes { Int(loadBE32($0, 0)) }
            let dirSize = d.withUnsafeBytes { loadBE64($0, 8) }
            let dirOff = d.withUnsafeBytes { loadBE64($0, 16) }
            guard dirSize < 64 << 20, fits(dirOff, dirSize, within: fileSize) else {
                res.corruptions += 1
                res.messages.append("ERROR bitmap directory at \(dirOff) is past the end of the file")
                continue
            }
            ref(dirOff, dirSize, "bitmap directory")
            let dir = try read(dirOff, Int(dirSize))
            var p = 0
            for _ in 0..<n where p + 24 <= dir.count {
                let tOff = be64(dir, p)
                let tSize = dir.withUnsafeBytes { Int(loadBE32($0, p + 8)) }
                let nameSize = dir.withUnsafeBytes { Int(loadBE16($0, p + 18)) }
                let extra = dir.withUnsafeBytes { Int(loadBE32($0, p + 20)) }
                ref(tOff, UInt64(tSize) * 8, "bitmap table")
                if fits(tOff, UInt64(tSize) * 8, within: fileSize) {
                    let t = try read(tOff, tSize * 8)
                    for k in 0..<tSize {
                        let e = be64(t, k * 8) & L1Entry.offsetMask
                        if e != 0 { ref(e, cs, "bitmap data") }
                    }
                }
                p += (24 + extra + nameSize + 7) & ~7
            }
        }

        // Stored refcounts.
        let codec = RefcountBlockCodec(refcountOrder: Int(h.refcountOrder))
        let perBlock = Int(g.clustersPerRefcountBlock(refcountOrder: Int(h.refcountOrder)))
        var stored = [UInt64](repeating: 0, count: nClusters)
        var highest = 0
        for (bi, b) in refblocks.enumerated() where b != 0 && fits(b, cs, within: fileSize) {
            let block = try read(b, Int(cs))
            block.withUnsafeBytes { p in
                for k in 0..<perBlock {
                    let c = bi * perBlock + k
                    let v = codec.get(p, k)
                    if v != 0 { highest = max(highest, c + 1) }
                    if c < nClusters { stored[c] = v }
                }
            }
        }
        for c in 0..<nClusters {
            let r = UInt64(refs[c])
            let s = stored[c]
            if s < r {
                res.corruptions += 1
                res.messages.append("ERROR cluster \(c) refcount=\(s) reference=\(r)")
            } else if s > r {
                res.leaks += 1
                res.messages.append("Leaked cluster \(c) refcount=\(s) reference=\(r)")
            }
            if r > 0 { highest = max(highest, c + 1) }
        }
        // The copied flag must say "refcount is exactly 1" (unless refcounts are lazy and dirty).
        if !(h.compatibleFeatures.contains(.lazyRefcounts) && h.incompatibleFeatures.contains(.dirty)) {
            for c in copiedChecks {
                let i = Int(c.target >> bits)
                guard i < nClusters else { continue }
                let one = stored[i] == 1
                if one != c.copied {
                    res.corruptions += 1
                    res.messages.append("ERROR OFLAG_COPIED \(c.what) at offset \(c.entryAt): offset=\(c.target) refcount=\(stored[i])")
                }
            }
        }
        res.imageEndOffset = UInt64(highest) * cs
        res.totalClusters = g.guestClusters(forVirtualSize: h.size)
        return res
    }
}
