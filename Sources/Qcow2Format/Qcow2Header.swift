/// The qcow2 header (versions 2 and 3), all fields big-endian.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | magic `QFI\xfb` |
/// | 4 | 4 | version (2 or 3) |
/// | 8 | 8 | backing_file_offset |
/// | 16 | 4 | backing_file_size (≤ 1023) |
/// | 20 | 4 | cluster_bits (9…21) |
/// | 24 | 8 | size (virtual, bytes) |
/// | 32 | 4 | crypt_method |
/// | 36 | 4 | l1_size |
/// | 40 | 8 | l1_table_offset |
/// | 48 | 8 | refcount_table_offset |
/// | 56 | 4 | refcount_table_clusters |
/// | 60 | 4 | nb_snapshots |
/// | 64 | 8 | snapshots_offset |
/// | 72 | 8 | incompatible_features (v3) |
/// | 80 | 8 | compatible_features (v3) |
/// | 88 | 8 | autoclear_features (v3) |
/// | 96 | 4 | refcount_order (v3; v2 implies 4) |
/// | 100 | 4 | header_length (v3; v2 implies 72) |
/// | 104 | 1 | compression_type (header_length ≥ 105) |
public struct Qcow2Header: Sendable, Equatable {
    public static let magic: UInt32 = 0x5146_49FB
    /// Length QEMU 7.x writes for v3: 104 bytes of fields + compression_type + 7 bytes padding.
    public static let v3HeaderLength: UInt32 = 112
    public static let v2HeaderLength: UInt32 = 72
    /// QEMU refuses backing names longer than this.
    public static let maxBackingFileSize: UInt32 = 1023
    /// QEMU's limit on the L1 table (32 MiB of entries); bigger values are refused as absurd.
    public static let maxL1Size: UInt32 = 32 * 1024 * 1024 / 8
    /// QEMU's limit on the refcount table (8 MiB).
    public static let maxRefcountTableBytes: UInt64 = 8 * 1024 * 1024

    public var version: UInt32 = 3
    public var backingFileOffset: UInt64 = 0
    public var backingFileSize: UInt32 = 0
    public var clusterBits: UInt32
    public var size: UInt64
    public var cryptMethod: UInt32 = 0
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var nbSnapshots: UInt32 = 0
    public var snapshotsOffset: UInt64 = 0
    public var incompatibleFeatures: IncompatibleFeatures = []
    public var compatibleFeatures: CompatibleFeatures = []
    public var autoclearFeatures: AutoclearFeatures = []
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32 = Qcow2Header.v3HeaderLength
    public var compressionType: CompressionType = .zlib
    public var extensions: [HeaderExtension] = []
    /// The backing file name, read from `backingFileOffset`.
    public var backingFile: String? = nil

    public var clusterSize: Int { 1 << Int(clusterBits) }
    public var geometry: ClusterGeometry {
        ClusterGeometry(clusterBits: Int(clusterBits), extendedL2: incompatibleFeatures.contains(.extendedL2))
    }
    public var backingFormat: String? {
        for case .backingFormat(let f) in extensions { return f }
        return nil
    }
    public var externalDataFile: String? {
        for case .externalDataFile(let f) in extensions { return f }
        return nil
    }

    public init(clusterBits: UInt32, size: UInt64, l1Size: UInt32, l1TableOffset: UInt64,
                refcountTableOffset: UInt64, refcountTableClusters: UInt32) {
        self.clusterBits = clusterBits
        self.size = size
        self.l1Size = l1Size
        self.l1TableOffset = l1TableOffset
        self.refcountTableOffset = refcountTableOffset
        self.refcountTableClusters = refcountTableClusters
    }
}

