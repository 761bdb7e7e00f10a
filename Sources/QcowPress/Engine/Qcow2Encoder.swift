import ClusterCompression
import DirectIO
import Glibc
import Logging
import Qcow2Format

/// Writes a qcow2 image from data arriving in any order, from any number of producers at once.
///
/// ```
/// producers ──write()──► assembly (slots) ──► workers (zero test, compress) ──► writer thread
///                                                                     packs buffers, io_uring/pwrite
/// ```
/// Writes may have any offset and length; a cluster may be completed by several writes; bytes never
/// written read as zero. Producers wait only when the memory budget is used up. Until ``finish()``
/// returns, the image lives under a temporary name next to the destination and its first cluster
/// holds no header, so nothing at the destination looks like a finished image.
///
/// Threads: `threads` compression workers and one writer that alone owns the output stream, the
/// ring and the refcounts. State has one owner each, with its own lock, and no lock is taken while
/// holding another: `GuestMap` (guest side), `ResultQueue` (to the writer), `Lifecycle`, the
/// group's job queue and slot pool; the host side (`StreamSink`) belongs to the writer thread.
public final class Qcow2Encoder: Sendable {
    public let destination: String
    /// The file being written and how it becomes final (rename of a temporary file, or in place).
    let output: PendingOutput
    let options: EncoderOptions
    let geometry: ClusterGeometry
    let plan: MemoryPlan
    /// This image's write buffers, out of the group's plan.
    let writeBuffers: (count: Int, size: Int)
    let file: OutputFile
    var pool: SlotPool { group.pool }
    let clusterSize: Int
    let guestClusters: UInt64
    let startTime = monotonicNanoseconds()

    /// The guest side: tables in flight, partial clusters, waiting copies (its own lock).
    let map: GuestMap
    /// Results, copies and ready regions on their way to the writer thread (its own lock).
    let queue = ResultQueue()
    /// open → finishing → committing → done, or failed (its own lock).
    let lifecycle = Lifecycle()
    /// How the encoder ends (done or failed, once), for every thread that ends it.
    let ending: EncoderEnding
    /// What `finish()` waits for (the ending resolves it).
    var completion: Completion<EncoderSummary> { ending.completion }
    /// Where written tables went and how far the file is on disk, for reading back (its own lock).
    let written: WrittenImage
    /// Partly written clusters beyond what the slots may hold (made on first use; its own lock).
    let spill: SpillFile

    /// A complete cluster in a slot. `checkedNonZero`: the intake already found non-zero bytes.
    struct WorkItem { var cluster: UInt64; var slot: Int32; var checkedNonZero = false }
    let group: EncoderGroup

    /// The library never prints; it logs through swift-log (the command installs a handler).
    let logger = Logger(label: "qcowpress.encoder")
    /// Fallbacks taken when the encoder was made.
    let notes: [String]

    /// Creates the image (under a temporary name) and starts the worker and writer threads.
    public init(destination: String, options: EncoderOptions) throws(QcowPressError) {
        try options.validate()
        let target = try OutputTarget(destination: destination, overwrite: options.overwrite, protecting: options.protectedInputs)
        self.destination = destination
        self.options = options
        geometry = ClusterGeometry(clusterSize: options.clusterSize)!
        clusterSize = options.clusterSize
        guestClusters = geometry.guestClusters(forVirtualSize: options.virtualSize)
        let (g, size, cs) = (geometry, options.virtualSize, UInt64(options.clusterSize))
        written = WrittenImage(regions: Int(g.l1Entries(forVirtualSize: size)))
        spill = SpillFile(clusterSize: options.clusterSize, destination: destination)
        map = GuestMap(geometry: g, guestClusters: guestClusters, zeroNeedsEntry: options.backingFile != nil) { c in
            Int(min(cs, size - (c << UInt64(g.clusterBits))))
        }
        if let g = options.group {
            guard g.clusterSize == options.clusterSize, g.compression == options.compression else {
                throw .invalidArgument("an encoder group's cluster size and compression must match its encoders'")
            }
            group = g
        } else {
            group = try EncoderGroup(options: options)
        }
        plan = group.plan
        let owner = group
        do throws(QcowPressError) {
            writeBuffers = try group.reserveWriteBuffers()
        } catch {
            if owner.ownedByOneEncoder { owner.shutdown() }
            throw error
        }
        do throws(QcowPressError) {
            output = try target.open(direct: options.ioMode != .buffered, zeroFirstBytes: options.clusterSize)
        } catch {
            owner.releaseWriteBuffers(writeBuffers.count * writeBuffers.size)
            if owner.ownedByOneEncoder { owner.shutdown() }
            throw error
        }
        file = output.file
        var notes: [String] = []
        if group.threads < options.threads {
            notes.append("\(group.threads) compression threads instead of \(options.threads): the memory limit holds no more")
        }
        if options.ioMode != .buffered && !file.direct {
            notes.append("O_DIRECT refused by the file system; using buffered writes with the page cache dropped behind")
        }
        let (writer, note) = makeBufferWriter(file, mode: options.ioMode, queueDepth: MemoryPlan.bufferCount * 2)
        if let note { notes.append(note) }
        self.notes = notes
        ending = EncoderEnding(lifecycle: lifecycle, group: group, writeBufferBytes: writeBuffers.count * writeBuffers.size,
                               map: map, queue: queue, output: output, logger: logger, destination: destination,
                               spill: spill)
        let sink = StreamSink(parts: sinkParts(), writer: writer)
        logger.debug("encoder started", metadata: ["destination": "\(destination)", "io": "\(writer.modeDescription)",
                                                   "slots": "\(plan.slotCount)", "threads": "\(group.threads)",
                                                   "writeBuffers": "\(writeBuffers.count) × \(writeBuffers.size)"])
        for n in notes { logger.info("\(n)") }
        group.join(ending.member)
        startThread(name: "qp-writer") { sink.run() }
    }

