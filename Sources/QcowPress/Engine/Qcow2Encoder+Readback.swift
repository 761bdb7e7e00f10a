import ClusterCompression
import DirectIO
import Glibc
import Qcow2Format

extension Qcow2Encoder {
    /// Reads guest bytes [offset, offset + count) back from the image being written, when every
    /// cluster of the range is final and its bytes — and its L2 table, if the region's table left
    /// memory — are on disk. Returns false, with `into` in no particular state, when some part is
    /// not: the caller reads it from where it came from. A live restore serves what it has already
    /// restored this way instead of loading chunks again.
    ///
    /// With `wait` > 0, a range whose every cluster was written to the encoder but is still being
    /// compressed or written waits up to `wait` seconds for the disk (cheaper than loading the data
    /// again), but gives up sooner when the disk makes no progress for `stall` seconds (default:
    /// `wait`); a range with a cluster nobody wrote returns false at once.
    ///
    /// Not for images over a backing file (an unallocated cluster would read the backing file):
    /// those always return false. Thread-safe; `context` is the calling thread's.
    public func readWritten(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext,
                            wait: Double = 0, stall: Double? = nil) throws(QcowPressError) -> Bool {
        guard count > 0 else { return true }
        guard options.backingFile == nil, offset + UInt64(count) <= options.virtualSize else { return false }
        let deadline = monotonicNanoseconds() + UInt64(max(0, wait) * 1e9)
        let stallNanos = UInt64(max(0, stall ?? wait) * 1e9)
        while !lifecycle.isFailed {
            // One look at the durable end per attempt: it only grows, so an attempt that found
            // something above it waits for it to move past.
            let durable = written.durableEnd
            switch try readWrittenOnce(at: offset, count: count, into: into, context: context, durable: durable) {
            case .done: return true
            case .never: return false
            case .later:
                let now = monotonicNanoseconds()
                if !written.waitForProgress(beyond: durable, deadline: min(deadline, now + stallNanos)) { return false }
            }
        }
        return false
    }

    private enum Attempt { case done, later, never }

    private func readWrittenOnce(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext,
                                 durable: UInt64) throws(QcowPressError) -> Attempt {
        let bits = UInt64(geometry.clusterBits)
        let first = offset >> bits
        let last = (offset + UInt64(count) - 1) >> bits
        var entries: [UInt64] = []
        entries.reserveCapacity(Int(last - first + 1))
        var c = first
        while c <= last {
            let regionEnd = UInt64(geometry.l1Index(ofGuestCluster: c) + 1) << UInt64(geometry.l2Bits)
            let n = Int(min(last + 1, regionEnd) - c)
            switch map.readback(c, count: n) {
            case .untouched: return .never
            case .pending: return .later
            case .zero: entries += repeatElement(0, count: n)
            case .entries(let e): entries += e
            case .elsewhere:
                guard let e = try written.entries(c, count: n, durable: durable, geometry: geometry, file: file,
                                                  buffer: context.compressedBuffer(clusterSize + 8192)) else { return .later }
                entries += e
            }
            c += UInt64(n)
        }
        // Where each cluster's bytes are; all of them must be on disk.
        var span: (start: UInt64, end: UInt64)?
        for e in entries {
            guard let r = hostRange(e) else { continue }
            guard r.upperBound <= durable else { return .later }
            span = (min(span?.start ?? r.lowerBound, r.lowerBound), max(span?.end ?? r.upperBound, r.upperBound))
        }
        // Clusters written close together are read at once (a request of a few clusters is
        // usually one stretch of the file); scattered ones one by one.
        var whole: (base: UnsafeRawPointer, start: UInt64)?
        if let s = span, s.end - s.start <= UInt64(2 * entries.count * clusterSize) {
            let n = Int(s.end - s.start)
            let b = context.compressedBuffer(n + 8192)
            do throws(IOError) {
                let at = try file.readBlocks(offset: s.start, length: n, into: b)
                whole = (UnsafeRawPointer(b.pointer + at), s.start)
            } catch {
                throw QcowPressError.from(error)
            }
        }
        let algorithm = compressionType
        var pos = 0
        for (k, e) in entries.enumerated() {
            let at = offset + UInt64(pos)
            let inCluster = Int(at - ((first + UInt64(k)) << bits))
            let n = min(count - pos, clusterSize - inCluster)
            let dst = into + pos
            if let r = hostRange(e) {
                let src: UnsafeRawPointer
                if let whole {
                    src = whole.base + Int(r.lowerBound - whole.start)
                } else {
                    let b = context.compressedBuffer(Int(r.count) + 8192)
                    do throws(IOError) {
                        src = UnsafeRawPointer(b.pointer + (try file.readBlocks(offset: r.lowerBound, length: Int(r.count), into: b)))
                    } catch {
                        throw QcowPressError.from(error)
                    }
                }
                let l2 = L2Entry(rawValue: e)
                if l2.isCompressed {
                    let out = context.buffer(clusterSize)
                    do {
                        try context.decompressor(algorithm).decompress(UnsafeRawBufferPointer(start: src, count: Int(r.count)),
                                                                       into: UnsafeMutableRawBufferPointer(start: out.pointer, count: clusterSize))
                    } catch {
                        throw .inputDamaged(path: destination, location: "compressed cluster at \(r.lowerBound) read back while writing: \(error.description)")
                    }
                    memcpy(dst, out.pointer + inCluster, n)
                } else {
                    memcpy(dst, src + inCluster, n)
                }
            } else {
                memset(dst, 0, n)
            }
            pos += n
        }
        return .done
    }

    /// The host bytes an entry's cluster occupies; nil when it reads as zero.
    private func hostRange(_ e: UInt64) -> Range<UInt64>? {
        let l2 = L2Entry(rawValue: e)
        if l2.isCompressed {
            let d = l2.compressedDescriptor(clusterBits: geometry.clusterBits)
            return d.hostOffset..<(d.hostOffset + UInt64(d.readLength))
        }
        if l2.readsAsZero || l2.hostOffset == 0 { return nil }
        return l2.hostOffset..<(l2.hostOffset + UInt64(clusterSize))
    }
}
