import ArgumentParser
import Foundation
import QcowPress

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check a qcow2 image's metadata as qemu-img check does (never repairs). Exit 0 clean, 1 check errors (unreadable metadata), 2 corruption, 3 leaks.")

    @Option(name: .customLong("output"), help: "human or json")
    var output: OutputFormat = .human
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: "Read an image in use, as qemu-img -U. QcowPress never locks images, so this is always so.")
    var forceShare = false
    @Argument(help: "The image.", completion: .file())
    var image: String

    func run() throws {
        guard try RawImageReader.detectFormat(path: image) == "qcow2" else { throw notQcow2(image) }
        let r = try Qcow2Checker(path: image).run()
        switch output {
        case .human: print(r.text, terminator: "")
        case .json: print(try encodeJSON(r))
        }
        if r.exitStatus != 0 { throw ExitCode(r.exitStatus) }
    }
}
