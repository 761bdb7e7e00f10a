import BackupSources
import DirectIO
import Glibc
import NIOCore
import Synchronization

/// A restore whose drives can be read while they are written (live restore): every drive's
/// encoder starts at once, one ``PBSChunkCache`` serves both the restore and readers, and a chunk a
/// reader asks for is loaded at once — ahead of the restore's order — and that same load is
/// written into the drive's qcow2, so the restore never fetches it again.
///
/// The cache is the restore's chunk cache (``PBSRestore/Options/cacheBytes``, out of the memory
/// limit, of which it may take a third); chunks used more than once stay longest. A client
/// reading what the restore has passed finds it there while the cache holds it, and otherwise
/// reads it back from the image being written (``Qcow2Encoder/readWritten(at:count:into:context:wait:stall:)``:
/// no chunk is loaded twice), or from the finished image once the drive is complete.
public final class PBSLiveRestore: Sendable {
    public let drives: [Drive]
    let restore: PBSRestore
    let options: PBSRestore.Options
    let group: EncoderGroup
    public let cache: PBSChunkCache
    /// Every image (and, with ``init(_:allInto:encoder:options:)``, config file) of this restore:
    /// they appear together when all drives are restored, or not at all.
    let outputs: OutputSet
    private let configs: [(path: String, bytes: [UInt8])]

    /// Opens every archive and creates every image (under temporary names) before any chunk is
    /// restored, so readers can start at once. `encoder.overwrite` says whether existing
    /// destinations may be replaced (they are, only when the whole restore succeeds).
    public convenience init(_ restore: PBSRestore, jobs: [(archive: String, destination: String)], encoder: EncoderOptions,
                            options: PBSRestore.Options = .init()) throws(QcowPressError) {
        try self.init(restore, outputs: PBSRestore.AllOutputs(jobs: jobs, configs: []), outdir: nil, encoder: encoder, options: options)
    }

    /// Every drive of the snapshot into `outdir`, named and checked as ``PBSRestore/restoreAll(into:overwrite:encoder:options:started:)``
    /// names them, with the snapshot's config files beside them.
    public convenience init(_ restore: PBSRestore, allInto outdir: String, encoder: EncoderOptions,
                            options: PBSRestore.Options = .init()) throws(QcowPressError) {
        try self.init(restore, outputs: try restore.allOutputs(into: outdir, overwrite: encoder.overwrite), outdir: outdir,
                      encoder: encoder, options: options)
    }

    private init(_ restore: PBSRestore, outputs all: PBSRestore.AllOutputs, outdir: String?, encoder: EncoderOptions,
                 options: PBSRestore.Options) throws(QcowPressError) {
        self.restore = restore
        let jobs = all.jobs
        configs = all.configs
        let plans = try jobs.map { j throws(QcowPressError) in try restore.drive(j.archive) }
        let (o, e) = try PBSRestore.fit(options, encoder, chunkSize: plans.map(\.index.chunkSize).max() ?? 4 << 20,
                                        cacheShare: 3, remote: restore.reader.store.isRemote, images: jobs.count)
        self.options = o
        // The cache serves the restore and the readers (its size comes out of the memory limit, but
        // holds at least two chunks: a reader's chunk must survive until it is copied out).
        let chunk = plans.map(\.index.chunkSize).max() ?? 4 << 20
        cache = PBSChunkCache(reader: restore.reader, capacity: max(o.cacheBytes, 2 * chunk), indexes: plans.map(\.index))
        group = try EncoderGroup(threads: e.threads, memoryLimit: e.memoryLimit, clusterSize: e.clusterSize,
                                 compression: e.compression, images: jobs.count)
        let outputs = OutputSet(overwrite: e.overwrite)
        self.outputs = outputs
        var drives: [Drive] = []
        do throws(QcowPressError) {
            if let outdir { try outputs.makeDirectory(outdir) }
            for (j, job) in jobs.enumerated() {
                var eo = e
                eo.group = group
                eo.virtualSize = plans[j].size
                let enc = try Qcow2Encoder(destination: job.destination, options: eo)
                outputs.add(enc)
                drives.append(Drive(archive: plans[j].archive, view: PBSArchiveView(drive: plans[j], cache: cache),
                                    destination: job.destination, encoder: enc, plan: plans[j].steps(dedup: o.dedup, encoder: eo)))
            }
        } catch {
            outputs.rollback()
            group.shutdown()
            throw error
        }
        self.drives = drives
    }