extension Qcow2Header {
    /// Parses a header from the first bytes of an image (pass at least one cluster, or the whole
    /// header area if smaller; the function asks for no more than it was given).
    ///
    /// - Parameter fileSize: the image's size, so that offsets past its end are refused here.
    public init(parsing bytes: UnsafeRawBufferPointer, fileSize: UInt64? = nil) throws(FormatError) {
        func need(_ n: Int, _ field: String) throws(FormatError) {
            if bytes.count < n {
                throw FormatError(field: field, offset: UInt64(n), reason: "image is truncated (\(bytes.count) bytes)")
            }
        }
        try need(72, "header")
        let magic = loadBE32(bytes, 0)
        guard magic == Self.magic else {
            throw FormatError(field: "magic", offset: 0, value: UInt64(magic), reason: "not a qcow2 image")
        }
        version = loadBE32(bytes, 4)
        guard version == 2 || version == 3 else {
            throw FormatError(field: "version", offset: 4, value: UInt64(version), reason: "only versions 2 and 3 exist")
        }
        backingFileOffset = loadBE64(bytes, 8)
        backingFileSize = loadBE32(bytes, 16)
        clusterBits = loadBE32(bytes, 20)
        guard (9...21).contains(clusterBits) else {
            throw FormatError(field: "cluster_bits", offset: 20, value: UInt64(clusterBits), reason: "must be 9…21")
        }
        size = loadBE64(bytes, 24)
        // QEMU's QCOW_MAX_SIZE is 2^63-ish via INT64_MAX; anything larger cannot be addressed.
        guard size <= UInt64(Int64.max) else {
            throw FormatError(field: "size", offset: 24, value: size, reason: "virtual size too large")
        }
        cryptMethod = loadBE32(bytes, 32)
        l1Size = loadBE32(bytes, 36)
        l1TableOffset = loadBE64(bytes, 40)
        refcountTableOffset = loadBE64(bytes, 48)
        refcountTableClusters = loadBE32(bytes, 56)
        nbSnapshots = loadBE32(bytes, 60)
        snapshotsOffset = loadBE64(bytes, 64)
        if version == 3 {
            try need(104, "header")
            incompatibleFeatures = IncompatibleFeatures(rawValue: loadBE64(bytes, 72))
            compatibleFeatures = CompatibleFeatures(rawValue: loadBE64(bytes, 80))
            autoclearFeatures = AutoclearFeatures(rawValue: loadBE64(bytes, 88))
            refcountOrder = loadBE32(bytes, 96)
            headerLength = loadBE32(bytes, 100)
            guard headerLength >= 104, headerLength <= UInt32(1 << clusterBits) else {
                throw FormatError(field: "header_length", offset: 100, value: UInt64(headerLength), reason: "must be at least 104 and fit in the first cluster")
            }
            if headerLength >= 105 {
                try need(105, "compression_type")
                let t = bytes[104]
                guard let ct = CompressionType(rawValue: t) else {
                    throw FormatError(field: "compression_type", offset: 104, value: UInt64(t), reason: "unknown compression type")
                }
                compressionType = ct
                if ct != .zlib && !incompatibleFeatures.contains(.compressionType) {
                    throw FormatError(field: "compression_type", offset: 104, value: UInt64(t), reason: "set without incompatible feature bit 3")
                }
            } else {
                compressionType = .zlib
            }
        } else {
            refcountOrder = 4
            headerLength = Self.v2HeaderLength
        }
        guard refcountOrder <= 6 else {
            throw FormatError(field: "refcount_order", offset: 96, value: UInt64(refcountOrder), reason: "must be 0…6")
        }
        let unknown = incompatibleFeatures.subtracting(.known)
        guard unknown.isEmpty else {
            throw FormatError(field: "incompatible_features", offset: 72, value: unknown.rawValue, reason: "unknown incompatible feature bits")
        }
        let cs = UInt64(1) << UInt64(clusterBits)
        guard l1TableOffset % cs == 0 else {
            throw FormatError(field: "l1_table_offset", offset: 40, value: l1TableOffset, reason: "not cluster-aligned")
        }
        guard refcountTableOffset % cs == 0 else {
            throw FormatError(field: "refcount_table_offset", offset: 48, value: refcountTableOffset, reason: "not cluster-aligned")
        }
        guard l1Size <= Self.maxL1Size else {
            throw FormatError(field: "l1_size", offset: 36, value: UInt64(l1Size), reason: "larger than QEMU's 32 MiB L1 limit")
        }
        let geometry = ClusterGeometry(clusterBits: Int(clusterBits), extendedL2: incompatibleFeatures.contains(.extendedL2))
        guard UInt64(l1Size) >= geometry.l1Entries(forVirtualSize: size) else {
            throw FormatError(field: "l1_size", offset: 36, value: UInt64(l1Size), reason: "too small for the virtual size \(size)")
        }
        guard refcountTableClusters > 0, UInt64(refcountTableClusters) * cs <= Self.maxRefcountTableBytes else {
            throw FormatError(field: "refcount_table_clusters", offset: 56, value: UInt64(refcountTableClusters), reason: "must be 1…\(Self.maxRefcountTableBytes / cs)")
        }
        if let fileSize {
            if l1Size > 0 && !fits(l1TableOffset, UInt64(l1Size) * 8, within: fileSize) {
                throw FormatError(field: "l1_table_offset", offset: 40, value: l1TableOffset, reason: "L1 table extends past the end of the file (\(fileSize) bytes)")
            }
            if !fits(refcountTableOffset, UInt64(refcountTableClusters) * cs, within: fileSize) {
                throw FormatError(field: "refcount_table_offset", offset: 48, value: refcountTableOffset, reason: "refcount table extends past the end of the file (\(fileSize) bytes)")
            }
        }
        if l1Size > 0 && l1TableOffset == 0 {
            throw FormatError(field: "l1_table_offset", offset: 40, value: 0, reason: "L1 table overlaps the header")
        }
        if refcountTableOffset == 0 {
            throw FormatError(field: "refcount_table_offset", offset: 48, value: 0, reason: "refcount table overlaps the header")
        }

        // Extensions start after the header (v3: header_length; v2: 72) and end at type 0.
        var at = Int(headerLength)
        var exts: [HeaderExtension] = []
        let limit = min(bytes.count, Int(cs))
        let extEnd = backingFileOffset > 0 ? min(limit, Int(clamping: backingFileOffset)) : limit
        while at + 8 <= extEnd {
            let type = loadBE32(bytes, at)
            let len = Int(loadBE32(bytes, at + 4))
            if type == HeaderExtension.endType { break }
            let padded = (len + 7) & ~7
            guard at + 8 + padded <= extEnd || at + 8 + len <= extEnd else {
                throw FormatError(field: "header extension 0x\(String(type, radix: 16)) length", offset: UInt64(at + 4), value: UInt64(len), reason: "extends past the header area")
            }
            let payload = Array(bytes[(at + 8)..<(at + 8 + len)])
            exts.append(try HeaderExtension(type: type, payload: payload, offset: UInt64(at + 8)))
            at += 8 + padded
        }
        extensions = exts

        // An empty name (size 0) means no backing file, as in QEMU.
        if backingFileOffset != 0 && backingFileSize != 0 {
            guard backingFileSize <= Self.maxBackingFileSize else {
                throw FormatError(field: "backing_file_size", offset: 16, value: UInt64(backingFileSize), reason: "must be 0…1023")
            }
            guard fits(backingFileOffset, UInt64(backingFileSize), within: cs) else {
                throw FormatError(field: "backing_file_offset", offset: 8, value: backingFileOffset, reason: "backing file name lies outside the first cluster")
            }
            let end = backingFileOffset + UInt64(backingFileSize)
            guard end <= UInt64(bytes.count) else {
                throw FormatError(field: "backing_file_offset", offset: 8, value: backingFileOffset, reason: "image is truncated before the backing file name")
            }
            let nameBytes = bytes[Int(backingFileOffset)..<Int(end)]
            guard let name = String(validating: nameBytes, as: UTF8.self) else {
                throw FormatError(field: "backing file name", offset: backingFileOffset, reason: "not UTF-8")
            }
            backingFile = name
        }
    }

