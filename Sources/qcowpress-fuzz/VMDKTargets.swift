import Foundation
import Glibc
import QcowPress

/// Targets vmdk and vmdk-stream. vmdk: the input becomes x.vmdk in a folder of its own beside the
/// seeds' flat.bin and sparse.vmdk, so a mutated descriptor names real extents; it is opened as a
/// VMDK (sparse, stream with footer, or descriptor) and read in a few ranges, with its zero
/// extents and block status asked for. vmdk-stream: the input is decoded front to back by
/// ``VMDKStreamReader`` from a source that hands out at most 3000 bytes a read.
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
    let buf = VMDKFolder.buffer
    let size = img.virtualSize
    // The first MiB, 256 KiB in the middle and at the end, a misaligned range across a grain
    // boundary through the many-buffer path, and the zero extents of the first 256 MiB: bounded
    // whatever the header says.
    let q = UInt64(256 << 10)
    for (at, count) in [(0, UInt64(1 << 20)), (size / 2, q), (size > q ? size - q : 0, q)] {
        _ = try? img.read(at: at, count: Int(count), into: buf, context: ctx)
    }
    let a = UnsafeMutableRawBufferPointer(start: buf, count: 3000), b = UnsafeMutableRawBufferPointer(start: buf + 4096, count: 70000)
    _ = try? img.read(at: 65536 - 1000, into: [a, b], context: ctx)
    _ = try? img.knownZeroEnd(from: 0, limit: min(size, 256 << 20))
    if size > 0 { _ = try? (img as? any BlockStatusReporting)?.blockStatus(at: size / 3, limit: size) }
}

/// The folder of the vmdk target, with the seeds' extent files copied in once: in /dev/shm when
/// there is one (a tmpfs: no O_DIRECT, so reads of the file just written never wait for its
/// writeback; in /tmp that made 100 runs a second), removed at exit.
enum VMDKFolder {
    nonisolated(unsafe) static let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    nonisolated(unsafe) static var removeAtExit = ""
    static let path: String = {
        let base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
        let p = "\(base)/qcowpress-fuzz-vmdk-\(getpid())"
        try? FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        for name in ["flat.bin", "sparse.vmdk"] {
            _ = try? FileManager.default.copyItem(atPath: corpusDir + "/" + name, toPath: p + "/" + name)
        }
        removeAtExit = p
        atexit { try? FileManager.default.removeItem(atPath: VMDKFolder.removeAtExit) }
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
