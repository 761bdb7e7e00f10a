import ArgumentParser
import Logging
import Synchronization

let loggingReady = Mutex(false)
/// -q: the encoder's notes (fallbacks) are not printed. Set from the command's arguments before
/// any encoder starts (`EncoderArguments.encoderOptions`).
let quietNotes = Mutex(false)
import QcowPress

/// Options every command that writes qcow2 shares (convert, restore, export).
struct EncoderArguments: ParsableArguments {
    @Flag(name: .customShort("c"), help: "Compress clusters: zlib level 6 unless -o says otherwise, as qemu-img -c. (export always compresses, with zstd level 3 unless -o says otherwise; -c changes nothing there.)")
    var compress = false
    @Option(name: .customShort("o"), help: ArgumentHelp("Image options, key=value[,key=value...]: compression_type=zlib|zstd, compression_level=N, cluster_size=N, refcount_bits=N, backing_file=F, backing_fmt=F. -o help lists them.", valueName: "options"))
    var formatOptions: [String] = []
    @Flag(name: .customShort("p"), help: "Progress on stderr: a bar with rate and ETA on a terminal, otherwise a plain line at most every 10 s and one at the end.")
    var progressRequested = false
    @Flag(name: .customShort("q"), help: "Quiet, as qemu-img -q: no progress (even with -p) and no notes; warnings and errors still print.")
    var quiet = false
    @Option(help: ArgumentHelp("Compression workers (default: all cores).", valueName: "n"))
    var threads: Int?
    @Option(name: .customLong("memory-limit"), help: ArgumentHelp("The engine's memory budget, e.g. 512M (default 256M).", valueName: "size"))
    var memoryLimit: String?
    @Option(help: ArgumentHelp("Write path: uring (default; io_uring with O_DIRECT), pwrite or buffered. Falls back and says so.", valueName: "mode"), completion: .list(["uring", "pwrite", "buffered"]))
    var io: String?
    @Option(name: .customLong("output"), help: ArgumentHelp("human, or json for a summary on stdout.", valueName: "format"))
    var output: OutputFormat = .human
    @Flag(help: "Overwrite an existing destination (never the source, a file of its backing chain or the base).")
    var force = false
    @Flag(name: [.customShort("v"), .long], help: "Log what the engine does (stderr).")
    var verbose = false

    /// -p unless -q.
    var progress: Bool { progressRequested && !quiet }

    /// Sends the library's logs to stderr: warnings only, everything with -v.
    func setupLogging() {
        // bootstrap may run once per process.
        guard loggingReady.withLock({ let was = $0; $0 = true; return !was }) else { return }
        let level: Logger.Level = verbose ? .debug : .warning
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
    }

    /// Encoder options for an image of `size` bytes, with every argument checked.
    func encoderOptions(virtualSize size: UInt64, compressByDefault: Bool = false) throws -> EncoderOptions {
        setupLogging()
        quietNotes.withLock { $0 = quiet }
        let o = try ImageOptionParser(formatOptions)
        var options = EncoderOptions(virtualSize: size)
        try o.apply(to: &options, compress: compress || compressByDefault)
        if let threads { options.threads = threads }
        if let m = memoryLimit { options.memoryLimit = try parseSize(m, what: "--memory-limit") }
        if let io {
            guard let mode = IOMode(rawValue: io) else {
                throw QcowPressError.invalidArgument("--io '\(io)' must be uring, pwrite or buffered")
            }
            options.ioMode = mode
        }
        options.overwrite = force
        try options.validate()
        return options
    }
}
