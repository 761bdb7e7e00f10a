import ArgumentParser
import Foundation
import QcowPress

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Convert a raw image to qcow2 (compressed with -c).")

    @Option(name: .customShort("f"), help: "Source format: raw or qcow2 (detected by magic when absent).")
    var sourceFormat: String?
    @Option(name: .customShort("O"), help: "Output format (qcow2).")
    var outputFormat: String = "qcow2"
    @OptionGroup var encoder: EncoderArguments
    @Argument(help: "Source image.")
    var source: String
    @Argument(help: "Destination image.")
    var destination: String

    func run() throws {
        _ = try ImageOptionParser(encoder.formatOptions)
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
        let options = try encoder.encoderOptions(virtualSize: reader.size)
        let summary = try runEncoder(destination: destination, options: options, showProgress: encoder.progress) { enc in
            try reader.feed(enc)
        }
        if encoder.output == .json { print(try encodeJSON(summary)) }
    }
}

/// Runs an encoder with the command's conventions: SIGINT/SIGTERM cancel it (temporary output
/// removed, exit 130/143), a progress bar on a TTY, fallback notes once on stderr.
func runEncoder(destination: String, options: EncoderOptions, showProgress: Bool,
                feed: (Qcow2Encoder) throws -> Void) throws -> EncoderSummary {
    let encoder = try Qcow2Encoder(destination: destination, options: options)
    watch(encoder)
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

/// Makes a signal cancel `encoder` (removing its temporary file) and says its fallbacks once.
func watch(_ encoder: Qcow2Encoder) {
    SignalWatcher.shared.add { encoder.cancel() }
    for n in encoder.fallbackNotes { writeStderr("qcowpress: note: \(n)\n") }
}
