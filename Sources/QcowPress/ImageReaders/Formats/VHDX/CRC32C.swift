/// CRC-32C (Castagnoli: reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF),
/// the checksum of VHDX headers, region tables and log entries. Slicing-by-8 over eight 256-entry
/// tables; "123456789" → 0xE3069283. (PBS blobs use zlib's CRC-32, a different polynomial.)
public struct CRC32C: Sendable {
    /// Table k maps a byte to its CRC contribution k bytes further on (tables[k * 256 + byte]).
    static let tables: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 8 * 256)
        for i in 0..<256 {
            var c = UInt32(i)
            for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            t[i] = c
        }
        for k in 1..<8 {
            for i in 0..<256 {
                let prev = t[(k - 1) * 256 + i]
                t[k * 256 + i] = (prev >> 8) ^ t[Int(prev & 0xFF)]
            }
        }
        return t
    }()

    private var state: UInt32 = 0xFFFF_FFFF
    public init() {}

    /// The checksum of everything passed to `update` so far.
    public var value: UInt32 { ~state }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard var p = bytes.baseAddress else { return }
        var n = bytes.count
        var c = state
        Self.tables.withUnsafeBufferPointer { t in
            while n >= 8 {
                let lo = c ^ (UInt32(p.load(fromByteOffset: 0, as: UInt8.self)) | UInt32(p.load(fromByteOffset: 1, as: UInt8.self)) << 8
                    | UInt32(p.load(fromByteOffset: 2, as: UInt8.self)) << 16 | UInt32(p.load(fromByteOffset: 3, as: UInt8.self)) << 24)
                c = t[7 * 256 + Int(lo & 0xFF)] ^ t[6 * 256 + Int((lo >> 8) & 0xFF)]
                    ^ t[5 * 256 + Int((lo >> 16) & 0xFF)] ^ t[4 * 256 + Int(lo >> 24)]
                    ^ t[3 * 256 + Int(p.load(fromByteOffset: 4, as: UInt8.self))] ^ t[2 * 256 + Int(p.load(fromByteOffset: 5, as: UInt8.self))]
                    ^ t[256 + Int(p.load(fromByteOffset: 6, as: UInt8.self))] ^ t[Int(p.load(fromByteOffset: 7, as: UInt8.self))]
                p += 8
                n -= 8
            }
            while n > 0 {
                c = (c >> 8) ^ t[Int((c ^ UInt32(p.load(as: UInt8.self))) & 0xFF)]
                p += 1
                n -= 1
            }
        }
        state = c
    }

    public mutating func update(_ bytes: [UInt8]) { bytes.withUnsafeBytes { update($0) } }

    /// The checksum of `bytes`.
    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var c = CRC32C()
        c.update(bytes)
        return c.value
    }

    /// The checksum of `bytes` with the 4-byte checksum field at `field` taken as zero (how VHDX
    /// stores a structure's own checksum inside it).
    public static func checksum(_ bytes: [UInt8], zeroingFieldAt field: Int) -> UInt32 {
        var copy = bytes
        for i in field..<min(field + 4, copy.count) { copy[i] = 0 }
        return checksum(copy)
    }
}
