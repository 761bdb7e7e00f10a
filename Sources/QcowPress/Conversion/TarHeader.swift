/// One 512-byte tar header block (POSIX ustar, GNU's "ustar  " variant, v7), parsed and checked:
/// the checksum (the unsigned sum of the block with the checksum field read as spaces; the signed
/// sum old tars wrote is accepted too), the octal (or GNU base-256) numbers, the name (with the
/// ustar prefix). Extension headers (pax `x`/`g`, GNU `L`/`K`) are resolved by `TarWalker`.
public struct TarHeader: Sendable, Equatable {
    public var name: String
    public var size: UInt64
    /// The typeflag byte ('0' or NUL: regular file, '5' directory, '1' hard link, '2' symlink,
    /// 'x'/'g' pax, 'L'/'K' GNU long name/link, …).
    public var type: UInt8
    public var linkName: String

    /// The block size of tar: headers and data are padded to it.
    public static let block = 512

    /// True when the block is all zeros (the end-of-archive marker is two of them).
    public static func isZero(_ b: [UInt8]) -> Bool { b.allSatisfy { $0 == 0 } }

    /// Parses `b` (512 bytes). `at` (the header's offset in the archive) and `archive` name the
    /// error, which is one line naming the field.
    public init(_ b: [UInt8], at: UInt64, archive: String) throws(QcowPressError) {
        func bad(_ field: String, _ why: String) -> QcowPressError {
            .inputDamaged(path: archive, location: "tar header at offset \(at) field \(field) \(why)")
        }
        guard b.count == Self.block else { throw bad("block", "is \(b.count) bytes, not 512 (truncated archive)") }
        guard let stored = Self.number(b[148..<156]) else { throw bad("chksum", "is not an octal number (not a tar archive?)") }
        var unsigned: UInt64 = 0
        var signed: Int64 = 0
        for (i, v) in b.enumerated() {
            let c = (148..<156).contains(i) ? UInt8(ascii: " ") : v
            unsigned += UInt64(c)
            signed += Int64(Int8(bitPattern: c))
        }
        guard stored == unsigned || Int64(bitPattern: stored) == signed else {
            throw bad("chksum", "is \(stored), the header sums to \(unsigned) (damaged, or not a tar archive)")
        }
        guard let size = Self.number(b[124..<136]) else { throw bad("size", "is not a number") }
        self.size = size
        type = b[156]
        let magic = Array(b[257..<263])
        let posix = magic == Array("ustar\0".utf8)
        var n = Self.string(b[0..<100])
        // POSIX ustar: a prefix (a directory part) of up to 155 bytes; GNU's header uses those
        // bytes for other fields.
        if posix {
            let prefix = Self.string(b[345..<500])
            if !prefix.isEmpty { n = prefix + "/" + n }
        }
        name = n
        linkName = Self.string(b[157..<257])
    }

    /// NUL-terminated text of a field.
    static func string(_ f: ArraySlice<UInt8>) -> String {
        let end = f.firstIndex(of: 0) ?? f.endIndex
        return String(decoding: f[f.startIndex..<end], as: UTF8.self)
    }

    /// An octal number (leading spaces, ended by NUL or space), or GNU's base-256 form (the first
    /// byte's high bit set; a negative one, 0xff, is refused). nil when it is neither.
    static func number(_ f: ArraySlice<UInt8>) -> UInt64? {
        guard let first = f.first else { return nil }
        if first & 0x80 != 0 {
            guard first == 0x80 else { return nil }
            var v: UInt64 = 0
            for c in f.dropFirst() {
                guard v >> 56 == 0 else { return nil }
                v = v << 8 | UInt64(c)
            }
            return v
        }
        var v: UInt64 = 0
        var digits = 0
        var i = f.startIndex
        while i < f.endIndex && f[i] == UInt8(ascii: " ") { i += 1 }
        while i < f.endIndex, f[i] >= UInt8(ascii: "0"), f[i] <= UInt8(ascii: "7") {
            guard v >> 60 == 0 else { return nil }
            v = v << 3 | UInt64(f[i] - UInt8(ascii: "0"))
            digits += 1
            i += 1
        }
        // The rest: terminators only (NUL or space).
        while i < f.endIndex {
            guard f[i] == 0 || f[i] == UInt8(ascii: " ") else { return nil }
            i += 1
        }
        return digits > 0 ? v : nil
    }

    /// The records of a pax extended header ("LEN key=value\n" each); a damaged record is an error.
    static func paxRecords(_ data: [UInt8], at: UInt64, archive: String) throws(QcowPressError) -> [String: String] {
        var out: [String: String] = [:]
        var p = 0
        while p < data.count {
            if data[p] == 0 { break }  // padding NULs after the last record
            var len = 0
            var q = p
            while q < data.count, data[q] >= UInt8(ascii: "0"), data[q] <= UInt8(ascii: "9"), len < 1 << 24 {
                len = len * 10 + Int(data[q] - UInt8(ascii: "0"))
                q += 1
            }
            guard q < data.count, data[q] == UInt8(ascii: " "), len > q - p + 1, p + len <= data.count, data[p + len - 1] == UInt8(ascii: "\n"),
                  let eq = data[(q + 1)..<(p + len - 1)].firstIndex(of: UInt8(ascii: "=")) else {
                throw .inputDamaged(path: archive, location: "pax extended header at offset \(at): record at byte \(p) is malformed")
            }
            let key = String(decoding: data[(q + 1)..<eq], as: UTF8.self)
            out[key] = String(decoding: data[(eq + 1)..<(p + len - 1)], as: UTF8.self)
            p += len
        }
        return out
    }
}