    /// Gives up before ``run(commitEarly:driveDone:keep:)``: every image goes, every destination
    /// stays as it was.
    public func cancel() {
        outputs.rollback()
        group.shutdown()
    }

    /// Guest bytes restored so far, over every drive, counted in each drive's order.
    public var bytesDone: UInt64 { drives.reduce(0) { $0 + $1.ordered.bytesDone } }
    /// Guest bytes of every drive.
    public var totalBytes: UInt64 { drives.reduce(0) { $0 + $1.ordered.total } }

    /// Restores every drive, one after the other (readers may read any drive meanwhile). Each
    /// drive is finished (header, fsync) as soon as its last chunk is written, and `driveDone` is
    /// called with it at once, so a caller can move a reader onto it while the next drive is
    /// restored. A drive named in `commitEarly` (one a running VM is about to be switched onto) is
    /// renamed into place before `driveDone`; the others when every drive is restored.
    ///
    /// All-or-nothing (`OutputSet`): on failure every destination is as it was before the run,
    /// except the images `keep` says are in use (a running VM switched onto them); `keep` is asked
    /// only about images renamed into place early.
    public func run(commitEarly: Set<String> = [], driveDone: (Drive, PBSRestore.Summary) -> Void = { _, _ in },
                    keep: (Drive) -> Bool = { _ in false }) throws(QcowPressError) -> [PBSRestore.Summary] {
        defer { group.shutdown() }
        var out: [PBSRestore.Summary] = []
        var early: [Drive] = []
        do throws(QcowPressError) {
            for d in drives {
                try restoreChunks(of: d)
                // Chunks a reader claimed and gave back (its load failed) are the restore's again.
                d.waitForReaders()
                for i in 0..<d.plan.count {
                    if case .load = d.plan[i], d.claim(i) { try d.loadAndWrite(i) }
                }
                // Every chunk written, by the restore or ahead of it by a reader (a reader's failed
                // write fails the image here rather than leaving a hole in it).
                if let i = d.firstUnwritten() {
                    throw .inputDamaged(path: d.archive, location: "chunk \(i) was not restored (a reader's load of it failed)")
                }
                d.beginFinishing()
                let s: EncoderSummary
                do throws(QcowPressError) { s = try d.encoder.finishBlocking() } catch {
                    d.endFinishing(succeeded: false)
                    throw error
                }
                d.endFinishing(succeeded: true)
                if commitEarly.contains(d.name) {
                    try outputs.commitNow(d.encoder)
                    early.append(d)
                }
                let summary = d.counters.summary(archive: d.archive, image: s, chunks: d.plan.count)
                out.append(summary)
                driveDone(d, summary)
            }
            for c in configs { try outputs.stage(c.bytes, as: c.path) }
            try outputs.commitAll()
        } catch {
            outputs.rollback(keeping: { e in early.contains { $0.encoder === e && keep($0) } })
            throw error
        }
        return out
    }

    /// The restore's pass over one drive's chunks, in index order with `options.loaders` threads.
    private func restoreChunks(of d: Drive) throws(QcowPressError) {
        let cs = UInt64(d.view.index.chunkSize)
        let index = d.view.index
        let store = restore.reader.store
        if store.isRemote {
            // From a server: the chunks this drive loads, in the restore's order, requested
            // ahead (a reader's chunk that is among them is taken from there too).
            store.willFetch(d.view.drive.firstLoads(d.plan, except: cache.contains), window: max(1, options.streams))
        }
        try forEachIndex(UInt64(d.plan.count), threads: options.loaders, name: "qp-live") {
            return { (i64) throws(QcowPressError) in
                let i = Int(i64)
                let at = UInt64(i) * cs
                let len = UInt64(index.chunkLength(i))
                switch d.plan[i] {
                case .zero:
                    try d.encoder.writeZeroesBlocking(at: at, length: len)
                    d.counters.add(zero: 1)
                    d.ordered.complete(i)
                case .copy(let f):
                    try d.encoder.writeCopy(at: at, from: UInt64(f) * cs, length: len)
                    d.counters.add(shared: 1, saved: len)
                    d.ordered.complete(i)
                case .load:
                    // A reader may have claimed it already: then it is written (or being).
                    if d.claim(i) { try d.loadAndWrite(i) }
                }
            }
        }
    }
}

