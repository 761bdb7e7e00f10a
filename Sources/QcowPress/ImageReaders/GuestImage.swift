import ClusterCompression
import DirectIO
import Glibc
import Qcow2Format

/// An image as a guest sees it: `virtualSize` bytes, any range readable.
public protocol GuestImage: AnyObject, Sendable {
    var path: String { get }
    var virtualSize: UInt64 { get }
    /// True when [offset, offset+count) reads as zeros without reading data (holes, zero or
    /// unallocated clusters through the whole chain). False means "maybe data".
    func isKnownZero(at offset: UInt64, count: Int) throws(QcowPressError) -> Bool
    /// Where the run of bytes known to read as zero that starts at `offset` ends, at most `limit`:
    /// `offset` itself when data may start there. Found by extents (holes, absent L2 tables),
    /// never byte by byte, so a long hole costs what its few extents cost.
    func knownZeroEnd(from offset: UInt64, limit: UInt64) throws(QcowPressError) -> UInt64
    /// Reads [offset, offset+count) into `into`; bytes past the virtual size read as zeros.
    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError)
    /// Reads consecutive guest bytes from `offset` into several buffers (each filled in turn), so a
    /// reader can fill cluster slots directly. Bytes past the virtual size read as zeros.
    func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer], context: ReadContext) throws(QcowPressError)
}

extension GuestImage {
    /// Images that know no extents: the whole range at once, or nothing.
    public func knownZeroEnd(from offset: UInt64, limit: UInt64) throws(QcowPressError) -> UInt64 {
        guard offset < limit else { return limit }
        return try isKnownZero(at: offset, count: Int(limit - offset)) ? limit : offset
    }

    /// Reads into one scratch buffer and copies out (images that cannot read into many at once).
    public func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer], context: ReadContext) throws(QcowPressError) {
        let total = buffers.reduce(0) { $0 + $1.count }
        let b = context.gatherBuffer(total)
        try read(at: offset, count: total, into: b.pointer, context: context)
        var at = 0
        for d in buffers {
            d.copyMemory(from: UnsafeRawBufferPointer(start: b.pointer + at, count: d.count))
            at += d.count
        }
    }
}

/// Per-thread scratch for reading images (decompression contexts, a cluster buffer).
public final class ReadContext {
    var scratch: AlignedBuffer?
    var compressed: AlignedBuffer?
    /// Whole reads that are then copied out to several buffers (the readers use `scratch` inside).
    var gather: AlignedBuffer?
    var decompressors: [CompressionSettings.Algorithm: any ClusterDecompressor] = [:]
    public init() {}

    func buffer(_ n: Int) -> AlignedBuffer {
        if let s = scratch, s.capacity >= n { return s }
        let b = AlignedBuffer(capacity: n)
        scratch = b
        return b
    }
    func gatherBuffer(_ n: Int) -> AlignedBuffer {
        if let s = gather, s.capacity >= n { return s }
        let b = AlignedBuffer(capacity: n)
        gather = b
        return b
    }
    func compressedBuffer(_ n: Int) -> AlignedBuffer {
        if let s = compressed, s.capacity >= n { return s }
        let b = AlignedBuffer(capacity: n)
        compressed = b
        return b
    }
    func decompressor(_ a: CompressionSettings.Algorithm) -> any ClusterDecompressor {
        if let d = decompressors[a] { return d }
        let d = Codecs.makeDecompressor(a)
        decompressors[a] = d
        return d
    }
}

/// A raw file or block device as a guest image (sources, backing files, export bases). Aligned
/// reads go around the page cache (O_DIRECT); others, and file systems without O_DIRECT, use a
/// buffered descriptor that drops what it read.
public final class RawGuestImage: GuestImage {
    public let path: String
    public let virtualSize: UInt64
    let file: InputFile
    let direct: InputFile?
    let data: [Range<UInt64>]

    public init(path: String) throws(QcowPressError) {
        self.path = path
        do { file = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        let d = try? InputFile(path: path, direct: true)
        direct = d?.direct == true ? d : nil
        virtualSize = (file.size + 511) & ~511
        data = file.dataRanges()
    }

    public func isKnownZero(at offset: UInt64, count: Int) throws(QcowPressError) -> Bool {
        count <= 0 || knownZeroEnd(from: offset, limit: offset + UInt64(count)) == offset + UInt64(count)
    }

    /// The next data extent (SEEK_DATA, found when the image was opened) bounds the hole: one
    /// binary search.
    public func knownZeroEnd(from offset: UInt64, limit: UInt64) -> UInt64 {
        guard offset < limit else { return limit }
        var lo = 0, hi = data.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if data[mid].upperBound > offset { hi = mid } else { lo = mid + 1 }
        }
        guard lo < data.count else { return limit }
        return data[lo].lowerBound <= offset ? offset : min(data[lo].lowerBound, limit)
    }

