import DirectIO
import Glibc

/// The file under a VDI or VHD image: small metadata reads through a buffered descriptor, data
/// reads around the page cache (O_DIRECT) when offset, length and memory are 4 KiB-aligned, as
/// ``RawGuestImage`` reads. Every read must lie inside the file (the readers check their tables
/// against the size when the image is opened, so a short read means the file changed).
final class FormatFile: Sendable {
    let path: String
    let file: InputFile
    let direct: InputFile?
    var size: UInt64 { file.size }

    init(path: String) throws(QcowPressError) {
        self.path = path
        do { file = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        let d = try? InputFile(path: path, direct: true)
        direct = d?.direct == true ? d : nil
    }

    /// Exactly `count` bytes at `offset` (metadata: headers, block maps).
    func bytes(at offset: UInt64, count: Int, what: String) throws(QcowPressError) -> [UInt8] {
        guard offset <= size, UInt64(count) <= size - offset else {
            throw .inputDamaged(path: path, location: "\(what) (\(count) bytes at offset \(offset)) lies past the end of the file (\(size) bytes)")
        }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: max(count, 1), alignment: 8)
        defer { buf.deallocate() }
        let got: Int
        do { got = try file.read(into: buf.baseAddress!, length: count, offset: offset) } catch { throw .from(error) }
        guard got == count else { throw .inputDamaged(path: path, location: "file ended at offset \(offset + UInt64(got)) while reading \(what)") }
        return Array(buf[0..<count])
    }

    /// `count` bytes of data at `offset` into `into`.
    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer) throws(QcowPressError) {
        let got: Int
        do {
            if let direct, offset % 4096 == 0, count % 4096 == 0, UInt(bitPattern: into) % 4096 == 0 {
                got = try direct.read(into: into, length: count, offset: offset)
            } else {
                got = try file.read(into: into, length: count, offset: offset)
            }
        } catch { throw .from(error) }
        guard got == count else {
            throw .inputDamaged(path: path, location: "file ended at offset \(offset + UInt64(got)) (size changed while reading?)")
        }
    }
}

/// Little- and big-endian fields of a header read into bytes.
struct FieldReader {
    let b: [UInt8]
    func le32(_ o: Int) -> UInt32 { b[o..<(o + 4)].reversed().reduce(0) { $0 << 8 | UInt32($1) } }
    func le64(_ o: Int) -> UInt64 { b[o..<(o + 8)].reversed().reduce(0) { $0 << 8 | UInt64($1) } }
    func be16(_ o: Int) -> UInt16 { b[o..<(o + 2)].reduce(0) { $0 << 8 | UInt16($1) } }
    func be32(_ o: Int) -> UInt32 { b[o..<(o + 4)].reduce(0) { $0 << 8 | UInt32($1) } }
    func be64(_ o: Int) -> UInt64 { b[o..<(o + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
    func isZero(_ o: Int, _ n: Int) -> Bool { b[o..<(o + n)].allSatisfy { $0 == 0 } }
    func text(_ o: Int, _ n: Int) -> String { String(decoding: b[o..<(o + n)], as: UTF8.self) }
}

/// A block-mapped image (VDI, dynamic VHD): where guest block `i` lives, for reading and for
/// finding holes by extents.
protocol BlockMappedImage: GuestImage {
    var blockSize: UInt64 { get }
    var file: FormatFile { get }
    /// The host offset of guest block `i`'s data, or nil when it reads as zero.
    func hostOffset(ofBlock i: UInt64) -> UInt64?
    /// Reads [offset, offset+count) of one allocated block whose data starts at `host`.
    func readAllocated(block i: UInt64, host: UInt64, inBlock: UInt64, count: Int, into: UnsafeMutableRawPointer) throws(QcowPressError)
}

extension BlockMappedImage {
    public func isKnownZero(at offset: UInt64, count: Int) throws(QcowPressError) -> Bool {
        guard count > 0 else { return true }
        return try knownZeroEnd(from: offset, limit: offset + UInt64(count)) == offset + UInt64(count)
    }

    /// Whole blocks without data, one map entry each (never the data).
    public func knownZeroEnd(from offset: UInt64, limit: UInt64) -> UInt64 {
        var at = offset
        while at < limit {
            if at >= virtualSize { return limit }
            let i = at / blockSize
            if hostOffset(ofBlock: i) != nil { return at }
            at = (i + 1) * blockSize
        }
        return limit
    }

    public func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError) {
        var pos = 0
        while pos < count {
            let at = offset + UInt64(pos)
            if at >= virtualSize {
                memset(into + pos, 0, count - pos)
                return
            }
            let i = at / blockSize
            let inBlock = at - i * blockSize
            let n = Int(min(UInt64(count - pos), blockSize - inBlock, virtualSize - at))
            if let host = hostOffset(ofBlock: i) {
                try readAllocated(block: i, host: host, inBlock: inBlock, count: n, into: into + pos)
            } else {
                memset(into + pos, 0, n)
            }
            pos += n
        }
    }
}
