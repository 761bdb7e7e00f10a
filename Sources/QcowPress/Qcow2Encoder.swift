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
/// ring and the refcounts. Locks: `mapLock` (tables, partial clusters, state), the group's queue lock,
/// `resultLock` (result queue); none is taken while holding another.
public final class Qcow2Encoder: @unchecked Sendable {
    public let destination: String
    /// The file being written and how it becomes final (rename of a temporary file, or in place).
    let output: PendingOutput
    let options: EncoderOptions
    let geometry: ClusterGeometry
    let plan: MemoryPlan
    let file: OutputFile
    var pool: SlotPool { group.pool }
    let clusterSize: Int
    let guestClusters: UInt64
    let startTime = monotonicNanoseconds()

    enum State { case open, finishing, done, failed(QcowPressError) }

    // Guarded by mapLock.
    let mapLock = ConditionLock()
    var state = State.open
    var tables: [Int: L2Table] = [:]
    var completedRegions = Set<Int>()
    var partials: [UInt64: PartialCluster] = [:]
    var bytesIn: UInt64 = 0
    /// Clusters recorded as zero at intake (zero test on the producer's bytes, or writeZeroes).
    var zeroClustersMarked: UInt64 = 0

    /// A complete cluster in a slot. `checkedNonZero`: the intake already found non-zero bytes.
    struct WorkItem { var cluster: UInt64; var slot: Int32; var checkedNonZero = false }
    let group: EncoderGroup

    // Guarded by resultLock.
    enum ResultKind { case zero, raw, compressed(Int), copy(from: UInt64) }
    struct ResultItem { var cluster: UInt64; var slot: Int32; var kind: ResultKind }
    let resultLock = ConditionLock()
    var results: [ResultItem] = []
    var readyRegions: [Int] = []
    var expected: UInt64 = 0
    var codecNanoseconds: UInt64 = 0
    var inputClosed = false
    var writerStop = false

    let completion = Completion<EncoderSummary>()
    /// The library never prints; it logs through swift-log (the command installs a handler).
    let logger = Logger(label: "qcowpress.encoder")
    var notes: [String] = []

    /// Creates the image (under a temporary name) and starts the worker and writer threads.
    public init(destination: String, options: EncoderOptions) throws(QcowPressError) {
        try options.validate()
        let target = try OutputTarget(destination: destination, overwrite: options.overwrite, protecting: options.protectedInputs)
        self.destination = destination
        self.options = options
        geometry = ClusterGeometry(clusterSize: options.clusterSize)!
        clusterSize = options.clusterSize
        guestClusters = geometry.guestClusters(forVirtualSize: options.virtualSize)
        if let g = options.group {
            guard g.clusterSize == options.clusterSize, g.compression == options.compression else {
                throw .invalidArgument("an encoder group's cluster size and compression must match its encoders'")
            }
            group = g
        } else {
            group = EncoderGroup(options: options)
            group.ownedByOneEncoder = true
        }
        plan = group.plan
        output = try target.open(direct: options.ioMode != .buffered, zeroFirstBytes: options.clusterSize)
        file = output.file
        if options.ioMode != .buffered && !file.direct {
            notes.append("O_DIRECT refused by the file system; using buffered writes with the page cache dropped behind")
        }
        let (writer, note) = makeBufferWriter(file, mode: options.ioMode, queueDepth: MemoryPlan.bufferCount * 2)
        if let note { notes.append(note) }
        let sink = StreamSink(encoder: self, writer: writer)
        logger.debug("encoder started", metadata: ["destination": "\(destination)", "io": "\(writer.modeDescription)",
                                                   "slots": "\(plan.slotCount)", "bufferSize": "\(plan.bufferSize)"])
        for n in notes { logger.info("\(n)") }
        group.join()
        startThread(name: "qp-writer") { sink.run() }
    }

    /// Guest bytes a cluster holds (the last one may be short).
    @inline(__always)
    func validBytes(_ c: UInt64) -> Int {
        let start = c << UInt64(geometry.clusterBits)
        return Int(min(UInt64(clusterSize), options.virtualSize - start))
    }

    /// True once the encoder failed or was cancelled (workers drop its clusters).
    var isStopped: Bool {
        mapLock.withLock { if case .failed = state { return true } else { return false } }
    }

    /// Results of one worker batch: handed to the writer thread in one go.
    func deliver(_ out: inout [ResultItem], codecNanoseconds dt: UInt64) {
        resultLock.withLock {
            results.append(contentsOf: out)
            codecNanoseconds += dt
            resultLock.signal()
        }
        out.removeAll(keepingCapacity: true)
    }

    /// The image's virtual size.
    public var virtualSize: UInt64 { options.virtualSize }

    /// Fallbacks the engine took (io_uring → pwrite, O_DIRECT → buffered).
    public var fallbackNotes: [String] { notes }

    /// Guest bytes written or announced so far (for progress).
    public var bytesReceived: UInt64 { mapLock.withLock { bytesIn } }
}

/// A one-shot result that async tasks and OS threads can both wait for.
final class Completion<T: Sendable>: @unchecked Sendable {
    private let lock = ConditionLock()
    private var value: Result<T, QcowPressError>?
    private var waiters: [CheckedContinuation<Result<T, QcowPressError>, Never>] = []

    func resolve(_ r: Result<T, QcowPressError>) {
        let w: [CheckedContinuation<Result<T, QcowPressError>, Never>] = lock.withLock {
            if value != nil { return [] }
            value = r
            lock.broadcast()
            let w = waiters
            waiters = []
            return w
        }
        for c in w { c.resume(returning: r) }
    }
    func waitBlocking() -> Result<T, QcowPressError> {
        lock.withLock {
            while value == nil { lock.wait() }
            return value!
        }
    }
    func wait() async -> Result<T, QcowPressError> {
        await withCheckedContinuation { c in
            let v: Result<T, QcowPressError>? = lock.withLock {
                if let value { return value }
                waiters.append(c)
                return nil
            }
            if let v { c.resume(returning: v) }
        }
    }
    var isResolved: Bool { lock.withLock { value != nil } }
}
