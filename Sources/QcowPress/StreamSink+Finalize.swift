import DirectIO
import Glibc
import Qcow2Format

extension StreamSink {
    /// Writes the last buffer, the L1 table, refcount blocks and table, then the header; syncs and
    /// renames the image to its final name.
    func finalize() throws(QcowPressError) {
        let remaining = enc.mapLock.withLock { enc.tables.keys.sorted() }
        for r in remaining { try flushRegion(r) }
        if let (src, _) = deferredCopies.first {
            throw .misuse("copy from guest cluster \(src), which was never written")
        }
        let dataEnd: UInt64
        do {
            try writer.drain()
            dataEnd = try writeLastBuffer()
            try applyDiskFlagClears()
        } catch {
            throw QcowPressError.from(error)
        }
        let g = enc.geometry
        let l1Bytes = l1.count * 8
        let l1Clusters = l1.isEmpty ? 0 : Int(g.clusters(forBytes: UInt64(l1Bytes)))
        let l1Offset = l1.isEmpty ? 0 : dataEnd
        let order = enc.options.refcountOrder
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
                try enc.file.pwriteAll(b.pointer, length: l1Clusters * cs, offset: l1Offset)
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
                try enc.file.pwriteAll(block.pointer, length: cs, offset: at)
                storeBE64(table.bytes, bi * 8, at)
            }
            try enc.file.pwriteAll(table.pointer, length: Int(tableClusters) * cs, offset: tableOffset)

            var h = Qcow2Header(clusterBits: UInt32(bits), size: enc.options.virtualSize, l1Size: UInt32(l1.count),
                                l1TableOffset: l1Offset, refcountTableOffset: tableOffset,
                                refcountTableClusters: UInt32(tableClusters))
            h.refcountOrder = UInt32(order)
            if (enc.options.compression?.algorithm ?? enc.options.headerCompressionType) == .zstd { h.compressionType = .zstd }
            h.backingFile = enc.options.backingFile
            h.extensions = Qcow2Header.defaultExtensions(clusterBits: UInt32(bits), backingFormat: enc.options.backingFile == nil ? nil : enc.options.backingFormat)
            let bytes = h.serialized()
            let hb = AlignedBuffer(capacity: cs)
            bytes.withUnsafeBytes { hb.bytes.copyMemory(from: $0) }
            try enc.file.pwriteAll(hb.pointer, length: cs, offset: 0)
            try enc.file.truncate(to: fileEnd)
            try enc.file.sync()
            try enc.output.commit()
        } catch {
            throw QcowPressError.from(error)
        }
        let s = summary(fileEnd: fileEnd)
        enc.logger.debug("image complete", metadata: ["destination": "\(enc.destination)", "bytesOut": "\(s.bytesOut)",
                                                      "wallSeconds": "\(s.wallSeconds)", "codecSeconds": "\(s.codecSeconds)"])
        enc.succeed(s)
    }

    /// Writes the last buffer with its gap closed: the clusters of the back region move down to
    /// just after the front's last cluster, and the L1/L2 entries that point at them move too (an
    /// L2 table already on disk is patched in place). Returns the end of the data stream.
    func writeLastBuffer() throws(IOError) -> UInt64 {
        let buf = buffers[current]
        let start = packer.bufferStart
        let frontEnd = (packer.front + cs - 1) / cs * cs
        buf.zero(from: packer.front, to: frontEnd)
        // Lowest source first: destinations are never above sources, so memmove in order is safe.
        let items = backItems.sorted { $0.offset < $1.offset }
        var moved: [(from: UInt64, to: UInt64)] = []
        for (k, item) in items.enumerated() {
            let dest = frontEnd + k * cs
            if dest != item.offset { memmove(buf.pointer + dest, buf.pointer + item.offset, cs) }
            moved.append((start + UInt64(item.offset), start + UInt64(dest)))
        }
        let end = frontEnd + items.count * cs
        // Each slot's whole refcount moves with it (a shared raw cluster has several references).
        let counts = moved.map { refcounts[Int($0.from >> bits)] }
        for m in moved { refcounts[Int(m.from >> bits)] = 0 }
        for (k, m) in moved.enumerated() {
            addRef(m.to)
            refcounts[Int(m.to >> bits)] += counts[k] - 1
        }
        // Tables first: a data entry is patched wherever its table now lives.
        for (k, item) in items.enumerated() {
            if case .table(let r) = item.owner {
                l1[r] = L1Entry(l2Offset: moved[k].to, copied: true).rawValue
            }
        }
        for (k, item) in items.enumerated() {
            guard case .data(let c) = item.owner, moved[k].from != moved[k].to else { continue }
            let g = enc.geometry
            let referrers = sharers[moved[k].from] ?? [c]
            let shared = sharers[moved[k].from] != nil
            for ref in referrers {
                let table = L1Entry(rawValue: l1[g.l1Index(ofGuestCluster: ref)]).l2Offset
                let entryAt = table + UInt64(g.l2Index(ofGuestCluster: ref) * 8)
                let value = L2Entry.standard(hostOffset: moved[k].to, copied: !shared).rawValue
                if entryAt >= start {
                    storeBE64(buf.bytes, Int(entryAt - start), value)
                } else {
                    try entryOnDisk(at: entryAt) { _ in value }
                }
            }
        }
        if end > 0 { try enc.file.pwriteAll(buf.pointer, length: end, offset: start) }
        return start + UInt64(end)
    }

    /// Reads one 8-byte table entry already on disk (the whole 4 KiB block around it, for O_DIRECT);
    /// with `update`, writes the block back with the entry replaced.
    @discardableResult
    func entryOnDisk(at offset: UInt64, update: ((UInt64) -> UInt64)? = nil) throws(IOError) -> UInt64 {
        let block = AlignedBuffer(capacity: 4096)
        let base = offset & ~4095
        let n = try enc.file.preadAll(block.pointer, length: 4096, offset: base)
        guard n == 4096 else { throw IOError(errno: EIO, operation: "read back L2 table", path: enc.destination, offset: base) }
        let v = loadBE64(UnsafeRawBufferPointer(block.bytes), Int(offset - base))
        if let update {
            storeBE64(block.bytes, Int(offset - base), update(v))
            try enc.file.pwriteAll(block.pointer, length: 4096, offset: base)
        }
        return v
    }

    func summary(fileEnd: UInt64) -> EncoderSummary {
        let codecNs = enc.resultLock.withLock { enc.codecNanoseconds }
        return EncoderSummary(
            destination: enc.destination,
            virtualSize: enc.options.virtualSize,
            clusterSize: cs,
            compression: enc.options.compression?.description ?? "none",
            bytesIn: enc.bytesReceived,
            bytesOut: fileEnd,
            clustersZero: clustersZero + enc.mapLock.withLock { enc.zeroClustersMarked },
            clustersCompressed: clustersCompressed,
            clustersUncompressed: clustersRaw,
            clustersShared: clustersShared,
            codecSeconds: Double(codecNs) / 1e9,
            producerStallSeconds: enc.pool.stallSeconds,
            diskBusySeconds: Double(diskWaitNanoseconds) / 1e9,
            wallSeconds: Double(monotonicNanoseconds() - enc.startTime) / 1e9,
            threads: enc.options.threads,
            memoryLimit: enc.options.memoryLimit,
            peakRSSBytes: peakResidentBytes(),
            ioMode: writer.modeDescription,
            notes: enc.notes)
    }
}

