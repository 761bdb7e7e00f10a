import ClusterCompression
import DirectIO
import Glibc

/// Compression workers and cluster memory shared by several encoders — every drive of one restore
/// (`restore pbs --all`, `restore vma`) — so that N images use the cores and the budget once, not
/// N times. An encoder made without a group gets a private one.
///
/// The workers take batches of complete clusters from one queue (each batch belongs to one
/// encoder), test them for zeros, compress them in place with the worker's own codec context, and
/// hand the results to that encoder's writer thread.
public final class EncoderGroup: Sendable {
    public let threads: Int
    public let clusterSize: Int
    public let compression: CompressionSettings?
    public let memoryLimit: Int
    let pool: SlotPool
    let plan: MemoryPlan

    struct Job { let encoder: Qcow2Encoder; var items: [Qcow2Encoder.WorkItem] }
    /// The job queue (workers wait on it), the members and the write-buffer bytes, under one lock.
    private struct State {
        var jobs: [Job] = []
        var head = 0
        var stopped = false
        /// The encoders in the group: joining and leaving change it only here, under the lock, and
        /// an encoder that leaves twice counts once.
        var members = Set<ObjectIdentifier>()
        /// Bytes of write buffers the member images hold.
        var writeBufferBytes = 0
    }
    private let state = ConditionMutex(State())
    /// A private group (made by an encoder for itself) stops with its encoder; shared ones with
    /// ``shutdown()``. Fixed when the group is made.
    let ownedByOneEncoder: Bool

    /// - Parameters: the settings every member encoder must use (cluster size and codec are per
    ///   group: one slot size, one codec context per worker); `images`: how many images will be
    ///   written at the same time (each gets an equal share of the write buffers).
    /// - Throws: ``QcowPressError/invalidArgument(_:)`` when the memory limit cannot hold even one
    ///   worker and every image's smallest write buffers. Fewer workers than asked for are started
    ///   when the limit cannot hold more (``threads`` says how many).
    public convenience init(threads: Int = EncoderOptions.defaultThreads, memoryLimit: Int = 256 << 20,
                            clusterSize: Int = 65536, compression: CompressionSettings? = nil, images: Int = 1) throws(QcowPressError) {
        try self.init(threads: threads, memoryLimit: memoryLimit, clusterSize: clusterSize, compression: compression,
                      images: images, ownedByOneEncoder: false)
    }

    init(threads: Int, memoryLimit: Int, clusterSize: Int, compression: CompressionSettings?, images: Int,
         ownedByOneEncoder: Bool) throws(QcowPressError) {
        self.ownedByOneEncoder = ownedByOneEncoder
        self.clusterSize = clusterSize
        self.compression = compression
        self.memoryLimit = memoryLimit
        var o = EncoderOptions(virtualSize: 0)
        o.threads = max(1, threads)
        o.memoryLimit = memoryLimit
        o.clusterSize = clusterSize
        o.compression = compression
        plan = try MemoryPlan(options: o, images: images)
        self.threads = plan.threads
        pool = SlotPool(slotSize: clusterSize, count: plan.slotCount)
        for i in 0..<self.threads {
            startThread(name: "qp-worker-\(i)") { [self] in workerLoop() }
        }
    }

    /// A private group for one encoder, with its options' settings (it stops with the encoder).
    convenience init(options o: EncoderOptions) throws(QcowPressError) {
        try self.init(threads: o.threads, memoryLimit: o.memoryLimit, clusterSize: o.clusterSize, compression: o.compression,
                      images: 1, ownedByOneEncoder: true)
    }

    /// Write buffers for one image joining the group (returned by ``releaseWriteBuffers(_:)``).
    func reserveWriteBuffers() throws(QcowPressError) -> (count: Int, size: Int) {
        let plan = self.plan, memoryLimit = self.memoryLimit
        return try state.withLock { (s) throws(QcowPressError) -> (count: Int, size: Int) in
            guard let b = plan.writeBuffers(inUse: s.writeBufferBytes) else {
                throw .invalidArgument("memory limit \(memoryLimit >> 20)M has no room for another image's write buffers (\(s.writeBufferBytes >> 20)M in use); raise --memory-limit")
            }
            s.writeBufferBytes += b.count * b.size
            return b
        }
    }

