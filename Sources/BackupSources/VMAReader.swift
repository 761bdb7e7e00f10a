import Crypto
import Foundation

/// A streaming reader of vzdump VMA archives. Source of truth: pve-qemu
/// debian/patches/pve/0026-PVE-Backup-add-vma-backup-format-code.patch (vma.h, vma-reader.c).
/// All fields are big-endian except the 2-byte little-endian length prefix of blob entries.
public final class VMAReader {
    public static let headerStructSize = 12288
    public static let extentHeaderSize = 512
    public static let clusterSize = 65536
    public static let blockSize = 4096
    public static let slotsPerExtent = 59
    public static let maxExtentSize = 512 + 65536 * 59

    public struct Device: Sendable {
        public var id: Int
        public var name: String
        public var size: UInt64
        public var clusterCount: Int { Int((size + 65535) / 65536) }
    }
    public struct Config: Sendable {
        public var name: String
        public var data: [UInt8]
    }

    public let stream: ArchiveStream
    public private(set) var uuid: [UInt8] = []
    public private(set) var devices: [Device] = []
    public private(set) var configs: [Config] = []
    var deviceByID = [Int?](repeating: nil, count: 256)
    /// Clusters seen per device: sparse pages of a bitmap (1 bit per 64 KiB), made when a cluster
    /// in them arrives, so a device's declared size costs nothing until the archive backs it.
    var seen: [ClusterSet] = []
    private let extentBuffer: UnsafeMutableRawPointer
    var path: String { stream.file.path }

    public init(stream: ArchiveStream) throws(SourceError) {
        self.stream = stream
        extentBuffer = .allocate(byteCount: Self.maxExtentSize, alignment: 4096)
        try readHeader()
    }
    deinit { extentBuffer.deallocate() }

    func damaged(_ at: UInt64, _ what: String) -> SourceError {
        SourceError(.damaged, path: path, "archive offset \(at): \(what)")
    }

