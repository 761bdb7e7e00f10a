import CURing
import Glibc

/// Writes whole aligned buffers asynchronously. One owner thread calls every method; a buffer
/// submitted belongs to the writer until its tag comes back from ``reap(wait:)``.
public protocol BufferWriter: AnyObject {
    /// What is in use, e.g. "io_uring, O_DIRECT".
    var modeDescription: String { get }
    var inFlight: Int { get }
    func submit(_ buffer: AlignedBuffer, length: Int, offset: UInt64, tag: Int) throws(IOError)
    /// Returns tags of finished writes; waits for one when `wait` and something is in flight.
    func reap(wait: Bool) throws(IOError) -> [Int]
    /// Waits for everything in flight (errors of those writes are thrown).
    func drain() throws(IOError)
}

extension BufferWriter {
    public func drain() throws(IOError) {
        while inFlight > 0 { _ = try reap(wait: true) }
    }
}

/// Opens the fastest writer for a mode, falling back (io_uring → pwrite) when the kernel refuses
/// io_uring. `fallbackNote` says what happened, once, for stderr and the summary.
public func makeBufferWriter(_ file: OutputFile, mode: IOMode, queueDepth: Int) -> (writer: any BufferWriter, fallbackNote: String?) {
    if mode == .uring {
        switch URingWriter.make(file: file, queueDepth: queueDepth) {
        case .success(let w): return (w, nil)
        case .failure(let e):
            return (PwriteWriter(file: file), "io_uring unavailable (\(e.errnoName)); using pwrite on a dedicated thread")
        }
    }
    return (PwriteWriter(file: file), nil)
}

/// io_uring writer. The ring and its request table are owned by the single thread that calls it.
///
/// `user_data` layout: the low 32 bits are the caller's tag (buffer index); nothing else is packed.
public final class URingWriter: BufferWriter {
    private var ring = io_uring()
    private let file: OutputFile
    private struct Request { var buffer: AlignedBuffer; var length: Int; var offset: UInt64; var done: Int }
    private var requests: [Int: Request] = [:]
    public var inFlight: Int { requests.count }
    public var modeDescription: String { file.direct ? "io_uring, O_DIRECT" : "io_uring, buffered" }

    private init(file: OutputFile) { self.file = file }

    static func make(file: OutputFile, queueDepth: Int) -> Result<URingWriter, IOError> {
        let w = URingWriter(file: file)
        let r = curing_queue_init(UInt32(max(2, queueDepth)), &w.ring)
        if r < 0 { return .failure(IOError(errno: -r, operation: "io_uring_queue_init", path: file.path)) }
        w.initialised = true
        return .success(w)
    }
    private var initialised = false
    deinit { if initialised { io_uring_queue_exit(&ring) } }

    public func submit(_ buffer: AlignedBuffer, length: Int, offset: UInt64, tag: Int) throws(IOError) {
        requests[tag] = Request(buffer: buffer, length: length, offset: offset, done: 0)
        try push(tag)
    }

    private func push(_ tag: Int) throws(IOError) {
        guard let rq = requests[tag] else { return }
        guard let sqe = curing_get_sqe(&ring) else {
            throw IOError(errno: EBUSY, operation: "io_uring_get_sqe", path: file.path, offset: rq.offset)
        }
        curing_prep_write(sqe, file.fd, rq.buffer.pointer + rq.done, UInt32(rq.length - rq.done), rq.offset + UInt64(rq.done), UInt64(tag))
        let r = Sys.retryingEINTR { io_uring_submit(&ring) }
        if r < 0 { throw IOError(errno: -r, operation: "io_uring_submit", path: file.path, offset: rq.offset) }
    }

