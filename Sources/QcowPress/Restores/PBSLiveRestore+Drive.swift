import BackupSources
import DirectIO
import Glibc
import NIOCore
import Synchronization

extension PBSLiveRestore {
    /// One drive: readable at any offset from the start, written in the background.
    // @unchecked: the claim and served tables are raw buffers and the `var`s are guarded by `lock`.
    public final class Drive: @unchecked Sendable {
        public let archive: String
        public let view: PBSArchiveView
        public let destination: String
        let encoder: Qcow2Encoder
        let plan: [PBSDrive.Step]
        /// Per chunk: 0 waiting, 1 claimed (being loaded and written, by the restore or a reader).
        private let claims: UnsafeMutablePointer<UInt8>
        private let lock = ConditionLock()
        let counters = RestoreCounters()
        let ordered: OrderedProgress
        private let aheadCount = Atomic<Int>(0)
        /// Per chunk: 1 once a client has read from it (guarded by `lock`).
        private let served: UnsafeMutablePointer<UInt8>
        private var servedCount = 0
        /// Read contexts of the threads reading back from the image (guarded by `lock`).
        private var contexts: [ReadContext] = []
        /// The finished image, once the drive is complete: every read comes from it; `finishing`
        /// while the encoder completes it (both guarded by `lock`).
        private var finishedImage: Qcow2Image?
        private var finishing = false
        private let readsBack = Atomic<Int>(0)

        init(archive: String, view: PBSArchiveView, destination: String, encoder: Qcow2Encoder, plan: [PBSDrive.Step]) {
            self.archive = archive
            self.view = view
            self.destination = destination
            self.encoder = encoder
            self.plan = plan
            claims = .allocate(capacity: max(1, plan.count))
            claims.initialize(repeating: 0, count: max(1, plan.count))
            served = .allocate(capacity: max(1, plan.count))
            served.initialize(repeating: 0, count: max(1, plan.count))
            ordered = OrderedProgress(chunks: plan.count, chunkSize: UInt64(view.index.chunkSize), total: view.size)
            view.readAhead = { [unowned self] j in self.readAhead(j) }
        }
        deinit {
            claims.deallocate()
            served.deallocate()
        }

        public var name: String { view.name }
        /// The image's encoder (for a signal handler's cancel).
        public var encoderForSignals: Qcow2Encoder { encoder }
        public var size: UInt64 { view.size }
        /// Chunks a reader asked for before the restore reached them (loaded once, for both).
        public var chunksAheadOfOrder: Int { aheadCount.load(ordering: .relaxed) }
        /// Distinct chunks clients have read from (zero chunks included).
        public var chunksServed: Int { lock.withLock { servedCount } }
        /// Client reads served from the image being written (what the restore had written and the
        /// cache no longer held), instead of loading their chunks again.
        public var readsFromImage: Int { readsBack.load(ordering: .relaxed) }

        /// Claims chunk `i` for loading and writing; false when someone already has.
        func claim(_ i: Int) -> Bool {
            lock.withLock {
                if claims[i] != 0 { return false }
                claims[i] = 1
                return true
            }
        }

        /// Loads chunk `i` through the cache and writes it into the image (the caller claimed it).
        /// A load that fails before anything was written gives the claim back, so the restore (or
        /// another reader) tries again; it never leaves a chunk claimed and unwritten.
        func loadAndWrite(_ i: Int) throws(QcowPressError) {
            let cs = UInt64(view.index.chunkSize)
            let len = view.index.chunkLength(i)
            var wrote = false
            do throws(QcowPressError) {
                try view.cache.withChunk(view.index.digest(i), length: len, what: "chunk \(i) of \(archive) (guest offset \(UInt64(i) * cs))") { (p) throws(QcowPressError) in
                    wrote = true
                    try encoder.writeBlocking(at: UInt64(i) * cs, p)
                }
            } catch {
                lock.withLock {
                    if !wrote { claims[i] = 0 }
                    lock.broadcast()
                }
                throw error
            }
            lock.withLock {
                claims[i] = 2
                lock.broadcast()
            }
            counters.add(read: 1)
            ordered.complete(i)
        }

        /// Waits until no reader is still loading or writing a chunk it claimed.
        func waitForReaders() {
            lock.withLock {
                while (0..<plan.count).contains(where: { claims[$0] == 1 }) { lock.wait() }
            }
        }

        /// The first chunk to load that was not written (after the restore's loop), if any.
        func firstUnwritten() -> Int? {
            lock.withLock {
                for i in 0..<plan.count { if case .load = plan[i], claims[i] != 2 { return i } }
                return nil
            }
        }

