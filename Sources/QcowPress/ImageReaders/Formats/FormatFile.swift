import DirectIO
import Glibc

/// The file under a VDI, VHD, VMDK or VHDX image: small metadata reads through a buffered
/// descriptor, data reads around the page cache (O_DIRECT) when the file offset and the length are
/// 4 KiB-aligned and memory is too, as ``RawGuestImage`` reads. Every read must lie inside the file
/// (the readers check their tables against the size when the image is opened, so a short read
/// means the file changed).
///
/// A *window* makes an image readable in place inside another file (a disk inside an OVA's tar):
/// offsets are relative to the window's start, ``size`` is its length, reads never leave it, and
/// errors name ``path`` (for a window, e.g. "VM.ova:disk1.vmdk").
final class FormatFile: Sendable {
    /// The name errors and the image's `path` give: `name` when given, otherwise the file's path.
    let path: String
    /// The file on disk (resolve relative extent names against its folder, never against ``path``).
    let filePath: String
    let file: InputFile
    let direct: InputFile?
    /// Where the image starts in the file (0 without a window).
    let base: UInt64
    /// The image's length: the window's, or the file's.
    let size: UInt64

    init(path: String, name: String? = nil, window: Range<UInt64>? = nil) throws(QcowPressError) {
        self.path = name ?? path
        filePath = path
        do { file = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        let d = try? InputFile(path: path, direct: true)
        direct = d?.direct == true ? d : nil
        if let window {
            guard window.upperBound <= file.size else {
                throw .inputDamaged(path: name ?? path, location: "ends at offset \(window.upperBound), past the end of \(path) (\(file.size) bytes)")
            }
            (base, size) = (window.lowerBound, window.upperBound - window.lowerBound)
        } else {
            (base, size) = (0, file.size)
        }
    }

    /// Exactly `count` bytes at `offset` (metadata: headers, block maps).
    func bytes(at offset: UInt64, count: Int, what: String) throws(QcowPressError) -> [UInt8] {
        guard offset <= size, UInt64(count) <= size - offset else {
            throw .inputDamaged(path: path, location: "\(what) (\(count) bytes at offset \(offset)) lies past the end of the file (\(size) bytes)")
        }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: max(count, 1), alignment: 8)
        defer { buf.deallocate() }
        let got: Int
        do { got = try file.read(into: buf.baseAddress!, length: count, offset: base + offset) } catch { throw .from(error) }
        guard got == count else { throw .inputDamaged(path: path, location: "file ended at offset \(offset + UInt64(got)) while reading \(what)") }
        return Array(buf[0..<count])
    }

    /// `count` bytes of data at `offset` into `into`.
    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer) throws(QcowPressError) {
        guard offset <= size, UInt64(count) <= size - offset else {
            throw .inputDamaged(path: path, location: "\(count) bytes at offset \(offset) lie past the end of the file (\(size) bytes)")
        }
        let at = base + offset
        var got = 0
        do {
            if let direct, count % 4096 == 0, UInt(bitPattern: into) % 4096 == 0 {
                if at % 4096 == 0 {
                    got = try direct.read(into: into, length: count, offset: at)
                } else if count >= Self.shiftedDirectMinimum {
                    got = try shiftedDirectRead(direct, at: at, count: count, into: into)
                } else {
                    got = try file.read(into: into, length: count, offset: at)
                }
            } else {
                got = try file.read(into: into, length: count, offset: at)
            }
        } catch { throw .from(error) }
        guard got == count else {
            throw .inputDamaged(path: path, location: "file ended at offset \(offset + UInt64(got)) (size changed while reading?)")
        }
    }

    /// The data ranges (SEEK_DATA/SEEK_HOLE) of [0, `to`), relative to the window.
    func dataRanges(to: UInt64) -> [Range<UInt64>] {
        let end = base + min(to, size)
        return file.dataRanges(from: base, to: end).compactMap { r in
            let lo = max(r.lowerBound, base), hi = min(r.upperBound, end)
            return lo < hi ? (lo - base)..<(hi - base) : nil
        }
    }

    /// Below this a misaligned data read goes buffered; at or above it, O_DIRECT plus a memmove.
    /// Measured on this machine's virtio disk (1 GiB cold, reads at file offsets 512 mod 4096, the
    /// buffered ones dropped behind as InputFile does): 4 MiB reads on 2 threads, O_DIRECT+memmove
    /// 553-699 MB/s for 0.19-0.23 CPU s, buffered 447-744 MB/s for 0.47-0.89 CPU s; 256 KiB on one
    /// thread 325 vs 188-202 MB/s (0.54 vs 1.5-1.7 CPU s); 64 KiB 151-163 vs 320-1154 MB/s (the
    /// shifted read loses there). Script: bench/window_read.py.
    static let shiftedDirectMinimum = 256 << 10

    /// A data read whose file offset is 512-aligned but not 4 KiB-aligned (a tar entry's data):
    /// the 4 KiB-aligned middle is read with O_DIRECT into the start of `into` (aligned memory)
    /// and moved up by the misalignment; the head before the first aligned offset and the tail
    /// after the last go through the buffered descriptor. No scratch memory: `into` is the buffer.
    private func shiftedDirectRead(_ direct: InputFile, at: UInt64, count: Int, into: UnsafeMutableRawPointer) throws(IOError) -> Int {
        let head = Int(4096 - at % 4096)
        let middle = (count - head) / 4096 * 4096
        let tail = count - head - middle
        let got = try direct.read(into: into, length: middle, offset: at + UInt64(head))
        guard got == middle else { return got > 0 ? head + got : 0 }
        memmove(into + head, into, middle)
        guard try file.read(into: into, length: head, offset: at) == head else { return 0 }
        if tail > 0 {
            let t = try file.read(into: into + head + middle, length: tail, offset: at + UInt64(head + middle))
            return head + middle + t
        }
        return count
    }
}

extension ImageFormat {
    /// The format of a ``FormatFile`` (a window inside a tar too) by its first 512 bytes, as
    /// ``probe(path:)`` (without the dmg trailer look).
    static func probe(file: FormatFile) throws(QcowPressError) -> String {
        guard file.size > 0 else { return "raw" }
        var head = try file.bytes(at: 0, count: Int(min(UInt64(probeBytes), file.size)), what: "image header")
        head += [UInt8](repeating: 0, count: probeBytes - head.count)
        return probe(head: head, fileName: file.path) ?? "raw"
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
