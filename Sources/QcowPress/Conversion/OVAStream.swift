import DirectIO
import Glibc

/// An OVA read once, front to back (stdin, a pipe): the OVF must come first (as the OVF
/// specification orders an OVA); each disk is decoded as its entry passes (a streamOptimized
/// VMDK or raw; another format needs random access and is refused with a message saying to pass
/// the file). Every file the manifest lists is hashed as it passes; a manifest that comes after
/// the disks is checked against SHA-256 and SHA-1 digests computed for every file before it.
struct OVAStream {
    let path: String
    let outputs: OVAOutputs

    func run() throws(QcowPressError) -> OVAImport.Summary {
        let file: StreamFile
        do { file = try StreamFile(path: path) } catch { throw .from(error) }
        let archive = file.path
        let walker = TarWalker(input: TarStreamInput(file: file), archive: archive)
        do throws(QcowPressError) {
            return try run(walker, archive: archive)
        } catch {
            outputs.rollback()
            throw error
        }
    }

    private func run(_ walker: TarWalker, archive: String) throws(QcowPressError) -> OVAImport.Summary {
        guard let first = try walker.next() else { throw .inputDamaged(path: archive, location: "the archive is empty (no OVF descriptor)") }
        guard !first.isDirectory, first.name.lowercased().hasSuffix(".ovf") else {
            throw .inputDamaged(path: archive, location: "the first file is '\(first.name)', not the .ovf descriptor (an OVA begins with it; pass a file to read another order)")
        }
        guard first.size <= ovaDescriptorLimit else {
            throw .unsupported(path: archive, what: "OVF descriptor of \(first.size) bytes (more than \(ovaDescriptorLimit >> 20) MiB)")
        }
        let ovfSource = TarEntrySource(walker: walker, digests: DigestSet([.sha1, .sha256, .sha512]))
        let ovfBytes = try ovfSource.readUpTo(Int(first.size))
        let ovfName = "\(archive):\(first.name)"
        let ovf = try OVFDescriptor(xml: ovfBytes, path: ovfName)
        let jobs = try OVADiskJob.plan(ovf, ovfName: ovfName, outdir: outputs.outdir)
        let protecting = path == "-" ? [] : [ProtectedInput(path: path, role: "the OVA being converted")]
        try outputs.check(jobs, protecting: protecting)
        var manifest: OVAManifest? = nil
        var manifestName = ""
        // Digests of every file seen (all three kinds until the manifest says which it lists).
        var seen: [String: DigestSet] = [first.name: ovfSource.digests]
        var written: [String: UInt64] = [:]
        while let e = try walker.next() {
            if e.isDirectory { continue }
            let lower = e.name.lowercased()
            if lower.hasSuffix(".ovf") { throw .inputDamaged(path: archive, location: "a second .ovf descriptor '\(e.name)' at offset \(e.dataOffset)") }
            if lower.hasSuffix(".mf") {
                guard manifest == nil else { throw .inputDamaged(path: archive, location: "a second .mf manifest '\(e.name)'") }
                guard e.size <= ovaDescriptorLimit else { throw .unsupported(path: archive, what: "manifest of \(e.size) bytes") }
                manifestName = "\(archive):\(e.name)"
                manifest = try OVAManifest(text: try TarEntrySource(walker: walker, digests: DigestSet([])).readUpTo(Int(e.size)), path: manifestName)
                continue
            }
            let algorithms: [OVAManifest.Algorithm] = manifest.map { m in m.entries[e.name].map { [$0.algorithm] } ?? [] } ?? [.sha1, .sha256]
            let src = TarEntrySource(walker: walker, digests: DigestSet(algorithms))
            let matching = jobs.filter { $0.href == e.name }
            if let job = matching.first {
                let name = "\(archive):\(e.name)"
                let source: OVAByteSource = job.file?.gzip == true ? GzipSource(src, name: name) : src
                let size = try OVAStreamDisk.convert(job, from: source, name: name, outputs: outputs, protecting: protecting,
                                                     streamHint: "read from a stream")
                for j in matching { written[j.output] = size }
                // What the decoder left of the entry (a VMDK's padding after its end marker) is hashed too.
                try src.drain()
            } else if manifest == nil || manifest?.entries[e.name] != nil {
                try src.drain()
            } else {
                continue  // not listed, not a disk: skipped unread
            }
            seen[e.name] = src.digests
        }
        try walker.checkTrailer()
        for j in jobs where j.href != nil && written[j.output] == nil {
            throw .inputDamaged(path: archive, location: "the OVF names '\(j.href!)' but the archive has no such file")
        }
        var verified: [String] = []
        if let manifest {
            for name in manifest.entries.keys.sorted() {
                guard let d = seen[name] else {
                    throw .inputDamaged(path: archive, location: "the manifest lists '\(name)' but the archive has no such file")
                }
                if let v = try checkDigest(d, file: name, manifest: manifest, archive: archive) { verified.append(v) }
            }
            for j in jobs {
                if let h = j.href, manifest.entries[h] == nil {
                    throw .inputDamaged(path: archive, location: "the manifest does not list the disk file '\(h)' (its digest cannot be checked)")
                }
            }
        }
        var disks: [(OVADiskJob, UInt64)] = []
        for j in jobs {
            if j.href == nil {
                let e = try outputs.encoder(for: j, virtualSize: j.disk.capacity, protecting: protecting)
                outputs.finished(try e.finishBlocking())
                disks.append((j, e.virtualSize))
            } else {
                disks.append((j, written[j.output] ?? 0))
            }
        }
        let vm = OVAImport.VM(ovf, disks: disks)
        let images = try outputs.commit(vm)
        return OVAImport.Summary(source: archive, vm: vm, images: images, verified: verified, stagedBytes: 0)
    }
}

