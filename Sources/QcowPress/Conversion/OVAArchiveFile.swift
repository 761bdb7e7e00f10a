import DirectIO
import Glibc
import Synchronization

/// A raw disk inside an OVA (or beside an OVF), read in place: the window's bytes are the guest's;
/// holes of the file within the window read as zeros without a read.
final class WindowRawImage: GuestImage {
    let file: FormatFile
    let virtualSize: UInt64
    let data: [Range<UInt64>]
    var path: String { file.path }

    init(file: FormatFile) {
        self.file = file
        virtualSize = (file.size + 511) & ~511
        data = file.dataRanges(to: file.size)
    }

    func isKnownZero(at offset: UInt64, count: Int) throws(QcowPressError) -> Bool {
        count <= 0 || knownZeroEnd(from: offset, limit: offset + UInt64(count)) == offset + UInt64(count)
    }

    func knownZeroEnd(from offset: UInt64, limit: UInt64) -> UInt64 {
        guard offset < limit, offset < file.size else { return limit }
        guard let next = data.first(where: { $0.upperBound > offset }) else { return limit }
        return next.lowerBound <= offset ? offset : min(next.lowerBound, limit)
    }

    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError) {
        let n = offset >= file.size ? 0 : Int(min(UInt64(count), file.size - offset))
        if n > 0 { try file.read(at: offset, count: n, into: into) }
        if n < count { memset(into + n, 0, count - n) }
    }
}

/// Where one file of the package is: a file on disk, or a window of the OVA.
struct OVALocation {
    var path: String
    /// The name errors give ("VM.ova:disk1.vmdk", or the file's path).
    var name: String
    var window: Range<UInt64>?
}

/// Converts the disks of a package whose files can be read at any offset (an OVA file, an OVF's
/// folder): each disk in place with its format's reader and the copier's parallel readers, or
/// (stored gzip-compressed) inflated as a stream. The manifest's digest of a disk read in place is
/// computed by one sequential pass over its stored bytes, on a thread of its own beside the
/// conversion (the stored bytes are read twice: the cost of in-place reading with a manifest).
struct OVARandomAccess {
    let ovf: OVFDescriptor
    let ovfName: String
    /// The OVA's path, or the OVF's (digest errors name it).
    let package: String
    let manifest: OVAManifest?
    let outputs: OVAOutputs
    let readers: Int
    let protecting: [ProtectedInput]

    func run(_ jobs: [OVADiskJob], locate: (String) throws(QcowPressError) -> OVALocation, verifiedBefore: [String]) throws(QcowPressError) -> OVAImport.Summary {
        var verified = verifiedBefore
        var disks: [(OVADiskJob, UInt64)] = []
        try outputs.check(jobs, protecting: protecting)
        if jobs.contains(where: { $0.file?.gzip == true }) { try outputs.reserveForStreams() }
        do throws(QcowPressError) {
            for job in jobs {
                guard let file = job.file, let href = job.href else {
                    let e = try outputs.encoder(for: job, virtualSize: job.disk.capacity, protecting: protecting)
                    outputs.finished(try e.finishBlocking())
                    disks.append((job, e.virtualSize))
                    continue
                }
                let loc = try locate(href)
                let (size, digest) = try convert(job, file: file, href: href, at: loc)
                if let v = digest { verified.append(v) }
                disks.append((job, size))
            }
            let images = try outputs.commit(OVAImport.VM(ovf, disks: disks))
            return OVAImport.Summary(source: ovfName, vm: OVAImport.VM(ovf, disks: disks), images: images, verified: verified, stagedBytes: 0)
        } catch {
            outputs.rollback()
            throw error
        }
    }

