import ClusterCompression
import Logging
import Qcow2Format

extension StreamSink {
    /// What the writer thread works with besides its own state, handed over when it is made: the
    /// owners it talks to (each with its own lock) and the facts of the image it writes. The sink
    /// reaches nothing else.
    struct Parts: Sendable {
        /// Worker results, copies and ready regions; the counts the summary reports.
        let queue: ResultQueue
        /// Slots of results; each goes back once its bytes are placed, or when the sink stops.
        let pool: SlotPool
        /// The guest side: final states go in, waiting copies and complete regions come out.
        let map: GuestMap
        /// Where tables went and how far the file is on disk, for readers of the image being written.
        let written: WrittenImage
        /// The file and how it becomes final (rename, in place, or deferred to an `OutputSet`).
        let output: PendingOutput
        /// Claimed (finishing → committing) before the image goes into place.
        let lifecycle: Lifecycle
        /// How the encoder ends, once (its group membership, write buffers, and `finish()`).
        let ending: EncoderEnding
        let image: Image
        let report: Report
        let logger: Logger
    }

    /// The image being written: its shape, its header's fields and this image's write buffers
    /// (out of the group's memory plan).
    struct Image: Sendable {
        var geometry: ClusterGeometry
        var virtualSize: UInt64
        var refcountOrder: Int
        var backingFile: String?
        var backingFormat: String?
        var compressionType: CompressionSettings.Algorithm
        var writeBuffers: (count: Int, size: Int)
    }

    /// What the summary reports besides the sink's own counts.
    struct Report: Sendable {
        var destination: String
        var compression: String
        var threads: Int
        var memoryLimit: Int
        /// Monotonic nanoseconds when the encoder was made.
        var startTime: UInt64
        var notes: [String]
    }
}
