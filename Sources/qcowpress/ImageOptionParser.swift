import QcowPress

/// The `-o key=value,...` options of qemu-img that QcowPress understands.
struct ImageOptionParser {
    static let knownKeys = ["compression_type", "cluster_size", "compression_level", "refcount_bits", "backing_file", "backing_fmt"]
    var values: [String: String] = [:]

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
