import BackupSources
import DirectIO
import Dispatch
import Glibc
import NIOCore
import Synchronization

/// Decoded PBS chunks in a fixed amount of memory, shared by every archive (drive) and every
/// reader of a snapshot — however many drives, one budget. Least recently used goes first, except
/// that chunks the indexes use more than once ("hot": repeated file-system metadata, common
/// blocks) are evicted only when no single-use chunk is left. Two readers of one digest never load
/// it twice at once: the second waits for the first's load (single flight). Every load is verified
/// as in a restore (CRC, decryption, decompression, digest).
///
/// Chunks are held in NIO `ByteBuffer`s so that an NBD reply can send a slice of one without
/// copying it (a copy into each reply was 5 % of `serve pbs`'s CPU); a slice handed out keeps its
/// chunk's memory alive after an eviction until the reply is sent.
// @unchecked: every `var` is guarded by `lock` (a ConditionLock: loads wait on it), and decode scratches are not Sendable.
public final class PBSChunkCache: @unchecked Sendable {
    public let reader: PBSChunkReader
    public let capacity: Int
    private let lock = ConditionLock()
    // Guarded by `lock`.
    /// `pins`: bodies running over the chunk now. A pinned chunk is not evicted: its bytes stay in
    /// memory while a body holds them anyway, and a live restore's body (writing the chunk into the
    /// image) can run long enough for a client to want the chunk meanwhile.
    private struct Entry { var bytes: ByteBuffer; var lastUse: UInt64; let hot: Bool; var pins = 0 }
    private var entries: [ArraySlice<UInt8>: Entry] = [:]
    private var used = 0
    private var clock: UInt64 = 0
    /// Chunks being loaded, each with the callbacks waiting for it (``chunk(_:length:what:then:)``);
    /// threads waiting for one wait in `lookUp`.
    private var loading: [ArraySlice<UInt8>: [Waiter]] = [:]
    public typealias Waiter = @Sendable (Result<ByteBuffer, QcowPressError>) -> Void
    /// Loads started for ``chunk(_:length:what:then:)`` running now, each on a thread of its own.
    private var demandLoads = 0
    private var hot = Set<ArraySlice<UInt8>>()
    private var scratches: [PBSChunkReader.Scratch] = []
    private(set) var hits = 0
    private(set) var loads = 0

    /// - Parameters:
    ///   - reader: loads and verifies chunks of the snapshot.
    ///   - capacity: bytes of decoded chunks kept.
    ///   - indexes: every index that will be read (their repeated digests are the hot set).
    public init(reader: PBSChunkReader, capacity: Int, indexes: [PBSFixedIndex]) {
        self.reader = reader
        self.capacity = capacity
        var count: [ArraySlice<UInt8>: Int] = [:]
        for idx in indexes { for i in 0..<idx.chunkCount { count[idx.digest(i), default: 0] += 1 } }
        hot = Set(count.filter { $0.value > 1 }.keys)
    }

    /// Chunk loads running ahead of sequential readers at once, and how many chunks ahead of a
    /// sequential reader they go. Each load holds one chunk buffer beyond the cache's capacity
    /// while it runs (six: 24 MiB with PBS's 4 MiB chunks). Measured on this 2-core machine: page
    /// cache dropped, `qcowpress serve pbs --datastore D vm/100/… --socket S` and the time of
    /// `nbdcopy --connections=4 nbd+unix:///drive-scsi0?socket=S null:` over the 3 GiB bench disk
    /// (449 distinct chunks), settings alternating: stop 20: 2 loads, 1 ahead: 3.58-3.74 s;
    /// 4 loads, 2 ahead: 2.72-3.24 s. Stop 22 (zero-copy replies): 4 loads, 2 ahead: 2.73-2.93 s
    /// (six runs, mean 2.84); 6 loads, 2 ahead: 2.62-2.76 s; 6 loads, 3 ahead: 2.44-2.87 s (six
    /// runs, mean 2.61); 8 loads, 3 or 4 ahead: 2.37-3.11 s. With fewer, readers of four
    /// connections kept waiting on their own loads while a core idled.
    public static let maxPrefetches = 6
    public static let depth = 3
    private var prefetching = 0

    /// Starts loading a chunk in the background (read-ahead for a sequential reader) unless it is
    /// cached or being loaded, or `maxPrefetches` loads are running already. A failed load is
    /// dropped: the reader that then needs the chunk loads it and gets the error.
    public func prefetch(_ digest: ArraySlice<UInt8>, length: Int, what: String) {
        let d = ArraySlice(digest)
        let go: Bool = lock.withLock {
            loading[d] != nil || entries[d]?.bytes.readableBytes == length ? false : reserveAhead()
        }
        if go { startCounted("qp-prefetch", \.prefetching) { _ = try? self.chunk(d, length: length, what: what) } }
    }

