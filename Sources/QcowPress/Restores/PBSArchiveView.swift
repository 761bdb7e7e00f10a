import BackupSources
import Glibc
import NIOCore
import Synchronization

/// One PBS archive (a drive) as a guest image read through a shared ``PBSChunkCache``: reads at
/// any offset, all-zero chunks known without a load.
// @unchecked: `readAhead` is set once, before the first read (a lock on every read cost the live
// restore's client reads: bench/nbd_bench.py live 1.22-1.31x of the restore alone, 1.03-1.15x without).
public final class PBSArchiveView: @unchecked Sendable {
    /// The drive: its index and zero chunks. Clients that copy a drive skip what block status
    /// calls holes, so a sequential reader goes on after a run of zero chunks at the next chunk
    /// with data (`PBSDrive.nextDataChunk(from:)`).
    public let drive: PBSDrive
    public let cache: PBSChunkCache
    public var name: String { drive.name }
    public var index: PBSFixedIndex { drive.index }

    public init(drive: PBSDrive, cache: PBSChunkCache) {
        self.drive = drive
        self.cache = cache
    }

    /// Guest size: the archive's size rounded up to 512 bytes, as QEMU sizes block devices.
    public var size: UInt64 { drive.size }

    /// True when chunk `i` is the all-zero chunk.
    public func isZeroChunk(_ i: Int) -> Bool { drive.isZeroChunk(i) }

    /// Where the last few reads ended: a read that starts at one of them is sequential, and
    /// reading on into the next chunk makes it load that chunk ahead. Eight: a copy over 4
    /// connections with requests in flight on each starts most reads where one of the last
    /// eight ended; random reads almost never do.
    private let recentEnds = Mutex<(ends: [UInt64], next: Int)>((Array(repeating: UInt64.max, count: 8), 0))

    /// Loads chunk `j` ahead of a sequential reader in place of ``PBSChunkCache/prefetch(_:length:what:)``
    /// (a live restore loads it and writes it into the image in one go). Set once, before the first read.
    var readAhead: (@Sendable (Int) -> Void)?

    /// Reads [offset, offset + count) (bytes past the archive's end read as zero). A sequential
    /// reader gets the next chunk loaded ahead (``PBSChunkCache/prefetch(_:length:what:)``).
    public func read(at offset: UInt64, count: Int, into out: UnsafeMutableRawBufferPointer) throws(QcowPressError) {
        _ = try read(at: offset, count: count, into: out, cachedOnly: false)
    }

    /// ``read(at:count:into:)``; with `cachedOnly`, only from chunks the cache holds (waiting for
    /// one being loaded): false, without loading anything, when one is not held.
    func read(at offset: UInt64, count: Int, into out: UnsafeMutableRawBufferPointer, cachedOnly: Bool) throws(QcowPressError) -> Bool {
        let sequential = noteRead(at: offset, count: count)
        guard try readChunks(at: offset, count: count, into: out, cachedOnly: cachedOnly) else { return false }
        if sequential { loadAhead(after: offset + UInt64(count)) }
        return true
    }

    /// [offset, offset + count) as a slice of its chunk's buffer, sent as is (no copy), when it
    /// lies inside one chunk that is not all zero; the chunk is loaded if needed. Nil when the
    /// range spans chunks, is all zero or lies past the archive's data (``read(at:count:into:)``
    /// then). A sequential reader gets the next chunks loaded ahead, as with a read.
    public func slice(at offset: UInt64, count: Int) throws(QcowPressError) -> ByteBuffer? {
        guard let (i, within) = singleChunk(offset, count) else { return nil }
        let sequential = noteRead(at: offset, count: count)
        let chunk = try cache.chunk(index.digest(i), length: index.chunkLength(i), what: chunkName(i))
        if sequential { loadAhead(after: offset + UInt64(count)) }
        return Self.piece(of: chunk, within, count)
    }

    /// ``slice(at:count:)`` for a caller that must not block (an NBD event loop): `then` gets the
    /// slice — at once when the chunk is cached, else when its load ends (loads run on threads of
    /// the cache). False, without calling `then`, when the range is not inside one chunk with data
    /// or the cache has as many such loads running as it allows: read on a thread of your own then.
    public func slice(at offset: UInt64, count: Int, then: @escaping @Sendable (Result<ByteBuffer, QcowPressError>) -> Void) -> Bool {
        guard let (i, within) = singleChunk(offset, count) else { return false }
        let what = chunkName(i)
        let accepted = cache.chunk(index.digest(i), length: index.chunkLength(i), what: what) { r in
            then(r.flatMap { chunk in
                Self.piece(of: chunk, within, count).map { .success($0) }
                    ?? .failure(.misuse("\(what): the cached chunk is shorter than its index says"))
            })
        }
        guard accepted else { return false }
        if noteRead(at: offset, count: count) { loadAhead(after: offset + UInt64(count)) }
        return true
    }