        /// Loads chunk `j` (or the chunk it repeats) ahead of a sequential reader and writes it,
        /// unless someone claimed it: then it is being loaded, or written and read back from the
        /// image. A load only into the cache could be evicted before the restore reached it, and
        /// then loaded twice. A failed load gives the claim back (the restore or the reader
        /// that needs it loads it and reports the error).
        func readAhead(_ j: Int) {
            let s = source(of: j)
            guard case .load = plan[s], lock.withLock({ claims[s] == 0 }) else { return }
            _ = view.cache.runAhead { [self] in _ = try? loadAhead(s) }
        }

        /// The chunk whose data chunk `i` holds: its first occurrence when it repeats one.
        func source(of i: Int) -> Int {
            if case .copy(let f) = plan[i] { return f }
            return i
        }

        /// Loads and writes chunk `i` ahead of the restore's order if it is one to load and nobody
        /// claimed it yet.
        private func loadAhead(_ i: Int) throws(QcowPressError) {
            guard case .load = plan[i], claim(i) else { return }
            aheadCount.add(1, ordering: .relaxed)
            try loadAndWrite(i)
        }

        /// Counts chunks clients read from (each once). Caller holds `lock`.
        private func markServed(_ chunks: ClosedRange<Int>) {
            for i in chunks where served[i] == 0 {
                served[i] = 1
                servedCount += 1
            }
        }

        /// A read inside one chunk as a slice of the cached chunk, when the cache holds it and its
        /// load was claimed already (there is nothing to load ahead) and the drive is not finished;
        /// never waits, never loads (an NBD event loop answers such reads itself). Nil otherwise:
        /// ``read(at:count:into:)`` then.
        public func cachedSlice(at offset: UInt64, count: Int) -> ByteBuffer? {
            let i = Int(offset / UInt64(view.index.chunkSize))
            guard count > 0, i < plan.count else { return nil }
            let s = source(of: i)
            guard lock.withLock({ finishedImage == nil && claims[s] != 0 }),
                  let bytes = view.cachedSlice(at: offset, count: count) else { return nil }
            lock.withLock { markServed(i...i) }
            return bytes
        }

        /// Reads guest bytes for a client: chunks of this range that the restore has not reached
        /// are loaded and written now (ahead of order); then the bytes come from the cache when it
        /// holds them, else from the image being written when they are on disk there (waiting a
        /// little for the encoder if needed), else from the cache again (a load). Once the drive
        /// is finished, from the finished image.
        public func read(at offset: UInt64, count: Int, into out: UnsafeMutableRawBufferPointer) throws(QcowPressError) {
            let cs = UInt64(view.index.chunkSize)
            guard count > 0 else { return }
            let first = Int(offset / cs)
            let last = min(plan.count - 1, Int((offset + UInt64(count) - 1) / cs))
            let finished: Qcow2Image? = lock.withLock {
                if first <= last { markServed(first...last) }
                return finishedImage
            }
            if let finished {
                try read(finished, at: offset, into: out)
                return
            }
            if first <= last {
                // A repeated chunk reads its first occurrence's data: load that one ahead.
                for i in first...last { try loadAhead(source(of: i)) }
            }
            if try view.read(at: offset, count: count, into: out, cachedOnly: true) { return }
            // Chunk by chunk: a repeated chunk reads its first occurrence (the restore may not
            // have written the repeat yet).
            var done = 0
            while done < count {
                let at = offset + UInt64(done)
                let i = Int(at / cs)
                let within = at % cs
                guard i < plan.count else {
                    memset(out.baseAddress! + done, 0, count - done)
                    return
                }
                let n = min(count - done, Int(cs - within))
                try readPiece(i, within: within, into: UnsafeMutableRawBufferPointer(start: out.baseAddress! + done, count: n))
                done += n
            }
        }