/// One disk decoded from a stream of its bytes (stdin's tar entry, or a gzip-stored file): a
/// streamOptimized VMDK grain by grain, or raw bytes in order; any other format needs random
/// access and is refused.
enum OVAStreamDisk {
    /// Converts into a new image of `job`; returns its guest size.
    static func convert(_ job: OVADiskJob, from source: OVAByteSource, name: String, outputs: OVAOutputs,
                        protecting: [ProtectedInput], streamHint: String) throws(QcowPressError) -> UInt64 {
        let head = try source.readUpTo(ImageFormat.probeBytes)
        var padded = head
        padded += [UInt8](repeating: 0, count: ImageFormat.probeBytes - head.count)
        let format = head.isEmpty ? "raw" : (ImageFormat.probe(head: padded, fileName: name) ?? "raw")
        let rest = PrefixedSource(prefix: head, inner: source)
        switch format {
        case "raw":
            return try raw(job, from: rest, name: name, outputs: outputs, protecting: protecting)
        case "vmdk" where isStreamOptimized(padded):
            return try OVAStreamVMDK.convert(job, from: rest, name: name, outputs: outputs, protecting: protecting)
        default:
            throw .unsupported(path: name, what: "a \(format) disk that is \(streamHint) needs random access; pass the OVA as a file (not a stream), or unpack this disk first")
        }
    }

    /// KDMV with compressed grains and markers (flags bits 16 and 17): the stream form.
    static func isStreamOptimized(_ h: [UInt8]) -> Bool {
        guard h.count >= 12, h[0..<4].elementsEqual([0x4B, 0x44, 0x4D, 0x56]) else { return false }
        let flags = FieldReader(b: h).le32(8)
        return flags & (1 << 16) != 0 && flags & (1 << 17) != 0
    }

    /// Raw bytes in order: the OVF's capacity is the guest size; more bytes than that are refused.
    static func raw(_ job: OVADiskJob, from source: OVAByteSource, name: String, outputs: OVAOutputs,
                    protecting: [ProtectedInput]) throws(QcowPressError) -> UInt64 {
        let enc = try outputs.encoder(for: job, virtualSize: job.disk.capacity, protecting: protecting)
        // 4 MiB: the copier's chunk (ImageCopier.chunkSize).
        let buf = AlignedBuffer(capacity: ImageCopier.chunkSize)
        var at: UInt64 = 0
        do throws(QcowPressError) {
            while true {
                var n = 0
                while n < ImageCopier.chunkSize {
                    let got = try source.read(into: UnsafeMutableRawBufferPointer(start: buf.pointer + n, count: ImageCopier.chunkSize - n))
                    if got == 0 { break }
                    n += got
                }
                if n == 0 { break }
                guard at + UInt64(n) <= enc.virtualSize else {
                    throw .inputDamaged(path: name, location: "raw disk holds more than the OVF's capacity (\(job.disk.capacity) bytes)")
                }
                try enc.writeBlocking(at: at, UnsafeRawBufferPointer(start: buf.pointer, count: n))
                at += UInt64(n)
            }
            outputs.finished(try enc.finishBlocking())
        } catch {
            enc.cancel()
            throw error
        }
        return enc.virtualSize
    }
}
