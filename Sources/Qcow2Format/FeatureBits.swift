/// Incompatible feature bits (header offset 72). A reader that does not know a set bit must refuse the image.
///
/// | bit | name |
/// |---|---|
/// | 0 | dirty (refcounts may be inconsistent) |
/// | 1 | corrupt |
/// | 2 | external data file |
/// | 3 | compression type field is valid (non-zlib) |
/// | 4 | extended L2 entries (subclusters) |
public struct IncompatibleFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let dirty = IncompatibleFeatures(rawValue: 1 << 0)
    public static let corrupt = IncompatibleFeatures(rawValue: 1 << 1)
    public static let externalDataFile = IncompatibleFeatures(rawValue: 1 << 2)
    public static let compressionType = IncompatibleFeatures(rawValue: 1 << 3)
    public static let extendedL2 = IncompatibleFeatures(rawValue: 1 << 4)
    /// Every bit this implementation understands.
    public static let known: IncompatibleFeatures = [.dirty, .corrupt, .externalDataFile, .compressionType, .extendedL2]
}

/// Compatible feature bits (header offset 80): bit 0 lazy refcounts.
public struct CompatibleFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let lazyRefcounts = CompatibleFeatures(rawValue: 1 << 0)
}

/// Autoclear feature bits (header offset 88): bit 0 bitmaps extension, bit 1 raw external data.
public struct AutoclearFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let bitmaps = AutoclearFeatures(rawValue: 1 << 0)
    public static let rawExternalData = AutoclearFeatures(rawValue: 1 << 1)
}

/// The header's compression_type byte (offset 104, v3 with header_length ≥ 105).
public enum CompressionType: UInt8, Sendable, CaseIterable {
    /// Raw deflate with a 4 KiB window (`windowBits = -12`).
    case zlib = 0
    /// One zstd frame per cluster.
    case zstd = 1

    public var name: String { self == .zlib ? "zlib" : "zstd" }
}

/// One entry of the feature name table extension (48 bytes: type, bit, 46-byte name).
public struct FeatureName: Sendable, Equatable {
    public enum Kind: UInt8, Sendable { case incompatible = 0, compatible = 1, autoclear = 2 }
    public var kind: Kind
    public var bit: UInt8
    public var name: String
    public init(kind: Kind, bit: UInt8, name: String) {
        self.kind = kind
        self.bit = bit
        self.name = name
    }

    /// The table QEMU 7.x writes into every image it creates; QcowPress writes the same one.
    public static let qemuDefaultTable: [FeatureName] = [
        .init(kind: .incompatible, bit: 0, name: "dirty bit"),
        .init(kind: .incompatible, bit: 1, name: "corrupt bit"),
        .init(kind: .incompatible, bit: 2, name: "external data file"),
        .init(kind: .incompatible, bit: 3, name: "compression type"),
        .init(kind: .incompatible, bit: 4, name: "extended L2 entries"),
        .init(kind: .compatible, bit: 0, name: "lazy refcounts"),
        .init(kind: .autoclear, bit: 0, name: "bitmaps"),
        .init(kind: .autoclear, bit: 1, name: "raw external data"),
    ]
}
