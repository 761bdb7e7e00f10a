/// Big-endian field access over raw bytes; qcow2 stores every multi-byte field big-endian.
@inlinable
public func loadBE64(_ p: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
    UInt64(bigEndian: p.loadUnaligned(fromByteOffset: at, as: UInt64.self))
}
@inlinable
public func loadBE32(_ p: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
    UInt32(bigEndian: p.loadUnaligned(fromByteOffset: at, as: UInt32.self))
}
@inlinable
public func loadBE16(_ p: UnsafeRawBufferPointer, _ at: Int) -> UInt16 {
    UInt16(bigEndian: p.loadUnaligned(fromByteOffset: at, as: UInt16.self))
}
@inlinable
public func storeBE64(_ p: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt64) {
    p.storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt64.self)
}
@inlinable
public func storeBE32(_ p: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt32) {
    p.storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt32.self)
}
@inlinable
public func storeBE16(_ p: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt16) {
    p.storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt16.self)
}

/// Appends big-endian fields to a byte array (used for headers and extensions, never for data).
struct ByteWriter {
    var bytes: [UInt8] = []
    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    mutating func raw(_ v: [UInt8]) { bytes.append(contentsOf: v) }
    mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }
    mutating func padTo(multipleOf m: Int) {
        let r = bytes.count % m
        if r != 0 { zeros(m - r) }
    }
}