    public func reap(wait: Bool) throws(IOError) -> [Int] {
        var finished: [Int] = []
        var first = true
        while !requests.isEmpty {
            var res: Int32 = 0
            var data: UInt64 = 0
            let r: Int32
            if wait && first && finished.isEmpty {
                r = Sys.retryingEINTR { curing_wait_cqe(&ring, &res, &data) }
            } else {
                r = curing_peek_cqe(&ring, &res, &data)
            }
            first = false
            if r == -EAGAIN { break }
            if r < 0 { throw IOError(errno: -r, operation: "io_uring_wait_cqe", path: file.path) }
            let tag = Int(data & 0xFFFF_FFFF)
            guard var rq = requests[tag] else { continue }
            // The seam: an injected fault replaces the kernel's answer.
            var result = Int(res)
            switch FaultInjection.check(.write, fd: file.fd) {
            case .fail(let e)?: result = -Int(e)
            case .short?: result = min(result, ((rq.length - rq.done) / 2) & ~511)
            case .delay(let ms)?: usleep(UInt32(ms) * 1000)
            case nil: break
            }
            // Interrupted or not possible now: submitted again.
            if Sys.interrupted(result) || result == -Int(EAGAIN) {
                try push(tag)
                continue
            }
            if result < 0 {
                requests[tag] = nil
                throw IOError(errno: Int32(-result), operation: "io_uring write", path: file.path, offset: rq.offset + UInt64(rq.done))
            }
            if result == 0 {
                requests[tag] = nil
                throw IOError(errno: EIO, operation: "io_uring write (no progress)", path: file.path, offset: rq.offset + UInt64(rq.done))
            }
            rq.done += result
            if rq.done < rq.length {
                requests[tag] = rq
                try push(tag)  // short write: continue with the rest
                continue
            }
            requests[tag] = nil
            file.dropBehind(offset: rq.offset, length: rq.length)
            finished.append(tag)
        }
        return finished
    }
}

/// pwrite on a dedicated thread: the owner thread queues buffers and keeps filling the next one.
/// The thread holds only the shared `Core`, never the writer, so releasing the writer stops the
/// thread (once its queue is empty) and closes nothing early: the core owns the file reference.
public final class PwriteWriter: BufferWriter, Sendable {
    private final class Core: Sendable {
        let file: OutputFile
        struct Job { var buffer: AlignedBuffer; var length: Int; var offset: UInt64; var tag: Int }
        struct State {
            var queue: [Job] = []
            var done: [Int] = []
            var error: IOError?
            var pending = 0
            var stopped = false
        }
        let state = ConditionMutex(State())

        init(file: OutputFile) { self.file = file }

        func run() {
            while true {
                let job: Job? = state.withLock(waitingUntil: { !$0.queue.isEmpty || $0.stopped }) { s in
                    s.queue.isEmpty ? nil : s.queue.removeFirst()
                }
                guard let job else { return }
                var failure: IOError?
                do throws(IOError) {
                    try file.pwriteAll(job.buffer.pointer, length: job.length, offset: job.offset)
                    file.dropBehind(offset: job.offset, length: job.length)
                } catch {
                    failure = error
                }
                state.withLock { s in
                    s.pending -= 1
                    if let failure, s.error == nil { s.error = failure }
                    s.done.append(job.tag)
                }
                state.broadcast()
            }
        }
    }
    private let core: Core

    public var modeDescription: String { core.file.direct ? "pwrite thread, O_DIRECT" : "pwrite thread, buffered" }
    public var inFlight: Int { core.state.withLock { $0.pending } }

    public init(file: OutputFile) {
        core = Core(file: file)
        startThread(name: "qp-pwrite") { [core] in core.run() }
    }
    deinit {
        core.state.withLock { $0.stopped = true }
        core.state.broadcast()
    }

    public func submit(_ buffer: AlignedBuffer, length: Int, offset: UInt64, tag: Int) throws(IOError) {
        try core.state.withLock { (s) throws(IOError) in
            if let error = s.error { throw error }
            s.pending += 1
            s.queue.append(Core.Job(buffer: buffer, length: length, offset: offset, tag: tag))
        }
        core.state.broadcast()
    }

    public func reap(wait: Bool) throws(IOError) -> [Int] {
        try core.state.withLock(waitingUntil: { !wait || !$0.done.isEmpty || $0.pending == 0 || $0.error != nil }) { (s) throws(IOError) -> [Int] in
            if let error = s.error { throw error }
            let d = s.done
            s.done.removeAll(keepingCapacity: true)
            return d
        }
    }
}
