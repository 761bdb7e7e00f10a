import QcowPress

/// The `-o key=value,...` options of qemu-img that QcowPress understands.
struct ImageOptionParser {
    static let knownKeys = ["compression_type", "cluster_size", "compression_level", "refcount_bits", "backing_file", "backing_fmt"]
    var values: [String: String] = [:]

    /// `-o help` (or `-o ?`), as qemu-img: one line per option of the output format, key=<type>
    /// and what it does. QcowPress writes qcow2 (and raw with convert -O raw, which has none).
    static let qcow2Help: [(key: String, type: String, text: String)] = [
        ("backing_file", "str", "File name of a base image (as -B)"),
        ("backing_fmt", "str", "Image format of the base image (as -F)"),
        ("cluster_size", "size", "qcow2 cluster size: 512 to 2M, a power of two (default 64k)"),
        ("compression_level", "num", "With -c: zlib 1..9 (default 6), zstd 1..19 (default 3); not a qemu-img option"),
        ("compression_type", "str", "Compression method used for image cluster compression: zlib or zstd"),
        ("refcount_bits", "num", "Width of a reference count entry in bits: 1, 2, 4, 8, 16 (default), 32 or 64"),
    ]

    static func helpText(format: String) -> String {
        guard format == "qcow2" else { return "Supported \(format) options:\n  (none: QcowPress writes \(format) images without options)\n" }
        var s = "Supported qcow2 options:\n"
        for o in qcow2Help {
            let left = "\(o.key)=<\(o.type)>"
            s += "  " + left + String(repeating: " ", count: max(0, 22 - left.count)) + " - " + o.text + "\n"
        }
        return s
    }

    /// The `-o help` listing when the command line asks for it (`convert`, `export`, `restore pbs`,
    /// `restore vma` with `-o help` or `-o ?`, alone or among other options), before the usual
    /// parsing: as with qemu-img, no files need be named. Nil when it does not ask.
    static func helpRequested(in args: [String]) -> Result<String, QcowPressError>? {
        let path = CommandWords.commandPath(in: args)
        guard path == ["convert"] || path == ["export"] || path == ["restore", "pbs"] || path == ["restore", "vma"] else { return nil }
        func values(of option: String) -> [String] {
            var out: [String] = []
            var i = path.count
            while i < args.count {
                let a = args[i]
                if a == "--" { break }
                if a == option, i + 1 < args.count {
                    out.append(args[i + 1])
                    i += 2
                    continue
                }
                if a.hasPrefix(option + "=") { out.append(String(a.dropFirst(option.count + 1))) }
                i += 1
            }
            return out
        }
        let asks = values(of: "-o").contains { v in v.split(separator: ",").contains { $0 == "help" || $0 == "?" } }
        guard asks else { return nil }
        let format = path == ["convert"] ? values(of: "-O").last ?? "qcow2" : "qcow2"
        guard format == "qcow2" || format == "raw" else {
            return .failure(.invalidArgument("output format '\(format)' is not supported (qcow2, raw)"))
        }
        return .success(helpText(format: format))
    }

    init(_ args: [String]) throws {
        for arg in args {
            for pair in arg.split(separator: ",", omittingEmptySubsequences: true) {
                let kv = pair.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2, !kv[1].isEmpty else {
                    throw QcowPressError.invalidArgument("-o '\(pair)' must be key=value")
                }
                guard Self.knownKeys.contains(kv[0]) else {
                    throw QcowPressError.invalidArgument("-o: unknown option '\(kv[0])' (known: \(Self.knownKeys.joined(separator: ", ")))")
                }
                values[kv[0]] = kv[1]
            }
        }
    }

    func apply(to o: inout EncoderOptions, compress: Bool) throws {
        if let cs = values["cluster_size"] {
            o.clusterSize = try parseSize(cs, what: "cluster_size")
        }
        var algorithm = CompressionSettings.Algorithm.zlib
        if let t = values["compression_type"] {
            guard let a = CompressionSettings.Algorithm(rawValue: t) else {
                throw QcowPressError.invalidArgument("compression_type '\(t)' must be zlib or zstd")
            }
            algorithm = a
        }
        var level: Int? = nil
        if let l = values["compression_level"] {
            guard let n = Int(l) else { throw QcowPressError.invalidArgument("compression_level '\(l)' is not a number") }
            level = n
        }
        if compress {
            o.compression = CompressionSettings(algorithm: algorithm, level: level)
        } else {
            if level != nil { throw QcowPressError.invalidArgument("compression_level needs -c") }
            o.headerCompressionType = algorithm
        }
        if let r = values["refcount_bits"] {
            guard let n = Int(r), n > 0, n & (n - 1) == 0, n <= 64 else {
                throw QcowPressError.invalidArgument("refcount_bits '\(r)' must be 1, 2, 4, 8, 16, 32 or 64")
            }
            o.refcountOrder = n.trailingZeroBitCount
        }
        if let b = values["backing_file"] {
            o.backingFile = b
            o.backingFormat = values["backing_fmt"]
        }
    }
}
