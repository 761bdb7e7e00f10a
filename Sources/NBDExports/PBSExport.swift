import NBDServer
import NIOCore
import QcowPress

/// A PBS archive as a read-only NBD export: reads through the shared chunk cache; block status
/// reports the all-zero chunks as holes (known from the index, never loaded).
final class PBSExport: NBDExport, Sendable {
    let view: PBSArchiveView
    var name: String { view.name }
    var size: UInt64 { view.size }
    var isReadOnly: Bool { true }
    init(view: PBSArchiveView) { self.view = view }

    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawBufferPointer) throws(NBDError) {
        do throws(QcowPressError) { try view.read(at: offset, count: count, into: into) } catch { throw NBDError.io(error.message) }
    }

    /// A read inside one chunk is a slice of the cached chunk, sent without a copy.
    func readBuffer(at offset: UInt64, count: Int) throws(NBDError) -> ByteBuffer? {
        do throws(QcowPressError) { return try view.slice(at: offset, count: count) } catch { throw NBDError.io(error.message) }
    }

    func readNow(at offset: UInt64, count: Int) -> ByteBuffer? { view.cachedSlice(at: offset, count: count) }

    func read(at offset: UInt64, count: Int, then: @escaping @Sendable (Result<ByteBuffer, NBDError>) -> Void) -> Bool {
        view.slice(at: offset, count: count) { r in then(r.mapError { NBDError.io($0.message) }) }
    }

    func blockStatus(at offset: UInt64, length: UInt64) throws(NBDError) -> [(length: UInt64, flags: UInt32)] {
        let cs = UInt64(view.index.chunkSize)
        return NBD.extents(from: offset, to: min(offset + length, size), granule: cs) { at, _ in
            let i = Int(at / cs)
            return i >= view.index.chunkCount || view.isZeroChunk(i)
        }
    }
}

/// A drive being restored as a read-only NBD export.
final class LiveExport: NBDExport, Sendable {
    let drive: PBSLiveRestore.Drive
    let pbs: PBSExport
    var name: String { drive.name }
    var size: UInt64 { drive.size }
    var isReadOnly: Bool { true }
    init(drive: PBSLiveRestore.Drive) {
        self.drive = drive
        pbs = PBSExport(view: drive.view)
    }
    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawBufferPointer) throws(NBDError) {
        do throws(QcowPressError) { try drive.read(at: offset, count: count, into: into) } catch { throw NBDError.io(error.message) }
    }
    func readNow(at offset: UInt64, count: Int) -> ByteBuffer? { drive.cachedSlice(at: offset, count: count) }
    func blockStatus(at offset: UInt64, length: UInt64) throws(NBDError) -> [(length: UInt64, flags: UInt32)] {
        try pbs.blockStatus(at: offset, length: length)
    }
}

extension ExportSet {
    /// The disk archives of a PBS snapshot (all when `archives` is empty; names as
    /// ``PBSRestore/drive(_:)`` takes them) as read-only exports named after their drives, read
    /// through one chunk cache of `cacheBytes`. Its ``report`` says how many chunks were loaded
    /// and how many reads the cache answered.
    public static func pbs(_ restore: PBSRestore, archives: [String], cacheBytes: Int) throws(QcowPressError) -> ExportSet {
        let names = archives.isEmpty ? restore.archives.map(\.name) : archives
        let drives = try names.map { n throws(QcowPressError) in try restore.drive(n) }
        let cache = PBSChunkCache(reader: restore.reader, capacity: cacheBytes, indexes: drives.map(\.index))
        let exports: [any NBDExport] = drives.map { PBSExport(view: PBSArchiveView(drive: $0, cache: cache)) }
        return ExportSet(exports) {
            let s = cache.stats
            return "\(s.loads) chunk loads, \(s.hits) cache hits"
        }
    }

    /// The drives of a live restore, readable while they are restored.
    public static func live(_ live: PBSLiveRestore) -> ExportSet {
        ExportSet(live.drives.map { LiveExport(drive: $0) })
    }
}