    /// What the writer thread works with: the owners it talks to and the facts it writes.
    private func sinkParts() -> StreamSink.Parts {
        StreamSink.Parts(
            queue: queue, pool: pool, map: map, written: written, output: output, lifecycle: lifecycle, ending: ending,
            image: StreamSink.Image(geometry: geometry, virtualSize: options.virtualSize, refcountOrder: options.refcountOrder,
                                    backingFile: options.backingFile, backingFormat: options.backingFormat,
                                    compressionType: compressionType, writeBuffers: writeBuffers),
            report: StreamSink.Report(destination: destination, compression: options.compression?.description ?? "none",
                                      threads: options.threads, memoryLimit: options.memoryLimit, startTime: startTime,
                                      notes: notes),
            logger: logger)
    }

    /// The header's compression type: how every compressed cluster of the image decodes (ISA-L
    /// writes zlib's format).
    var compressionType: CompressionSettings.Algorithm {
        (options.compression?.algorithm ?? options.headerCompressionType) == .zstd ? .zstd : .zlib
    }

    /// Guest bytes a cluster holds (the last one may be short).
    @inline(__always)
    func validBytes(_ c: UInt64) -> Int {
        let start = c << UInt64(geometry.clusterBits)
        return Int(min(UInt64(clusterSize), options.virtualSize - start))
    }

    /// True once the encoder failed or was cancelled (workers drop its clusters).
    var isStopped: Bool { lifecycle.isFailed }

    /// The image's virtual size.
    public var virtualSize: UInt64 { options.virtualSize }

    /// Fallbacks the engine took (io_uring → pwrite, O_DIRECT → buffered).
    public var fallbackNotes: [String] { notes }

    /// Guest bytes written or announced so far (for progress).
    public var bytesReceived: UInt64 { queue.bytesIn }

    /// Guest bytes from the start of the image whose clusters all reached the output (placed in
    /// a write buffer, or zero): progress that only moves over finished work, in guest order.
    public var bytesDone: UInt64 {
        min(options.virtualSize, map.clustersDoneInOrder << UInt64(geometry.clusterBits))
    }
}

/// A one-shot result that async tasks and OS threads can both wait for.
final class Completion<T: Sendable>: Sendable {
    private struct State {
        var value: Result<T, QcowPressError>?
        var waiters: [CheckedContinuation<Result<T, QcowPressError>, Never>] = []
    }
    private let state = ConditionMutex(State())

    func resolve(_ r: Result<T, QcowPressError>) {
        let w = state.withLock { s -> [CheckedContinuation<Result<T, QcowPressError>, Never>] in
            if s.value != nil { return [] }
            s.value = r
            let w = s.waiters
            s.waiters = []
            return w
        }
        state.broadcast()
        for c in w { c.resume(returning: r) }
    }
    func waitBlocking() -> Result<T, QcowPressError> {
        state.withLock(waitingUntil: { $0.value != nil }) { $0.value! }
    }
    func wait() async -> Result<T, QcowPressError> {
        await withCheckedContinuation { c in
            let v = state.withLock { s -> Result<T, QcowPressError>? in
                if let value = s.value { return value }
                s.waiters.append(c)
                return nil
            }
            if let v { c.resume(returning: v) }
        }
    }
    var isResolved: Bool { state.withLock { $0.value != nil } }
}
