import DirectIO
import Qcow2Format

/// Decoded L2 tables by host offset, the oldest dropped beyond `limit`; its own lock (a leaf).
/// Used by ``Qcow2Image`` and by reads of the image being written (``WrittenImage``).
final class L2TableCache: @unchecked Sendable {
    private let lock = ConditionLock()
    private var tables: [UInt64: [UInt64]] = [:]
    private var order: [UInt64] = []
    let limit: Int

    init(limit: Int) { self.limit = limit }

    /// The table at `offset`, from the cache or `load` (outside the lock; two readers of one
    /// uncached table may both load it, and the first kept wins).
    func table(at offset: UInt64, load: () throws(QcowPressError) -> [UInt64]) throws(QcowPressError) -> [UInt64] {
        if let t = lock.withLock({ tables[offset] }) { return t }
        let t = try load()
        lock.withLock {
            if tables[offset] == nil {
                tables[offset] = t
                order.append(offset)
                if order.count > limit { tables[order.removeFirst()] = nil }
            }
        }
        return t
    }

    /// A table's big-endian words, host-endian.
    static func decode(_ bytes: UnsafeRawBufferPointer) -> [UInt64] {
        (0..<(bytes.count / 8)).map { loadBE64(bytes, $0 * 8) }
    }
}
