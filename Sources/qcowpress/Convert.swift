import ArgumentParser
import Foundation
import QcowPress

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Convert a raw, qcow2, vmdk, vhdx, vdi or vpc (VHD) image, or an OVA/OVF, to qcow2 (compressed with -c) or raw.")

    @Option(name: .customShort("f"), help: ArgumentHelp("Source format: \(ImageFormat.readable.joined(separator: ", ")) (probed by magic when absent; a fixed VHD needs -f vpc).", valueName: "format"), completion: .list(ImageFormat.readable))
    var sourceFormat: String?
    @Option(name: .customShort("O"), help: ArgumentHelp("Output format: qcow2 or raw.", valueName: "format"), completion: .list(["qcow2", "raw"]))
    var outputFormat: String = "qcow2"
    @Option(name: .customShort("B"), help: ArgumentHelp("Keep a backing file: DST names it and holds only what differs from it.", valueName: "backing"), completion: .file())
    var backing: String?
    @Option(name: .customShort("F"), help: ArgumentHelp("Backing format with -B: raw or qcow2 (detected by magic when absent), as qemu-img -F.", valueName: "format"), completion: .list(["raw", "qcow2"]))
    var backingFormat: String?
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp)
    var forceShare = false
    @Flag(name: .customLong("no-backing"), help: "Do not open the source's backing file (unallocated clusters read as zeros).")
    var noBacking = false
    @Option(help: ArgumentHelp("Source reader threads (default 2).", valueName: "n"))
    var readers: Int?
    @OptionGroup var encoder: EncoderArguments
    @Argument(help: "Source image.", completion: .file())
    var source: String
    @Argument(help: "Destination image (for an OVA/OVF source, or - for an OVA on stdin: the output directory).", completion: .file())
    var destination: String

    func run() throws {
        if sourceFormat == nil && OVAImport.isImport(source: source, destination: destination) { return try runImport() }
        let parsed = try ImageOptionParser(encoder.formatOptions)
        guard outputFormat == "qcow2" || outputFormat == "raw" else {
            throw QcowPressError.invalidArgument("output format '\(outputFormat)' is not supported (qcow2, raw)")
        }
        try ImageFormat.validate(sourceFormat)
        // SRC is locked before anything is read; its backing chain and the -B base (with its
        // chain) as soon as their names are known (from the headers read for `protected`).
        let locks = try lockForReading([(source, false)], forceShare: forceShare)
        defer { locks.release() }
        let format = try ImageFormat.resolve(path: source, given: sourceFormat)
        let backingName = backing ?? parsed.values["backing_file"]
        if outputFormat == "raw" && encoder.compress {
            throw QcowPressError.invalidArgument("-c needs -O qcow2: raw images cannot be compressed (as qemu-img)")
        }
        if let f = backingFormat {
            guard backingName != nil else { throw QcowPressError.invalidArgument("-F needs -B (it is the backing file's format)") }
            guard f == "raw" || f == "qcow2" else {
                throw QcowPressError.invalidArgument("backing format '\(f)' is not supported (raw, qcow2)")
            }
        }
        // --force never replaces what this run reads: SRC, its backing chain, the -B base.
        var protected = try ProtectedInput.imageAndBackingChain(source, role: "the source")
        if !noBacking { try locks.lock(paths: protected.dropFirst().map(\.path)) }
        if let backingName {
            let base = try ProtectedInput.imageAndBackingChain(resolveBesides(destination, backingName), role: "the backing file (-B)")
            try locks.lock(paths: base.map(\.path))
            protected += base
        }
        warnAboutLeftovers(besides: destination)
        if outputFormat == "raw" {
            guard backingName == nil else { throw QcowPressError.invalidArgument("-B needs -O qcow2") }
            let image = try openImage(source, format: format, openBacking: !noBacking)
            let w = try RawImageWriter(destination: destination, size: image.virtualSize, overwrite: encoder.force,
                                       protecting: protected)
            let counted = CountingSink(w)
            ProgressReport.follow(total: image.virtualSize) { counted.bytes }
            do {
                try ImageCopier(source: image, clusterSize: 65536).feed(counted)
                try w.finish()
            } catch {
                w.cancel()
                throw error
            }
            return
        }
        let image = try openImage(source, format: format, openBacking: !noBacking)
        var options = try encoder.encoderOptions(virtualSize: image.virtualSize)
        options.protectedInputs = protected
        var base: (any GuestImage)? = nil
        if let backingName {
            let resolved = resolveBesides(destination, backingName)
            let fmt = try backingFormat ?? parsed.values["backing_fmt"] ?? RawImageReader.detectFormat(path: resolved)
            base = try openImage(resolved, format: fmt, openBacking: true)
            options.backingFile = backingName
            options.backingFormat = fmt
        }
        var copier = ImageCopier(source: image, base: base, clusterSize: options.clusterSize)
        copier.readers = readers ?? ImageCopier.defaultReaders
        let summary = try runEncoder(destination: destination, options: options, showProgress: encoder.progress) { enc in
            try copier.feed(enc)
        }
        if encoder.output == .json { print(try encodeJSON(summary)) }
    }
}

