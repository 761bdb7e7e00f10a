import DirectIO
import Glibc
import Qcow2Format

/// The whole check in qemu-img's order, then the copied flags.
extension CheckState {
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
