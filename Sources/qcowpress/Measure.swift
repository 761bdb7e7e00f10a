import ArgumentParser
import Foundation
import QcowPress

struct Measure: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compute the size a qcow2 (or raw) image of an input needs, as qemu-img measure.",
        discussion: """
            'required' (the input's data clusters and the metadata of a fully allocated image) and \
            'fully-allocated' are qemu-img measure's numbers for the same input and -o options. \
            With -c also 'compressed': the size a 'convert -c' with the same -o would write, \
            estimated by compressing a seeded random sample of the input's data clusters (spread \
            over the whole image) with the encoder's codec and level, scaled to the number of data \
            clusters, plus the metadata; and 'compressed-error', the estimate's relative error at \
            95 % confidence (0.02: within 2 %). The default output format is qcow2 (qemu-img's is raw).
            """)

    @Option(name: .customShort("f"), help: ArgumentHelp("Input format: \(ImageFormat.readable.joined(separator: ", ")) (probed by magic when absent; a fixed VHD needs -f vpc).", valueName: "format"),
            completion: .list(ImageFormat.readable))
    var format: String?
    @Option(name: .customShort("O"), help: ArgumentHelp("Output format: qcow2 (default) or raw.", valueName: "format"), completion: .list(["qcow2", "raw"]))
    var outputFormat = "qcow2"
    @Flag(name: .customShort("c"), help: "Also estimate the size of a compressed conversion (convert -c).")
    var compress = false
    @Option(name: .customShort("o"), help: ArgumentHelp("qcow2 options, key=value[,...]: cluster_size, refcount_bits, extended_l2=on|off, preallocation=off|metadata|falloc|full, compat=0.10|1.1, backing_file, backing_fmt, compression_type=zlib|zstd and compression_level (for -c).", valueName: "options"))
    var options: [String] = []
    @Option(name: .customLong("size"), help: ArgumentHelp("Measure a new empty image of this size (k, M, G, T suffixes) instead of an input image.", valueName: "size"))
    var size: String?
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp)
    var forceShare = false
    @Option(name: .customLong("output"), help: ArgumentHelp("human or json, as qemu-img --output.", valueName: "format"))
    var output: OutputFormat = .human
    @Argument(help: "The input image (or --size).", completion: .file())
    var image: String?

    func validate() throws {
        if size != nil && image != nil { throw ValidationError("--size N cannot be used together with a filename.") }
        if size == nil && image == nil { throw ValidationError("Either --size N or one filename must be specified.") }
        guard outputFormat == "qcow2" || outputFormat == "raw" else {
            throw ValidationError("-O '\(outputFormat)': QcowPress measures qcow2 and raw output")
        }
        if compress && outputFormat == "raw" { throw ValidationError("-c needs -O qcow2: raw images cannot be compressed") }
        if compress && size != nil { throw ValidationError("-c estimates from an input's data: name an image instead of --size") }
    }

    func run() throws {
        var o = MeasureOptions()
        var compat3 = true
        var level: Int?
        for arg in options {
            for pair in arg.split(separator: ",") {
                let kv = pair.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2, !kv[1].isEmpty else { throw QcowPressError.invalidArgument("-o '\(pair)' must be key=value") }
                let (k, v) = (kv[0], kv[1])
                switch k {
                case "cluster_size":
                    let n = try parseSize(v, what: "cluster_size")
                    guard n >= 512, n <= 2 << 20, n & (n - 1) == 0 else {
                        throw QcowPressError.invalidArgument("cluster_size '\(v)' must be a power of two between 512 and 2M")
                    }
                    o.clusterSize = n
                case "refcount_bits":
                    guard let n = Int(v), n > 0, n <= 64, n & (n - 1) == 0 else {
                        throw QcowPressError.invalidArgument("refcount_bits '\(v)' must be 1, 2, 4, 8, 16, 32 or 64")
                    }
                    o.refcountOrder = n.trailingZeroBitCount
                case "extended_l2":
                    guard v == "on" || v == "off" else { throw QcowPressError.invalidArgument("extended_l2 '\(v)' must be on or off") }
                    o.extendedL2 = v == "on"
                case "preallocation":
                    guard ["off", "metadata", "falloc", "full"].contains(v) else {
                        throw QcowPressError.invalidArgument("preallocation '\(v)' must be off, metadata, falloc or full")
                    }
                    o.fullPreallocation = v == "falloc" || v == "full"
                case "compat":
                    guard ["0.10", "v2", "1.1", "v3"].contains(v) else { throw QcowPressError.invalidArgument("compat '\(v)' must be 0.10 or 1.1") }
                    compat3 = v == "1.1" || v == "v3"
                case "backing_file": o.hasBackingFile = true
                case "backing_fmt": break
                case "compression_type":
                    guard let a = CompressionSettings.Algorithm(rawValue: v) else {
                        throw QcowPressError.invalidArgument("compression_type '\(v)' must be zlib or zstd")
                    }
                    o.compression = CompressionSettings(algorithm: a, level: level)
                case "compression_level":
                    guard let n = Int(v) else { throw QcowPressError.invalidArgument("compression_level '\(v)' is not a number") }
                    level = n
                default:
                    throw QcowPressError.invalidArgument("-o: unknown option '\(k)' (known: cluster_size, refcount_bits, extended_l2, preallocation, compat, backing_file, backing_fmt, compression_type, compression_level)")
                }
            }
        }
        if let level {
            guard CompressionSettings.levelRange(o.compression.algorithm).contains(level) else {
                throw QcowPressError.invalidArgument("compression_level \(level) is out of range for \(o.compression.algorithm.rawValue) (\(CompressionSettings.levelRange(o.compression.algorithm)))")
            }
            o.compression.level = level
        }
        if o.extendedL2 && o.clusterSize < 16384 {
            throw QcowPressError.invalidArgument("extended_l2 needs a cluster size of at least 16k (as qemu-img)")
        }
        var m: ImageMeasurement
        if let size {
            let n = UInt64(try parseSize(size, what: "--size"))
            m = outputFormat == "raw" ? ImageMeasure.raw(size: n) : try ImageMeasure.qcow2(size: n, options: o)
        } else if let image {
            try ImageFormat.validate(format)
            let locks = try lockForReading([], forceShare: forceShare)
            defer { locks.release() }
            let f = try ImageFormat.resolve(path: image, given: format)
            try locks.lock(image, backingChain: true, format: f)
            let img = try openImage(image, format: f, openBacking: true)
            if outputFormat == "raw" {
                m = ImageMeasure.raw(size: img.virtualSize)
            } else {
                var bitmaps: UInt64?
                if compat3, let q = img as? Qcow2Image { bitmaps = try ImageMeasure.bitmapsSize(of: q, clusterSize: UInt64(o.clusterSize)) }
                m = try ImageMeasure.qcow2(image: img, options: o, bitmaps: bitmaps)
                if compress {
                    let e = try CompressedEstimate.estimate(img, options: o)
                    m.compressed = e.bytes
                    m.compressedError = e.error
                }
            }
        } else {
            return
        }
        print(Self.render(m, json: output == .json))
    }

    /// qemu-img measure's output (its key order: bitmaps first in JSON, last in the table).
    static func render(_ m: ImageMeasurement, json: Bool) -> String {
        let error = m.compressedError.map { String(format: "%.4f", $0) }
        if json {
            var lines: [String] = []
            if let b = m.bitmaps { lines.append("    \"bitmaps\": \(b)") }
            lines.append("    \"required\": \(m.required)")
            lines.append("    \"fully-allocated\": \(m.fullyAllocated)")
            if let c = m.compressed, let error {
                lines.append("    \"compressed\": \(c)")
                lines.append("    \"compressed-error\": \(error)")
            }
            return "{\n" + lines.joined(separator: ",\n") + "\n}"
        }
        var s = "required size: \(m.required)\nfully allocated size: \(m.fullyAllocated)"
        if let b = m.bitmaps { s += "\nbitmaps size: \(b)" }
        if let c = m.compressed, let error { s += "\ncompressed size: \(c)\ncompressed size error: \(error)" }
        return s
    }
}
