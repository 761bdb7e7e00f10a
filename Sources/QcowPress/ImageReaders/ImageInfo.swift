import DirectIO
import Glibc
import Qcow2Format

/// What `qcowpress info` reports about an image, named as `qemu-img info --output json` names it.
public struct ImageInfo: Sendable, Codable, Equatable {
    public struct Qcow2Specific: Sendable, Codable, Equatable {
        public var compat: String
        public var compressionType: String
        public var lazyRefcounts: Bool
        public var refcountBits: Int
        public var corrupt: Bool
        public var extendedL2: Bool
        enum CodingKeys: String, CodingKey {
            case compat
            case compressionType = "compression-type"
            case lazyRefcounts = "lazy-refcounts"
            case refcountBits = "refcount-bits"
            case corrupt
            case extendedL2 = "extended-l2"
        }
    }
    /// qemu-img's `format-specific`: `type` names the format, `data` holds its fields.
    public struct FormatSpecific: Sendable, Codable, Equatable {
        public enum Content: Sendable, Equatable { case qcow2(Qcow2Specific), vmdk(VMDKSpecific) }
        public var type: String
        public var data: Content
        public init(_ data: Content) {
            self.data = data
            switch data {
            case .qcow2: type = "qcow2"
            case .vmdk: type = "vmdk"
            }
        }
        /// The qcow2 fields, nil for another format.
        public var qcow2: Qcow2Specific? { if case .qcow2(let q) = data { q } else { nil } }
        /// The vmdk fields, nil for another format.
        public var vmdk: VMDKSpecific? { if case .vmdk(let v) = data { v } else { nil } }
        enum CodingKeys: String, CodingKey { case type, data }
        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            switch try c.decode(String.self, forKey: .type) {
            case "vmdk": self.init(.vmdk(try c.decode(VMDKSpecific.self, forKey: .data)))
            default: self.init(.qcow2(try c.decode(Qcow2Specific.self, forKey: .data)))
            }
        }
        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(type, forKey: .type)
            switch data {
            case .qcow2(let q): try c.encode(q, forKey: .data)
            case .vmdk(let v): try c.encode(v, forKey: .data)
            }
        }
        /// The lines under "Format specific information:", laid out as qemu-img's.
        var text: String {
            switch data {
            case .qcow2(let q):
                "    compat: \(q.compat)\n    compression type: \(q.compressionType)\n    lazy refcounts: \(q.lazyRefcounts)\n    refcount bits: \(q.refcountBits)\n    corrupt: \(q.corrupt)\n    extended l2: \(q.extendedL2)\n"
            case .vmdk(let v): v.text
            }
        }
    }
    public var virtualSize: UInt64
    public var filename: String
    public var clusterSize: Int?
    public var format: String
    public var actualSize: UInt64
    public var dirtyFlag: Bool
    public var backingFilename: String?
    /// The backing file as a reader finds it: a relative name resolved against this image's
    /// directory (qemu-img's `full-backing-filename`).
    public var fullBackingFilename: String?
    public var backingFilenameFormat: String?
    public var formatSpecific: FormatSpecific?
    /// VDI: static or dynamic; VHD: fixed or dynamic (not a qemu-img key).
    public var subformat: String?

    enum CodingKeys: String, CodingKey {
        case virtualSize = "virtual-size"
        case filename
        case clusterSize = "cluster-size"
        case format
        case actualSize = "actual-size"
        case dirtyFlag = "dirty-flag"
        case backingFilename = "backing-filename"
        case fullBackingFilename = "full-backing-filename"
        case backingFilenameFormat = "backing-filename-format"
        case formatSpecific = "format-specific"
        case subformat
    }

    /// Reads the header of `path`. `format` as qemu-img info -f: "qcow2" requires the qcow2 magic,
    /// "raw" reads any file as raw (a qcow2 file too), nil probes by magic (``ImageFormat``: raw
    /// when none; a format QcowPress does not read is refused by name).
    public init(path: String, format given: String? = nil) throws(QcowPressError) {
        let format = try ImageFormat.resolve(path: path, given: given)
        if let other = try ImageInfo(blockImage: path, format: format) {
            self = other
            return
        }
        let f: InputFile
        do { f = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        filename = path
        actualSize = (try? FileStatus.of(fd: f.fd, path: path))?.allocated ?? 0
        let header = format == "raw" ? nil : try readQcow2Header(f, path: path, requireMagic: format == "qcow2")
        guard let h = header else {
            self.format = "raw"
            virtualSize = (f.size + 511) & ~511  // QEMU's raw driver rounds up to whole sectors
            dirtyFlag = false
            return
        }
        self.format = "qcow2"
        virtualSize = h.size & ~511  // QEMU counts qcow2 sizes in whole sectors
        clusterSize = h.clusterSize
        dirtyFlag = h.incompatibleFeatures.contains(.dirty)
        backingFilename = h.backingFile
        fullBackingFilename = h.backingFile.map { Qcow2Image.resolve($0, relativeTo: path) }
        backingFilenameFormat = h.backingFormat
        formatSpecific = FormatSpecific(.qcow2(Qcow2Specific(
            compat: h.version == 3 ? "1.1" : "0.10",
            compressionType: h.compressionType.name,
            lazyRefcounts: h.compatibleFeatures.contains(.lazyRefcounts),
            refcountBits: 1 << Int(h.refcountOrder),
            corrupt: h.incompatibleFeatures.contains(.corrupt),
            extendedL2: h.incompatibleFeatures.contains(.extendedL2))))
    }

    /// The human-readable form, laid out like `qemu-img info`.
    public var text: String {
        var s = "image: \(filename)\nfile format: \(format)\nvirtual size: \(Self.human(virtualSize)) (\(virtualSize) bytes)\ndisk size: \(Self.human(actualSize))\n"
        if let clusterSize { s += "cluster_size: \(clusterSize)\n" }
        if let subformat { s += "subformat: \(subformat)\n" }
        if let backingFilename {
            let full = fullBackingFilename ?? backingFilename
            s += "backing file: \(backingFilename)\(full == backingFilename ? "" : " (actual path: \(full))")\n"
        }
        if let backingFilenameFormat { s += "backing file format: \(backingFilenameFormat)\n" }
        if let formatSpecific { s += "Format specific information:\n" + formatSpecific.text }
        return s
    }

    /// The image and every image below it, top first, as `qemu-img info --backing-chain` lists
    /// them. A backing file that is missing or not a regular file, a loop, or a chain deeper than
    /// ``Qcow2Image/maxChainDepth`` is an error naming the image whose backing file it is.
    public static func chain(path: String, format: String? = nil) throws(QcowPressError) -> [ImageInfo] {
        var out = [try ImageInfo(path: path, format: format)]
        var seen = [Qcow2Image.identity(path)]
        while let top = out.last, let name = top.backingFilename, let next = top.fullBackingFilename {
            guard Qcow2Image.isRegularFile(next) else {
                throw .inputDamaged(path: top.filename, location: "backing file '\(name)' does not resolve to a regular file")
            }
            let id = Qcow2Image.identity(next)
            if seen.contains(id) {
                throw .inputDamaged(path: top.filename, location: "backing file '\(name)' loops back to an image already in the chain")
            }
            if out.count >= Qcow2Image.maxChainDepth {
                throw .inputDamaged(path: top.filename, location: "backing chain is deeper than \(Qcow2Image.maxChainDepth) images; it stops here, at backing file '\(name)'")
            }
            seen.append(id)
            out.append(try ImageInfo(path: next, format: top.backingFilenameFormat))
        }
        return out
    }

    /// A size as qemu-img prints it (`size_to_str`): three significant digits and a binary unit,
    /// switching unit from 1000 on ("10 MiB", "1.25 MiB", "0.977 MiB", "196 KiB").
    public static func human(_ n: UInt64) -> String {
        let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
        let x = Double(n) / (1000.0 / 1024.0)
        let e = n == 0 ? 0 : Int(x.exponent) + 1  // frexp's exponent
        let i = min((e - 1) / 10, suffixes.count - 1)
        let v = Double(n) / Double(UInt64(1) << UInt64(max(i, 0) * 10))
        var buf = [CChar](repeating: 0, count: 32)
        _ = withVaList([v]) { vsnprintf(&buf, buf.count, "%0.3g", $0) }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) + " \(suffixes[max(i, 0)])B"
    }
}
