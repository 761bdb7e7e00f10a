import DirectIO
import Glibc

/// What a `TarWalker` reads: an archive file (skipping costs nothing) or a stream (stdin).
protocol TarInput: AnyObject {
    /// Bytes of the archive consumed so far.
    var position: UInt64 { get }
    /// Reads up to `count` bytes; 0 only at the end.
    func read(into: UnsafeMutableRawPointer, count: Int) throws(QcowPressError) -> Int
    /// Moves `count` bytes on (a file seeks, a stream reads and drops); false when the archive
    /// ends first.
    func skip(_ count: UInt64) throws(QcowPressError) -> Bool
}

/// One file of a tar archive: its checked name, size and where its data starts.
public struct TarEntry: Sendable, Equatable {
    public var name: String
    public var size: UInt64
    /// The offset of the first data byte in the archive (512-aligned).
    public var dataOffset: UInt64
    public var isDirectory: Bool
}

/// Walks a tar archive's entries front to back, never unpacking anything: pax (`path`, `size`)
/// and GNU long names are applied to the entry they precede; links, devices, FIFOs and sparse
/// entries are refused, as are names that would leave a directory (absolute, or with a `..`
/// component) and a name given twice. The archive must end with the end-of-archive block;
/// otherwise it is truncated. Every refusal is one line naming the archive and the offset.
final class TarWalker {
    let input: TarInput
    let archive: String
    /// The current entry's data not read yet, and the padding after it.
    private var remaining: UInt64 = 0
    private var padding: UInt64 = 0
    private var names = Set<String>()
    private(set) var ended = false

    /// Extension headers' data is read into memory: at most this much (a pax header holds a few
    /// records; GNU long names are paths). Larger is refused as damage, never allocated.
    static let extensionLimit: UInt64 = 1 << 20

    init(input: TarInput, archive: String) {
        self.input = input
        self.archive = archive
    }

    private func damaged(_ at: UInt64, _ why: String) -> QcowPressError {
        .inputDamaged(path: archive, location: "tar \(why) at offset \(at)")
    }

    private func truncated() -> QcowPressError {
        .inputDamaged(path: archive, location: "archive ends at offset \(input.position) before its end-of-archive block (truncated)")
    }

