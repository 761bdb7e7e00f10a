import Foundation
import Glibc
import QcowPress

/// 128 KiB a read: reads of 1 MiB (zero-filled mostly) halved the executions a second.
let formatReadSize = 128 << 10
nonisolated(unsafe) let formatReadBuffer = UnsafeMutableRawPointer.allocate(byteCount: formatReadSize, alignment: 4096)

/// Targets vhdx, vhd, vdi: the input becomes an image file (in /dev/shm when there is one: a
/// tmpfs, so a megabyte-sized input per run costs no disk writes), which is opened as that format
/// and read in a few ranges, with the zero extents asked for, all bounded whatever the header says.
func fuzzBlockFormat(_ target: String, _ input: [UInt8]) {
    withInputFile(input, suffix: target) { p in fuzzBlockFormat(target, path: p) }
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
        for (at, n) in [(65536, 4096), (131_072, 4096), (196_608, 65536), (262_144, 65536)] where b.count >= at + n {
            for k in 4..<8 { b[at + k] = 0 }
            let c = CRC32C.checksum(Array(b[at..<(at + n)]))
            for k in 0..<4 { b[at + 4 + k] = UInt8(truncatingIfNeeded: c >> UInt32(8 * k)) }
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
