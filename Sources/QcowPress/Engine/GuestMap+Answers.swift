/// What ``GuestMap`` answers to the writer's copy lookups and to readers of the image being written.
extension GuestMap {
    /// Where the source of a copy stands.
    enum Source {
        /// Final in memory (`.zero` or `.final`).
        case known(ClusterState)
        /// Its region's table has been written (or the whole region was zero): look it up there.
        case written(region: Int)
        /// Not final yet: `dst` now waits for it and comes back through a ``Finalized``.
        case waiting
    }

    /// What the map says of clusters [first, first + count) (one region) to a reader of the image
    /// being written (``Qcow2Encoder/readWritten(at:count:into:context:)``).
    enum Readback {
        /// Every one is final: its entry (0 for a zero cluster).
        case entries([UInt64])
        /// The region was completed as zero without a table.
        case zero
        /// The region's table left memory to be written: ``WrittenImage`` knows where it went.
        case elsewhere
        /// Some cluster is written but not final yet (being compressed): it will be.
        case pending
        /// Some cluster was never written.
        case untouched
    }
}
