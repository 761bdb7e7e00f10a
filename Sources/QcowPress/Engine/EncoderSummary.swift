/// What an encoder did, as `--output json` prints it.
public struct EncoderSummary: Sendable, Codable, Equatable {
    public var destination: String
    public var virtualSize: UInt64
    public var clusterSize: Int
    /// "none", or the codec and level, e.g. "zstd level 3".
    public var compression: String
    /// Guest bytes handed to the engine (written or announced as zero).
    public var bytesIn: UInt64
    /// Size of the image file.
    public var bytesOut: UInt64
    public var clustersZero: UInt64
    public var clustersCompressed: UInt64
    public var clustersUncompressed: UInt64
    /// Clusters that point at host clusters written for an identical earlier cluster (no bytes written).
    public var clustersShared: UInt64
    /// CPU seconds spent in the codec, summed over workers.
    public var codecSeconds: Double
    /// Seconds producers waited for memory (back-pressure).
    public var producerStallSeconds: Double
    /// Seconds the writer waited for the disk (write completions).
    public var diskBusySeconds: Double
    public var wallSeconds: Double
    public var threads: Int
    public var memoryLimit: Int
    /// Peak resident set of the process, bytes.
    public var peakRSSBytes: Int
    /// "io_uring, O_DIRECT", "pwrite thread, O_DIRECT", "pwrite thread, buffered", …
    public var ioMode: String
    /// Fallbacks taken (each also said once on stderr by the command).
    public var notes: [String]
    /// Partly written clusters that memory could not hold and were assembled in the spill file
    /// beside the destination (writes far out of order into large clusters).
    public var clustersSpilled: UInt64 = 0
    /// The most bytes the spill file held on disk at once.
    public var spillPeakBytes: UInt64 = 0
}