    /// Serialises a version 3 header with its extensions and backing file name, as QEMU 7.x lays them
    /// out: 112-byte header, extensions (backing format first, then the feature name table when the
    /// cluster is larger than 4 KiB, as QEMU does), end marker, then the backing file name.
    public func serialized() -> [UInt8] {
        precondition(version == 3, "QcowPress writes version 3 only")
        var w = ByteWriter()
        w.u32(Self.magic)
        w.u32(3)
        // backing_file_offset/size are patched below once the extensions' length is known.
        w.u64(0)
        w.u32(0)
        w.u32(clusterBits)
        w.u64(size)
        w.u32(cryptMethod)
        w.u32(l1Size)
        w.u64(l1TableOffset)
        w.u64(refcountTableOffset)
        w.u32(refcountTableClusters)
        w.u32(nbSnapshots)
        w.u64(snapshotsOffset)
        var incompat = incompatibleFeatures
        if compressionType != .zlib { incompat.insert(.compressionType) }
        w.u64(incompat.rawValue)
        w.u64(compatibleFeatures.rawValue)
        w.u64(autoclearFeatures.rawValue)
        w.u32(refcountOrder)
        w.u32(Self.v3HeaderLength)
        w.u8(compressionType.rawValue)
        w.zeros(7)
        for ext in extensions {
            let p = ext.payload
            w.u32(ext.type)
            w.u32(UInt32(p.count))
            w.raw(p)
            w.padTo(multipleOf: 8)
        }
        w.zeros(8)  // end of extensions
        if let backingFile, !backingFile.isEmpty {
            let name = Array(backingFile.utf8)
            let off = UInt64(w.bytes.count)
            w.raw(name)
            w.bytes.withUnsafeMutableBytes { p in
                storeBE64(p, 8, off)
                storeBE32(p, 16, UInt32(name.count))
            }
        }
        return w.bytes
    }

    /// The extensions QEMU writes for a new image: backing format (if any), then the feature name
    /// table when the cluster is larger than 4 KiB (qemu-img 7.2 omits it for 512 B…4 KiB clusters).
    public static func defaultExtensions(clusterBits: UInt32, backingFormat: String?) -> [HeaderExtension] {
        var exts: [HeaderExtension] = []
        if let backingFormat { exts.append(.backingFormat(backingFormat)) }
        if clusterBits > 12 { exts.append(.featureNames(FeatureName.qemuDefaultTable)) }
        return exts
    }
}

/// True when [offset, offset+length) lies inside [0, size), computed without overflow (offsets
/// read from a damaged image may be anywhere up to 2^64 − 1).
@inlinable
public func fits(_ offset: UInt64, _ length: UInt64, within size: UInt64) -> Bool {
    offset <= size && length <= size - offset
}
