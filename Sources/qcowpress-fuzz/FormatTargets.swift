import Foundation
import Glibc
import QcowPress

/// 128 KiB a read: reads of 1 MiB (zero-filled mostly) halved the executions a second.
let formatReadSize = 128 << 10
nonisolated(unsafe) let formatReadBuffer = UnsafeMutableRawPointer.allocate(byteCount: formatReadSize, alignment: 4096)

/// Targets vhdx, vhd, vdi: the input becomes an image file (in /dev/shm when there is one: a
/// tmpfs, so a megabyte-sized input per run costs no disk writes), which is opened as that format
/// and read in a few ranges, with the zero extents asked for, all bounded whatever the header says.
/// A vhdx input describes a sparse file (``SparseInput``): its structures lie at 64 KiB steps,
/// and as whole files the seeds were ~1 MiB of mostly zeros, which ran ~200 executions a second
/// and spent most mutations on zeros and block data.
func fuzzBlockFormat(_ target: String, _ input: [UInt8]) {
    if target == "vhdx" {
        SparseInput.withFile(input, suffix: target) { p in fuzzBlockFormat(target, path: p) }
    } else {
        withInputFile(input, suffix: target) { p in fuzzBlockFormat(target, path: p) }
    }
}

/// A file described by its non-zero pieces: `size` (u32 LE, bytes, at most ``maxSize``), then
/// pieces `offset` (u32 LE), `length` (u16 LE) and that many bytes, written in order over a file
/// of holes (ftruncate, pwrite). fuzz/make_format_seeds.py writes the vhdx seeds this way.
enum SparseInput {
    /// The largest file made: the old whole-file inputs were at most 64 MiB (the crash buffer).
    static let maxSize = 64 << 20

    struct Piece { var offset: Int; var bytes: Range<Int> }

    /// The file size and the pieces of `input` (byte ranges of `input`), clipped to ``maxSize``.
    static func parse(_ input: [UInt8]) -> (size: Int, pieces: [Piece]) {
        func le(_ at: Int, _ n: Int) -> Int { (0..<n).reduce(0) { $0 | Int(input[at + $1]) << (8 * $1) } }
        guard input.count >= 4 else { return (0, []) }
        var pieces: [Piece] = []
        var at = 4
        while at + 6 <= input.count {
            let offset = le(at, 4), length = le(at + 4, 2)
            let end = min(at + 6 + length, input.count)
            if offset < maxSize { pieces.append(Piece(offset: offset, bytes: (at + 6)..<min(end, at + 6 + maxSize - offset))) }
            at = end
        }
        return (min(le(0, 4), maxSize), pieces)
    }

    static func withFile(_ input: [UInt8], suffix: String, _ body: (String) -> Void) {
        let dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
        let p = "\(dir)/qcowpress-fuzz-\(getpid()).\(suffix)"
        let fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { return }
        defer { unlink(p) }
        let (size, pieces) = parse(input)
        var ok = ftruncate(fd, off_t(size)) == 0
        input.withUnsafeBytes { b in
            for piece in pieces where ok {
                ok = pwrite(fd, b.baseAddress! + piece.bytes.lowerBound, piece.bytes.count, off_t(piece.offset)) == piece.bytes.count
            }
        }
        close(fd)
        if ok { body(p) }
    }

    /// Sets the CRC-32C at `at + 4` of the `count` bytes at `at` of the file `input` describes
    /// (a VHDX header or region table), in every piece holding those bytes; a piece is appended
    /// when none holds them all.
    static func fixCRC32C(_ input: inout [UInt8], at: Int, count: Int) {
        let (_, pieces) = parse(input)
        var view = [UInt8](repeating: 0, count: count)
        var covered = Set<Int>()
        for p in pieces where p.offset < at + count && p.offset + p.bytes.count > at {
            for k in max(at, p.offset)..<min(at + count, p.offset + p.bytes.count) {
                view[k - at] = input[p.bytes.lowerBound + k - p.offset]
                if (at + 4..<at + 8).contains(k) { covered.insert(k) }
            }
        }
        for k in 4..<8 { view[k] = 0 }
        let c = CRC32C.checksum(view)
        let crc = (0..<4).map { UInt8(truncatingIfNeeded: c >> UInt32(8 * $0)) }
        for p in pieces {
            let lo = max(at + 4, p.offset), hi = min(at + 8, p.offset + p.bytes.count)
            for k in lo..<max(lo, hi) { input[p.bytes.lowerBound + k - p.offset] = crc[k - at - 4] }
        }
        if covered.count < 4 && input.count >= 4 {
            input += [UInt8(truncatingIfNeeded: at + 4), UInt8(truncatingIfNeeded: (at + 4) >> 8),
                      UInt8(truncatingIfNeeded: (at + 4) >> 16), UInt8(truncatingIfNeeded: (at + 4) >> 24), 4, 0] + crc
        }
    }
}

/// Writes `input` to a scratch file (in /dev/shm when there is one: a tmpfs, so a megabyte-sized
/// input per run costs no disk writes), runs `body` on its path and removes it.
func withInputFile(_ input: [UInt8], suffix: String, _ body: (String) -> Void) {
    let dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
    let p = "\(dir)/qcowpress-fuzz-\(getpid()).\(suffix)"
    let fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    guard fd >= 0 else { return }
    defer { unlink(p) }
    let wrote = input.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    close(fd)
    guard wrote == input.count else { return }
    body(p)
}

private func fuzzBlockFormat(_ target: String, path p: String) {
    guard let img = try? ImageFormat.open(path: p, format: target == "vhd" ? "vpc" : target) else { return }
    let ctx = ReadContext()
    let n = formatReadSize
    let buf = formatReadBuffer
    let size = img.virtualSize
    // The first and last 128 KiB, some in the middle, and a misaligned range across a block boundary.
    for (at, count) in [(0, n), (size / 2, n), (size > UInt64(n) ? size - UInt64(n) : 0, n), (1_048_576 - 700, 5000), (4096 - 3, 9000)] {
        _ = try? img.read(at: at, count: count, into: buf, context: ctx)
    }
    _ = try? img.knownZeroEnd(from: 0, limit: min(size, 256 << 20))
    _ = try? img.isKnownZero(at: size / 3, count: n)
}

/// Recomputes the checksums a mutation broke (VHDX headers and region tables: CRC-32C; VHD
/// footers: one's complement sum), so that the fuzzer gets past them into the parsers behind.
func fixFormatChecksums(_ target: String, _ b: inout [UInt8]) {
    switch target {
    case "vhdx":
        for (at, n) in [(65536, 4096), (131_072, 4096), (196_608, 65536), (262_144, 65536)] {
            SparseInput.fixCRC32C(&b, at: at, count: n)
        }
    case "vhd":
        for at in Set([0, b.count - 512]) where at >= 0 && b.count >= at + 512 {
            for k in 64..<68 { b[at + k] = 0 }
            let sum = ~b[at..<(at + 512)].reduce(UInt32(0)) { $0 &+ UInt32($1) }
            for k in 0..<4 { b[at + 64 + k] = UInt8(truncatingIfNeeded: sum >> (24 - 8 * UInt32(k))) }
        }
    default: break
    }
}
