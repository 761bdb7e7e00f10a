import ArgumentParser
import Foundation
import QcowPress

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check a qcow2 image's metadata as qemu-img check does (never repairs). Problem lines go to stderr, the summary to stdout. Exit 0 clean, 1 check errors (unreadable metadata), 2 corruption (also a truncated image or tables past its end), 3 leaks, 63 a raw image (no metadata to check).")

    @Option(name: .customShort("f"), help: ArgumentHelp("Image format: qcow2, or raw (which has nothing to check: exit 63, as qemu-img). Detected by magic when absent; -f qcow2 on a file that is not qcow2 is an error.", valueName: "format"),
            completion: .list(["raw", "qcow2"]))
    var format: String?
    @Option(name: .customLong("output"), help: ArgumentHelp("Output format, as qemu-img --output.", valueName: "format"))
    var output: OutputFormat = .human
    @Flag(name: .customShort("q"), help: "Quiet: nothing on stdout (the exit status tells), as qemu-img check -q; problem lines still go to stderr.")
    var quiet = false
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp)
    var forceShare = false
    @Argument(help: "The image.", completion: .file())
    var image: String

    /// qemu-img's exit status for "this image format does not support checks".
    static let unsupportedFormat: Int32 = 63

    func validate() throws {
        if let format, !ImageFormat.readable.contains(format) { throw ValidationError("-f '\(format)': the format is one of \(ImageFormat.readable.joined(separator: ", "))") }
    }

    func run() throws {
        let detected = try ImageFormat.resolve(path: image, given: format)
        // As qemu-img check: a raw image's lock shares everything (there is nothing to check).
        let locks = try lockForReading([(image, false)], forceShare: forceShare || (format ?? detected) == "raw")
        defer { locks.release() }
        if format == "qcow2" && detected != "qcow2" { throw notQcow2(image) }
        if (format ?? detected) != "qcow2" {
            let why = detected != "raw" ? "a \(detected) image (QcowPress checks qcow2 metadata only)" : format == nil ? "a raw image (no qcow2 magic at offset 0)" : "a raw image (-f raw)"
            writeStderr("qcowpress: \(image): \(why): this image format does not support checks\n")
            throw ExitCode(Self.unsupportedFormat)
        }
        let r = try Qcow2Checker(path: image).run()
        // As qemu-img: the problem lines on stderr, the counts on stdout (nothing there with -q).
        if !r.messages.isEmpty { writeStderr(r.messages.map { $0 + "\n" }.joined()) }
        if !quiet {
            switch output {
            case .human: print(r.text, terminator: "")
            case .json: print(try encodeJSON(r))
            }
        }
        if r.exitStatus != 0 { throw ExitCode(r.exitStatus) }
    }
}