    /// Exactly `count` bytes (a header or an extension's data), or a truncation error.
    private func readExactly(_ count: Int) throws(QcowPressError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = try out.withTypedMutableBytes { p throws(QcowPressError) -> Int in
                try input.read(into: p.baseAddress! + got, count: count - got)
            }
            if n == 0 { throw truncated() }
            got += n
        }
        return out
    }

    /// The next regular file or directory, or nil after the end-of-archive block.
    func next() throws(QcowPressError) -> TarEntry? {
        guard !ended else { return nil }
        if remaining + padding > 0 {
            guard try input.skip(remaining + padding) else { throw truncated() }
            (remaining, padding) = (0, 0)
        }
        var longName: String? = nil
        var pax: [String: String] = [:]
        while true {
            let at = input.position
            let block = try readExactly(TarHeader.block)
            if TarHeader.isZero(block) {
                ended = true
                return nil
            }
            let h = try TarHeader(block, at: at, archive: archive)
            let pad = (UInt64(TarHeader.block) - h.size % UInt64(TarHeader.block)) % UInt64(TarHeader.block)
            switch h.type {
            case UInt8(ascii: "x"), UInt8(ascii: "g"), UInt8(ascii: "L"), UInt8(ascii: "K"):
                guard h.size <= Self.extensionLimit else {
                    throw damaged(at, "extension header of \(h.size) bytes (more than \(Self.extensionLimit))")
                }
                let data = try readExactly(Int(h.size))
                guard try input.skip(pad) else { throw truncated() }
                switch h.type {
                case UInt8(ascii: "x"): pax.merge(try TarHeader.paxRecords(data, at: at, archive: archive)) { $1 }
                case UInt8(ascii: "L"): longName = TarHeader.string(data[...])
                default: break  // global pax records and GNU long link names change nothing here
                }
                continue
            case UInt8(ascii: "1"), UInt8(ascii: "2"):
                let name = longName ?? pax["path"] ?? h.name
                throw .unsupported(path: archive, what: "tar entry '\(name)' at offset \(at) is a \(h.type == UInt8(ascii: "1") ? "hard" : "symbolic") link (to '\(pax["linkpath"] ?? h.linkName)'); links are refused in an OVA")
            case UInt8(ascii: "0"), 0, UInt8(ascii: "7"), UInt8(ascii: "5"):
                break
            default:
                let t = h.type >= 0x20 && h.type < 0x7F ? "'\(Character(UnicodeScalar(h.type)))'" : "\(h.type)"
                throw .unsupported(path: archive, what: "tar entry '\(longName ?? pax["path"] ?? h.name)' at offset \(at) has type \(t) (not a regular file); refused in an OVA")
            }
            var size = h.size
            if let s = pax["size"] {
                guard let v = UInt64(s) else { throw damaged(at, "pax size '\(s)' before the header") }
                size = v
            }
            let name = try checkedName(longName ?? pax["path"] ?? h.name, at: at)
            let isDirectory = h.type == UInt8(ascii: "5")
            guard names.insert(isDirectory ? name + "/" : name).inserted else {
                throw .inputDamaged(path: archive, location: "tar entry '\(name)' at offset \(at) appears twice in the archive (refused: which one is meant?)")
            }
            remaining = size
            padding = (UInt64(TarHeader.block) - size % UInt64(TarHeader.block)) % UInt64(TarHeader.block)
            return TarEntry(name: name, size: size, dataOffset: input.position, isDirectory: isDirectory)
        }
    }

    /// The name without a leading "./" and repeated or trailing slashes; refused when absolute,
    /// with a ".." component, empty, or holding a NUL or a backslash.
    private func checkedName(_ raw: String, at: UInt64) throws(QcowPressError) -> String {
        if raw.hasPrefix("/") {
            throw .unsupported(path: archive, what: "tar entry '\(raw)' at offset \(at) has an absolute name; refused (it would leave the output directory)")
        }
        let parts = raw.split(separator: "/").filter { $0 != "." }
        if parts.contains("..") {
            throw .unsupported(path: archive, what: "tar entry '\(raw)' at offset \(at) has a '..' component; refused (it would leave the output directory)")
        }
        guard !parts.isEmpty, !raw.contains("\0"), !raw.contains("\\") else {
            throw damaged(at, "entry name '\(raw)' is empty or holds a NUL or backslash;")
        }
        return parts.joined(separator: "/")
    }

    /// Reads up to `count` bytes of the current entry's data; 0 at its end.
    func read(into p: UnsafeMutableRawPointer, count: Int) throws(QcowPressError) -> Int {
        let n = Int(min(UInt64(count), remaining))
        guard n > 0 else { return 0 }
        let got = try input.read(into: p, count: n)
        if got == 0 { throw truncated() }
        remaining -= UInt64(got)
        return got
    }

    /// After the end-of-archive block: the archive must hold nothing but zeros up to its end (tar
    /// pads to a record); a second archive or data after it is refused, as GNU tar warns.
    func checkTrailer() throws(QcowPressError) {
        var block = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let at = input.position
            let n = try block.withTypedMutableBytes { p throws(QcowPressError) -> Int in try input.read(into: p.baseAddress!, count: p.count) }
            if n == 0 { return }
            if let i = block[0..<n].firstIndex(where: { $0 != 0 }) {
                throw .inputDamaged(path: archive, location: "data after the end-of-archive block at offset \(at + UInt64(i))")
            }
        }
    }
}

/// An archive file read at offsets: skips cost nothing (the headers of a 100 GiB OVA are read,
/// never its data).
final class TarFileInput: TarInput {
    let file: InputFile
    private(set) var position: UInt64 = 0
    init(file: InputFile) { self.file = file }

    func read(into p: UnsafeMutableRawPointer, count: Int) throws(QcowPressError) -> Int {
        let n = Int(min(UInt64(count), file.size - min(file.size, position)))
        guard n > 0 else { return 0 }
        let got: Int
        do { got = try file.read(into: p, length: n, offset: position) } catch { throw .from(error) }
        position += UInt64(got)
        return got
    }

    func skip(_ count: UInt64) throws(QcowPressError) -> Bool {
        guard count <= file.size - min(file.size, position) else {
            position = file.size
            return false
        }
        position += count
        return true
    }
}

