import Foundation
import Glibc
import QcowPress

/// Targets vmdk and vmdk-stream. vmdk: the input becomes x.vmdk in a folder of its own beside the
/// seeds' flat.bin and sparse.vmdk, so a mutated
/// descriptor names real extents; it is opened as a VMDK (sparse, stream with footer, or
/// descriptor) and up to 64 MiB of guest read with the zero extents asked for. vmdk-stream: the
/// input is decoded front to back by ``VMDKStreamReader`` from a source that hands out at most
/// 3000 bytes a read.
func fuzzVMDK(_ target: String, _ input: [UInt8]) {
    if target == "vmdk-stream" {
        guard let r = try? VMDKStreamReader(source: ChunkedSource(input), name: "fuzz") else { return }
        var grains = 0
        while grains < 1 << 16, (try? r.next()) != nil { grains += 1 }
        return
    }
    let dir = VMDKFolder.path
    let p = dir + "/x.vmdk"
    guard FileManager.default.createFile(atPath: p, contents: Data(input)) else { return }
    guard let img = try? ImageFormat.open(path: p, format: "vmdk") else { return }
    let ctx = ReadContext()
    let n = 1 << 20
    let buf = UnsafeMutableRawPointer.allocate(byteCount: n, alignment: 4096)
    defer { buf.deallocate() }
    var off: UInt64 = 0
    while off < min(img.virtualSize, 64 << 20) {
        let m = Int(min(UInt64(n), img.virtualSize - off))
        _ = try? img.knownZeroEnd(from: off, limit: off + UInt64(m))
        if (try? img.read(at: off, count: m, into: buf, context: ctx)) == nil { break }
        off += UInt64(m)
    }
    // A misaligned range across a grain boundary, through the many-buffer path too.
    let a = UnsafeMutableRawBufferPointer(start: buf, count: 3000), b = UnsafeMutableRawBufferPointer(start: buf + 4096, count: 70000)
    _ = try? img.read(at: 65536 - 1000, into: [a, b], context: ctx)
}

/// The folder of the vmdk target, inside the fuzzer's scratch folder (removed at exit), with the
/// seeds' extent files copied in once.
enum VMDKFolder {
    static let path: String = {
        let p = scratch + "/vmdk"
        try? FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        for name in ["flat.bin", "sparse.vmdk"] {
            _ = try? FileManager.default.copyItem(atPath: corpusDir + "/" + name, toPath: p + "/" + name)
        }
        return p
    }()
}

/// An input as a stream that hands out at most 3000 bytes a read (short reads on purpose).
final class ChunkedSource: VMDKByteSource {
    let bytes: [UInt8]
    var at = 0
    init(_ b: [UInt8]) { bytes = b }
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Int {
        let n = min(buffer.count, bytes.count - at, 3000)
        guard n > 0 else { return 0 }
        bytes.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + at, byteCount: n) }
        at += n
        return n
    }
}
