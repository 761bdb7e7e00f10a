import Logging

/// How an encoder ends, once: done (the writer completed and committed the image) or failed (an
/// error anywhere, or a cancel). Only the outcome the ``Lifecycle`` lets through acts, so the
/// encoder leaves its group and gives its write buffers back exactly once, and `finish()` wakes
/// with that outcome. Producers, workers and the writer all end the encoder through this.
final class EncoderEnding: Sendable {
    let lifecycle: Lifecycle
    let completion = Completion<EncoderSummary>()
    private let group: EncoderGroup
    /// Bytes of write buffers this image holds out of the group's plan.
    private let writeBufferBytes: Int
    private let map: GuestMap
    private let queue: ResultQueue
    private let output: PendingOutput
    private let logger: Logger
    private let destination: String
    private let spill: SpillFile

    init(lifecycle: Lifecycle, group: EncoderGroup, writeBufferBytes: Int, map: GuestMap, queue: ResultQueue,
         output: PendingOutput, logger: Logger, destination: String, spill: SpillFile) {
        self.lifecycle = lifecycle
        self.group = group
        self.writeBufferBytes = writeBufferBytes
        self.map = map
        self.queue = queue
        self.output = output
        self.logger = logger
        self.destination = destination
        self.spill = spill
    }

    /// The encoder's identity in its group.
    var member: ObjectIdentifier { ObjectIdentifier(self) }

    /// The writer completed the image (and committed it, or left it for its `OutputSet`). After
    /// a failure that won first, this does nothing.
    func succeed(_ s: EncoderSummary) {
        guard lifecycle.markDone() else { return }
        spill.close(reason: .misuse("write after finish()"))
        group.releaseWriteBuffers(writeBufferBytes)
        group.leave(member)
        var s = s
        (s.clustersSpilled, s.spillPeakBytes) = spill.counts
        completion.resolve(.success(s))
    }

    /// Puts the encoder in the failed state (first error wins), stops all threads, gives every
    /// cluster slot it holds back to the (possibly shared) pool and removes the temporary file.
    /// Refused while the writer commits, unless `committer` (the writer's own commit failed).
    func fail(_ e: QcowPressError, committer: Bool = false) {
        guard lifecycle.markFailed(e, committer: committer) else { return }
        logger.debug("encoder stopped", metadata: ["destination": "\(destination)", "reason": "\(e.message)"])
        if group.ownedByOneEncoder { group.pool.fail() }
        // Partly filled clusters; one a producer is copying into now comes back through it. A
        // spilled one has no slot: its region goes with the spill file.
        spill.close(reason: e)
        for home in map.stop().map(PartialHome.init(raw:)) {
            guard let slot = home.slot else { continue }
            group.pool.endPartial()
            group.pool.release(slot)
        }
        group.releaseWriteBuffers(writeBufferBytes)
        group.leave(member)
        // Clusters queued for the writer (workers still running give theirs back on delivery).
        for r in queue.stop() { if let slot = r.heldSlot { group.pool.release(slot) } }
        output.discard()
        completion.resolve(.failure(e))
    }
}
