/// A VMDK text descriptor (a file of its own, or embedded in a sparse extent): `createType` and
/// the extent lines `ACCESS SECTORS TYPE "FILE" [OFFSET]`, in guest order.
///
/// Extent names are resolved against the descriptor's folder (as qemu-img does for relative
/// names). Unlike qemu-img, a name that is absolute or has a `..` component is refused: a
/// descriptor that came with a downloaded VM could otherwise make a conversion copy any file the
/// user can read (`/etc/shadow` as a FLAT extent) into the image.
public struct VMDKDescriptor: Sendable, Equatable {
    public enum ExtentType: String, Sendable { case flat = "FLAT", sparse = "SPARSE", zero = "ZERO", vmfs = "VMFS" }
    public struct Extent: Sendable, Equatable {
        public var sectors: UInt64
        public var type: ExtentType
        /// The file name as written (nil for ZERO).
        public var fileName: String?
        /// FLAT: where the extent's data starts in its file, in sectors.
        public var offset: UInt64
        /// 1-based line in the descriptor, for messages.
        public var line: Int
    }
    public var createType: String
    public var extents: [Extent]

    /// qemu reads at most 1 MiB − 1 of a descriptor (vmdk_read_desc); a larger one is refused.
    static let maxBytes = (1 << 20) - 1
    /// Bounds the open files and per-extent state: 4096 extents of 2 GiB hold 8 TiB, four times
    /// the 2 TiB a VMDK extent addresses.
    static let maxExtents = 4096
    /// The createTypes read (qemu-img's list without seSparse and vmfsSparse, whose extents
    /// QcowPress does not read, plus the two monolithic sparse kinds).
    static let createTypes: Set<String> = ["monolithicFlat", "vmfs", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
                                           "monolithicSparse", "streamOptimized"]

    /// Parses `text` of the descriptor file `path`; each error names the line or the key.
    init(_ text: [UInt8], path: String) throws(QcowPressError) {
        func bad(_ line: Int, _ why: String) -> QcowPressError {
            .inputDamaged(path: path, location: "VMDK descriptor line \(line) \(why)")
        }
        var createType: String?
        var extents: [Extent] = []
        var total: UInt64 = 0
        let lines = text.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false)
        for (i, raw) in lines.enumerated() {
            let n = i + 1
            var s = String(decoding: raw, as: UTF8.self)
            if s.hasSuffix("\r") { s.removeLast() }
            s = String(s.drop { $0 == " " || $0 == "\t" })
            if s.isEmpty || s.hasPrefix("#") || s.allSatisfy({ $0 == "\0" }) { continue }
            let words = s.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
            if ["RW", "RDONLY", "NOACCESS"].contains(words[0]) {
                guard words[0] != "NOACCESS" else {
                    throw .unsupported(path: path, what: "VMDK descriptor line \(n): a NOACCESS extent (its data is not readable)")
                }
                let e = try Self.extent(s, words: words, line: n, path: path)
                guard extents.count < Self.maxExtents else { throw bad(n, "is extent \(extents.count + 1): more than \(Self.maxExtents) extents") }
                guard e.sectors <= UInt64.max / 512 - total / 512 - 1 else { throw bad(n, "makes the disk larger than 2^64 bytes") }
                total += e.sectors * 512
                extents.append(e)
                continue
            }
            guard let eq = s.firstIndex(of: "=") else { continue }
            let key = trim(s[..<eq])
            var value = trim(s[s.index(after: eq)...])
            if value.count >= 2 && value.hasPrefix("\"") && value.hasSuffix("\"") { value = String(value.dropFirst().dropLast()) }
            switch key {
            case "createType": createType = value
            case "parentCID" where value.lowercased() != "ffffffff":
                throw .unsupported(path: path, what: "a VMDK delta disk (parentCID=\(value) on line \(n)): its data lives partly in a parent image; convert the chain with qemu-img")
            case "parentFileNameHint":
                throw .unsupported(path: path, what: "a VMDK delta disk (parentFileNameHint on line \(n)): its data lives partly in a parent image; convert the chain with qemu-img")
            default: break
            }
        }
        guard let createType else { throw .inputDamaged(path: path, location: "VMDK descriptor has no createType line") }
        guard Self.createTypes.contains(createType) else {
            throw .unsupported(path: path, what: "VMDK createType \"\(createType)\" (QcowPress reads \(Self.createTypes.sorted().joined(separator: ", ")))")
        }
        guard !extents.isEmpty else { throw .inputDamaged(path: path, location: "VMDK descriptor has no extent lines") }
        self.createType = createType
        self.extents = extents
    }

    /// One extent line: `RW 8192 FLAT "name-flat.vmdk" 0`, `RW 8192 SPARSE "name-s001.vmdk"`,
    /// `RW 8192 ZERO`.
    static func extent(_ s: String, words: [String], line n: Int, path: String) throws(QcowPressError) -> Extent {
        func bad(_ why: String) -> QcowPressError {
            .inputDamaged(path: path, location: "VMDK descriptor line \(n) (extent) \(why)")
        }
        guard words.count >= 3, let sectors = UInt64(words[1]), sectors > 0 else { throw bad("has no sector count > 0: \(s.prefix(80))") }
        guard let type = ExtentType(rawValue: words[2]) else {
            throw .unsupported(path: path, what: "VMDK extent type \(words[2].prefix(20)) on descriptor line \(n) (QcowPress reads FLAT, SPARSE, ZERO and VMFS)")
        }
        if type == .zero {
            guard words.count == 3 else { throw bad("ZERO takes no file name") }
            return Extent(sectors: sectors, type: .zero, fileName: nil, offset: 0, line: n)
        }
        guard let open = s.firstIndex(of: "\""), let close = s[s.index(after: open)...].firstIndex(of: "\"") else {
            throw bad("has no quoted file name")
        }
        let name = String(s[s.index(after: open)..<close])
        let rest = s[s.index(after: close)...].split(whereSeparator: { $0 == " " || $0 == "\t" })
        var offset: UInt64 = 0
        switch type {
        case .flat:
            guard rest.count == 1, let o = UInt64(rest[0]) else { throw bad("FLAT needs one offset in sectors after the file name") }
            guard o <= UInt64.max / 512 - sectors else { throw bad("offset \(o) overflows") }
            offset = o
        default:
            guard rest.isEmpty else { throw bad("has words after the file name") }
        }
        guard !name.isEmpty, !name.contains("\0") else { throw bad("has an empty file name") }
        guard !name.hasPrefix("/") else {
            throw .unsupported(path: path, what: "VMDK extent file \"\(name)\" on descriptor line \(n) is an absolute path; QcowPress reads extents inside the descriptor's folder only (copy or link the file there and name it relatively)")
        }
        guard !name.split(separator: "/").contains("..") else {
            throw .unsupported(path: path, what: "VMDK extent file \"\(name)\" on descriptor line \(n) leaves the descriptor's folder (\"..\"); QcowPress reads extents inside that folder only")
        }
        return Extent(sectors: sectors, type: type, fileName: name, offset: offset, line: n)
    }
}

