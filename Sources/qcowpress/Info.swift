import ArgumentParser
import Foundation
import QcowPress

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show an image's header fields, named as qemu-img info names them.")

    @Option(name: .customShort("f"), help: ArgumentHelp("Image format: \(ImageFormat.readable.joined(separator: ", ")) (probed by magic when absent). As in qemu-img, -f qcow2 on a file that is not qcow2 is an error and -f raw shows any file as raw.", valueName: "format"),
            completion: .list(ImageFormat.readable))
    var format: String?
    @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain, top first (with --output json: a list).")
    var backingChain = false
    @Option(name: .customLong("output"), help: ArgumentHelp("Output format, as qemu-img --output.", valueName: "format"))
    var output: OutputFormat = .human
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp)
    var forceShare = false

    @Argument(help: "The image.", completion: .file())
    var image: String

    func validate() throws {
        if let format, !ImageFormat.readable.contains(format) { throw ValidationError("-f '\(format)': the format is one of \(ImageFormat.readable.joined(separator: ", "))") }
    }

    func run() throws {
        // As qemu-img info: a qcow2's metadata is locked against writers, a raw file not at all.
        // The format probed once here (a foreign one refused), not again by the lock.
        let locks = try lockForReading([(image, backingChain)], forceShare: forceShare, purpose: .inspect,
                                       format: format ?? ImageFormat.resolve(path: image, given: nil))
        defer { locks.release() }
        if format == "qcow2", try RawImageReader.detectFormat(path: image) != "qcow2" { throw notQcow2(image) }
        let infos = backingChain ? try ImageInfo.chain(path: image, format: format) : [try ImageInfo(path: image, format: format)]
        for i in infos where i.formatSpecific?.qcow2?.corrupt == true { warnMarkedCorrupt(i.filename) }
        switch (output, backingChain) {
        case (.human, _): print(infos.map(\.text).joined(separator: "\n"), terminator: "")
        case (.json, false): print(try encodeJSON(infos[0]))
        case (.json, true): print(try encodeJSON(infos))
        }
    }
}

/// The warning for a qcow2 whose corrupt bit is set (read anyway, read-only, as qemu-img reads it).
func warnMarkedCorrupt(_ path: String) {
    writeStderr("qcowpress: warning: \(path): the image is marked corrupt (corrupt bit, incompatible_features bit 1, is set); reading it read-only — data may be damaged, see qemu-img check\n")
}

func encodeJSON<T: Encodable>(_ v: T) throws -> String {
    let e = JSONEncoder()
    e.outputFormatting = [.prettyPrinted, .sortedKeys]
    return String(decoding: try e.encode(v), as: UTF8.self)
}

/// One JSON value on one line (JSON lines: a command that prints several values as it goes).
func encodeJSONLine<T: Encodable>(_ v: T) throws -> String {
    let e = JSONEncoder()
    e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try e.encode(v), as: UTF8.self)
}
