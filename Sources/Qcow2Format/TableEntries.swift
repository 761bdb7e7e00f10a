/// A host byte offset in the image file (never a guest offset).
public typealias HostOffset = UInt64

/// L1 table entry.
///
/// | bits | meaning |
/// |---|---|
/// | 0–8 | reserved (0) |
/// | 9–55 | L2 table offset (cluster-aligned); 0 = unallocated |
/// | 56–62 | reserved (0) |
/// | 63 | copied: refcount is exactly 1 |
public struct L1Entry: Sendable, Equatable {
    public var rawValue: UInt64
    public static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    public static let copiedFlag: UInt64 = 1 << 63
    public static let reservedMask: UInt64 = 0x7F00_0000_0000_01FF

    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(l2Offset: HostOffset, copied: Bool = true) {
        precondition(l2Offset & ~Self.offsetMask == 0, "L2 offset must be cluster-aligned and < 2^56")
        rawValue = l2Offset | (copied && l2Offset != 0 ? Self.copiedFlag : 0)
    }
    public var l2Offset: HostOffset { rawValue & Self.offsetMask }
    public var copied: Bool { rawValue & Self.copiedFlag != 0 }
    public var reservedBits: UInt64 { rawValue & Self.reservedMask }
}

/// Standard (64-bit) L2 table entry.
///
/// | bits | meaning (standard cluster) |
/// |---|---|
/// | 0 | reads as zeros (v3) |
/// | 1–8 | reserved (0) |
/// | 9–55 | host cluster offset; 0 = unallocated (or zero if bit 0) |
/// | 56–61 | reserved (0) |
/// | 62 | compressed (then bits 0–61 are a ``CompressedDescriptor``) |
/// | 63 | copied: refcount is exactly 1 (never set for compressed) |
public struct L2Entry: Sendable, Equatable {
    public var rawValue: UInt64
    public static let zeroFlag: UInt64 = 1
    public static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    public static let compressedFlag: UInt64 = 1 << 62
    public static let copiedFlag: UInt64 = 1 << 63
    /// Reserved bits of a standard (uncompressed) entry.
    public static let standardReservedMask: UInt64 = 0x3F00_0000_0000_01FE

    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let unallocated = L2Entry(rawValue: 0)
    /// A cluster that reads as zeros with no host cluster (v3 only).
    public static let zero = L2Entry(rawValue: zeroFlag)

    public static func standard(hostOffset: HostOffset, copied: Bool) -> L2Entry {
        precondition(hostOffset & ~offsetMask == 0, "host offset must be cluster-aligned and < 2^56")
        return L2Entry(rawValue: hostOffset | (copied ? copiedFlag : 0))
    }
    public static func compressed(_ d: CompressedDescriptor) -> L2Entry {
        L2Entry(rawValue: compressedFlag | d.rawValue)
    }

    public var isCompressed: Bool { rawValue & Self.compressedFlag != 0 }
    public var copied: Bool { rawValue & Self.copiedFlag != 0 }
    public var readsAsZero: Bool { !isCompressed && rawValue & Self.zeroFlag != 0 }
    /// Host cluster offset of a standard entry (0 if unallocated).
    public var hostOffset: HostOffset { rawValue & Self.offsetMask }
    public func compressedDescriptor(clusterBits: Int) -> CompressedDescriptor {
        CompressedDescriptor(rawValue: rawValue & ~(Self.compressedFlag | Self.copiedFlag), clusterBits: clusterBits)
    }
}

/// The descriptor of a compressed cluster (bits 0–61 of an L2 entry with bit 62 set).
///
/// With x = 70 − cluster_bits: bits 0…x−1 hold the host **byte** offset of the compressed data,
/// bits x…61 the number of 512-byte sectors it occupies after the first:
/// `floor((offset + length − 1) / 512) − floor(offset / 512)`.
public struct CompressedDescriptor: Sendable, Equatable {
    public var rawValue: UInt64
    public let clusterBits: Int

    public static let sectorSize: UInt64 = 512

    public init(rawValue: UInt64, clusterBits: Int) {
        self.rawValue = rawValue
        self.clusterBits = clusterBits
    }

    /// Number of low bits holding the byte offset.
    public static func offsetBits(clusterBits: Int) -> Int { 70 - clusterBits }

    /// Encodes a compressed cluster of `length` bytes at host byte `offset`.
    public init(hostOffset: HostOffset, length: Int, clusterBits: Int) {
        precondition(length > 0)
        let x = Self.offsetBits(clusterBits: clusterBits)
        precondition(hostOffset < (UInt64(1) << UInt64(x)), "host offset does not fit the descriptor")
        let first = hostOffset / Self.sectorSize
        let last = (hostOffset + UInt64(length) - 1) / Self.sectorSize
        let sectors = last - first
        precondition(sectors < (UInt64(1) << UInt64(62 - x)), "compressed length does not fit the descriptor")
        self.rawValue = hostOffset | (sectors << UInt64(x))
        self.clusterBits = clusterBits
    }

    public var hostOffset: HostOffset {
        rawValue & ((UInt64(1) << UInt64(Self.offsetBits(clusterBits: clusterBits))) - 1)
    }
    /// Additional 512-byte sectors after the first.
    public var additionalSectors: UInt64 {
        (rawValue & ((UInt64(1) << 62) - 1)) >> UInt64(Self.offsetBits(clusterBits: clusterBits))
    }
    /// Bytes a reader fetches: from `hostOffset` to the end of the last sector it names.
    public var readLength: Int {
        Int((additionalSectors + 1) * Self.sectorSize - hostOffset % Self.sectorSize)
    }
    /// Host clusters the compressed data may touch (first through last, inclusive).
    public func hostClusterRange(clusterBits: Int) -> ClosedRange<UInt64> {
        let first = hostOffset >> UInt64(clusterBits)
        let end = hostOffset + UInt64(readLength) - 1
        return first...(end >> UInt64(clusterBits))
    }
}
