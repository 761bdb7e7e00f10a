import DirectIO
import Glibc

/// Decoded blocks of guest images in a fixed amount of memory, shared by every image read through
/// it (`serve image --cache-size`): a small read of a compressed qcow2 cluster decodes the whole
/// cluster once, and later reads of that cluster are copies. Least recently used goes first; two
/// readers of one block never decode it twice at once (the second waits for the first).
///
/// Reads of at least `bypassBytes` go straight to the image: sequential copies (nbdcopy reads
/// 256 KiB–2 MiB) gain nothing from a cache and would only evict what random readers use.
public final class BlockCache: Sendable {
    public let capacity: Int
    /// Requests this large or larger are not cached: sequential copies ask for 256 KiB (nbdcopy)
    /// or 2 MiB (qemu-img convert) and read each block once, while guests' random reads are 4–128
    /// KiB. Copies through the cache would only evict what random readers use.
    public static let bypassBytes = 256 << 10

    fileprivate struct Key: Hashable { let image: ObjectIdentifier; let block: UInt64 }
    private let state = ConditionMutex(Blocks())

    public init(capacity: Int) {
        self.capacity = capacity
    }

    /// Hits and decoded blocks so far.
    public var stats: (hits: Int, misses: Int) { state.withLock { ($0.hits, $0.misses) } }

    /// Reads [offset, offset + count) of `image` through the cache, in blocks of `blockSize`
    /// (the image's cluster size); bytes past the virtual size read as zeros.
    public func read(_ image: any GuestImage, blockSize: Int, at offset: UInt64, count: Int,
                     into out: UnsafeMutableRawPointer, context: ReadContext) throws(QcowPressError) {
        if count >= Self.bypassBytes || blockSize > capacity || blockSize <= 0 {
            return try image.read(at: offset, count: count, into: out, context: context)
        }
        let bs = UInt64(blockSize)
        var done = 0
        while done < count {
            let at = offset + UInt64(done)
            let block = at / bs
            let within = Int(at % bs)
            let n = min(count - done, blockSize - within)
            let key = Key(image: ObjectIdentifier(image), block: block)
            try withBlock(key, image: image, start: block * bs, length: blockSize, context: context) { p in
                memcpy(out + done, p.baseAddress! + within, n)
            }
            done += n
        }
    }

    private func withBlock(_ key: Key, image: any GuestImage, start: UInt64, length: Int, context: ReadContext,
                           _ body: (UnsafeRawBufferPointer) -> Void) throws(QcowPressError) {
        let cached: [UInt8]? = state.withLock(waitingUntil: { !$0.loading.contains(key) }) { b in
            if let s = b.map[key] {
                b.hits += 1
                b.touch(s)
                return b.slots[s].bytes
            }
            b.misses += 1
            b.loading.insert(key)
            return nil
        }
        if let cached {
            cached.withUnsafeBytes(body)
            return
        }
        var bytes = [UInt8](repeating: 0, count: length)
        let result: Result<Void, QcowPressError> = bytes.withUnsafeMutableBytes { p in
            do throws(QcowPressError) {
                try image.read(at: start, count: length, into: p.baseAddress!, context: context)
                return .success(())
            } catch {
                return .failure(error)
            }
        }
        let kept = bytes
        state.withLock { b in
            b.loading.remove(key)
            if case .success = result { b.insert(key, kept, capacity: capacity) }
        }
        state.broadcast()
        try result.get()
        bytes.withUnsafeBytes(body)
    }
}

/// What a ``BlockCache`` holds, under its lock: slots in a doubly linked list, most recently used
/// at `head`, the blocks being loaded, and the counts.
private struct Blocks {
    struct Slot { var key: BlockCache.Key; var bytes: [UInt8]; var prev: Int; var next: Int }
    var slots: [Slot] = []
    var free: [Int] = []
    var map: [BlockCache.Key: Int] = [:]
    var head = -1, tail = -1
    var used = 0
    var loading = Set<BlockCache.Key>()
    var hits = 0
    var misses = 0

    mutating func unlink(_ s: Int) {
        let (p, n) = (slots[s].prev, slots[s].next)
        if p >= 0 { slots[p].next = n } else { head = n }
        if n >= 0 { slots[n].prev = p } else { tail = p }
    }

    mutating func pushFront(_ s: Int) {
        slots[s].prev = -1
        slots[s].next = head
        if head >= 0 { slots[head].prev = s }
        head = s
        if tail < 0 { tail = s }
    }

    mutating func touch(_ s: Int) {
        guard head != s else { return }
        unlink(s)
        pushFront(s)
    }

    mutating func insert(_ key: BlockCache.Key, _ bytes: [UInt8], capacity: Int) {
        guard map[key] == nil, bytes.count <= capacity else { return }
        while used + bytes.count > capacity, tail >= 0 {
            let victim = tail
            unlink(victim)
            map[slots[victim].key] = nil
            used -= slots[victim].bytes.count
            slots[victim].bytes = []
            free.append(victim)
        }
        let slot = Slot(key: key, bytes: bytes, prev: -1, next: -1)
        let s: Int
        if let f = free.popLast() {
            slots[f] = slot
            s = f
        } else {
            slots.append(slot)
            s = slots.count - 1
        }
        pushFront(s)
        map[key] = s
        used += bytes.count
    }
}