    /// ``slice(at:count:)`` only when the chunk is cached now: never waits, never loads (an event
    /// loop serves cached reads itself with this). Nil when it is not at hand.
    public func cachedSlice(at offset: UInt64, count: Int) -> ByteBuffer? {
        guard let (i, within) = singleChunk(offset, count),
              let chunk = cache.cachedChunk(index.digest(i), length: index.chunkLength(i)) else { return nil }
        if noteRead(at: offset, count: count) { loadAhead(after: offset + UInt64(count)) }
        return Self.piece(of: chunk, within, count)
    }

    /// `count` bytes at `within` of a chunk, sharing its memory.
    private static func piece(of chunk: ByteBuffer, _ within: Int, _ count: Int) -> ByteBuffer? {
        chunk.getSlice(at: chunk.readerIndex + within, length: count)
    }

    /// The chunk holding all of [offset, offset + count) and where the range starts in it; nil
    /// when the range is empty, spans chunks, reaches past the data or the chunk is all zero.
    private func singleChunk(_ offset: UInt64, _ count: Int) -> (Int, Int)? {
        let cs = UInt64(index.chunkSize)
        let i = Int(offset / cs)
        guard count > 0, i < index.chunkCount, !isZeroChunk(i) else { return nil }
        let within = Int(offset % cs)
        return within + count <= index.chunkLength(i) ? (i, within) : nil
    }

    /// How errors name chunk `i`.
    private func chunkName(_ i: Int) -> String {
        "chunk \(i) of \(name) (guest offset \(UInt64(i) * UInt64(index.chunkSize)))"
    }

    /// Records a read; true when it is sequential (it starts where a recent one ended, or at the
    /// next chunk with data after a read that ended where zero chunks begin).
    private func noteRead(at offset: UInt64, count: Int) -> Bool {
        let cs = UInt64(index.chunkSize)
        var end = offset + UInt64(count)
        if end % cs == 0, end / cs < UInt64(index.chunkCount) {
            end = UInt64(drive.nextDataChunk(from: Int(end / cs))) * cs
        }
        return recentEnds.withLock { r in
            let hit = r.ends.contains(offset)
            r.ends[r.next] = end
            r.next = (r.next + 1) % r.ends.count
            return hit
        }
    }

    /// Loads the next ``PBSChunkCache/depth`` chunks with data after a sequential read ending at
    /// `end`, once the read is past the middle of its chunk.
    private func loadAhead(after end: UInt64) {
        let cs = UInt64(index.chunkSize)
        let next = Int((end + cs - 1) / cs)
        guard end + cs / 2 > UInt64(next) * cs else { return }
        var j = next
        for _ in 0..<PBSChunkCache.depth {
            guard j < index.chunkCount else { return }
            j = drive.nextDataChunk(from: j)
            guard j < index.chunkCount else { return }
            defer { j += 1 }
            if let hook = readAhead {
                hook(j)
            } else {
                cache.prefetch(index.digest(j), length: index.chunkLength(j), what: chunkName(j))
            }
        }
    }

    /// The bytes of [offset, offset + count) from the chunks (no read-ahead); with `cachedOnly`,
    /// false without loading when a chunk is not held.
    func readChunks(at offset: UInt64, count: Int, into out: UnsafeMutableRawBufferPointer, cachedOnly: Bool) throws(QcowPressError) -> Bool {
        let cs = UInt64(index.chunkSize)
        var done = 0
        while done < count {
            let at = offset + UInt64(done)
            let i = Int(at / cs)
            let within = Int(at % cs)
            guard i < index.chunkCount else {
                memset(out.baseAddress! + done, 0, count - done)
                return true
            }
            let len = index.chunkLength(i)
            let n = min(count - done, len - within)
            if n <= 0 {
                memset(out.baseAddress! + done, 0, count - done)
                return true
            }
            if isZeroChunk(i) {
                memset(out.baseAddress! + done, 0, n)
            } else if cachedOnly {
                let dst = out.baseAddress! + done
                guard cache.withCachedChunk(index.digest(i), length: len, { src in memcpy(dst, src.baseAddress! + within, n) }) != nil else { return false }
            } else {
                let dst = out.baseAddress! + done
                _ = try cache.withChunk(index.digest(i), length: len, what: chunkName(i)) { src in
                    memcpy(dst, src.baseAddress! + within, n)
                }
            }
            done += n
        }
        return true
    }
}
