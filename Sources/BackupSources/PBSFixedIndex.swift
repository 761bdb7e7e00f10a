import Crypto
import Foundation

/// A fixed index (`.fidx`): a 4096-byte little-endian header, then one 32-byte chunk digest per
/// chunk. Source: proxmox-backup pbs-datastore/src/fixed_index.rs.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic 2f7f41ed91fd0fcd |
/// | 8 | 16 | uuid |
/// | 24 | 8 | ctime (i64) |
/// | 32 | 32 | index_csum = SHA-256 over all digests |
/// | 64 | 8 | size (image bytes) |
/// | 72 | 8 | chunk_size |
/// | 80 | 4016 | reserved |
public struct PBSFixedIndex: Sendable {
    public static let magic: UInt64 = 0x2f7f_41ed_91fd_0fcd
    public static let headerSize = 4096
    public let path: String
    public let size: UInt64
    public let chunkSize: Int
    public let indexCsum: [UInt8]
    /// All digests, 32 bytes each.
    public let digests: [UInt8]

    public var chunkCount: Int { digests.count / 32 }

    /// 1 GiB of index is 32 Mi chunks: 128 TiB of disk at 4 MiB per chunk.
    public static let maxFileSize = 1 << 30

    public init(path: String) throws(SourceError) {
        let data = try readSourceFile(path, limit: Self.maxFileSize, what: "fixed index", cannotRead: "cannot read fixed index")
        try self.init(bytes: data, path: path)
    }

    /// Parses an index fetched elsewhere (a server); `path` names it in errors.
    public init(bytes data: [UInt8], path: String) throws(SourceError) {
        self.path = path
        guard data.count >= Self.headerSize else {
            throw SourceError(.damaged, path: path, "fixed index is truncated (\(data.count) bytes, header needs 4096)")
        }
        let bytes = data
        func le64(_ at: Int) -> UInt64 { bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt64.self)) } }
        let magic = bytes.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(as: UInt64.self)) }
        guard magic == Self.magic else {
            throw SourceError(.damaged, path: path, "magic at offset 0 is not a fixed index")
        }
        size = le64(64)
        let cs = le64(72)
        // chunk_from_offset masks with chunk_size - 1: a power of two (64 KiB … 4 MiB in real stores).
        guard cs >= 4096, cs <= 64 << 20, cs & (cs - 1) == 0 else {
            throw SourceError(.damaged, path: path, "chunk_size at offset 72 is \(cs): must be a power of two from 4 KiB to 64 MiB")
        }
        chunkSize = Int(cs)
        // The file must hold one digest per chunk; checked without overflow for any stored size.
        let count64 = size / cs + (size % cs == 0 ? 0 : 1)
        guard count64 <= UInt64(bytes.count / 32) else {
            throw SourceError(.damaged, path: path, "size \(size) at offset 64 needs \(count64) digests, the file holds \((bytes.count - Self.headerSize) / 32)")
        }
        let count = Int(count64)
        let expected = Self.headerSize + 32 * count
        guard bytes.count == expected else {
            throw SourceError(.damaged, path: path, "file is \(bytes.count) bytes, but size \(size) at offset 64 needs \(count) digests (\(expected) bytes)")
        }
        indexCsum = Array(bytes[32..<64])
        digests = Array(bytes[Self.headerSize...])
        let computed = Array(SHA256.hash(data: digests))
        guard computed == indexCsum else {
            throw SourceError(.damaged, path: path, "index_csum at offset 32 does not match the digests")
        }
    }

    public func digest(_ i: Int) -> ArraySlice<UInt8> { digests[(i * 32)..<(i * 32 + 32)] }
    /// Bytes of chunk i (the last may be short).
    public func chunkLength(_ i: Int) -> Int {
        Int(min(UInt64(chunkSize), size - UInt64(i) * UInt64(chunkSize)))
    }
}

public func hexString<S: Sequence>(_ bytes: S) -> String where S.Element == UInt8 {
    let digits = Array("0123456789abcdef".utf8)
    var out = [UInt8]()
    for b in bytes {
        out.append(digits[Int(b >> 4)])
        out.append(digits[Int(b & 15)])
    }
    return String(decoding: out, as: UTF8.self)
}

public func bytesFromHex(_ s: String) -> [UInt8]? {
    let u = Array(s.utf8)
    guard u.count % 2 == 0 else { return nil }
    var out = [UInt8]()
    out.reserveCapacity(u.count / 2)
    func v(_ c: UInt8) -> UInt8? {
        switch c {
        case 48...57: c - 48
        case 97...102: c - 87
        case 65...70: c - 55
        default: nil
        }
    }
    var i = 0
    while i < u.count {
        guard let a = v(u[i]), let b = v(u[i + 1]) else { return nil }
        out.append(a << 4 | b)
        i += 2
    }
    return out
}
