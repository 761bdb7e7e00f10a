import ArgumentParser
import QcowPress

struct Map: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show how an image's guest bytes map to its file, as qemu-img map.",
        discussion: """
            --output json prints qemu-img map's list: one entry per merged run (start, length, \
            depth in the backing chain, present, zero, data, and offset where the bytes lie in a \
            file as they are: not for compressed clusters or runs without a place). The human \
            table lists the data runs (Offset, Length, Mapped to, File) and, as qemu-img, refuses \
            an image with compressed clusters (they have no place to show): use --output json.
            """)

    @Option(name: .customShort("f"), help: ArgumentHelp("Image format: \(ImageFormat.readable.joined(separator: ", ")) (probed by magic when absent; a fixed VHD needs -f vpc).", valueName: "format"),
            completion: .list(ImageFormat.readable))
    var format: String?
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp)
    var forceShare = false
    @Option(name: .customLong("output"), help: ArgumentHelp("human or json, as qemu-img --output.", valueName: "format"))
    var output: OutputFormat = .human
    @Argument(help: "The image.", completion: .file())
    var image: String

    func run() throws {
        try ImageFormat.validate(format)
        let locks = try lockForReading([], forceShare: forceShare)
        defer { locks.release() }
        let f = try ImageFormat.resolve(path: image, given: format)
        try locks.lock(image, backingChain: true, format: f)
        let img = try openImage(image, format: f, openBacking: true)
        var out = ""
        func flush(_ force: Bool) {
            if force || out.utf8.count >= 1 << 16 {
                print(out, terminator: "")
                out = ""
            }
        }
        switch output {
        case .json:
            out = "["
            try ImageMap.walk(img, human: false) { e, last in
                out += e.json + (last ? "]\n" : ",\n")
                flush(last)
            }
        case .human:
            out = "Offset          Length          Mapped to       File\n"
            try ImageMap.walk(img, human: true) { e, _ in
                if e.data && e.offset == nil {
                    flush(true)
                    throw QcowPressError.unsupported(path: image, what: "compressed clusters at offset \(e.start) (they have no place in a file to show; --output json lists them)")
                }
                if let line = e.humanLine { out += line + "\n" }
                flush(false)
            }
            flush(true)
        }
    }
}
