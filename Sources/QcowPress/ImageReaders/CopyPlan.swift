import Synchronization

/// The work of an ``ImageCopier`` in guest order, handed out one unit at a time to its reader
/// threads: a run of whole chunks the source (and the base, when there is one) reads as zero
/// without a read, however long — one unit, so a 64 TiB hole costs one call, not 16 million
/// chunks — or one chunk to read. Units start on the chunk grid, so the chunks read are those
/// a copy chunk by chunk would read.
final class CopyPlan: Sendable {
    enum Unit: Equatable {
        /// [range) reads as zero in the source (and in the base): nothing to read.
        case zero(Range<UInt64>)
        /// A chunk to read at `offset`, `count` bytes; `sourceZero` when the source reads it as
        /// zero (then only the base holds data there).
        case chunk(offset: UInt64, count: Int, sourceZero: Bool)
    }

    private let source: any GuestImage
    private let base: (any GuestImage)?
    private let size: UInt64
    private let step: UInt64
    private let state = Mutex<(next: UInt64, stopped: Bool)>((0, false))

    init(source: any GuestImage, base: (any GuestImage)?, chunkSize: Int) {
        self.source = source
        self.base = base
        size = source.virtualSize
        step = UInt64(chunkSize)
    }

    /// The next unit, nil at the end or after ``stop()``. The extent lookups run under the lock
    /// so units leave in guest order (sources are read front to back).
    func take() throws(QcowPressError) -> Unit? {
        try state.withLock { (s) throws(QcowPressError) -> Unit? in
            guard !s.stopped, s.next < size else { return nil }
            let at = s.next
            var zeroEnd = try source.knownZeroEnd(from: at, limit: size)
            let sourceZeroChunk = zeroEnd >= min(size, at + step)
            if let base, zeroEnd > at {
                // Past the base's end it reads zeros (a base of another size, as qemu reads it).
                let inBase = min(zeroEnd, base.virtualSize)
                if at < inBase {
                    let e = try base.knownZeroEnd(from: at, limit: inBase)
                    if e < inBase { zeroEnd = e }
                }
            }
            // A zero run ends on the chunk grid, or at the end of the image.
            if zeroEnd < size { zeroEnd -= (zeroEnd - at) % step }
            if zeroEnd > at {
                s.next = zeroEnd
                return .zero(at..<zeroEnd)
            }
            let n = min(step, size - at)
            s.next = at + n
            return .chunk(offset: at, count: Int(n), sourceZero: sourceZeroChunk)
        }
    }

    func stop() { state.withLock { $0.stopped = true } }
}