extension Qcow2Encoder {
    /// Completes the image: queues partially written clusters (their unwritten bytes are zero),
    /// waits for every cluster to reach the disk, writes the metadata and header, syncs, and renames
    /// the image to its destination. Call once, after every write has returned.
    public func finish() async throws(QcowPressError) -> EncoderSummary {
        try beginFinish()
        return try await completion.wait().get()
    }

    /// Blocking form of ``finish()``, for callers on their own OS threads.
    public func finishBlocking() throws(QcowPressError) -> EncoderSummary {
        try beginFinish()
        return try completion.waitBlocking().get()
    }

    /// Stops everything and removes the partial output. Writers waiting for memory are woken with
    /// ``QcowPressError/cancelled``.
    public func cancel() {
        fail(.cancelled)
    }

    func beginFinish() throws(QcowPressError) {
        let items: [WorkItem] = try mapLock.withLock { () throws(QcowPressError) -> [WorkItem] in
            switch state {
            case .open: state = .finishing
            case .failed(let e): throw e
            case .finishing, .done: throw .misuse("finish() called twice")
            }
            let items = partials.map { WorkItem(cluster: $0.key, slot: $0.value.slot) }
            partials.removeAll()
            return items
        }
        var batch = items
        flush(&batch)
        resultLock.withLock {
            inputClosed = true
            resultLock.signal()
        }
    }

    func succeed(_ s: EncoderSummary) {
        mapLock.withLock { state = .done }
        group.leave()
        completion.resolve(.success(s))
    }

    /// Puts the encoder in the failed state (first error wins), stops all threads and removes the
    /// temporary file.
    func fail(_ e: QcowPressError) {
        let first: Bool = mapLock.withLock {
            switch state {
            case .failed, .done: return false
            default:
                state = .failed(e)
                return true
            }
        }
        guard first else { return }
        logger.debug("encoder stopped", metadata: ["destination": "\(destination)", "reason": "\(e.message)"])
        if group.ownedByOneEncoder { pool.fail() }
        group.leave()
        // Clusters queued for the writer go back to the (possibly shared) pool.
        let queued: [ResultItem] = resultLock.withLock {
            writerStop = true
            resultLock.broadcast()
            let r = results
            results = []
            return r
        }
        for r in queued where r.slot >= 0 { pool.release(r.slot) }
        output.discard()
        completion.resolve(.failure(e))
    }
}

/// Peak resident memory of this process: VmHWM from /proc/self/status. (getrusage's ru_maxrss is
/// not used: Linux carries the pre-exec high-water mark over execve, so a child forked from a big
/// parent reports the parent's size.)
func peakResidentBytes() -> Int {
    let fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC)
    if fd >= 0 {
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 8192)
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n > 0 {
            let text = String(decoding: buf[0..<n], as: UTF8.self)
            for line in text.split(separator: "\n") where line.hasPrefix("VmHWM:") {
                let digits = line.split(separator: " ").compactMap { Int($0) }
                if let kb = digits.first { return kb * 1024 }
            }
        }
    }
    var ru = rusage()
    getrusage(RUSAGE_SELF.rawValue, &ru)
    return Int(ru.ru_maxrss) * 1024
}
