/// Reads and writes refcount entries in a refcount block for any refcount_order 0…6.
///
/// Entry width is `1 << refcountOrder` bits. Widths of 8 bits and more are big-endian integers;
/// narrower entries are packed into bytes starting at the least significant bit (QEMU's
/// `get_refcount_ro0…ro2`: entry i of width w lives at bits `(i % (8/w)) * w` of byte `i / (8/w)`).
public struct RefcountBlockCodec: Sendable {
    public let refcountOrder: Int
    public init(refcountOrder: Int) {
        precondition((0...6).contains(refcountOrder))
        self.refcountOrder = refcountOrder
    }
    public var bits: Int { 1 << refcountOrder }
    /// Largest refcount representable.
    public var maxRefcount: UInt64 { bits == 64 ? UInt64.max : (UInt64(1) << UInt64(bits)) - 1 }

    public func get(_ block: UnsafeRawBufferPointer, _ index: Int) -> UInt64 {
        switch refcountOrder {
        case 0, 1, 2:
            let perByte = 8 >> refcountOrder
            let byte = block[index / perByte]
            let shift = (index % perByte) * bits
            return UInt64((byte >> UInt8(shift)) & UInt8((1 << bits) - 1))
        case 3: return UInt64(block[index])
        case 4: return UInt64(loadBE16(block, index * 2))
        case 5: return UInt64(loadBE32(block, index * 4))
        default: return loadBE64(block, index * 8)
        }
    }

    public func set(_ block: UnsafeMutableRawBufferPointer, _ index: Int, _ value: UInt64) {
        precondition(value <= maxRefcount, "refcount \(value) exceeds \(bits)-bit width")
        switch refcountOrder {
        case 0, 1, 2:
            let perByte = 8 >> refcountOrder
            let shift = (index % perByte) * bits
            let mask = UInt8(((1 << bits) - 1) << shift)
            let i = index / perByte
            block[i] = (block[i] & ~mask) | (UInt8(value) << UInt8(shift))
        case 3: block[index] = UInt8(value)
        case 4: storeBE16(block, index * 2, UInt16(value))
        case 5: storeBE32(block, index * 4, UInt32(value))
        default: storeBE64(block, index * 8, value)
        }
    }
}
