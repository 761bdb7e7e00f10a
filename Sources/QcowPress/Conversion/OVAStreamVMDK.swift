import ClusterCompression
import Dispatch
import DirectIO
import Glibc
import Synchronization

/// A streamOptimized VMDK decoded as its bytes pass (stdin's tar entry, a gzip-stored file): the
/// reading thread walks the grain markers (``VMDKStreamReader``) and hands batches of compressed
/// grains to inflate workers, which write the inflated runs into the encoder (out of order across
/// batches; the encoder takes any order). Grains the stream does not list read as zeros and are
/// never written.
///
/// Memory: the pipeline's buffers (batches queued, in the workers' hands and being filled, and
/// each worker's inflate buffer) come out of `--memory-limit`: a stream import gives the engine
/// three quarters of it (``engineOptions(_:)``) and the pipeline the rest (``Plan``).
enum OVAStreamVMDK {
    /// A batch: grains inside one guest window of at most this size (the copier's chunk, 4 MiB:
    /// runs as ImageCopier writes them), their compressed bytes at most the window plus two grains.
    static let window = ImageCopier.chunkSize
    /// Batches waiting for a worker, per worker: 2 keeps every worker busy while the reader fills
    /// the next (the reader is faster than inflate + encoder intake: it only copies).
    static let depthPerWorker = 2

    /// How the pipeline fits its share of the limit: `workers` inflate threads, `depth` batches
    /// queued, batches of `window` guest bytes.
    struct Plan: Equatable {
        var workers: Int
        var depth: Int
        var window: Int
        /// Bytes held at most with grains of `grain` bytes: each worker's batch and inflate buffer,
        /// the queued batches, the batch being filled, and the reader's buffer of two grains.
        func bytes(grain: Int) -> Int {
            let batch = window + 2 * grain
            return workers * (window + grain) + (depth + workers + 1) * batch + 2 * grain
        }

        /// The preferred plan (`workers`, 2 batches queued per worker, 4 MiB windows), cut to
        /// `budget`: the queue first (down to one batch per worker), then the window (halved down
        /// to one grain), then workers, then the queue to one batch. The smallest plan (one
        /// worker, one batch, one-grain windows: 13 grains) runs even over the budget.
        static func fitting(_ budget: Int, workers: Int, grain: Int) -> Plan {
            var p = Plan(workers: workers, depth: workers * depthPerWorker, window: max(OVAStreamVMDK.window, grain))
            while p.bytes(grain: grain) > budget {
                if p.depth > p.workers { p.depth -= 1 } else if p.window > grain { p.window = max(grain, p.window / 2) } else if p.workers > 1 {
                    p.workers -= 1
                    p.depth = p.workers
                } else if p.depth > 1 { p.depth -= 1 } else { break }
            }
            return p
        }
    }

    /// The engine's part of a stream import's limit: three quarters; the pipeline takes the rest
    /// (at the default 256M: 64 MiB, which holds 4 workers with 6 batches of 4 MiB queued). A limit whose
    /// three quarters cannot hold the engine's smallest plan is refused with the smallest that can.
    static func engineOptions(_ e: EncoderOptions) throws(QcowPressError) -> EncoderOptions {
        func engine(_ limit: Int) -> EncoderOptions? {
            var o = e
            o.memoryLimit = limit - limit / 4
            return o.memoryLimit >= 4 << 20 && MemoryPlan.fixedBytes(o, images: 1, threads: 1) <= o.memoryLimit ? o : nil
        }
        if let o = engine(e.memoryLimit) { return o }
        var need = ((e.memoryLimit >> 20) + 1) << 20
        while engine(need) == nil { need += 1 << 20 }
        throw .invalidArgument("memory limit \(e.memoryLimit >> 20)M cannot hold the engine and the stream's inflate buffers (a quarter of the limit): at least \(need >> 20)M is needed")
    }

    /// The pipeline's share, from the engine's part (a third of it is a quarter of the limit).
    static func budget(engineLimit: Int) -> Int { engineLimit / 3 }

    struct Grain: Sendable { var offset: UInt64; var start: Int; var count: Int; var length: Int }
    struct Batch: Sendable { var grains: [Grain] = []; var bytes: [UInt8] = [] }

    static func convert(_ job: OVADiskJob, from source: OVAByteSource, name: String, outputs: OVAOutputs,
                        protecting: [ProtectedInput]) throws(QcowPressError) -> UInt64 {
        let reader = try VMDKStreamReader(source: VMDKSourceAdapter(source), name: name)
        let enc = try outputs.encoder(for: job, virtualSize: reader.virtualSize, protecting: protecting)
        do throws(QcowPressError) {
            try pump(reader, into: enc, name: name, workers: inflateWorkers(enc))
            outputs.finished(try enc.finishBlocking())
        } catch {
            enc.cancel()
            throw error
        }
        return enc.virtualSize
    }

    /// Inflate workers: half the encoder's compression threads (at least 1, at most 4). ISA-L
    /// inflates a grain about 10× faster than zlib level 6 compresses one, so fewer suffice.
    static func inflateWorkers(_ enc: Qcow2Encoder) -> Int { max(1, min(4, enc.options.threads / 2)) }

