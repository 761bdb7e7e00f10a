import Synchronization

/// Bytes restored in guest order: the length of the prefix of the image whose chunks are all done
/// (chunks complete out of order; the bar only moves over a finished prefix).
public final class OrderedProgress: Sendable {
    private let state: Mutex<(done: [Bool], prefix: Int)>
    let chunkSize: UInt64
    public let total: UInt64

    init(chunks: Int, chunkSize: UInt64, total: UInt64) {
        state = Mutex(([Bool](repeating: false, count: chunks), 0))
        self.chunkSize = chunkSize
        self.total = total
    }
    func complete(_ i: Int) {
        state.withLock { s in
            s.done[i] = true
            while s.prefix < s.done.count && s.done[s.prefix] { s.prefix += 1 }
        }
    }
    /// Guest bytes done in order.
    public var bytesDone: UInt64 { min(total, UInt64(state.withLock { $0.prefix }) * chunkSize) }
}

/// What one drive's restore did, counted by its loaders.
final class RestoreCounters: Sendable {
    let ordered: OrderedProgress?
    private struct Counts { var read = 0, cached = 0, zero = 0, shared = 0, saved: UInt64 = 0 }
    private let counts = Mutex(Counts())
    init(ordered: OrderedProgress? = nil) { self.ordered = ordered }
    func add(read r: Int = 0, cached c: Int = 0, zero z: Int = 0, shared s: Int = 0, saved v: UInt64 = 0) {
        counts.withLock {
            $0.read += r; $0.cached += c; $0.zero += z; $0.shared += s; $0.saved += v
        }
    }
    func summary(archive: String, image: EncoderSummary, chunks: Int) -> PBSRestore.Summary {
        let c = counts.withLock { $0 }
        return PBSRestore.Summary(archive: archive, image: image, chunks: chunks, chunksRead: c.read, chunksFromCache: c.cached,
                                  chunksZero: c.zero, chunksShared: c.shared, dedupBytesSaved: c.saved)
    }
}

/// Decoded chunks that will be used again, in bounded memory. Each entry knows how many uses are
/// still to come (from the indexes); it leaves the cache after its last use, and when space runs
/// out the entry with the fewest uses to come is dropped first (hot chunks stay).
final class ChunkCache: Sendable {
    private struct State {
        var used = 0
        var remaining: [ArraySlice<UInt8>: Int]
        var entries: [ArraySlice<UInt8>: [UInt8]] = [:]

        mutating func dropUse(_ d: ArraySlice<UInt8>) {
            let left = (remaining[d] ?? 1) - 1
            remaining[d] = left
            if left <= 0, let e = entries.removeValue(forKey: d) { used -= e.count }
        }
    }
    private let capacity: Int
    private let state: Mutex<State>

    init(capacity: Int, uses: [ArraySlice<UInt8>: Int]) {
        self.capacity = capacity
        state = Mutex(State(remaining: uses))
    }

    /// True when `d` is held now.
    func contains(_ d: ArraySlice<UInt8>) -> Bool {
        state.withLock { $0.entries[d] != nil }
    }

    /// Counts a use that needs no data (a shared copy).
    func consume(_ d: ArraySlice<UInt8>) {
        state.withLock { $0.dropUse(d) }
    }

    /// Copies a cached chunk out (counting the use); false when absent.
    func take(_ d: ArraySlice<UInt8>, into out: UnsafeMutableRawBufferPointer) -> Bool {
        state.withLock { s in
            guard let e = s.entries[d], e.count == out.count else { return false }
            e.withUnsafeBytes { out.copyMemory(from: $0) }
            s.dropUse(d)
            return true
        }
    }

    /// Offers a freshly loaded chunk (its use is counted); kept only if it will be used again.
    func offer(_ d: ArraySlice<UInt8>, _ bytes: UnsafeRawBufferPointer) {
        let capacity = self.capacity
        state.withLock { s in
            s.dropUse(d)
            let left = s.remaining[d] ?? 0
            guard left > 0, s.entries[d] == nil, bytes.count <= capacity else { return }
            while s.used + bytes.count > capacity {
                guard let victim = s.entries.keys.min(by: { (s.remaining[$0] ?? 0) < (s.remaining[$1] ?? 0) }),
                      (s.remaining[victim] ?? 0) <= left else { return }
                s.used -= s.entries.removeValue(forKey: victim)!.count
            }
            s.entries[d] = Array(bytes)
            s.used += bytes.count
        }
    }
}