extension VMDKDescriptor {
    /// The bytes of a descriptor qemu looks in for CID, parentCID and parentFileNameHint
    /// (DESC_SIZE: 20 sectors; its last byte is the string's end).
    static let keyWindow = 20 * 512

    /// The value of `CID` (or `parentCID`) as qemu's vmdk_read_cid finds it: the first place the
    /// key occurs in `text` (up to its first NUL), one character (the `=`) skipped, then a hex
    /// number as `sscanf("%x")` reads it (blanks, an optional 0x, hex digits). nil when absent.
    static func hexKey(_ key: String, in text: ArraySlice<UInt8>) -> UInt32? {
        let text = text.prefix(keyWindow - 1).prefix { $0 != 0 }
        let k = Array(key.utf8)
        guard text.count >= k.count,
              let at = (text.startIndex...(text.endIndex - k.count)).first(where: { text[$0..<($0 + k.count)].elementsEqual(k) })
        else { return nil }
        var i = at + k.count + 1
        while i < text.endIndex, [0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D].contains(text[i]) { i += 1 }
        if i + 2 < text.endIndex, text[i] == 0x30, text[i + 1] | 0x20 == 0x78, hexDigit(text[i + 2]) != nil { i += 2 }
        var value: UInt64 = 0, digits = 0
        while i < text.endIndex, let d = hexDigit(text[i]) {
            // strtoul saturates past 64 bits; %x then keeps the low 32 of what it got.
            value = digits < 16 ? value << 4 | UInt64(d) : UInt64.max
            digits += 1
            i += 1
        }
        return digits == 0 ? nil : UInt32(truncatingIfNeeded: value)
    }

    /// Whether `key` occurs in `text` up to its first NUL (qemu's strstr over DESC_SIZE bytes).
    static func find(_ key: String, in text: ArraySlice<UInt8>) -> Bool {
        let text = text.prefix(keyWindow - 1).prefix { $0 != 0 }
        let k = Array(key.utf8)
        guard text.count >= k.count else { return false }
        return (text.startIndex...(text.endIndex - k.count)).contains { text[$0..<($0 + k.count)].elementsEqual(k) }
    }

    private static func hexDigit(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: c - 0x30
        case 0x61...0x66: c - 0x61 + 10
        case 0x41...0x46: c - 0x41 + 10
        default: nil
        }
    }
}

/// `s` without leading and trailing blanks.
private func trim(_ s: Substring) -> String {
    var s = s
    while let f = s.first, f == " " || f == "\t" { s.removeFirst() }
    while let l = s.last, l == " " || l == "\t" { s.removeLast() }
    return String(s)
}