/// An archive read front to back once (stdin, a pipe): reads go through one buffer; skips read
/// and drop.
final class TarStreamInput: TarInput {
    let file: StreamFile
    private let buffer: UnsafeMutableRawPointer
    /// 1 MiB: a pipe delivers 64 KiB at a time; larger reads go straight into the caller's memory.
    private let capacity = 1 << 20
    private var start = 0
    private var end = 0
    private(set) var position: UInt64 = 0

    init(file: StreamFile) {
        self.file = file
        buffer = .allocate(byteCount: capacity, alignment: 4096)
    }
    deinit { buffer.deallocate() }

    func read(into p: UnsafeMutableRawPointer, count: Int) throws(QcowPressError) -> Int {
        guard count > 0 else { return 0 }
        if start == end {
            // Large reads bypass the buffer.
            if count >= capacity {
                let n: Int
                do { n = try file.read(into: p, count: count) } catch { throw .from(error) }
                position += UInt64(n)
                return n
            }
            do { end = try file.read(into: buffer, count: capacity) } catch { throw .from(error) }
            start = 0
            if end == 0 { return 0 }
        }
        let n = min(count, end - start)
        memcpy(p, buffer + start, n)
        start += n
        position += UInt64(n)
        return n
    }

    func skip(_ count: UInt64) throws(QcowPressError) -> Bool {
        var left = count
        while left > 0 {
            if start == end {
                do { end = try file.read(into: buffer, count: capacity) } catch { throw .from(error) }
                start = 0
                if end == 0 { return false }
            }
            let n = Int(min(left, UInt64(end - start)))
            start += n
            left -= UInt64(n)
            position += UInt64(n)
        }
        return true
    }
}

extension Array where Element == UInt8 {
    /// withUnsafeMutableBytes for a body that throws QcowPressError.
    mutating func withTypedMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws(QcowPressError) -> R) throws(QcowPressError) -> R {
        try withUnsafeMutableBytes { p in Result { () throws(QcowPressError) -> R in try body(p) } }.get()
    }
}

extension OVAImport {
    /// The files of a tar archive (an OVA) as the import walks them: names checked, links and
    /// other non-file entries refused, the end-of-archive block required. An archive file is read
    /// header by header (its data is skipped); "-", a pipe, or any file with `asStream` is read
    /// once, to its end, as `convert - OUTDIR` reads stdin.
    public static func entries(ofArchive path: String, asStream: Bool = false) throws(QcowPressError) -> [TarEntry] {
        let input: TarInput
        if !asStream, path != "-", FileNames.status(path)?.kind == .regular {
            do { input = TarFileInput(file: try InputFile(path: path, direct: false)) } catch { throw .from(error) }
        } else {
            do { input = TarStreamInput(file: try StreamFile(path: path)) } catch { throw .from(error) }
        }
        let walker = TarWalker(input: input, archive: path)
        var out: [TarEntry] = []
        while let e = try walker.next() { out.append(e) }
        try walker.checkTrailer()
        return out
    }

    /// The files of a tar archive held in memory, walked as ``entries(ofArchive:asStream:)`` walks a file.
    public static func entries(ofArchiveBytes bytes: [UInt8], name: String) throws(QcowPressError) -> [TarEntry] {
        let walker = TarWalker(input: TarMemoryInput(bytes), archive: name)
        var out: [TarEntry] = []
        while let e = try walker.next() { out.append(e) }
        try walker.checkTrailer()
        return out
    }

    /// The files a manifest (`.mf`) lists, with their digests as "ALGORITHM hex".
    public static func manifest(_ text: [UInt8], path: String) throws(QcowPressError) -> [String: String] {
        try OVAManifest(text: text, path: path).entries.mapValues { "\($0.algorithm.rawValue) \($0.digest)" }
    }
}

/// An archive in memory (the fuzzer's input): reads copy, skips move on.
final class TarMemoryInput: TarInput {
    let bytes: [UInt8]
    private(set) var position: UInt64 = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    func read(into p: UnsafeMutableRawPointer, count: Int) throws(QcowPressError) -> Int {
        let at = Int(min(position, UInt64(bytes.count)))
        let n = min(count, bytes.count - at)
        guard n > 0 else { return 0 }
        bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress! + at, byteCount: n) }
        position += UInt64(n)
        return n
    }

    func skip(_ count: UInt64) throws(QcowPressError) -> Bool {
        guard count <= UInt64(bytes.count) - min(position, UInt64(bytes.count)) else {
            position = UInt64(bytes.count)
            return false
        }
        position += count
        return true
    }
}
