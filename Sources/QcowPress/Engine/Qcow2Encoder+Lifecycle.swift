import DirectIO

extension Qcow2Encoder {
    /// Completes the image: queues partially written clusters (their unwritten bytes are zero),
    /// waits for every cluster to reach the disk, writes the metadata and header, syncs, and renames
    /// the image to its destination. Call once, after every write has returned.
    public func finish() async throws(QcowPressError) -> EncoderSummary {
        for p in try beginFinish() {
            guard let slot = await pool.acquire() else { throw lifecycle.failure ?? .cancelled }
            var batch = [try readBack(p.cluster, region: p.region, into: slot)]
            flush(&batch)
        }
        queue.close()
        return try await completion.wait().get()
    }

    /// Blocking form of ``finish()``, for callers on their own OS threads.
    public func finishBlocking() throws(QcowPressError) -> EncoderSummary {
        for p in try beginFinish() {
            guard let slot = pool.acquireBlocking() else { throw lifecycle.failure ?? .cancelled }
            var batch = [try readBack(p.cluster, region: p.region, into: slot)]
            flush(&batch)
        }
        queue.close()
        return try completion.waitBlocking().get()
    }

    /// Stops everything and removes the partial output. Writers waiting for memory are woken with
    /// ``QcowPressError/cancelled``. Once the finished image is going into place, a cancel is
    /// refused and ``finish()`` reports it done: the image is never left in place behind a
    /// "cancelled".
    public func cancel() {
        fail(.cancelled)
    }

    /// Input closed: partly written clusters in slots go to the workers; the spilled ones are
    /// returned for the caller to read back (waiting for slots as it may) before it closes the
    /// queue.
    func beginFinish() throws(QcowPressError) -> [(cluster: UInt64, region: Int32)] {
        try lifecycle.beginFinish()
        return queuePartialsInSlots()
    }

    /// The writer completed the image (see ``EncoderEnding/succeed(_:)``).
    func succeed(_ s: EncoderSummary) { ending.succeed(s) }

    /// Fails the encoder: first error wins, everything stops, slots go back, the temporary file
    /// goes (see ``EncoderEnding/fail(_:committer:)``).
    func fail(_ e: QcowPressError) { ending.fail(e) }
}