    public func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError) {
        guard offset < file.size else {
            memset(into, 0, count)
            return
        }
        let n = Int(min(UInt64(count), file.size - offset))
        let got: Int
        do {
            // O_DIRECT needs 4 KiB-aligned offset, length and memory; the request is rounded up to
            // 4 KiB but never past `count` (a multiple of 4096), and the file's end stops it early.
            if let direct, offset % 4096 == 0, count % 4096 == 0, UInt(bitPattern: into) % 4096 == 0 {
                got = min(n, try direct.read(into: into, length: (n + 4095) & ~4095, offset: offset))
            } else {
                got = try file.read(into: into, length: n, offset: offset)
            }
        } catch {
            throw .from(error)
        }
        guard got == n else { throw .inputDamaged(path: path, location: "file ended at offset \(offset + UInt64(got)) (size changed while reading?)") }
        if n < count { memset(into + n, 0, count - n) }
    }

    /// One preadv straight into the buffers (O_DIRECT when every buffer is 4 KiB-aligned and a
    /// multiple of 4 KiB long; the file's end stops it, the rest reads as zeros).
    public func read(at offset: UInt64, into buffers: [UnsafeMutableRawBufferPointer], context: ReadContext) throws(QcowPressError) {
        let count = buffers.reduce(0) { $0 + $1.count }
        let aligned = offset % 4096 == 0 && buffers.allSatisfy { UInt(bitPattern: $0.baseAddress) % 4096 == 0 && $0.count % 4096 == 0 }
        guard let direct, aligned, offset < file.size else {
            var at = offset
            for b in buffers {
                try read(at: at, count: b.count, into: b.baseAddress!, context: context)
                at += UInt64(b.count)
            }
            return
        }
        let n = Int(min(UInt64(count), file.size - offset))
        let got: Int
        do { got = min(n, try direct.read(into: buffers, offset: offset)) } catch { throw .from(error) }
        guard got == n else { throw .inputDamaged(path: path, location: "file ended at offset \(offset + UInt64(got)) (size changed while reading?)") }
        if n < count {
            var at = 0
            for b in buffers {
                let from = max(n, at), to = at + b.count
                if from < to { memset(b.baseAddress! + (from - at), 0, to - from) }
                at += b.count
            }
        }
    }
}

extension Qcow2Image: GuestImage {
    enum ClusterState {
        case unallocated
        case zero
        case data(UInt64)
        case compressed(CompressedDescriptor)
        /// Extended L2: host cluster (0 if none) and the bitmap (alloc bits 0–31, zero bits 32–63).
        case subclusters(UInt64, UInt64)
    }

    func state(ofCluster c: UInt64) throws(QcowPressError) -> ClusterState {
        let r = geometry.l1Index(ofGuestCluster: c)
        guard let t = try l2Table(r) else { return .unallocated }
        let i = geometry.l2Index(ofGuestCluster: c)
        let words = geometry.extendedL2 ? 2 : 1
        let raw = t[i * words]
        let at = l1[r] + UInt64(i * 8 * words)
        let e = L2Entry(rawValue: raw)
        if e.isCompressed {
            if dataFile !== file {
                throw .inputDamaged(path: path, location: "L2 entry at offset \(at): compressed cluster in an image with an external data file")
            }
            if geometry.extendedL2 && t[i * 2 + 1] != 0 {
                throw .inputDamaged(path: path, location: "L2 entry at offset \(at): compressed cluster with a subcluster bitmap")
            }
            let d = e.compressedDescriptor(clusterBits: geometry.clusterBits)
            if d.hostOffset < UInt64(cs) || d.hostOffset >= fileSize {
                throw .inputDamaged(path: path, location: "L2 entry at offset \(at): compressed data at \(d.hostOffset) lies outside the file (\(fileSize) bytes)")
            }
            return .compressed(d)
        }
        if raw & L2Entry.standardReservedMask != 0 {
            throw .inputDamaged(path: path, location: "L2 entry at offset \(at) is \(raw): reserved bits set (host offset not cluster-aligned?)")
        }
        let host = e.hostOffset
        if host != 0 {
            if host % UInt64(cs) != 0 {
                throw .inputDamaged(path: path, location: "L2 entry at offset \(at): host offset \(host) is not cluster-aligned")
            }
            let limit = dataFile === file ? fileSize : dataFile.size
            // With subclusters only the allocated ones need to exist (QEMU writes them lazily).
            var needed = UInt64(cs)
            if geometry.extendedL2 {
                let alloc = t[i * 2 + 1] & 0xFFFF_FFFF
                needed = alloc == 0 ? 0 : UInt64(32 - alloc.leadingZeroBitCount + 32) * UInt64(cs / 32)
            }
            if host + needed > limit && !(dataFile !== file && host < limit) {
                throw .inputDamaged(path: path, location: "L2 entry at offset \(at): cluster at \(host) lies past the end of the file (\(limit) bytes)")
            }
            if dataFile === file && host < UInt64(cs) {
                throw .inputDamaged(path: path, location: "L2 entry at offset \(at): cluster at \(host) overlaps the header")
            }
        }
        if geometry.extendedL2 {
            let bitmap = t[i * 2 + 1]
            if bitmap & bitmap >> 32 & 0xFFFF_FFFF != 0 {
                throw .inputDamaged(path: path, location: "L2 bitmap at offset \(at + 8): subclusters both allocated and zero")
            }
            if bitmap & 0xFFFF_FFFF != 0 && host == 0 && dataFile === file {
                throw .inputDamaged(path: path, location: "L2 entry at offset \(at): allocated subclusters without a host cluster")
            }
            return .subclusters(host, bitmap)
        }
        if e.readsAsZero { return .zero }
        if host == 0 { return dataFile !== file && raw & L2Entry.copiedFlag != 0 ? .data(0) : .unallocated }
        return .data(host)
    }

