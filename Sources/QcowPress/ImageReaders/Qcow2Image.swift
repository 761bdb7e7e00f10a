import ClusterCompression
import DirectIO
import Glibc
import Qcow2Format

/// A qcow2 image opened for reading, as QEMU 7.x creates them: versions 2 and 3, cluster sizes
/// 512 B–2 MiB, zlib and zstd compressed clusters, zero clusters, extended L2 (subclusters),
/// refcount widths 1–64, lazy refcounts, internal snapshots (the active state is read), external
/// data files and backing chains.
///
/// An image with the corrupt bit set is read (see ``markedCorrupt``). Every offset taken from the
/// image is checked before use: tables and clusters must lie inside
/// the file, be aligned, and not overlap the header, the L1 table or the refcount table; two L1
/// entries may not share an L2 table. A violation is an ``QcowPressError/inputDamaged(path:location:)``
/// naming the field and offset. Reads are thread-safe (one cache lock; I/O without it).
public final class Qcow2Image: Sendable {
    public let path: String
    public let header: Qcow2Header
    public let geometry: ClusterGeometry
    public let virtualSize: UInt64
    let file: InputFile
    let dataFile: InputFile
    let fileSize: UInt64
    let l1: [UInt64]
    /// The image below this one (qcow2 or raw), when there is one and it may be opened.
    public let backing: (any GuestImage)?
    /// The header's corrupt bit (incompatible feature bit 1): QEMU found inconsistent metadata
    /// while writing and refuses to open the image read/write until `qemu-img check -r` repairs it.
    /// The image is still read (read-only), as by qemu-img convert.
    public let markedCorrupt: Bool
    /// The images of this chain (this one first) whose corrupt bit is set.
    public var markedCorruptInChain: [String] {
        (markedCorrupt ? [path] : []) + ((backing as? Qcow2Image)?.markedCorruptInChain ?? [])
    }
    let l2Tables: L2TableCache
    let cs: Int

    /// Most images in a backing chain (the top image included). QEMU has no fixed limit (it reads
    /// chains of hundreds; only the open-file limit stops it); this bound keeps the recursion and
    /// the descriptors (one or two per image) well inside a default process.
    public static let maxChainDepth = 1000