    /// Bytes of write buffers the member images hold now.
    var writeBufferBytesInUse: Int { state.withLock { $0.writeBufferBytes } }

    func releaseWriteBuffers(_ bytes: Int) {
        state.withLock { $0.writeBufferBytes -= bytes }
    }

    func join(_ member: ObjectIdentifier) { state.withLock { _ = $0.members.insert(member) } }

    /// An encoder (its ``EncoderEnding/member``) finished or failed. A private group's workers
    /// stop when its encoder leaves. Leaving again changes nothing.
    func leave(_ member: ObjectIdentifier) {
        let owned = ownedByOneEncoder
        let stops = state.withLock { s -> Bool in
            guard s.members.remove(member) != nil, s.members.isEmpty && owned else { return false }
            s.stopped = true
            return true
        }
        if stops { state.broadcast() }
    }

    /// Encoders in the group now.
    var memberCount: Int { state.withLock { $0.members.count } }

    /// Stops the workers (for shared groups, after every member finished).
    public func shutdown() {
        state.withLock { $0.stopped = true }
        state.broadcast()
    }

    func submit(_ encoder: Qcow2Encoder, _ items: [Qcow2Encoder.WorkItem]) {
        state.withLock { $0.jobs.append(Job(encoder: encoder, items: items)) }
        if items.count > 1 { state.broadcast() } else { state.signal() }
    }

    /// Clusters a worker takes at once. Small enough that both cores stay busy near the end of an
    /// image, large enough that the queue lock is taken once per ~512 KiB of data.
    static let workerBatch = 8

    private func next() -> (Qcow2Encoder, ArraySlice<Qcow2Encoder.WorkItem>)? {
        state.withLock(waitingUntil: { $0.head < $0.jobs.count || $0.stopped }) { s -> (Qcow2Encoder, ArraySlice<Qcow2Encoder.WorkItem>)? in
            if s.head == s.jobs.count { return nil }
            let job = s.jobs[s.head]
            let n = min(Self.workerBatch, job.items.count)
            let taken = job.items[0..<n]
            if n == job.items.count {
                s.head += 1
                if s.head > 1024 && s.head * 2 > s.jobs.count {
                    s.jobs.removeFirst(s.head)
                    s.head = 0
                }
            } else {
                s.jobs[s.head].items.removeFirst(n)
            }
            return (job.encoder, taken)
        }
    }

    private func workerLoop() {
        let compressor = compression.map { Codecs.makeCompressor($0, clusterSize: clusterSize) }
        let scratch = AlignedBuffer(capacity: clusterSize)
        var out: [ResultItem] = []
        out.reserveCapacity(Self.workerBatch)
        while let (enc, items) = next() {
            if enc.isStopped {
                for item in items { pool.release(item.slot) }
                continue
            }
            let t0 = monotonicNanoseconds()
            for item in items {
                let p = pool.pointer(item.slot)
                if !item.checkedNonZero && isAllZero(p, clusterSize) {
                    pool.release(item.slot)
                    out.append(.init(cluster: item.cluster, slot: nil, kind: .zero))
                    continue
                }
                guard let compressor else {
                    out.append(.init(cluster: item.cluster, slot: item.slot, kind: .raw))
                    continue
                }
                switch compressor.compress(UnsafeRawBufferPointer(start: p, count: clusterSize), into: scratch.bytes) {
                case .compressed(let length):
                    memcpy(p, scratch.pointer, length)
                    out.append(.init(cluster: item.cluster, slot: item.slot, kind: .compressed(length)))
                case .didNotFit:
                    out.append(.init(cluster: item.cluster, slot: item.slot, kind: .raw))
                }
            }
            if !enc.queue.deliver(&out, codecNanoseconds: monotonicNanoseconds() - t0) {
                // The encoder stopped while this batch was being worked on: its writer takes
                // nothing more, so the slots come back here (a shared pool outlives the encoder).
                for r in out { if let slot = r.heldSlot { pool.release(slot) } }
                out.removeAll(keepingCapacity: true)
            }
        }
    }
}