    public func isKnownZero(at offset: UInt64, count: Int) throws(QcowPressError) -> Bool {
        guard count > 0 else { return true }
        return try knownZeroEnd(from: offset, limit: offset + UInt64(count)) == offset + UInt64(count)
    }

    public func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError) {
        var pos = 0
        while pos < count {
            let at = offset + UInt64(pos)
            let c = at >> UInt64(geometry.clusterBits)
            let inCluster = Int(at - (c << UInt64(geometry.clusterBits)))
            let n = min(count - pos, cs - inCluster)
            let dst = into + pos
            if at >= virtualSize {
                memset(dst, 0, count - pos)
                return
            }
            switch try state(ofCluster: c) {
            case .zero:
                memset(dst, 0, n)
            case .unallocated:
                try readBacking(at: at, count: n, into: dst, context: context)
            case .data(let host):
                try readData(host + UInt64(inCluster), n, dst)
            case .compressed(let d):
                let buf = context.buffer(cs)
                try decompress(d, into: buf, context: context)
                memcpy(dst, buf.pointer + inCluster, n)
            case .subclusters(let host, let bitmap):
                let sub = cs / 32
                var k = 0
                while k < n {
                    let s = (inCluster + k) / sub
                    let m = min(n - k, (s + 1) * sub - (inCluster + k))
                    if bitmap & (1 << UInt64(s)) != 0 {
                        try readData(host + UInt64(inCluster + k), m, dst + k)
                    } else if bitmap & (1 << UInt64(32 + s)) != 0 {
                        memset(dst + k, 0, m)
                    } else {
                        try readBacking(at: at + UInt64(k), count: m, into: dst + k, context: context)
                    }
                    k += m
                }
            }
            pos += n
        }
    }

    func readBacking(at: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError) {
        guard let b = backing, at < b.virtualSize else {
            memset(into, 0, count)
            return
        }
        let n = Int(min(UInt64(count), b.virtualSize - at))
        try b.read(at: at, count: n, into: into, context: context)
        if n < count { memset(into + n, 0, count - n) }
    }

    func readData(_ host: UInt64, _ n: Int, _ dst: UnsafeMutableRawPointer) throws(QcowPressError) {
        let got: Int
        do { got = try dataFile.read(into: dst, length: n, offset: host) } catch { throw .from(error) }
        if got < n {
            // External raw data files may be shorter than the guest (sparse tail).
            guard dataFile !== file else {
                throw .inputDamaged(path: path, location: "cluster data at \(host) is past the end of the file")
            }
            memset(dst + got, 0, n - got)
        }
    }

    func decompress(_ d: CompressedDescriptor, into out: AlignedBuffer, context: ReadContext) throws(QcowPressError) {
        let len = min(d.readLength, Int(fileSize - d.hostOffset))
        let src = context.compressedBuffer(len + 512)
        let got: Int
        do { got = try file.read(into: src.pointer, length: len, offset: d.hostOffset) } catch { throw .from(error) }
        guard got > 0 else { throw .inputDamaged(path: path, location: "compressed cluster at \(d.hostOffset) is past the end of the file") }
        let algo: CompressionSettings.Algorithm = header.compressionType == .zstd ? .zstd : .zlib
        do {
            try context.decompressor(algo).decompress(UnsafeRawBufferPointer(start: src.pointer, count: got),
                                                    into: UnsafeMutableRawBufferPointer(start: out.pointer, count: cs))
        } catch {
            throw .inputDamaged(path: path, location: "compressed cluster at \(d.hostOffset): \(error.description)")
        }
    }
}
