import DirectIO

extension VMDKImage: BlockStatusReporting {
    /// qemu's vmdk_co_block_status: an unallocated grain is not present (and reads as zero: no
    /// backing file), a zeroed grain is present and zero, a plain grain is data at its place in the
    /// extent file, a compressed grain data without a place; a FLAT extent is data at its place to
    /// the extent's end, with the file's holes reading as zero (`BDRV_BLOCK_RECURSE`). ZERO extents
    /// (which qemu-img drops) are present zeros.
    public func blockStatus(at offset: UInt64, limit: UInt64) throws(QcowPressError) -> BlockStatus {
        let p = pieces[pieceIndex(offset)]
        let rel = offset - p.start
        let relLimit = min(p.length, limit - p.start)
        switch p.part {
        case .zero:
            return BlockStatus(length: relLimit - rel, data: false, zero: true, present: true)
        case .flat(let f, let off, let data):
            let under = BlockStatusQuery.fileExtents(data, file: f.path, at: rel, limit: relLimit)
            return BlockStatus(length: under.length, data: true, zero: under.zero, present: true, offset: off + rel, file: f.path)
        case .sparse(let e):
            return try e.blockStatus(at: rel, limit: relLimit)
        }
    }
}

extension VMDKSparseExtent {
    /// The status at extent-relative `offset` for at most `limit - offset` bytes: one grain of
    /// data, or a run of unallocated or of zeroed grains.
    func blockStatus(at offset: UInt64, limit: UInt64) throws(QcowPressError) -> BlockStatus {
        let g = offset / grainBytes
        let first = try grain(g)
        if case .data(let host) = first {
            let end = min(limit, (g + 1) * grainBytes)
            let place: UInt64? = header.compressed ? nil : host + (offset - g * grainBytes)
            return BlockStatus(length: end - offset, data: true, zero: false, present: true, offset: place, file: place == nil ? nil : file.path)
        }
        var end = min(limit, (g + 1) * grainBytes)
        while end < limit {
            let next = end / grainBytes
            let t = next / UInt64(header.gtesPerGT)
            if first == .unallocated, t < UInt64(gd.count), gd[Int(t)] == 0 {
                end = min(limit, (t + 1) * header.gtCoverage)
                continue
            }
            guard try grain(next) == first else { break }
            end = min(limit, (next + 1) * grainBytes)
        }
        return BlockStatus(length: end - offset, data: false, zero: true, present: first == .zero)
    }
}