    func readHeader() throws(SourceError) {
        var head = [UInt8](repeating: 0, count: Self.headerStructSize)
        let got = try stream.readFully(into: &head, from: 0, count: head.count)
        guard got >= 4 else { throw damaged(UInt64(got), "archive is empty or truncated in the header") }
        guard head[0...3] == [0x56, 0x4D, 0x41, 0x00] else { throw damaged(0, "magic is not VMA\\0 (not a VMA archive)") }
        guard got == Self.headerStructSize else { throw damaged(UInt64(got), "archive is truncated in the header") }
        func be32(_ a: [UInt8], _ at: Int) -> UInt32 { a.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt32.self)) } }
        func be64(_ a: [UInt8], _ at: Int) -> UInt64 { a.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt64.self)) } }
        let headerSize = Int(be32(head, 56))
        // The writer's HEADERBUF_SIZE is 512 KiB; anything larger is not from vzdump.
        guard headerSize > Self.headerStructSize, headerSize <= 512 << 10 else {
            throw damaged(56, "header_size \(headerSize) must be above 12288 and at most 524288")
        }
        var full = head
        full += [UInt8](repeating: 0, count: headerSize - head.count)
        let rest = try stream.readFully(into: &full, from: Self.headerStructSize, count: headerSize - Self.headerStructSize)
        guard rest == headerSize - Self.headerStructSize else {
            throw damaged(UInt64(Self.headerStructSize + rest), "archive is truncated in the header")
        }
        let stored = Array(full[32..<48])
        for i in 32..<48 { full[i] = 0 }
        guard Array(Insecure.MD5.hash(data: full)) == stored else { throw damaged(32, "header MD5 checksum mismatch") }
        let version = be32(full, 4)
        guard version == 1 else { throw damaged(4, "version \(version) is not 1") }
        uuid = Array(full[8..<24])
        let blobOffset = Int(be32(full, 48))
        let blobSize = Int(be32(full, 52))
        guard blobOffset >= Self.headerStructSize, blobOffset + blobSize <= headerSize else {
            throw damaged(48, "blob buffer \(blobOffset)+\(blobSize) lies outside the header")
        }
        func blob(_ ptr: UInt32, field: String, at: Int) throws(SourceError) -> [UInt8] {
            let p = Int(ptr)
            guard p > 0, p + 2 <= blobSize else { throw damaged(UInt64(at), "\(field) points outside the blob buffer") }
            let len = Int(full[blobOffset + p]) | Int(full[blobOffset + p + 1]) << 8
            guard p + 2 + len <= blobSize else { throw damaged(UInt64(at), "\(field) runs past the blob buffer") }
            return Array(full[(blobOffset + p + 2)..<(blobOffset + p + 2 + len)])
        }
        func name(_ ptr: UInt32, field: String, at: Int) throws(SourceError) -> String {
            var b = try blob(ptr, field: field, at: at)
            guard b.last == 0 else { throw damaged(UInt64(at), "\(field) is not NUL-terminated") }
            b.removeLast()
            guard let s = String(validating: b, as: UTF8.self) else { throw damaged(UInt64(at), "\(field) is not UTF-8") }
            // Names become file names in OUTDIR: nothing that could leave it.
            guard !s.isEmpty, s != ".", s != "..", !s.contains("/"), !s.contains("\0") else {
                throw damaged(UInt64(at), "\(field) '\(s)' is not a plain file name")
            }
            return s
        }
        for i in 0..<256 {
            let n = be32(full, 2044 + 4 * i)
            let d = be32(full, 3068 + 4 * i)
            guard n != 0 && d != 0 else { continue }
            let cname = try name(n, field: "config_names[\(i)]", at: 2044 + 4 * i)
            guard !configs.contains(where: { $0.name == cname }) else { throw damaged(UInt64(2044 + 4 * i), "config name '\(cname)' appears twice") }
            configs.append(Config(name: cname, data: try blob(d, field: "config_data[\(i)]", at: 3068 + 4 * i)))
        }
        for id in 1..<256 {
            let at = 4096 + 32 * id
            let ptr = be32(full, at)
            let size = be64(full, at + 8)
            guard ptr != 0, size != 0 else { continue }
            let dname = try name(ptr, field: "device \(id) name", at: at)
            guard !devices.contains(where: { $0.name == dname }) else { throw damaged(UInt64(at), "device name '\(dname)' appears twice") }
            guard size <= 1 << 50 else { throw damaged(UInt64(at + 8), "device \(id) size \(size) is absurd") }
            deviceByID[id] = devices.count
            devices.append(Device(id: id, name: dname, size: size))
        }
        seen = devices.map { _ in ClusterSet() }
        // Every cluster of every device must appear in some extent (59 clusters at most, each
        // extent with a 512-byte header): an uncompressed archive shorter than that cannot hold them.
        if compressionKnownNone, let length = stream.file.size {
            let clusters = devices.reduce(UInt64(0)) { $0 + UInt64($1.clusterCount) }
            let extents = (clusters + UInt64(Self.slotsPerExtent) - 1) / UInt64(Self.slotsPerExtent)
            let needed = UInt64(headerSize) + extents * UInt64(Self.extentHeaderSize)
            if needed > length {
                let d = devices.max { $0.size < $1.size }!
                throw damaged(UInt64(4096 + 32 * d.id + 8), "device sizes (largest: '\(d.name)', \(d.size) bytes) need at least \(needed) bytes of archive, but the archive has \(length)")
            }
        }
    }

    var compressionKnownNone: Bool { stream.compression == .none }

    /// One cluster of one device from an extent: `mask` bit i set = block i stored in `data`
    /// (contiguous, in bit order); clear = zero block.
    public struct Cluster {
        public var device: Int  // index into `devices`
        public var cluster: Int
        public var mask: UInt16
        public var data: UnsafeRawBufferPointer
    }

    /// Reads the next extent and calls `body` for each of its clusters; returns false at the end.
    public func nextExtent(_ body: (Cluster) throws(SourceError) -> Void) throws(SourceError) -> Bool {
        let start = stream.offset
        let h = extentBuffer
        let got = try stream.readFully(into: h, count: Self.extentHeaderSize)
        if got == 0 { return false }
        guard got == Self.extentHeaderSize else { throw damaged(start + UInt64(got), "archive is truncated in an extent header") }
        let header = UnsafeMutableRawBufferPointer(start: h, count: Self.extentHeaderSize)
        var md5 = [UInt8](repeating: 0, count: 16)
        for i in 0..<16 { md5[i] = header[24 + i]; header[24 + i] = 0 }
        guard Array(Insecure.MD5.hash(data: UnsafeRawBufferPointer(header))) == md5 else {
            throw damaged(start + 24, "extent MD5 checksum mismatch")
        }
        guard Array(header[8..<24]) == uuid else { throw damaged(start + 8, "extent uuid differs from the archive's") }
        guard header[0] == 0x56, header[1] == 0x4D, header[2] == 0x41, header[3] == 0x45, header[4] == 0, header[5] == 0 else {
            throw damaged(start, "extent magic is not VMAE")
        }
        let blockCount = Int(UInt16(header[6]) << 8 | UInt16(header[7]))
        guard Self.extentHeaderSize + blockCount * Self.blockSize <= Self.maxExtentSize else {
            throw damaged(start + 6, "block count \(blockCount) exceeds an extent")
        }
        var expected = 0
        var slots: [(dev: Int, cluster: Int, mask: UInt16, slotAt: UInt64)] = []
        for s in 0..<Self.slotsPerExtent {
            let bi = UInt64(bigEndian: UnsafeRawBufferPointer(header).loadUnaligned(fromByteOffset: 40 + 8 * s, as: UInt64.self))
            let devID = Int((bi >> 32) & 0xFF)
            guard devID != 0 else { continue }
            let slotAt = start + UInt64(40 + 8 * s)
            guard let dev = deviceByID[devID] else { throw damaged(slotAt, "device id \(devID) is not in the device table") }
            let mask = UInt16(bi >> 48)
            let cluster = Int(bi & 0xFFFF_FFFF)
            let d = devices[dev]
            guard cluster < d.clusterCount else {
                throw damaged(slotAt, "cluster \(cluster) is beyond the size of device '\(d.name)' (\(d.size) bytes)")
            }
            // Blocks wholly past the end are never stored (old writers: only a full mask, clamped).
            let blocksInDevice = Int(min(16, (d.size - UInt64(cluster) * 65536 + 4095) / 4096))
            if mask != 0xFFFF && blocksInDevice < 16 && mask >> blocksInDevice != 0 {
                throw damaged(slotAt, "cluster \(cluster) of device '\(d.name)' has blocks beyond the device end")
            }
            guard seen[dev].insert(cluster) else { throw damaged(slotAt, "cluster \(cluster) of device '\(d.name)' appears twice") }
            expected += mask.nonzeroBitCount
            slots.append((dev, cluster, mask, slotAt))
        }
        guard expected == blockCount else {
            throw damaged(start + 6, "block count \(blockCount) disagrees with the masks (\(expected) blocks)")
        }
        let dataLen = blockCount * Self.blockSize
        let data = h + Self.extentHeaderSize
        let n = try stream.readFully(into: data, count: dataLen)
        guard n == dataLen else { throw damaged(stream.offset, "archive is truncated inside an extent's data") }
        var pos = 0
        for s in slots {
            let len = s.mask.nonzeroBitCount * Self.blockSize
            try body(Cluster(device: s.dev, cluster: s.cluster, mask: s.mask, data: UnsafeRawBufferPointer(start: data + pos, count: len)))
            pos += len
        }
        return true
    }

    /// After the last extent: every cluster of every device must have appeared.
    public func checkComplete() throws(SourceError) {
        for (i, d) in devices.enumerated() where seen[i].count < d.clusterCount {
            let c = seen[i].firstMissing()
            throw SourceError(.damaged, path: path, "archive offset \(stream.offset): cluster \(c) of device '\(d.name)' is missing")
        }
    }
}

