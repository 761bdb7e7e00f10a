import ArgumentParser
import Foundation
import QcowPress

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Convert a raw image to qcow2 (compressed with -c).")

    @Option(name: .customShort("f"), help: "Source format: raw or qcow2 (detected by magic when absent).")
    var sourceFormat: String?
    @Option(name: .customShort("O"), help: "Output format (qcow2).")
    var outputFormat: String = "qcow2"
    @Flag(name: .customShort("c"), help: "Compress clusters (zlib level 6 unless -o says otherwise).")
    var compress = false
    @Option(name: .customShort("o"), help: "compression_type=zlib|zstd, cluster_size=N, compression_level=N, refcount_bits=N, backing_file=F, backing_fmt=F")
    var formatOptions: [String] = []
    @Flag(name: .customShort("p"), help: "Progress bar on stderr when it is a terminal.")
    var progress = false
    @Option(help: "Compression workers (default: all cores).")
    var threads: Int?
    @Option(name: .customLong("memory-limit"), help: "The engine's memory budget (default 256M).")
    var memoryLimit: String?
    @Option(help: "uring (default), pwrite or buffered.")
    var io: String?
    @Option(name: .customLong("output"), help: "human or json (a summary on stdout).")
    var output: OutputFormat = .human
    @Flag(help: "Overwrite an existing destination.")
    var force = false
    @Argument(help: "Source image.")
    var source: String
    @Argument(help: "Destination image.")
    var destination: String

    func run() throws {
        let o = try ImageOptionParser(formatOptions)
        guard outputFormat == "qcow2" else {
            throw QcowPressError.invalidArgument("output format '\(outputFormat)' is not supported (qcow2)")
        }
        if let f = sourceFormat, f != "raw" && f != "qcow2" {
            throw QcowPressError.invalidArgument("source format '\(f)' is not supported (raw, qcow2)")
        }
        let reader = try RawImageReader(path: source)
        let detected = try RawImageReader.detectFormat(path: source)
        if sourceFormat == "qcow2" && detected != "qcow2" {
            throw QcowPressError.inputDamaged(path: source, location: "magic at offset 0 is not QFI\\xfb (not a qcow2 image)")
        }
        if detected == "qcow2" && sourceFormat != "raw" {
            throw QcowPressError.unsupported(path: source, what: "qcow2 sources are not readable yet; pass -f raw to copy the file as raw")
        }
        var options = EncoderOptions(virtualSize: reader.size)
        try o.apply(to: &options, compress: compress)
        if let threads { options.threads = threads }
        if let m = memoryLimit { options.memoryLimit = try parseSize(m, what: "--memory-limit") }
        if let io {
            guard let mode = IOMode(rawValue: io) else {
                throw QcowPressError.invalidArgument("--io '\(io)' must be uring, pwrite or buffered")
            }
            options.ioMode = mode
        }
        options.overwrite = force
        let summary = try runEncoder(destination: destination, options: options, showProgress: progress) { enc in
            try reader.feed(enc)
        }
        if output == .json { print(try encodeJSON(summary)) }
    }
}

/// Runs an encoder with the command's conventions: SIGINT/SIGTERM cancel it (temporary output
/// removed, exit 130/143), a progress bar on a TTY, fallback notes once on stderr.
func runEncoder(destination: String, options: EncoderOptions, showProgress: Bool,
                feed: (Qcow2Encoder) throws -> Void) throws -> EncoderSummary {
    let signals = SignalWatcher.shared
    let encoder = try Qcow2Encoder(destination: destination, options: options)
    signals.onSignal = { encoder.cancel() }
    for n in encoder.fallbackNotes { writeStderr("qcowpress: note: \(n)\n") }
    let bar = showProgress && isatty(2) != 0 ? ProgressBar(total: options.virtualSize) { encoder.bytesReceived } : nil
    defer { bar?.stop() }
    do {
        try feed(encoder)
    } catch {
        encoder.cancel()
        throw error
    }
    return try encoder.finishBlocking()
}
