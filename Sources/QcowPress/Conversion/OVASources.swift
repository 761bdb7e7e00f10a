import ClusterCompression
import DirectIO
import Glibc

/// Sequential bytes of one file of an OVA: a tar entry in a stream, a window of a file, a gzip
/// inflater over either. Returns 0 at the end.
protocol OVAByteSource: AnyObject {
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Int
}

/// The digests a file's bytes are checked against, computed as they pass (several when the
/// manifest is not known yet: a stream whose `.mf` comes after the disks).
struct DigestSet {
    var digests: [FileDigest]
    init(_ algorithms: [OVAManifest.Algorithm]) { digests = algorithms.map { FileDigest($0) } }
    mutating func update(_ p: UnsafeRawBufferPointer) {
        for i in digests.indices { digests[i].update(p) }
    }
    func hex(_ a: OVAManifest.Algorithm) -> String? { digests.first { $0.algorithm == a }?.hex() }
}

/// The manifest check of one file: the digest computed over its stored bytes against the `.mf`.
func checkDigest(_ set: DigestSet, file: String, manifest: OVAManifest?, archive: String) throws(QcowPressError) -> String? {
    guard let manifest, let want = manifest.entries[file] else { return nil }
    guard let got = set.hex(want.algorithm) else {
        throw .unsupported(path: archive, what: "\(file): the manifest's \(want.algorithm.rawValue) digest comes after the file in the stream and was not computed (SHA-1 and SHA-256 are); pass the OVA as a file")
    }
    guard got == want.digest else {
        throw .inputDamaged(path: archive, location: "\(file): \(want.algorithm.rawValue) digest is \(got), the manifest says \(want.digest)")
    }
    return "\(want.algorithm.rawValue) \(file)"
}

/// The current entry of a tar stream, hashed as it passes.
final class TarEntrySource: OVAByteSource {
    let walker: TarWalker
    var digests: DigestSet
    init(walker: TarWalker, digests: DigestSet) {
        self.walker = walker
        self.digests = digests
    }
    func read(into b: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Int {
        let n = try walker.read(into: b.baseAddress!, count: b.count)
        if n > 0 { digests.update(UnsafeRawBufferPointer(rebasing: b[0..<n])) }
        return n
    }
    /// Reads (and hashes) what is left of the entry.
    func drain() throws(QcowPressError) {
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 64)
        defer { buf.deallocate() }
        while try read(into: buf) > 0 {}
    }
}

/// A window of a file read front to back (a gzip-stored disk of an OVA file, the digest pass of a
/// disk read in place).
final class WindowSource: OVAByteSource {
    let file: InputFile
    private var position: UInt64
    let end: UInt64
    init(file: InputFile, window: Range<UInt64>) {
        self.file = file
        position = window.lowerBound
        end = window.upperBound
    }
    func read(into b: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Int {
        let n = Int(min(UInt64(b.count), end - position))
        guard n > 0 else { return 0 }
        let got: Int
        do { got = try file.read(into: b.baseAddress!, length: n, offset: position) } catch { throw .from(error) }
        guard got == n else { throw .inputDamaged(path: file.path, location: "file ended at offset \(position + UInt64(got)) (size changed while reading?)") }
        position += UInt64(n)
        return n
    }
}

/// The bytes of a gzip-compressed file (`ovf:compression="gzip"`), inflated as they are read.
final class GzipSource: OVAByteSource {
    let inner: OVAByteSource
    let name: String
    private let inflater = GzipStreamInflater()
    private let input: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0
    private var eof = false
    private var produced: UInt64 = 0

    init(_ inner: OVAByteSource, name: String) {
        self.inner = inner
        self.name = name
        // 1 MiB of compressed input at a time: a pipe's reads are smaller; inflate is far slower.
        input = .allocate(byteCount: 1 << 20, alignment: 64)
    }
    deinit { input.deallocate() }

    func read(into b: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Int {
        while true {
            if start == end && !eof {
                end = try inner.read(into: input)
                start = 0
                eof = end == 0
            }
            if start == end && eof {
                guard inflater.atMemberBoundary else {
                    throw .inputDamaged(path: name, location: "gzip data ends inside a member after \(produced) bytes (truncated)")
                }
                return 0
            }
            let r: (consumed: Int, produced: Int)
            do { r = try inflater.inflate(UnsafeRawBufferPointer(rebasing: input[start..<end]), into: b) } catch {
                throw .inputDamaged(path: name, location: "gzip data at byte \(produced) of the inflated file: \(error.reason)")
            }
            start += r.consumed
            produced += UInt64(r.produced)
            if r.produced > 0 { return r.produced }
            if r.consumed == 0 && start < end {
                throw .inputDamaged(path: name, location: "gzip data makes no progress at byte \(produced) of the inflated file")
            }
        }
    }
}

/// Bytes already read (the probe's first block) followed by the rest of a source.
final class PrefixedSource: OVAByteSource {
    private var prefix: [UInt8]
    private var at = 0
    let inner: OVAByteSource
    init(prefix: [UInt8], inner: OVAByteSource) {
        self.prefix = prefix
        self.inner = inner
    }
    func read(into b: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Int {
        if at < prefix.count {
            let n = min(b.count, prefix.count - at)
            prefix.withUnsafeBytes { p in b.baseAddress!.copyMemory(from: p.baseAddress! + at, byteCount: n) }
            at += n
            return n
        }
        return try inner.read(into: b)
    }
}

extension OVAByteSource {
    /// Up to `count` bytes (fewer only at the end).
    func readUpTo(_ count: Int) throws(QcowPressError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = try out.withTypedMutableBytes { p throws(QcowPressError) -> Int in
                try read(into: UnsafeMutableRawBufferPointer(rebasing: p[got...]))
            }
            if n == 0 { break }
            got += n
        }
        return Array(out[0..<got])
    }
}

/// The digest of a window of a file, by one sequential pass (a disk read in place: its reads
/// are out of order, so the manifest is checked by this pass, run beside the conversion).
func digestOfWindow(_ file: InputFile, _ window: Range<UInt64>, _ algorithm: OVAManifest.Algorithm,
                    stopped: () -> Bool) throws(QcowPressError) -> DigestSet {
    var set = DigestSet([algorithm])
    let src = WindowSource(file: file, window: window)
    // 1 MiB reads: sequential buffered reads at disk speed (the file is dropped from the cache behind).
    let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    defer { buf.deallocate() }
    while !stopped() {
        let n = try src.read(into: buf)
        if n == 0 { return set }
        set.update(UnsafeRawBufferPointer(rebasing: buf[0..<n]))
    }
    return set
}
