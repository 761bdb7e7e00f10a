import ArgumentParser
import Foundation
import QcowPress

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show an image's header fields, named as qemu-img info names them.")

    @Option(name: .customLong("output"), help: "human or json")
    var output: OutputFormat = .human
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: "Read an image in use, as qemu-img -U. QcowPress never locks images, so this is always so.")
    var forceShare = false

    @Argument(help: "The image.", completion: .file())
    var image: String

    func run() throws {
        let info = try ImageInfo(path: image)
        switch output {
        case .human: print(info.text, terminator: "")
        case .json: print(try encodeJSON(info))
        }
    }
}

func encodeJSON<T: Encodable>(_ v: T) throws -> String {
    let e = JSONEncoder()
    e.outputFormatting = [.prettyPrinted, .sortedKeys]
    return String(decoding: try e.encode(v), as: UTF8.self)
}
