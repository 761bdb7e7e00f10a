import CISAL
import CZstd
/// What compressing one cluster produced.
public enum CompressionResult: Sendable, Equatable {
    /// `length` bytes of compressed data were written to the destination (always < cluster size).
    case compressed(length: Int)
    /// The compressed form would not be smaller than `cluster size − 1`: store the cluster raw.
    /// This is a normal outcome (QEMU does the same), not an error.
    case didNotFit
}

/// A decompression failure: the stream is damaged or does not produce exactly one cluster.
public struct DecompressionError: Error, Sendable, CustomStringConvertible {
    public var codec: String
    public var reason: String
    public init(codec: String, reason: String) {
        self.codec = codec
        self.reason = reason
    }
    public var description: String { "\(codec) data does not decompress: \(reason)" }
}

/// The codec and level a qcow2 image is written with.
public struct CompressionSettings: Sendable, Equatable, CustomStringConvertible {
    public enum Algorithm: String, Sendable { case zlib, zstd }
    public var algorithm: Algorithm
    /// zlib 1…9 (1 selects the fastest QEMU-readable deflate: ISA-L level 1 with a 4 KiB history);
    /// zstd 1…19.
    public var level: Int

    public init(algorithm: Algorithm, level: Int? = nil) {
        self.algorithm = algorithm
        self.level = level ?? Self.defaultLevel(algorithm)
    }

    /// QEMU's levels: zlib 6 (`Z_DEFAULT_COMPRESSION` is what qcow2 uses), zstd 3.
    public static func defaultLevel(_ a: Algorithm) -> Int { a == .zlib ? 6 : 3 }
    public static func levelRange(_ a: Algorithm) -> ClosedRange<Int> { a == .zlib ? 1...9 : 1...19 }

    /// The implementation that runs for these settings.
    public var implementation: String {
        switch algorithm {
        case .zlib: level == 1 ? "isa-l igzip level 1, 4 KiB history" : "zlib level \(level), 4 KiB window"
        case .zstd: "zstd level \(level)\(level == 3 ? " (hashLog 12 for clusters up to 64 KiB)" : "")"
        }
    }
    public var description: String { "\(algorithm.rawValue) level \(level)" }
}

/// Compresses single clusters. Each worker owns one instance (contexts are reused, never shared).
public protocol ClusterCompressor: AnyObject {
    /// Compresses `source` (one whole cluster) into `destination`, whose capacity must be at least
    /// `source.count − 1`; output longer than that is reported as ``CompressionResult/didNotFit``.
    func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> CompressionResult
}

/// Decompresses one cluster from the front of `source` (trailing bytes are ignored, as QEMU does).
public protocol ClusterDecompressor: AnyObject {
    func decompress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) throws(DecompressionError)
}

public enum Codecs {
    /// Memory one worker's compression context takes for these settings and cluster size (the
    /// memory plan counts it). zstd: libzstd's own estimate, which equals `ZSTD_sizeof_CCtx` after
    /// compressing one cluster (measured here: 64 KiB clusters 304 KB at level 1, 664 KB at 3,
    /// 1.8 MB at 19; 2 MiB clusters 1.3 MB at 3, 35 MB at 19). zlib with a 4 KiB window and
    /// memLevel 8: zlib's documented (1 << (windowBits + 2)) + (1 << (memLevel + 9)) plus its state.
    /// ISA-L level 1: the level buffer it is given.
    public static func contextBytes(_ s: CompressionSettings, clusterSize: Int) -> Int {
        switch s.algorithm {
        case .zstd:
            var p = ZSTD_getCParams(Int32(s.level), UInt64(clusterSize), 0)
            if let h = ZstdClusterCompressor.tunedHashLog(level: s.level, clusterSize: clusterSize) { p.hashLog = UInt32(h) }
            return ZSTD_estimateCCtxSize_usingCParams(p)
        case .zlib where s.level == 1: return Int(CISAL_LVL1_BUF_SIZE) + 16 << 10
        case .zlib: return (1 << 14) + (1 << 17) + 8 << 10
        }
    }

    /// A compressor with its own context, for one worker thread.
    public static func makeCompressor(_ s: CompressionSettings, clusterSize: Int) -> any ClusterCompressor {
        switch s.algorithm {
        case .zlib where s.level == 1: IsalDeflateCompressor(clusterSize: clusterSize)
        case .zlib: ZlibDeflateCompressor(level: s.level)
        case .zstd: ZstdClusterCompressor(level: s.level, clusterSize: clusterSize)
        }
    }

    public static func makeDecompressor(_ a: CompressionSettings.Algorithm) -> any ClusterDecompressor {
        switch a {
        case .zlib: ZlibInflateDecompressor()
        case .zstd: ZstdClusterDecompressor()
        }
    }
}