    /// Runs `body` (a load ahead of a reader) on a thread of its own unless `maxPrefetches` run
    /// already; false when it did not start.
    func runAhead(_ body: @escaping @Sendable () -> Void) -> Bool {
        let go = lock.withLock { reserveAhead() }
        if go { startCounted("qp-prefetch", \.prefetching, body) }
        return go
    }

    /// Counts one more read-ahead load unless `maxPrefetches` run already. Caller holds the lock.
    private func reserveAhead() -> Bool {
        if prefetching >= Self.maxPrefetches { return false }
        prefetching += 1
        return true
    }

    /// Starts a load on a thread of its own that `counter` counts (the caller counted it, under
    /// the lock; the thread takes it off when done). Not on Dispatch: its shared pool could sit
    /// behind blocked work of other clients of the process for seconds (seen in the test suite).
    private func startCounted(_ name: String, _ counter: any ReferenceWritableKeyPath<PBSChunkCache, Int> & Sendable,
                              _ body: @escaping @Sendable () -> Void) {
        startThread(name: name) {
            body()
            self.lock.withLock { self[keyPath: counter] -= 1 }
        }
    }

    /// True when chunk `digest` is held now.
    func contains(_ digest: ArraySlice<UInt8>) -> Bool {
        lock.withLock { entries[digest] != nil }
    }

    /// Bytes the cache counts as held, and the bytes of the chunks it holds (the two must agree).
    var accounting: (used: Int, held: Int) {
        lock.withLock { (used, entries.values.reduce(0) { $0 + $1.bytes.readableBytes }) }
    }

    /// Counts of cache hits and chunk loads so far.
    public var stats: (hits: Int, loads: Int) { lock.withLock { (hits, loads) } }

    /// Runs `body` over chunk `digest` if the cache holds it (waiting for a load of it that is
    /// running); nil, without loading, when it does not.
    func withCachedChunk<T>(_ digest: ArraySlice<UInt8>, length: Int, _ body: (UnsafeRawBufferPointer) -> T) -> T? {
        lock.withLock { lookUp(digest, length: length, pin: false, wait: true) }.map { $0.withUnsafeReadableBytes(body) }
    }

    /// Chunk `digest` if the cache holds it now: never waits for a load, never loads (for an
    /// event loop, which must not block).
    public func cachedChunk(_ digest: ArraySlice<UInt8>, length: Int) -> ByteBuffer? {
        lock.withLock { lookUp(digest, length: length, pin: false, wait: false) }
    }

    /// Takes `d` from the cache (a hit; pinned when `pin`), after waiting for a running load of
    /// it when `wait`; nil when it is not held. Caller holds the lock.
    private func lookUp(_ d: ArraySlice<UInt8>, length: Int, pin: Bool, wait: Bool) -> ByteBuffer? {
        while wait && loading[d] != nil { lock.wait() }
        guard var e = entries[d], e.bytes.readableBytes == length else { return nil }
        clock += 1
        e.lastUse = clock
        if pin { e.pins += 1 }
        entries[d] = e
        hits += 1
        return e.bytes
    }

    /// Runs `body` over chunk `digest` (`length` bytes), loading it if needed. `what` names the
    /// chunk in errors. The chunk stays cached while `body` runs.
    public func withChunk<T>(_ digest: ArraySlice<UInt8>, length: Int, what: String,
                             _ body: (UnsafeRawBufferPointer) throws(QcowPressError) -> T) throws(QcowPressError) -> T {
        let d = ArraySlice(digest)  // its own storage: the key outlives the caller's index
        let (bytes, pinned) = try chunk(d, length: length, what: what, pin: true)
        defer { if pinned { unpin(d) } }
        let r: Result<T, QcowPressError> = bytes.withUnsafeReadableBytes { p in
            do throws(QcowPressError) { return .success(try body(p)) } catch { return .failure(error) }
        }
        return try r.get()
    }

    /// Chunk `digest` (`length` bytes), loaded if needed; the buffer is never written to again
    /// (a reply may send it as is).
    public func chunk(_ digest: ArraySlice<UInt8>, length: Int, what: String) throws(QcowPressError) -> ByteBuffer {
        try chunk(ArraySlice(digest), length: length, what: what, pin: false).bytes
    }

    /// Loads started by ``chunk(_:length:what:then:)`` at once; beyond this it declines and the
    /// caller reads on a thread of its own. 16: the NBD server's pool threads, which bounded
    /// these loads before they stopped blocking a thread each.
    public static let maxDemandLoads = 16

