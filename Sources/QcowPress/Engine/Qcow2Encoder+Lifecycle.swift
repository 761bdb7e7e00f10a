import DirectIO

/// An encoder's life: open (accepting writes) → finishing (input closed, the writer completes the
/// image) → done; or failed (first error wins; everything stops and the temporary file goes).
final class Lifecycle: @unchecked Sendable {
    enum State { case open, finishing, done, failed(QcowPressError) }
    private let lock = ConditionLock()
    private var state = State.open

    /// Throws unless writes are accepted.
    func checkOpen() throws(QcowPressError) {
        try lock.withLock { () throws(QcowPressError) in
            switch state {
            case .open: return
            case .failed(let e): throw e
            case .finishing, .done: throw .misuse("write after finish()")
            }
        }
    }

    /// open → finishing; throws when already finishing, done or failed.
    func beginFinish() throws(QcowPressError) {
        try lock.withLock { () throws(QcowPressError) in
            switch state {
            case .open: state = .finishing
            case .failed(let e): throw e
            case .finishing, .done: throw .misuse("finish() called twice")
            }
        }
    }

    /// finishing → done; false, changing nothing, when it failed meanwhile (the failure stands,
    /// and its path already stopped everything) or was already done.
    @discardableResult
    func markDone() -> Bool {
        lock.withLock {
            switch state {
            case .failed, .done: return false
            case .open, .finishing:
                state = .done
                return true
            }
        }
    }

    /// → failed; false when it already failed or is done (the first outcome wins).
    func markFailed(_ e: QcowPressError) -> Bool {
        lock.withLock {
            switch state {
            case .failed, .done: return false
            default:
                state = .failed(e)
                return true
            }
        }
    }

    var isFailed: Bool { failure != nil }

    /// The error that failed the encoder (the first one), or nil.
    var failure: QcowPressError? { lock.withLock { if case .failed(let e) = state { e } else { nil } } }
}

extension Qcow2Encoder {
    /// Completes the image: queues partially written clusters (their unwritten bytes are zero),
    /// waits for every cluster to reach the disk, writes the metadata and header, syncs, and renames
    /// the image to its destination. Call once, after every write has returned.
    public func finish() async throws(QcowPressError) -> EncoderSummary {
        try beginFinish()
        return try await completion.wait().get()
    }

    /// Blocking form of ``finish()``, for callers on their own OS threads.
    public func finishBlocking() throws(QcowPressError) -> EncoderSummary {
        try beginFinish()
        return try completion.waitBlocking().get()
    }

    /// Stops everything and removes the partial output. Writers waiting for memory are woken with
    /// ``QcowPressError/cancelled``.
    public func cancel() {
        fail(.cancelled)
    }

    func beginFinish() throws(QcowPressError) {
        try lifecycle.beginFinish()
        var batch = map.takePartials().map { WorkItem(cluster: $0.cluster, slot: $0.slot) }
        flush(&batch)
        queue.close()
    }

    /// The writer completed the image. Only the first outcome counts: after a failure (a cancel
    /// racing the last step) this does nothing, so the encoder leaves its group and gives its
    /// write buffers back once, on whichever path won.
    func succeed(_ s: EncoderSummary) {
        guard lifecycle.markDone() else { return }
        group.releaseWriteBuffers(writeBuffers.count * writeBuffers.size)
        group.leave(self)
        completion.resolve(.success(s))
    }

    /// Puts the encoder in the failed state (first error wins), stops all threads, gives every
    /// cluster slot it holds back to the (possibly shared) pool and removes the temporary file.
    func fail(_ e: QcowPressError) {
        guard lifecycle.markFailed(e) else { return }
        logger.debug("encoder stopped", metadata: ["destination": "\(destination)", "reason": "\(e.message)"])
        if group.ownedByOneEncoder { pool.fail() }
        // Partly filled clusters; one a producer is copying into now comes back through it.
        for slot in map.stop() { pool.release(slot) }
        group.releaseWriteBuffers(writeBuffers.count * writeBuffers.size)
        group.leave(self)
        // Clusters queued for the writer (workers still running give theirs back on delivery).
        for r in queue.stop() { if let slot = r.heldSlot { pool.release(slot) } }
        output.discard()
        completion.resolve(.failure(e))
    }
}
