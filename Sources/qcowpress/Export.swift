import ArgumentParser
import Foundation
import QcowPress

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compressed backup export of a raw or qcow2 image; with -b, an incremental over BASE. With --nbd-sink, of a running VM: QEMU's backup job writes into an NBD export.",
        usage: """
            qcowpress export [-b BASE.qcow2] [-f FMT] [-c] [-o ...] [-p] SRC DST.qcow2
            qcowpress export --nbd-sink PATH (--size SIZE | -b BASE.qcow2) [-c] [-o ...] [-p] DST.qcow2
            """,
        discussion: """
            --nbd-sink serves one writable NBD export named "backup" on the unix socket PATH (for \
            blockdev-backup into an nbd node) and encodes what arrives into DST. DST is finished when \
            the client sends NBD_CMD_DISC (exit 0); a client that disconnects without it, a second \
            write to a cluster already written, or (with --size) a disconnect before every byte was \
            written or zeroed leaves no DST (exit 1). With -b only what the client writes is stored.
            """)

    @Option(name: .customShort("b"), help: ArgumentHelp("A previous export (qcow2): DST names it as its backing file and holds only clusters that differ from what it reads (with --nbd-sink: only what the client writes; DST's size is the base's).", valueName: "base"), completion: .file())
    var base: String?
    @Option(name: .customShort("f"), help: ArgumentHelp("Source format: \(ImageFormat.readable.joined(separator: ", ")) (probed by magic when absent; a fixed VHD needs -f vpc).", valueName: "format"), completion: .list(ImageFormat.readable))
    var sourceFormat: String?
    @Option(name: .customLong("nbd-sink"), help: ArgumentHelp("Serve a writable NBD export named \"backup\" on this unix socket and encode what a client (QEMU's backup job) writes into it.", valueName: "path"), completion: .file())
    var nbdSink: String?
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp)
    var forceShare = false
    @Option(help: ArgumentHelp("Virtual size of DST with --nbd-sink and no -b (the size of the disk backed up, e.g. 32G).", valueName: "size"))
    var size: String?
    @Option(name: .customLong("handshake-timeout"), help: ArgumentHelp("With --nbd-sink: seconds a client may take to negotiate before it is dropped (default 10; 0 for no limit).", valueName: "seconds"))
    var handshakeTimeout: Double?
    @OptionGroup var encoder: EncoderArguments
    // Two positionals (not an array) so shell completion offers files for each.
    @Argument(help: ArgumentHelp("Source image (raw or qcow2); with --nbd-sink, the destination qcow2.", valueName: "src"), completion: .file())
    var source: String
    @Argument(help: ArgumentHelp("Destination qcow2 (absent with --nbd-sink).", valueName: "dst"), completion: .file())
    var destination: String?

    func validate() throws {
        if nbdSink != nil {
            guard destination == nil else { throw ValidationError("--nbd-sink takes one file: DST.qcow2") }
            guard (size == nil) != (base == nil) else { throw ValidationError("--nbd-sink needs one of --size SIZE or -b BASE.qcow2") }
            guard sourceFormat == nil else { throw ValidationError("-f names a source's format; --nbd-sink has no source file") }
            if let t = handshakeTimeout, !(t >= 0 && t.isFinite) { throw ValidationError("--handshake-timeout takes seconds ≥ 0") }
        } else {
            guard destination != nil else { throw ValidationError("expected SRC DST.qcow2") }
            guard size == nil else { throw ValidationError("--size needs --nbd-sink") }
            guard handshakeTimeout == nil else { throw ValidationError("--handshake-timeout needs --nbd-sink") }
        }
    }

    func run() throws {
        // SRC and BASE (with their backing chains) are read: locked for the whole run.
        let locks = try lockForReading((nbdSink == nil ? [(source, true)] : []) + (base.map { [($0, true)] } ?? []), forceShare: forceShare)
        defer { locks.release() }
        // With --nbd-sink the one file given is DST.
        if let nbdSink { return try runSink(socket: nbdSink, destination: source) }
        let destination = self.destination!
        let parsed = try ImageOptionParser(encoder.formatOptions)
        let format = try ImageFormat.resolve(path: source, given: sourceFormat)
        let image = try openImage(source, format: format, openBacking: true)
        var args = encoder
        // Backups are compressed by default, with zstd level 3: measured on a 3 GiB ext4 image here
        // it is ~6× faster than zlib level 6 for ~the same size (bench/results).
        if parsed.values["compression_type"] == nil { args.formatOptions.append("compression_type=zstd") }
        var options = try args.encoderOptions(virtualSize: image.virtualSize, compressByDefault: true)
        options.protectedInputs = try ProtectedInput.imageAndBackingChain(source, role: "the source")
        warnAboutLeftovers(besides: destination)
        var baseImage: (any GuestImage)? = nil
        if let base {
            options.protectedInputs += try ProtectedInput.imageAndBackingChain(base, role: "the base (-b)")
            let fmt = try RawImageReader.detectFormat(path: base)
            baseImage = try openImage(base, format: fmt, openBacking: true)
            options.backingFile = relativePath(from: destination, to: base)
            options.backingFormat = fmt
        }
        let copier = ImageCopier(source: image, base: baseImage, clusterSize: options.clusterSize)
        var written: UInt64 = 0
        var summary = try runEncoder(destination: destination, options: options, showProgress: encoder.progress) { enc in
            written = try copier.feed(enc)
        }
        if encoder.output == .json {
            summary.notes.append(base == nil ? "full export" : "incremental over \(base!): \(written) clusters differ")
            print(try encodeJSON(ExportSummary(image: summary, incrementalBase: base, clustersNew: base == nil ? nil : written)))
        }
    }
}

struct ExportSummary: Encodable {
    var image: EncoderSummary
    var incrementalBase: String?
    /// Clusters that differ from the base (incremental exports).
    var clustersNew: UInt64?
}

/// `to` as seen from the directory of `from` (both as given, made absolute against the cwd).
func relativePath(from: String, to: String) -> String {
    let cwd = FileManager.default.currentDirectoryPath
    func parts(_ p: String) -> [String] {
        let abs = p.hasPrefix("/") ? p : cwd + "/" + p
        var out: [String] = []
        for c in abs.split(separator: "/") {
            if c == "." { continue }
            if c == ".." { _ = out.popLast(); continue }
            out.append(String(c))
        }
        return out
    }
    let dir = Array(parts(from).dropLast())
    let target = parts(to)
    var i = 0
    while i < dir.count && i < target.count - 1 && dir[i] == target[i] { i += 1 }
    let up = Array(repeating: "..", count: dir.count - i)
    return (up + target[i...]).joined(separator: "/")
}
