import DirectIO
import Foundation

/// Imports a VM from an OVA (a tar: a file, or a stream such as stdin) or an OVF with its files
/// beside it: every disk of the OVF becomes `OUTDIR/<file name without extension>.qcow2` and
/// `OUTDIR/vm.json` describes the VM (name, CPUs, memory, disks, NICs).
///
/// Nothing is unpacked: a disk inside an OVA file is read in place (a window of the tar, with the
/// format's own reader, in parallel), a disk in a stream (stdin, or a gzip-compressed file) is
/// decoded as it passes (a streamOptimized VMDK, or raw). The manifest's digests are computed
/// over the bytes as stored and checked before anything is put in place; the run's outputs appear
/// together or not at all (an output set). Hostile archives — names that would leave OUTDIR,
/// links, a truncated tar, a disk the OVF names and the tar lacks, names given twice, a digest
/// that does not match — are refused with one line.
public struct OVAImport: Sendable {
    public let source: String
    public let outdir: String
    public var overwrite = false
    /// Reader threads of a disk read in place (``ImageCopier/readers``).
    public var readers = ImageCopier.defaultReaders

    public init(source: String, outdir: String) {
        self.source = source
        self.outdir = outdir
    }

    /// What `OUTDIR/vm.json` holds.
    public struct VM: Sendable, Codable, Equatable {
        public struct Disk: Sendable, Codable, Equatable {
            /// The OVF's file name (href).
            public var file: String
            /// Bytes the guest sees.
            public var capacity: UInt64
            /// The image's name in OUTDIR.
            public var qcow2: String
        }
        public var name: String?
        public var cpus: Int?
        public var memoryMiB: UInt64?
        public var disks: [Disk]
        public var nics: [OVFDescriptor.NIC]
    }

    public struct Summary: Sendable, Codable {
        public var source: String
        public var vm: VM
        public var images: [EncoderSummary]
        /// Files whose manifest digest was checked ("SHA256 disk1.vmdk", …).
        public var verified: [String]
        /// Bytes written anywhere but the outputs (always 0: nothing is unpacked).
        public var stagedBytes: UInt64
    }

    /// True when `convert SRC DST` means an import: SRC ends in .ova or .ovf (any case) or is "-",
    /// and DST is a directory or does not exist.
    public static func isImport(source: String, destination: String) -> Bool {
        let s = source.lowercased()
        guard s.hasSuffix(".ova") || s.hasSuffix(".ovf") || source == "-" else { return false }
        return FileNames.isDirectory(destination) || !FileNames.exists(destination)
    }

    /// Runs the import. `started` is told each image's encoder as it starts.
    public func run(encoder template: EncoderOptions, started: @escaping (Qcow2Encoder) -> Void = { _ in }) throws(QcowPressError) -> Summary {
        if FileNames.exists(outdir) && !FileNames.isDirectory(outdir) { throw .invalidArgument("\(outdir): is not a directory") }
        if source.lowercased().hasSuffix(".ovf") && source != "-" {
            let out = OVAOutputs(outdir: outdir, overwrite: overwrite, template: template, started: started)
            return try OVAFolder(ovfPath: source, outputs: out, readers: readers).run()
        }
        let regular = source != "-" && FileNames.status(source)?.kind == .regular
        let out = OVAOutputs(outdir: outdir, overwrite: overwrite, template: template, started: started)
        if regular { return try OVAArchiveFile(path: source, outputs: out, readers: readers).run() }
        try out.reserveForStreams()
        return try OVAStream(path: source, outputs: out).run()
    }
}

/// A disk to write: the OVF's disk, its file (nil for a blank disk) and the output name.
struct OVADiskJob: Sendable {
    var disk: OVFDescriptor.Disk
    var file: OVFDescriptor.File?
    /// The href as a checked relative name (no "./", no "..", not absolute).
    var href: String?
    /// The qcow2's file name in OUTDIR.
    var output: String

    /// The disks of `ovf`, with their hrefs checked and output names chosen (and distinct).
    static func plan(_ ovf: OVFDescriptor, ovfName: String, outdir: String) throws(QcowPressError) -> [OVADiskJob] {
        var jobs: [OVADiskJob] = []
        for d in ovf.disks {
            guard let ref = d.fileRef else {
                jobs.append(OVADiskJob(disk: d, file: nil, href: nil, output: safeBase(d.id, fallback: "disk") + ".qcow2"))
                continue
            }
            guard let f = ovf.files.first(where: { $0.id == ref }) else { continue }  // checked by the parser
            let href = try checkedHref(f.href, ovfName: ovfName)
            var base = String(href.split(separator: "/").last ?? "")
            if f.gzip && base.lowercased().hasSuffix(".gz") { base.removeLast(3) }
            if let dot = base.lastIndex(of: "."), dot != base.startIndex { base = String(base[..<dot]) }
            jobs.append(OVADiskJob(disk: d, file: f, href: href, output: safeBase(base, fallback: d.id) + ".qcow2"))
        }
        guard !jobs.isEmpty else { throw .inputDamaged(path: ovfName, location: "DiskSection names no disk: nothing to convert") }
        try OutputSet.checkDistinct(jobs.map { ($0.output, "disk '\($0.disk.id)'") } + [("vm.json", "the VM description")], in: outdir)
        return jobs
    }