/// A set of cluster numbers as a bitmap in 4 KiB pages (32768 clusters = 2 GiB of disk each),
/// allocated on first use.
struct ClusterSet {
    static let pageShift = 15
    final class Page { var words = [UInt64](repeating: 0, count: 1 << (ClusterSet.pageShift - 6)) }
    private var pages: [Int: Page] = [:]
    private(set) var count = 0

    /// Adds `c`; false when it was already there.
    mutating func insert(_ c: Int) -> Bool {
        let k = c >> Self.pageShift
        let page: Page
        if let p = pages[k] { page = p } else { page = Page(); pages[k] = page }
        let i = c & ((1 << Self.pageShift) - 1)
        let b = UInt64(1) << UInt64(i & 63)
        if page.words[i >> 6] & b != 0 { return false }
        page.words[i >> 6] |= b
        count += 1
        return true
    }
    func contains(_ c: Int) -> Bool {
        guard let p = pages[c >> Self.pageShift] else { return false }
        let i = c & ((1 << Self.pageShift) - 1)
        return p.words[i >> 6] & (UInt64(1) << UInt64(i & 63)) != 0
    }
    /// The smallest cluster number not in the set (cost bounded by the pages present).
    func firstMissing() -> Int {
        var k = 0
        while let p = pages[k] {
            if let w = p.words.firstIndex(where: { $0 != UInt64.max }) {
                return k << Self.pageShift | w << 6 | (~p.words[w]).trailingZeroBitCount
            }
            k += 1
        }
        return k << Self.pageShift
    }
}