/// The one-line error for a file that should be qcow2 and is not.
func notQcow2(_ path: String) -> QcowPressError {
    .inputDamaged(path: path, location: "magic at offset 0 is not QFI\\xfb (not a qcow2 image)")
}

/// Opens a source image; a qcow2 in whose chain an image is marked corrupt is read with a warning.
func openImage(_ path: String, format: String, openBacking: Bool) throws -> any GuestImage {
    guard format == "qcow2" else { return try ImageFormat.open(path: path, format: format) }
    let image = try Qcow2Image(path: path, openBacking: openBacking)
    for p in image.markedCorruptInChain { warnMarkedCorrupt(p) }
    return image
}

/// A backing name as a reader of `image` resolves it: relative names against the image's directory.
func resolveBesides(_ image: String, _ name: String) -> String {
    if name.hasPrefix("/") { return name }
    if let slash = image.lastIndex(of: "/") { return String(image[...slash]) + name }
    return name
}

/// Runs an encoder with the command's conventions: a progress bar on a TTY, fallback notes once on
/// stderr, and cancel (temporary output removed) when feeding fails.
func runEncoder(destination: String, options: EncoderOptions, showProgress: Bool,
                feed: (Qcow2Encoder) throws -> Void) throws -> EncoderSummary {
    let encoder = try Qcow2Encoder(destination: destination, options: options)
    watch(encoder)
    ProgressReport.follow(total: options.virtualSize) { encoder.bytesDone }
    let bar = showProgress ? ProgressBar(total: options.virtualSize) { encoder.bytesDone } : nil
    defer { bar?.stop() }
    do {
        try feed(encoder)
    } catch {
        encoder.cancel()
        throw error
    }
    return try encoder.finishBlocking()
}

/// Names the temporary files a killed run left beside `destination` (never removes them).
func warnAboutLeftovers(besides destination: String) {
    for p in TemporaryFiles.leftovers(besides: destination) { warnAboutLeftover(p) }
}

/// Names the temporary files a killed run left in `directory`.
func warnAboutLeftovers(in directory: String) {
    for p in TemporaryFiles.leftovers(in: directory) { warnAboutLeftover(p) }
}

private func warnAboutLeftover(_ p: String) {
    writeStderr("qcowpress: warning: \(p): temporary file left by a run that did not finish (its process is gone); remove it if nothing needs it\n")
}

/// Says the encoder's fallbacks (io_uring → pwrite, O_DIRECT → buffered) once on stderr, unless -q.
func watch(_ encoder: Qcow2Encoder) {
    guard !quietNotes.withLock({ $0 }) else { return }
    for n in encoder.fallbackNotes { writeStderr("qcowpress: note: \(n)\n") }
}