    /// Opens an image. With `openBacking` false (qemu-img `-U`-style `--no-backing`) unallocated
    /// clusters read as zeros, as if there were no backing file. `seen` holds the identities of the
    /// images above this one in the chain (to refuse loops).
    /// `depthLimit` lowers the chain bound (tests).
    public init(path: String, openBacking: Bool = true, seen: [String] = [], depthLimit: Int = Qcow2Image.maxChainDepth) throws(QcowPressError) {
        self.path = path
        do { file = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        fileSize = file.size
        header = try readQcow2Header(file, path: path)
        geometry = header.geometry
        cs = header.clusterSize
        // QEMU counts qcow2 sizes in 512-byte sectors, rounding an odd size down.
        virtualSize = header.size & ~511
        if header.cryptMethod != 0 {
            throw .unsupported(path: path, what: "encrypted qcow2 (crypt_method \(header.cryptMethod))")
        }
        // The corrupt bit stops QEMU from writing an image, not from reading it: qemu-img convert,
        // compare and info open it read-only. So does this reader (it never writes); callers name
        // such images (`markedCorruptInChain`), since the data may be damaged.
        markedCorrupt = header.incompatibleFeatures.contains(.corrupt)
        l2Tables = L2TableCache(limit: max(8, (32 << 20) / cs))
        // Metadata regions, to refuse tables that overlap them.
        let l1Bytes = UInt64(header.l1Size) * 8
        let reserved: [(Range<UInt64>, String)] = [
            (0..<UInt64(cs), "the header"),
            (header.l1TableOffset..<(header.l1TableOffset + max(l1Bytes, 1)), "the L1 table"),
            (header.refcountTableOffset..<(header.refcountTableOffset + UInt64(header.refcountTableClusters) * UInt64(cs)), "the refcount table"),
        ]
        if overlaps(reserved[1].0, reserved[2].0) {
            throw .inputDamaged(path: path, location: "l1_table_offset \(header.l1TableOffset) overlaps the refcount table")
        }
        var l1: [UInt64] = []
        if header.l1Size > 0 {
            let b = AlignedBuffer(capacity: Int(l1Bytes))
            do { _ = try file.read(into: b.pointer, length: Int(l1Bytes), offset: header.l1TableOffset) } catch { throw .from(error) }
            l1.reserveCapacity(Int(header.l1Size))
            var owners: [UInt64: Int] = [:]
            for i in 0..<Int(header.l1Size) {
                let e = L1Entry(rawValue: loadBE64(UnsafeRawBufferPointer(b.bytes), i * 8))
                let at = header.l1TableOffset + UInt64(i * 8)
                if e.l2Offset != 0 {
                    if e.reservedBits != 0 || e.l2Offset % UInt64(cs) != 0 {
                        throw .inputDamaged(path: path, location: "L1 entry \(i) at offset \(at) is \(e.rawValue): reserved bits set or L2 offset not cluster-aligned")
                    }
                    if e.l2Offset + UInt64(cs) > fileSize {
                        throw .inputDamaged(path: path, location: "L1 entry \(i) at offset \(at): L2 table at \(e.l2Offset) lies past the end of the file (\(fileSize) bytes)")
                    }
                    for (r, what) in reserved where r.contains(e.l2Offset) || overlaps(r, e.l2Offset..<(e.l2Offset + UInt64(cs))) {
                        throw .inputDamaged(path: path, location: "L1 entry \(i) at offset \(at): L2 table at \(e.l2Offset) overlaps \(what)")
                    }
                    if let j = owners[e.l2Offset] {
                        throw .inputDamaged(path: path, location: "L1 entries \(j) and \(i) both point at the L2 table at \(e.l2Offset) (loop)")
                    }
                    owners[e.l2Offset] = i
                }
                l1.append(e.l2Offset)
            }
        }
        self.l1 = l1
        // QEMU decides by incompatible bit 2 alone: the extension names the file only when the bit
        // is set; without the bit the data is in this file whatever the extension says.
        if header.incompatibleFeatures.contains(.externalDataFile) {
            guard let ext = header.externalDataFile else {
                throw .inputDamaged(path: path, location: "incompatible_features at offset 72 has the external data file bit (2) set but no data-file extension names the file ('data-file' is required for this image)")
            }
            let p = Self.resolve(ext, relativeTo: path)
            guard Self.isRegularFile(p) else {
                throw .inputDamaged(path: path, location: "external data file '\(ext)' is not a regular file")
            }
            do { dataFile = try InputFile(path: p, direct: false) } catch { throw .from(error) }
        } else {
            if header.autoclearFeatures.contains(.rawExternalData) {
                throw .inputDamaged(path: path, location: "autoclear_features at offset 88 has raw external data (bit 1) set without an external data file (data-file-raw requires a data file)")
            }
            dataFile = file
        }
        if openBacking, let name = header.backingFile {
            let p = Self.resolve(name, relativeTo: path)
            guard Self.isRegularFile(p) else {
                throw .inputDamaged(path: path, location: "backing file '\(name)' (offset \(header.backingFileOffset)) does not resolve to a regular file")
            }
            let mine = Self.identity(path)
            let id = Self.identity(p)
            if id == mine || seen.contains(id) {
                throw .inputDamaged(path: path, location: "backing file '\(name)' loops back to an image already in the chain")
            }
            // `seen` holds the images above this one: this image is number seen.count + 1.
            if seen.count + 2 > depthLimit {
                throw .inputDamaged(path: path, location: "backing chain is deeper than \(depthLimit) images; it stops here, at backing file '\(name)'")
            }
            let fmt: String
            if let f = header.backingFormat { fmt = f } else { fmt = try RawImageReader.detectFormat(path: p) }
            switch fmt {
            case "qcow2": backing = try Qcow2Image(path: p, openBacking: true, seen: seen + [mine], depthLimit: depthLimit)
            case "raw": backing = try RawGuestImage(path: p)
            default: throw .unsupported(path: path, what: "backing format '\(fmt)'")
            }
        } else {
            backing = nil
        }
    }

    static func resolve(_ name: String, relativeTo image: String) -> String {
        if name.hasPrefix("/") { return name }
        if let slash = image.lastIndex(of: "/") { return String(image[...slash]) + name }
        return name
    }
    static func isRegularFile(_ p: String) -> Bool {
        (try? FileStatus.of(path: p))?.kind == .regular
    }
    static func identity(_ p: String) -> String {
        (try? FileStatus.of(path: p))?.identity ?? p
    }

    /// The L2 table of region `r` (entries host-endian; 2 words per cluster with extended L2).
    func l2Table(_ r: Int) throws(QcowPressError) -> [UInt64]? {
        guard r < l1.count, l1[r] != 0 else { return nil }
        let off = l1[r]
        return try l2Tables.table(at: off) { () throws(QcowPressError) -> [UInt64] in
            let b = AlignedBuffer(capacity: cs)
            let n: Int
            do throws(IOError) { n = try file.read(into: b.pointer, length: cs, offset: off) } catch { throw .from(error) }
            guard n == cs else { throw .inputDamaged(path: path, location: "L2 table at \(off) is truncated") }
            return L2TableCache.decode(UnsafeRawBufferPointer(b.bytes))
        }
    }
}

func overlaps(_ a: Range<UInt64>, _ b: Range<UInt64>) -> Bool {
    !a.isEmpty && !b.isEmpty && a.lowerBound < b.upperBound && b.lowerBound < a.upperBound
}

/// The qcow2 header at the start of `file`, parsed against the file's size. Reads the first cluster
/// at most (2 MiB). Returns nil when the magic is not qcow2's, unless `requireMagic` (then that is
/// the error); a damaged header is ``QcowPressError/inputDamaged(path:location:)`` naming the field.
/// With `tablesInsideFile` false the L1 and refcount tables may lie past the end of the file (they
/// read as zeros there, as in QEMU, which `check` reports rather than refuses).
func readQcow2Header(_ file: InputFile, path: String, requireMagic: Bool, tablesInsideFile: Bool = true) throws(QcowPressError) -> Qcow2Header? {
    let n = Int(min(file.size, 2 << 20))
    let head = AlignedBuffer(capacity: max(n, 4096))
    let got: Int
    do { got = try file.read(into: head.pointer, length: n, offset: 0) } catch { throw .from(error) }
    let bytes = UnsafeRawBufferPointer(start: head.pointer, count: got)
    if !requireMagic && (got < 4 || loadBE32(bytes, 0) != Qcow2Header.magic) { return nil }
    do { return try Qcow2Header(parsing: bytes, fileSize: tablesInsideFile ? file.size : nil) } catch {
        throw .inputDamaged(path: path, location: error.description)
    }
}

/// The qcow2 header at the start of `file`; anything else (bad magic included) is an error.
func readQcow2Header(_ file: InputFile, path: String) throws(QcowPressError) -> Qcow2Header {
    guard let h = try readQcow2Header(file, path: path, requireMagic: true) else {
        throw .inputDamaged(path: path, location: "magic at offset 0 is not QFI\\xfb (not a qcow2 image)")
    }
    return h
}

extension Qcow2Image {
    /// Walks the extents of this image: a run of absent L2 tables (512 MiB each with 64 KiB
    /// clusters) at once, through the backing file's own extents; cluster by cluster only inside
    /// an L2 table that exists (what it costs is the metadata's size, not the virtual size).
    public func knownZeroEnd(from offset: UInt64, limit: UInt64) throws(QcowPressError) -> UInt64 {
        let bits = UInt64(geometry.clusterBits)
        var at = offset
        while at < limit {
            if at >= virtualSize { return limit }
            let c = at >> bits
            let r = geometry.l1Index(ofGuestCluster: c)
            if r >= l1.count || l1[r] == 0 {
                var next = r + 1
                while next < l1.count && l1[next] == 0 { next += 1 }
                let runEnd = next >= l1.count ? limit : min(limit, UInt64(next) * geometry.bytesPerL2)
                let e = try backingZeroEnd(from: at, limit: runEnd)
                if e < runEnd { return e }
                at = runEnd
                continue
            }
            let stop = min(limit, (c + 1) << bits)
            switch try state(ofCluster: c) {
            case .zero: break
            case .unallocated:
                let e = try backingZeroEnd(from: at, limit: stop)
                if e < stop { return e }
            case .subclusters(_, let bitmap):
                if bitmap & 0xFFFF_FFFF != 0 { return at }
                if bitmap >> 32 != 0xFFFF_FFFF, try backingZeroEnd(from: at, limit: stop) < stop { return at }
            default: return at
            }
            at = stop
        }
        return limit
    }

    /// ``knownZeroEnd(from:limit:)`` of the backing file (zeros without one, and past its end).
    func backingZeroEnd(from offset: UInt64, limit: UInt64) throws(QcowPressError) -> UInt64 {
        guard let b = backing, offset < b.virtualSize else { return limit }
        let inBacking = min(limit, b.virtualSize)
        let e = try b.knownZeroEnd(from: offset, limit: inBacking)
        return e == inBacking ? limit : e
    }
}