    /// One disk: (guest size, what the manifest check verified).
    private func convert(_ job: OVADiskJob, file: OVFDescriptor.File, href: String, at loc: OVALocation) throws(QcowPressError) -> (UInt64, String?) {
        let input: InputFile
        do { input = try InputFile(path: loc.path, direct: false) } catch { throw .from(error) }
        let window = loc.window ?? 0..<input.size
        let want = manifest?.entries[href]
        if file.gzip {
            // Inflated as it is read; the digest is of the stored (compressed) bytes.
            let hashed = HashingSource(WindowSource(file: input, window: window), digests: DigestSet(want.map { [$0.algorithm] } ?? []))
            let size = try OVAStreamDisk.convert(job, from: GzipSource(hashed, name: loc.name), name: loc.name, outputs: outputs,
                                                 protecting: protecting, streamHint: "stored gzip-compressed")
            return (size, try checkDigest(hashed.digests, file: href, manifest: manifest, archive: package))
        }
        let f = try FormatFile(path: loc.path, name: loc.name, window: loc.window)
        let format = try ImageFormat.probe(file: f)
        let image: any GuestImage
        switch format {
        case "raw": image = WindowRawImage(file: f)
        case "qcow2": throw .unsupported(path: loc.name, what: "a qcow2 disk inside an OVA; extract it (it is already qcow2)")
        default:
            guard ImageFormat.readable.contains(format) else { throw ImageFormat.refusal(path: loc.name, format: format) }
            image = try ImageFormat.open(file: f, format: format)
        }
        // The manifest pass runs beside the conversion; a mismatch fails the run before commit.
        let hash = ThreadGroup()
        let result = ResultBox()
        if let want {
            hash.spawn(name: "qp-ova-digest") { () throws(QcowPressError) in
                let set = try digestOfWindow(input, window, want.algorithm) { result.stopped }
                result.set(set.hex(want.algorithm) ?? "")
            }
        }
        let enc: Qcow2Encoder
        do throws(QcowPressError) {
            enc = try outputs.encoder(for: job, virtualSize: image.virtualSize, protecting: protecting)
            var copier = ImageCopier(source: image, clusterSize: enc.clusterSize)
            copier.readers = readers
            do throws(QcowPressError) { _ = try copier.feed(enc) } catch {
                enc.cancel()
                throw error
            }
            outputs.finished(try enc.finishBlocking())
        } catch {
            result.stop()
            _ = hash.wait()
            throw error
        }
        if let e = hash.wait() { throw e }
        guard let want, let got = result.get() else { return (image.virtualSize, nil) }
        guard got == want.digest else {
            throw .inputDamaged(path: package, location: "\(href): \(want.algorithm.rawValue) digest is \(got), the manifest says \(want.digest)")
        }
        return (image.virtualSize, "\(want.algorithm.rawValue) \(href)")
    }
}

/// The digest pass's result, handed from its thread.
final class ResultBox: Sendable {
    private let value = Mutex<String?>(nil)
    private let stopFlag = Atomic<Bool>(false)
    func set(_ v: String) { value.withLock { $0 = v } }
    func get() -> String? { value.withLock { $0 } }
    /// The conversion failed: the pass ends at its next read.
    func stop() { stopFlag.store(true, ordering: .relaxed) }
    var stopped: Bool { stopFlag.load(ordering: .relaxed) }
}

/// Bytes of another source, hashed as they pass.
final class HashingSource: OVAByteSource {
    let inner: OVAByteSource
    var digests: DigestSet
    init(_ inner: OVAByteSource, digests: DigestSet) {
        self.inner = inner
        self.digests = digests
    }
    func read(into b: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Int {
        let n = try inner.read(into: b)
        if n > 0 { digests.update(UnsafeRawBufferPointer(rebasing: b[0..<n])) }
        return n
    }
}

/// Small files of the package (the OVF, the manifest) are read whole: at most this much.
let ovaDescriptorLimit: UInt64 = 16 << 20

/// Reads a small file of the package (the OVF, the manifest) whole, hashing it.
func readSmall(_ loc: OVALocation, what: String) throws(QcowPressError) -> [UInt8] {
    let input: InputFile
    do { input = try InputFile(path: loc.path, direct: false) } catch { throw .from(error) }
    let window = loc.window ?? 0..<input.size
    guard window.count <= ovaDescriptorLimit else {
        throw .unsupported(path: loc.name, what: "\(what) of \(window.count) bytes (more than \(ovaDescriptorLimit >> 20) MiB)")
    }
    return try WindowSource(file: input, window: window).readUpTo(Int(window.count))
}

/// An OVA file: the tar's headers are read (never its data) to find every entry, then the OVF
/// and manifest, then each disk in place.
struct OVAArchiveFile {
    let path: String
    let outputs: OVAOutputs
    let readers: Int

