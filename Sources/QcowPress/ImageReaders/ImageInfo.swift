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
    public struct FormatSpecific: Sendable, Codable, Equatable {
        public var type: String
        public var data: Qcow2Specific
    }
    public var virtualSize: UInt64
    public var filename: String
    public var clusterSize: Int?
    public var format: String
    public var actualSize: UInt64
    public var dirtyFlag: Bool
    public var backingFilename: String?
    public var backingFilenameFormat: String?
    public var formatSpecific: FormatSpecific?

    enum CodingKeys: String, CodingKey {
        case virtualSize = "virtual-size"
        case filename
        case clusterSize = "cluster-size"
        case format
        case actualSize = "actual-size"
        case dirtyFlag = "dirty-flag"
        case backingFilename = "backing-filename"
        case backingFilenameFormat = "backing-filename-format"
        case formatSpecific = "format-specific"
    }

    /// Reads the header of `path` (qcow2, or raw when the magic is absent).
    public init(path: String) throws(QcowPressError) {
        let f: InputFile
        do { f = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        filename = path
        actualSize = (try? FileStatus.of(fd: f.fd, path: path))?.allocated ?? 0
        guard let h = try readQcow2Header(f, path: path, requireMagic: false) else {
            format = "raw"
            virtualSize = f.size
            dirtyFlag = false
            return
        }
        format = "qcow2"
        virtualSize = h.size & ~511  // QEMU counts qcow2 sizes in whole sectors
        clusterSize = h.clusterSize
        dirtyFlag = h.incompatibleFeatures.contains(.dirty)
        backingFilename = h.backingFile
        backingFilenameFormat = h.backingFormat
        formatSpecific = FormatSpecific(type: "qcow2", data: Qcow2Specific(
            compat: h.version == 3 ? "1.1" : "0.10",
            compressionType: h.compressionType.name,
            lazyRefcounts: h.compatibleFeatures.contains(.lazyRefcounts),
            refcountBits: 1 << Int(h.refcountOrder),
            corrupt: h.incompatibleFeatures.contains(.corrupt),
            extendedL2: h.incompatibleFeatures.contains(.extendedL2)))
    }

    /// The human-readable form, laid out like `qemu-img info`.
    public var text: String {
        var s = "image: \(filename)\nfile format: \(format)\nvirtual size: \(Self.human(virtualSize)) (\(virtualSize) bytes)\ndisk size: \(Self.human(actualSize))\n"
        if let clusterSize { s += "cluster_size: \(clusterSize)\n" }
        if let backingFilename { s += "backing file: \(backingFilename)\n" }
        if let backingFilenameFormat { s += "backing file format: \(backingFilenameFormat)\n" }
        if let q = formatSpecific?.data {
            s += "Format specific information:\n    compat: \(q.compat)\n    compression type: \(q.compressionType)\n    lazy refcounts: \(q.lazyRefcounts)\n    refcount bits: \(q.refcountBits)\n    corrupt: \(q.corrupt)\n    extended l2: \(q.extendedL2)\n"
        }
        return s
    }

    public static func human(_ n: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var v = Double(n)
        var u = 0
        while v >= 1024 && u < units.count - 1 { v /= 1024; u += 1 }
        if u == 0 { return "\(n) B" }
        let hundredths = Int((v * 100).rounded())
        let frac = hundredths % 100
        return "\(hundredths / 100).\(frac < 10 ? "0" : "")\(frac) \(units[u])"
    }
}
