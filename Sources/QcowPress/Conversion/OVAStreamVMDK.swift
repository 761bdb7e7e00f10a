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
enum OVAStreamVMDK {
    /// A batch: grains inside one 4 MiB guest window (the copier's chunk), at most this many
    /// compressed bytes. 4 MiB runs are what ImageCopier writes too.
    static let window = UInt64(ImageCopier.chunkSize)
    /// Batches waiting for a worker, per worker: 2 keeps every worker busy while the reader fills
    /// the next (the reader is faster than inflate + encoder intake: it only copies).
    static let depthPerWorker = 2

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

    static func pump(_ reader: VMDKStreamReader, into enc: Qcow2Encoder, name: String, workers: Int) throws(QcowPressError) {
        let queue = BatchQueue(depth: workers * depthPerWorker)
        let group = ThreadGroup()
        let grainSize = reader.grainSize
        for t in 0..<workers {
            group.spawn(name: "qp-ova-inflate-\(t)") { () throws(QcowPressError) in
                let inflater = ZlibGrainInflater()
                let out = AlignedBuffer(capacity: Int(window) + grainSize)
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
            var batch = Batch()
            var windowStart: UInt64 = 0
            while let g = try reader.nextCompressed() {
                if !batch.grains.isEmpty && (g.offset / window != windowStart / window) {
                    guard queue.put(batch) else { break }
                    batch = Batch()
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
