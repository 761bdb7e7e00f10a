import DirectIO
import Qcow2Format
import Synchronization

/// Decoded L2 tables by host offset, the oldest dropped beyond `limit`; its own lock (a leaf).
/// Used by ``Qcow2Image`` and by reads of the image being written (``WrittenImage``).
final class L2TableCache: Sendable {
    private struct Tables {
        var byOffset: [UInt64: [UInt64]] = [:]
        /// Offsets in the order they were kept (the oldest leaves first).
        var order: [UInt64] = []
    }
    private let tables = Mutex(Tables())
    let limit: Int

    init(limit: Int) { self.limit = limit }

    /// The table at `offset`, from the cache or `load` (outside the lock; two readers of one
    /// uncached table may both load it, and the first kept wins).
    func table(at offset: UInt64, load: () throws(QcowPressError) -> [UInt64]) throws(QcowPressError) -> [UInt64] {
        if let t = tables.withLock({ $0.byOffset[offset] }) { return t }
        let t = try load()
        tables.withLock { s in
            if s.byOffset[offset] == nil {
                s.byOffset[offset] = t
                s.order.append(offset)
                if s.order.count > limit { s.byOffset[s.order.removeFirst()] = nil }
            }
        }
        return t
    }

    /// A table's big-endian words, host-endian.
    static func decode(_ bytes: UnsafeRawBufferPointer) -> [UInt64] {
        (0..<(bytes.count / 8)).map { loadBE64(bytes, $0 * 8) }
    }
}