        /// Reads `piece.count` bytes at `within` of chunk `i` (inside it) when the whole request
        /// was not cached: from the cache, else from the image being written, else after the
        /// load of whoever claimed the chunk, else from the finished image when the drive is being
        /// finished, else by loading it.
        private func readPiece(_ i: Int, within: UInt64, into piece: UnsafeMutableRawBufferPointer) throws(QcowPressError) {
            let cs = UInt64(view.index.chunkSize)
            if view.isZeroChunk(i) {
                memset(piece.baseAddress!, 0, piece.count)
                return
            }
            let source = source(of: i)
            let at = UInt64(source) * cs + within
            // While someone has the chunk claimed and not written, its load is running or about to
            // start, and the loaded chunk stays cached while it is written (a cached-only read
            // waits for a running load): look again every 10 ms.
            let deadline = monotonicNanoseconds() + UInt64(Self.claimWait * 1e9)
            while true {
                if try view.readChunks(at: at, count: piece.count, into: piece, cachedOnly: true) { return }
                if try readBack(at: at, count: piece.count, into: piece) { return }
                // Claimed: wait a little, then look again (once more after the claim ends).
                let claimed = lock.withLock { () -> Bool in
                    guard claims[source] == 1 else { return false }
                    _ = lock.wait(seconds: 0.01)
                    return true
                }
                guard claimed && monotonicNanoseconds() < deadline else { break }
            }
            // Written, but in the image's last buffer, which is on disk only once the image is
            // finished: the finished image is moments away.
            if let image = waitForFinishedImage() {
                try read(image, at: UInt64(i) * cs + within, into: piece)
                return
            }
            _ = try view.readChunks(at: at, count: piece.count, into: piece, cachedOnly: false)
        }

        /// Reads from the finished image.
        private func read(_ image: Qcow2Image, at offset: UInt64, into out: UnsafeMutableRawBufferPointer) throws(QcowPressError) {
            try withContext { (c) throws(QcowPressError) in try image.read(at: offset, count: out.count, into: out.baseAddress!, context: c) }
            readsBack.add(1, ordering: .relaxed)
        }

        /// How long a read waits for another reader's (or the restore's) claim of a chunk to be
        /// loaded before it loads the chunk itself.
        static let claimWait = 5.0

        /// How long a read of chunks already written to the encoder waits for them to reach the
        /// disk before it loads them again: while the disk makes progress, up to `readBackWait`;
        /// after `readBackStall` without progress, at once. The encoder's backlog (its slots:
        /// 48 MiB with two workers) reaches the disk in about 0.1 s on the bench machine (3 GiB
        /// restored in 6.6 s); waiting there removed the last 2-14 repeated loads of the live
        /// bench. With a 1 s limit, `liveRestoreServesWhileItWrites` (every write 100 ms late)
        /// loaded 25-27 chunks for 24 when three busy loops shared the machine's two cores: the
        /// disk was moving, only slower. The end of a drive (its last buffer is written only
        /// when it is finished) stops the wait at once.
        static let readBackWait = 5.0
        static let readBackStall = 1.0

        /// Reads from the image being written when all of the range is on disk there; false otherwise.
        private func readBack(at offset: UInt64, count: Int, into out: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Bool {
            guard try withContext({ (c) throws(QcowPressError) in
                try encoder.readWritten(at: offset, count: count, into: out.baseAddress!, context: c, wait: Self.readBackWait,
                                        stall: Self.readBackStall)
            }) else { return false }
            readsBack.add(1, ordering: .relaxed)
            return true
        }

        private func withContext<T>(_ body: (ReadContext) throws(QcowPressError) -> T) throws(QcowPressError) -> T {
            let context = lock.withLock { contexts.popLast() } ?? ReadContext()
            defer { lock.withLock { contexts.append(context) } }
            return try body(context)
        }

        /// How long a read waits for the image being finished (writing its metadata and syncing
        /// it) rather than loading its chunks again.
        static let finishWait = 5.0

        /// The finished image, waiting for it while the drive is being finished; nil otherwise.
        private func waitForFinishedImage() -> Qcow2Image? {
            let deadline = monotonicNanoseconds() + UInt64(Self.finishWait * 1e9)
            return lock.withLock {
                while finishing && finishedImage == nil {
                    let now = monotonicNanoseconds()
                    guard now < deadline else { break }
                    _ = lock.wait(seconds: Double(deadline - now) / 1e9)
                }
                return finishedImage
            }
        }

        /// The drive's encoder starts completing the image.
        func beginFinishing() {
            lock.withLock { finishing = true }
        }

        /// The drive's encoder is done: when it succeeded, reads of this drive come from the
        /// finished image from now on (all of it is on disk; of the image being written, only what
        /// lay below its last buffer). An image that cannot be opened leaves reads as they were.
        func endFinishing(succeeded: Bool) {
            let image = succeeded ? try? Qcow2Image(path: encoder.output.temporaryPath ?? encoder.output.target.path) : nil
            lock.withLock {
                finishing = false
                finishedImage = image
                lock.broadcast()
            }
        }
    }
}