    /// A file name that stays in OUTDIR: no slash, not "." or "..", no NUL; otherwise `fallback`.
    static func safeBase(_ s: String, fallback: String) -> String {
        let ok = !s.isEmpty && s != "." && s != ".." && !s.contains("/") && !s.contains("\0") && !s.hasPrefix(".")
        if ok { return s }
        let f = fallback.filter { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }
        return f.isEmpty ? "disk" : f
    }

    /// An href as a relative name inside the OVA or the OVF's folder; absolute names, "..",
    /// URLs and backslashes are refused.
    static func checkedHref(_ href: String, ovfName: String) throws(QcowPressError) -> String {
        func refuse(_ why: String) -> QcowPressError {
            .unsupported(path: ovfName, what: "References/File href '\(href)' \(why); refused")
        }
        if href.hasPrefix("/") { throw refuse("is absolute (it would leave the package's folder)") }
        if href.contains("://") || href.lowercased().hasPrefix("file:") { throw refuse("is a URL (only files inside the package are read)") }
        if href.contains("\\") || href.contains("\0") { throw refuse("holds a backslash or NUL") }
        let parts = href.split(separator: "/").filter { $0 != "." }
        if parts.contains("..") { throw refuse("has a '..' component (it would leave the package's folder)") }
        guard !parts.isEmpty else { throw refuse("is empty") }
        return parts.joined(separator: "/")
    }
}

/// The outputs of one import: the images (deferred commits) and vm.json, committed together.
final class OVAOutputs {
    let outdir: String
    let overwrite: Bool
    private(set) var template: EncoderOptions
    private var reservedForStreams = false
    let started: (Qcow2Encoder) -> Void
    let set: OutputSet
    private var group: EncoderGroup?
    private var summaries: [EncoderSummary] = []

    init(outdir: String, overwrite: Bool, template: EncoderOptions, started: @escaping (Qcow2Encoder) -> Void) {
        self.outdir = outdir
        self.overwrite = overwrite
        self.template = template
        self.started = started
        set = OutputSet(overwrite: overwrite)
    }

    func path(_ name: String) -> String { outdir + "/" + name }

    /// A disk that streams (stdin, a gzip-stored file) passes through inflate buffers that come
    /// out of the memory limit: the engine gets the rest (``OVAStreamVMDK/engineOptions(_:)``).
    /// Called before the first encoder (all disks share one group); once is enough.
    func reserveForStreams() throws(QcowPressError) {
        guard !reservedForStreams else { return }
        guard group == nil else { throw .misuse("OVAOutputs.reserveForStreams after the first encoder") }
        template = try OVAStreamVMDK.engineOptions(template)
        reservedForStreams = true
    }

    /// Checks every destination before anything is written (exists without --force, or is an input).
    func check(_ jobs: [OVADiskJob], protecting: [ProtectedInput]) throws(QcowPressError) {
        for j in jobs { _ = try OutputTarget(destination: path(j.output), overwrite: overwrite, protecting: protecting) }
        _ = try OutputTarget(destination: path("vm.json"), overwrite: overwrite, protecting: protecting)
    }

    /// A new encoder for `job`'s image of `virtualSize` bytes (commit deferred to ``commit(_:)``).
    func encoder(for job: OVADiskJob, virtualSize: UInt64, protecting: [ProtectedInput]) throws(QcowPressError) -> Qcow2Encoder {
        if group == nil {
            try set.makeDirectory(outdir)
            // One image at a time: the disks are written one after the other, each on every core.
            group = try EncoderGroup(threads: template.threads, memoryLimit: template.memoryLimit,
                                     clusterSize: template.clusterSize, compression: template.compression, images: 1)
        }
        var o = template
        o.virtualSize = (virtualSize + 511) & ~511
        o.group = group
        o.overwrite = overwrite
        o.protectedInputs += protecting
        let e = try Qcow2Encoder(destination: path(job.output), options: o)
        set.add(e)
        started(e)
        return e
    }

    func finished(_ s: EncoderSummary) { summaries.append(s) }

    /// Writes vm.json and puts everything in place.
    func commit(_ vm: OVAImport.VM) throws(QcowPressError) -> [EncoderSummary] {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        guard let data = try? enc.encode(vm) else { throw .misuse("vm.json: cannot encode") }
        if group == nil { try set.makeDirectory(outdir) }
        try set.stage(Array(data) + [0x0A], as: path("vm.json"))
        try set.commitAll()
        group?.shutdown()
        group = nil
        return summaries
    }

    func rollback() {
        set.rollback()
        group?.shutdown()
        group = nil
    }
}

extension OVAImport.VM {
    /// vm.json for `ovf` and the disks written (with their guest sizes).
    init(_ ovf: OVFDescriptor, disks: [(OVADiskJob, UInt64)]) {
        self.init(name: ovf.name, cpus: ovf.cpus, memoryMiB: ovf.memoryMiB,
                  disks: disks.map { .init(file: $0.0.href ?? "", capacity: $0.1, qcow2: $0.0.output) }, nics: ovf.nics)
    }
}
