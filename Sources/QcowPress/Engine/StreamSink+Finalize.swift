import DirectIO
import Glibc
import Qcow2Format

extension StreamSink {
    /// Writes the last buffer, the L1 table, refcount blocks and table, then the header; syncs,
    /// claims the commit in the ``Lifecycle`` and renames the image to its final name (or leaves
    /// it for its `OutputSet`, when the commit is deferred).
    func finalize() throws(QcowPressError) {
        // Readers of the image being written stop at what is on disk now: the last buffer's
        // compaction below moves clusters above it.
        written.freeze()
        // Copies of clusters never written: those read as zero, and so do their copies.
        for (dst, src) in map.takeWaiting() { try setFinal(dst, try unwritten(src)) }
        for r in map.regionsInMemory { try flushRegion(r) }
        let dataEnd: UInt64
        do { try drainWrites() } catch { throw QcowPressError.from(error) }
        dataEnd = try writeLastBuffer()
        do { try applyDiskFlagClears() } catch { throw QcowPressError.from(error) }
        let g = geometry
        let l1Bytes = l1.count * 8
        let l1Clusters = l1.isEmpty ? 0 : Int(g.clusters(forBytes: UInt64(l1Bytes)))
        let l1Offset = l1.isEmpty ? 0 : dataEnd
        let order = image.refcountOrder
        let dataClusters = (dataEnd >> bits) + UInt64(l1Clusters)
        let (blocks, tableClusters) = g.refcountLayout(dataClusters: dataClusters, refcountOrder: order)
        let blocksOffset = dataEnd + UInt64(l1Clusters * cs)
        let tableOffset = blocksOffset + blocks * UInt64(cs)
        let fileEnd = tableOffset + tableClusters * UInt64(cs)
        for i in 0..<l1Clusters { addRef(l1Offset + UInt64(i * cs)) }
        for i in 0..<blocks { addRef(blocksOffset + i * UInt64(cs)) }
        for i in 0..<tableClusters { addRef(tableOffset + i * UInt64(cs)) }

        do {
            if l1Clusters > 0 {
                let b = AlignedBuffer(capacity: l1Clusters * cs)
                for (i, e) in l1.enumerated() { storeBE64(b.bytes, i * 8, e) }
                try file.pwriteAll(b.pointer, length: l1Clusters * cs, offset: l1Offset)
            }
            let codec = RefcountBlockCodec(refcountOrder: order)
            let perBlock = Int(g.clustersPerRefcountBlock(refcountOrder: order))
            let block = AlignedBuffer(capacity: cs)
            let table = AlignedBuffer(capacity: Int(tableClusters) * cs)
            for bi in 0..<Int(blocks) {
                block.zero(from: 0, to: cs)
                let first = bi * perBlock
                let last = min(refcounts.count, first + perBlock)
                if first < last {
                    for i in first..<last where refcounts[i] != 0 {
                        codec.set(block.bytes, i - first, UInt64(refcounts[i]))
                    }
                }
                let at = blocksOffset + UInt64(bi * cs)
                try file.pwriteAll(block.pointer, length: cs, offset: at)
                storeBE64(table.bytes, bi * 8, at)
            }
            try file.pwriteAll(table.pointer, length: Int(tableClusters) * cs, offset: tableOffset)

            var h = Qcow2Header(clusterBits: UInt32(bits), size: image.virtualSize, l1Size: UInt32(l1.count),
                                l1TableOffset: l1Offset, refcountTableOffset: tableOffset,
                                refcountTableClusters: UInt32(tableClusters))
            h.refcountOrder = UInt32(order)
            if image.compressionType == .zstd { h.compressionType = .zstd }
            h.backingFile = image.backingFile
            h.extensions = Qcow2Header.defaultExtensions(clusterBits: UInt32(bits), backingFormat: image.backingFile == nil ? nil : image.backingFormat)
            let bytes = h.serialized()
            let hb = AlignedBuffer(capacity: cs)
            bytes.withUnsafeBytes { hb.bytes.copyMemory(from: $0) }
            try file.pwriteAll(hb.pointer, length: cs, offset: 0)
            try file.truncate(to: fileEnd)
            try file.sync()
        } catch {
            throw QcowPressError.from(error)
        }
        // The claim that makes a cancel from here on refused: the image goes into place and is
        // reported done (or its own commit fails). A cancel or failure that came first wins
        // instead, and the image never moves (that failure's path removes it).
        guard lifecycle.beginCommit() else { return }
        do { try output.commit() } catch { throw QcowPressError.from(error) }
        let s = summary(fileEnd: fileEnd)
        logger.debug("image complete", metadata: ["destination": "\(report.destination)", "bytesOut": "\(s.bytesOut)",
                                                      "wallSeconds": "\(s.wallSeconds)", "codecSeconds": "\(s.codecSeconds)"])
        ending.succeed(s)
    }

