import ArgumentParser
import Logging
import Synchronization

let loggingReady = Mutex(false)
import QcowPress

/// Options every command that writes qcow2 shares (convert, restore, export).
struct EncoderArguments: ParsableArguments {
    @Flag(name: .customShort("c"), help: "Compress clusters (zlib level 6 unless -o says otherwise).")
    var compress = false
    @Option(name: .customShort("o"), help: "compression_type=zlib|zstd, cluster_size=N, compression_level=N, refcount_bits=N")
    var formatOptions: [String] = []
    @Flag(name: .customShort("p"), help: "Progress bar on stderr when it is a terminal.")
    var progress = false
    @Option(help: "Compression workers (default: all cores).")
    var threads: Int?
    @Option(name: .customLong("memory-limit"), help: "The engine's memory budget (default 256M).")
    var memoryLimit: String?
    @Option(help: "uring (default), pwrite or buffered.", completion: .list(["uring", "pwrite", "buffered"]))
    var io: String?
    @Option(name: .customLong("output"), help: "human or json (a summary on stdout).")
    var output: OutputFormat = .human
    @Flag(help: "Overwrite existing destinations.")
    var force = false
    @Flag(name: [.customShort("v"), .long], help: "Log what the engine does (stderr).")
    var verbose = false

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