    /// Chunk `digest` for a caller that must not block (an NBD event loop): `then` gets it — at
    /// once when it is cached, else when the load of it that is running, or that this starts on a
    /// thread of its own, ends. False, without calling `then`, when ``maxDemandLoads`` such loads
    /// run already. Readers waiting for one chunk then cost no thread each.
    public func chunk(_ digest: ArraySlice<UInt8>, length: Int, what: String, then: @escaping Waiter) -> Bool {
        let d = ArraySlice(digest)
        enum Next { case cached(ByteBuffer), waiting, load, declined }
        let next: Next = lock.withLock {
            if let b = lookUp(d, length: length, pin: false, wait: false) { return .cached(b) }
            if loading[d] != nil {
                loading[d]!.append(then)
                return .waiting
            }
            guard demandLoads < Self.maxDemandLoads else { return .declined }
            demandLoads += 1
            loading[d] = [then]
            return .load
        }
        switch next {
        case .cached(let b): then(.success(b))
        case .waiting: break
        case .declined: return false
        case .load:
            startCounted("qp-load", \.demandLoads) {
                let spare = self.lock.withLock { self.scratches.popLast() }
                self.load(d, length: length, what: what, scratch: spare, pin: false)
            }
        }
        return true
    }

    /// The chunk, from the cache or loaded; `pinned`: it is pinned for the caller (who unpins).
    private func chunk(_ d: ArraySlice<UInt8>, length: Int, what: String, pin: Bool) throws(QcowPressError) -> (bytes: ByteBuffer, pinned: Bool) {
        let (cached, spare): (ByteBuffer?, PBSChunkReader.Scratch?) = lock.withLock {
            if let b = lookUp(d, length: length, pin: pin, wait: true) { return (b, nil) }
            // This thread loads it; others asking for it wait in `lookUp` or in `loading`.
            loading[d] = []
            return (nil, scratches.popLast())
        }
        if let cached { return (cached, pin) }
        let (result, pinned) = load(d, length: length, what: what, scratch: spare, pin: pin)
        return (try result.get(), pinned)
    }

    /// Loads chunk `d` (the caller put it in `loading`), keeps it, and hands it to every waiter.
    @discardableResult
    private func load(_ d: ArraySlice<UInt8>, length: Int, what: String, scratch spare: PBSChunkReader.Scratch?,
                      pin: Bool) -> (Result<ByteBuffer, QcowPressError>, pinned: Bool) {
        let scratch = spare ?? PBSChunkReader.Scratch()
        // Not zero-filled first: a load writes all `length` bytes or fails (and then the
        // buffer is dropped). The memset was 2 % of `serve pbs`'s profile.
        var failure: QcowPressError?
        var bytes = ByteBufferAllocator().buffer(capacity: length)
        bytes.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { p in
            do throws(SourceError) {
                try reader.load(digest: d, length: length, into: UnsafeMutableRawBufferPointer(rebasing: p[0..<length]), scratch: scratch, what: what)
                return length
            } catch {
                failure = QcowPressError(error)
                return 0
            }
        }
        let result: Result<ByteBuffer, QcowPressError> = failure.map { .failure($0) } ?? .success(bytes)
        let (pinned, waiters): (Bool, [Waiter]) = lock.withLock {
            scratches.append(scratch)
            let waiters = loading.removeValue(forKey: d) ?? []
            var pinned = false
            if failure == nil {
                loads += 1
                pinned = insert(d, bytes, pin: pin)
            }
            lock.broadcast()
            return (pinned, waiters)
        }
        for w in waiters { w(result) }
        return (result, pinned)
    }

    private func unpin(_ d: ArraySlice<UInt8>) {
        lock.withLock {
            if let p = entries[d]?.pins, p > 0 { entries[d]!.pins = p - 1 }
            trim(toFit: 0)
        }
    }

    /// Keeps a loaded chunk (pinned once when `pin`, for the caller's body). Pinned chunks are never
    /// evicted, so when every other chunk is pinned the cache holds more than its capacity for a
    /// while — memory those bodies hold anyway — and gives it back as they end. Refusing the
    /// chunk instead made every other reader of it load it again (62 loads for 24 chunks in
    /// `liveRestoreServesWhileItWrites`, whose slow disk keeps writes running). Caller holds the lock.
    private func insert(_ d: ArraySlice<UInt8>, _ bytes: ByteBuffer, pin: Bool) -> Bool {
        if var held = entries[d] {
            // Held already (a lookup that missed it on its length, then a load that succeeded):
            // keep the one held, so its bytes are counted once and its pins stay with it.
            clock += 1
            held.lastUse = clock
            if pin { held.pins += 1 }
            entries[d] = held
            return pin
        }
        guard bytes.readableBytes <= capacity else { return false }
        trim(toFit: bytes.readableBytes)
        clock += 1
        entries[d] = Entry(bytes: bytes, lastUse: clock, hot: hot.contains(d), pins: pin ? 1 : 0)
        used += bytes.readableBytes
        return pin
    }

    /// Evicts unpinned chunks — single-use ones first, least recently used first — until `extra`
    /// more bytes fit, or none is left to evict. Caller holds the lock.
    private func trim(toFit extra: Int) {
        while used + extra > capacity {
            let victim = entries.lazy.filter { $0.value.pins == 0 }.min { a, b in
                if a.value.hot != b.value.hot { return !a.value.hot }
                return a.value.lastUse < b.value.lastUse
            }
            guard let victim else { return }
            used -= victim.value.bytes.readableBytes
            entries[victim.key] = nil
        }
    }
}