    /// Writes the last buffer with its gap closed: the clusters of the back region move down to
    /// just after the front's last cluster (``LastBufferCompaction``), and the L1/L2 entries that
    /// point at them move too (an L2 table already on disk is patched in place). Returns the end of
    /// the data stream.
    func writeLastBuffer() throws(QcowPressError) -> UInt64 {
        let buf = buffers[current]
        let start = packer.bufferStart
        let plan = LastBufferCompaction.plan(front: packer.front, back: backItems.map(\.offset), clusterSize: cs)
        buf.zero(from: packer.front, to: plan.frontEnd)
        let owners = Dictionary(uniqueKeysWithValues: backItems.map { ($0.offset, $0.owner) })
        for m in plan.moves where m.to != m.from { memmove(buf.pointer + m.to, buf.pointer + m.from, cs) }
        // Each cluster's whole refcount moves with it (a shared raw cluster has several references).
        let counts = plan.moves.map { refcounts[Int((start + UInt64($0.from)) >> bits)] }
        for m in plan.moves { refcounts[Int((start + UInt64(m.from)) >> bits)] = 0 }
        for (k, m) in plan.moves.enumerated() { refcounts[Int((start + UInt64(m.to)) >> bits)] = counts[k] }
        // Tables first: a data entry is patched wherever its table now lives.
        for m in plan.moves {
            if case .table(let r) = owners[m.from]! { l1[r] = L1Entry(l2Offset: start + UInt64(m.to), copied: true).rawValue }
        }
        for m in plan.moves where m.to != m.from {
            guard case .data(let c) = owners[m.from]! else { continue }
            let from = start + UInt64(m.from)
            let shared = sharers[from]
            for ref in shared ?? [c] {
                guard let place = entryPlace(of: ref) else { continue }
                let value = L2Entry.standard(hostOffset: start + UInt64(m.to), copied: shared == nil).rawValue
                _ = try entry(at: place) { _ in value }
            }
        }
        do {
            if plan.end > 0 { try file.pwriteAll(buf.pointer, length: plan.end, offset: start) }
        } catch {
            throw QcowPressError.from(error)
        }
        return start + UInt64(plan.end)
    }

    /// Reads one 8-byte table entry already on disk (the whole 4 KiB block around it, for O_DIRECT);
    /// with `update`, writes the block back with the entry replaced.
    @discardableResult
    func entryOnDisk(at offset: UInt64, update: ((UInt64) -> UInt64)? = nil) throws(IOError) -> UInt64 {
        let block = AlignedBuffer(capacity: 4096)
        let base = offset & ~4095
        let n = try file.preadAll(block.pointer, length: 4096, offset: base)
        guard n == 4096 else { throw IOError(errno: EIO, operation: "read back L2 table", path: report.destination, offset: base) }
        let v = loadBE64(UnsafeRawBufferPointer(block.bytes), Int(offset - base))
        if let update {
            storeBE64(block.bytes, Int(offset - base), update(v))
            try file.pwriteAll(block.pointer, length: 4096, offset: base)
        }
        return v
    }

    func summary(fileEnd: UInt64) -> EncoderSummary {
        let codecNs = queue.codecNanoseconds
        return EncoderSummary(
            destination: report.destination,
            virtualSize: image.virtualSize,
            clusterSize: cs,
            compression: report.compression,
            bytesIn: queue.bytesIn,
            bytesOut: fileEnd,
            clustersZero: clustersZero + queue.zeroClustersMarked,
            clustersCompressed: clustersCompressed,
            clustersUncompressed: clustersRaw,
            clustersShared: clustersShared,
            codecSeconds: Double(codecNs) / 1e9,
            producerStallSeconds: pool.stallSeconds,
            diskBusySeconds: Double(diskWaitNanoseconds) / 1e9,
            wallSeconds: Double(monotonicNanoseconds() - report.startTime) / 1e9,
            threads: report.threads,
            memoryLimit: report.memoryLimit,
            peakRSSBytes: peakResidentBytes(),
            ioMode: writer.modeDescription,
            notes: report.notes)
    }
}

/// Peak resident memory of this process (DirectIO asks the kernel).
func peakResidentBytes() -> Int { ProcessMemory.peakResidentBytes() }