    func run() throws(QcowPressError) -> OVAImport.Summary {
        let input: InputFile
        do { input = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        let walker = TarWalker(input: TarFileInput(file: input), archive: path)
        var entries: [String: TarEntry] = [:]
        var order: [TarEntry] = []
        while let e = try walker.next() {
            guard e.dataOffset + e.size <= input.size else {
                throw .inputDamaged(path: path, location: "tar entry '\(e.name)' (\(e.size) bytes at offset \(e.dataOffset)) runs past the end of the archive (\(input.size) bytes; truncated)")
            }
            if e.isDirectory { continue }
            entries[e.name] = e
            order.append(e)
        }
        try walker.checkTrailer()
        func locate(_ name: String) throws(QcowPressError) -> OVALocation {
            guard let e = entries[name] else {
                throw .inputDamaged(path: path, location: "the OVF names '\(name)' but the archive has no such file")
            }
            return OVALocation(path: path, name: "\(path):\(name)", window: e.dataOffset..<(e.dataOffset + e.size))
        }
        let ovfs = order.filter { $0.name.lowercased().hasSuffix(".ovf") }
        guard ovfs.count == 1 else {
            throw .inputDamaged(path: path, location: ovfs.isEmpty ? "no .ovf descriptor in the archive (not an OVA?)" : "\(ovfs.count) .ovf descriptors in the archive; one is expected")
        }
        let mfs = order.filter { $0.name.lowercased().hasSuffix(".mf") }
        guard mfs.count <= 1 else { throw .inputDamaged(path: path, location: "\(mfs.count) .mf manifests in the archive; one is expected") }
        let ovfName = "\(path):\(ovfs[0].name)"
        let ovfBytes = try readSmall(try locate(ovfs[0].name), what: "OVF descriptor")
        let ovf = try OVFDescriptor(xml: ovfBytes, path: ovfName)
        var manifest: OVAManifest? = nil
        if let mf = mfs.first { manifest = try OVAManifest(text: try readSmall(try locate(mf.name), what: "manifest"), path: "\(path):\(mf.name)") }
        let jobs = try OVADiskJob.plan(ovf, ovfName: ovfName, outdir: outputs.outdir)
        for j in jobs { if let h = j.href { _ = try locate(h) } }
        let verified = try checkManifestCoverage(manifest, jobs: jobs, present: Set(entries.keys), ovf: (ovfs[0].name, ovfBytes), archive: path)
        let access = OVARandomAccess(ovf: ovf, ovfName: ovfName, package: path, manifest: manifest, outputs: outputs, readers: readers,
                                     protecting: [ProtectedInput(path: path, role: "the OVA being converted")])
        var s = try access.run(jobs, locate: locate, verifiedBefore: verified)
        s.source = path
        return s
    }
}

/// Before anything is written: every file the manifest lists is in the package, every disk file
/// is listed (when there is a manifest), and the OVF's own digest matches. Returns what it verified.
func checkManifestCoverage(_ manifest: OVAManifest?, jobs: [OVADiskJob], present: Set<String>, ovf: (name: String, bytes: [UInt8]),
                           archive: String) throws(QcowPressError) -> [String] {
    guard let manifest else { return [] }
    for name in manifest.entries.keys.sorted() where !present.contains(name) {
        throw .inputDamaged(path: archive, location: "the manifest lists '\(name)' but the package has no such file")
    }
    for j in jobs {
        if let h = j.href, manifest.entries[h] == nil {
            throw .inputDamaged(path: archive, location: "the manifest does not list the disk file '\(h)' (its digest cannot be checked)")
        }
    }
    guard let want = manifest.entries[ovf.name] else { return [] }
    var set = DigestSet([want.algorithm])
    ovf.bytes.withUnsafeBytes { set.update($0) }
    return [try checkDigest(set, file: ovf.name, manifest: manifest, archive: archive)].compactMap { $0 }
}

/// An OVF with its files beside it: hrefs are resolved against the OVF's folder (never the
/// current directory); the manifest is the `.mf` of the same name beside it, when present.
struct OVAFolder {
    let ovfPath: String
    let outputs: OVAOutputs
    let readers: Int

    func run() throws(QcowPressError) -> OVAImport.Summary {
        let folder = ovfPath.lastIndex(of: "/").map { String(ovfPath[...$0]) } ?? "./"
        let ovfBytes = try readSmall(OVALocation(path: ovfPath, name: ovfPath, window: nil), what: "OVF descriptor")
        let ovf = try OVFDescriptor(xml: ovfBytes, path: ovfPath)
        let ovfFile = String(ovfPath.split(separator: "/").last ?? "")
        let mfPath = String(ovfPath.dropLast(4)) + ".mf"
        var manifest: OVAManifest? = nil
        if FileNames.exists(mfPath) {
            manifest = try OVAManifest(text: try readSmall(OVALocation(path: mfPath, name: mfPath, window: nil), what: "manifest"), path: mfPath)
        }
        let jobs = try OVADiskJob.plan(ovf, ovfName: ovfPath, outdir: outputs.outdir)
        func locate(_ href: String) throws(QcowPressError) -> OVALocation {
            let p = folder == "./" ? href : folder + href
            guard FileNames.exists(p) else { throw .inputDamaged(path: ovfPath, location: "the OVF names '\(href)' but \(p) does not exist") }
            return OVALocation(path: p, name: p, window: nil)
        }
        var present = Set<String>()
        for name in manifest?.entries.keys.sorted() ?? [] where FileNames.exists(folder == "./" ? name : folder + name) { present.insert(name) }
        for j in jobs { if let h = j.href { _ = try locate(h) } }
        let verified = try checkManifestCoverage(manifest, jobs: jobs, present: present.union([ovfFile]), ovf: (ovfFile, ovfBytes), archive: ovfPath)
        var protecting = [ProtectedInput(path: ovfPath, role: "the OVF being converted")]
        for j in jobs { if let h = j.href { protecting.append(ProtectedInput(path: try locate(h).path, role: "a disk of the OVF")) } }
        let access = OVARandomAccess(ovf: ovf, ovfName: ovfPath, package: ovfPath, manifest: manifest, outputs: outputs, readers: readers, protecting: protecting)
        return try access.run(jobs, locate: locate, verifiedBefore: verified)
    }
}