    static func pump(_ reader: VMDKStreamReader, into enc: Qcow2Encoder, name: String, workers wanted: Int) throws(QcowPressError) {
        let grainSize = reader.grainSize
        let plan = Plan.fitting(budget(engineLimit: enc.options.memoryLimit), workers: wanted, grain: grainSize)
        let window = UInt64(plan.window), batchBytes = plan.window + 2 * grainSize
        let queue = BatchQueue(depth: plan.depth)
        let group = ThreadGroup()
        for t in 0..<plan.workers {
            group.spawn(name: "qp-ova-inflate-\(t)") { () throws(QcowPressError) in
                let inflater = ZlibGrainInflater()
                let out = AlignedBuffer(capacity: plan.window + grainSize)
                while let batch = queue.take() {
                    do throws(QcowPressError) { try write(batch, enc: enc, out: out, inflater: inflater, name: name) } catch {
                        queue.fail()
                        throw error
                    }
                }
            }
        }
        var readError: QcowPressError? = nil
        do throws(QcowPressError) {
            func newBatch() -> Batch {
                var b = Batch()
                b.bytes.reserveCapacity(batchBytes)  // never grown past the plan's size
                return b
            }
            var batch = newBatch()
            var windowStart: UInt64 = 0
            while let g = try reader.nextCompressed() {
                if !batch.grains.isEmpty && (g.offset / window != windowStart / window || batch.bytes.count + g.zlib.count > batchBytes) {
                    guard queue.put(batch) else { break }
                    batch = newBatch()
                }
                if batch.grains.isEmpty { windowStart = g.offset }
                batch.grains.append(Grain(offset: g.offset, start: batch.bytes.count, count: g.zlib.count, length: g.length))
                batch.bytes.append(contentsOf: g.zlib)
            }
            if !batch.grains.isEmpty { _ = queue.put(batch) }
        } catch {
            readError = error
            queue.fail()
        }
        queue.close()
        let workerError = group.wait()
        if let e = readError ?? workerError { throw e }
    }

    /// Inflates a batch's grains and writes each contiguous run in one call.
    static func write(_ b: Batch, enc: Qcow2Encoder, out: AlignedBuffer, inflater: ZlibGrainInflater, name: String) throws(QcowPressError) {
        // A batch's grains lie inside one window: their inflated run fits `out` (window + grain).
        var runStart: UInt64 = 0
        var runLen = 0
        func flush() throws(QcowPressError) {
            if runLen > 0 { try enc.writeBlocking(at: runStart, UnsafeRawBufferPointer(start: out.pointer, count: runLen)) }
            runLen = 0
        }
        for g in b.grains {
            if runLen > 0 && runStart + UInt64(runLen) != g.offset { try flush() }
            if runLen == 0 { runStart = g.offset }
            let dst = UnsafeMutableRawBufferPointer(start: out.pointer + runLen, count: g.length)
            try b.bytes.withUnsafeBytes { p in
                Result { () throws(QcowPressError) in
                    try VMDKStreamReader.inflate(UnsafeRawBufferPointer(rebasing: p[g.start..<(g.start + g.count)]), length: g.length, into: dst,
                                                 inflater: inflater, name: name, offset: g.offset)
                }
            }.get()
            runLen += g.length
        }
        try flush()
    }
}

/// Batches from the reading thread to the inflate workers, at most `depth` waiting.
final class BatchQueue: Sendable {
    private let slots: DispatchSemaphore
    private let items = DispatchSemaphore(value: 0)
    private let state = Mutex<(queue: [OVAStreamVMDK.Batch], closed: Bool, failed: Bool)>(([], false, false))

    init(depth: Int) { slots = DispatchSemaphore(value: depth) }

    /// False when a worker failed (the reader stops).
    func put(_ b: OVAStreamVMDK.Batch) -> Bool {
        slots.wait()
        let ok = state.withLock { s -> Bool in
            guard !s.failed else { return false }
            s.queue.append(b)
            return true
        }
        items.signal()
        return ok
    }

    /// The next batch; nil once closed and empty (or failed).
    func take() -> OVAStreamVMDK.Batch? {
        while true {
            items.wait()
            let (b, done) = state.withLock { s -> (OVAStreamVMDK.Batch?, Bool) in
                if s.failed { return (nil, true) }
                if !s.queue.isEmpty { return (s.queue.removeFirst(), false) }
                return (nil, s.closed)
            }
            if let b {
                slots.signal()
                return b
            }
            if done {
                items.signal()  // wake the next worker: it ends too
                return nil
            }
        }
    }

    func close() {
        state.withLock { $0.closed = true }
        items.signal()
    }

    func fail() {
        state.withLock { $0.failed = true; $0.queue.removeAll() }
        items.signal()
        slots.signal()
    }
}

/// An OVA byte source as the VMDK stream reader takes it.
final class VMDKSourceAdapter: VMDKByteSource {
    let inner: OVAByteSource
    init(_ inner: OVAByteSource) { self.inner = inner }
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Int { try inner.read(into: buffer) }
}
