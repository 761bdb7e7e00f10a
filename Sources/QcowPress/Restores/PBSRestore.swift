import BackupSources
import DirectIO
import Foundation
import PBSRemote

/// Restores disk images from a snapshot in a local Proxmox Backup Server datastore into qcow2.
///
/// Chunks are loaded in parallel (read, CRC, decrypt, decompress, SHA-256 on `loaders` threads)
/// and handed to the encoder as they complete. An all-zero chunk is recognised by its digest and
/// never read. A chunk seen before in the same image becomes a ``Qcow2Encoder/writeCopy(at:from:length:)``
/// (stored once). Chunks used more than once are kept in a shared, bounded cache, preferring those
/// with the most uses still to come.
public struct PBSRestore: Sendable {
    public struct Options: Sendable {
        /// Chunk loader threads (read + verify + decode), each holding two chunk buffers. Reads
        /// wait on the disk, so more loaders than cores pay: measured here (3 GiB image, 449 distinct
        /// 4 MiB chunks, 2 cores, cold cache) 2 loaders 2.34 s, 4: 1.90 s, 8: 1.79 s. Default 4 per
        /// core, at most 16 (PBS's own restore gained up to 16 in flight).
        public var loaders: Int = min(16, 4 * EncoderOptions.defaultThreads)
        /// Point repeated chunks at the host clusters already written (default on).
        public var dedup: Bool = true
        /// Memory for decoded chunks that will be used again (shared by all drives of one restore).
        public var cacheBytes: Int = 64 << 20
        /// From a server: chunk requests in flight ahead of the loaders (HTTP/2 streams on one
        /// connection), each holding a received chunk until a loader takes it. 32 × 4 MiB in flight
        /// keeps a link of 2.5 GB/s busy at 50 ms round trips; the memory plan lowers it (at the
        /// default 256M and 4 MiB chunks: 16). Measured in bench/RESULTS.md ("remote").
        public var streams: Int = 32
        public init() {}
    }

    /// What one drive's restore did.
    public struct Summary: Sendable, Codable {
        public var archive: String
        public var image: EncoderSummary
        public var chunks: Int
        public var chunksRead: Int
        public var chunksFromCache: Int
        public var chunksZero: Int
        /// Chunks stored as references to an identical earlier chunk.
        public var chunksShared: Int
        /// Guest bytes that were not written again thanks to sharing.
        public var dedupBytesSaved: UInt64
    }

    /// The snapshot: in a datastore directory, or on a server.
    public let snapshot: any PBSSnapshotSource
    public let reader: PBSChunkReader

    /// Opens a snapshot in a local datastore; `keyFile` and `password` are needed for encrypted
    /// backups.
    public init(datastore: String, namespace: String?, snapshot: String, keyFile: String?,
                password: @escaping () throws(QcowPressError) -> String) throws(QcowPressError) {
        let snap: PBSSnapshot
        do throws(SourceError) { snap = try PBSSnapshot(datastore: datastore, namespace: namespace, snapshot: snapshot) } catch {
            throw QcowPressError(error)
        }
        try self.init(source: snap, keyFile: keyFile, password: password)
    }

    /// Opens a snapshot on a Proxmox Backup Server (the reader protocol over HTTPS and HTTP/2).
    public init(server: PBSServer, namespace: String?, snapshot: String, keyFile: String?,
                password: @escaping () throws(QcowPressError) -> String) throws(QcowPressError) {
        let snap: PBSRemoteSnapshot
        do throws(SourceError) { snap = try server.client().openSnapshot(namespace: namespace, snapshot: snapshot) } catch {
            throw QcowPressError(error)
        }
        try self.init(source: snap, keyFile: keyFile, password: password)
    }

    /// Opens any snapshot source (a datastore directory, a server, or one of the caller's own).
    public init(source snap: any PBSSnapshotSource, keyFile: String?,
                password: @escaping () throws(QcowPressError) -> String) throws(QcowPressError) {
        do throws(SourceError) {
            var key: PBSKey? = nil
            if let keyFile {
                key = try PBSKey.load(path: keyFile) { () throws(SourceError) -> String in
                    do throws(QcowPressError) { return try password() } catch {
                        throw SourceError(.wrongKey, path: keyFile, error.message)
                    }
                }
                try snap.manifest.verify(key: key!, path: snap.manifestPath)
            } else if snap.manifest.files.contains(where: { $0.cryptMode == "encrypt" }) {
                throw SourceError(.wrongKey, path: snap.manifestPath, "the backup is encrypted: pass --keyfile")
            }
            self.snapshot = snap
            reader = PBSChunkReader(store: snap.chunks, key: key)
        } catch {
            throw QcowPressError(error)
        }
    }

    /// The snapshots of a backup group (`vm/100`) on a server, oldest first.
    public static func snapshots(server: PBSServer, namespace: String?, group: String) throws(QcowPressError) -> [String] {
        do throws(SourceError) { return try server.client().snapshots(namespace: namespace, group: group) } catch {
            throw QcowPressError(error)
        }
    }

    /// The snapshots of a backup group (`vm/100`) in a local datastore, oldest first.
    public static func snapshots(datastore: String, namespace: String?, group: String) throws(QcowPressError) -> [String] {
        do throws(SourceError) { return try PBSSnapshot.snapshots(datastore: datastore, namespace: namespace, group: group) } catch {
            throw QcowPressError(error)
        }
    }

    /// The disk images of the snapshot: archive name and size in bytes.
    public var archives: [(name: String, size: UInt64)] {
        snapshot.images.map { ($0.filename, $0.size) }
    }

    /// Restores `archives` (name, destination) one after another, sharing one chunk cache. All or
    /// nothing (`OutputSet`): the images appear together at the end; after a failure every
    /// destination is as it was.
    public func restore(_ jobs: [(archive: String, destination: String)], encoder: EncoderOptions,
                        options: Options = Options(),
                        started: (Qcow2Encoder, OrderedProgress) -> Void = { _, _ in }) throws(QcowPressError) -> [Summary] {
        let outputs = OutputSet(overwrite: encoder.overwrite)
        do throws(QcowPressError) {
            let images = try restore(jobs, encoder: encoder, options: options, outputs: outputs, started: started)
            try outputs.commitAll()
            return images
        } catch {
            outputs.rollback()
            throw error
        }
    }

    /// What ``restoreAll(into:overwrite:encoder:options:started:)`` wrote.
    public struct AllSummary: Sendable {
        public var images: [Summary]
        /// Config files written beside the images (`qemu-server.conf` from `qemu-server.conf.blob`).
        public var configs: [String]
    }

    /// The outputs of a restore of every drive into `outdir`: one image per drive
    /// (`drive-scsi0.img.fidx` → `drive-scsi0.qcow2`) and each config blob decoded
    /// (`qemu-server.conf`), checked before anything is written (distinct names, `outdir` not a
    /// file, no destination that exists without `overwrite`).
    struct AllOutputs {
        var jobs: [(archive: String, destination: String)] = []
        var configs: [(path: String, bytes: [UInt8])] = []
    }

    func allOutputs(into outdir: String, overwrite: Bool) throws(QcowPressError) -> AllOutputs {
        var all = AllOutputs()
        var names: [(name: String, what: String)] = []
        for a in archives {
            // drive-scsi0.img.fidx -> drive-scsi0.qcow2 (names were checked: no '/', no '..').
            let base = PBSDrive.driveName(a.name)
            names.append((base + ".qcow2", "the image of \(a.name)"))
            all.jobs.append((a.name, outdir + "/" + base + ".qcow2"))
        }
        do throws(SourceError) {
            for b in snapshot.configBlobs {
                let name = String(b.filename.dropLast(5))
                names.append((name, "config '\(name)'"))
                all.configs.append((outdir + "/" + name, try snapshot.readBlob(b.filename, key: reader.key)))
            }
        } catch {
            throw QcowPressError(error)
        }
        try OutputSet.checkDistinct(names, in: outdir)
        if FileNames.exists(outdir) && !FileNames.isDirectory(outdir) {
            throw .invalidArgument("\(outdir): is not a directory")
        }
        for p in all.jobs.map(\.destination) + all.configs.map(\.path) {
            _ = try OutputTarget(destination: p, overwrite: overwrite, protecting: [])
        }
        return all
    }

    /// Restores every drive of the snapshot into `outdir` (`allOutputs(into:overwrite:)`). All
    /// or nothing (`OutputSet`): names are checked and configs decoded before anything is
    /// written; the images and configs appear together at the end; after a failure every file in
    /// `outdir` is as it was, and no directory the run created is left.
    public func restoreAll(into outdir: String, overwrite: Bool, encoder: EncoderOptions, options: Options = Options(),
                           started: (Qcow2Encoder, OrderedProgress) -> Void = { _, _ in }) throws(QcowPressError) -> AllSummary {
        let all = try allOutputs(into: outdir, overwrite: overwrite)
        let outputs = OutputSet(overwrite: overwrite)
        do throws(QcowPressError) {
            try outputs.makeDirectory(outdir)
            var eo = encoder
            eo.overwrite = overwrite
            let images = try restore(all.jobs, encoder: eo, options: options, outputs: outputs, started: started)
            for c in all.configs { try outputs.stage(c.bytes, as: c.path) }
            try outputs.commitAll()
            return AllSummary(images: images, configs: all.configs.map(\.path))
        } catch {
            outputs.rollback()
            throw error
        }
    }

    func restore(_ jobs: [(archive: String, destination: String)], encoder: EncoderOptions, options: Options,
                 outputs: OutputSet, started: (Qcow2Encoder, OrderedProgress) -> Void) throws(QcowPressError) -> [Summary] {
        let drives = try jobs.map { j throws(QcowPressError) in try drive(j.archive) }
        let (options, encoder) = try Self.fit(options, encoder, chunkSize: drives.map(\.index.chunkSize).max() ?? 4 << 20,
                                              remote: reader.store.isRemote)
        // Uses still to come for each digest across every job: the cache's hint.
        var uses: [ArraySlice<UInt8>: Int] = [:]
        for d in drives { for i in 0..<d.index.chunkCount { uses[d.index.digest(i), default: 0] += 1 } }
        let cache = ChunkCache(capacity: options.cacheBytes, uses: uses)
        // One worker pool and one budget for every drive of this restore.
        let group = try EncoderGroup(threads: encoder.threads, memoryLimit: encoder.memoryLimit,
                                     clusterSize: encoder.clusterSize, compression: encoder.compression)
        defer { group.shutdown() }
        var out: [Summary] = []
        for (j, job) in jobs.enumerated() {
            var eo = encoder
            eo.group = group
            // Rounded up to whole 512-byte sectors, as QEMU sizes every block device.
            eo.virtualSize = drives[j].size
            out.append(try restoreOne(drives[j], destination: job.destination,
                                      encoder: eo, options: options, cache: cache, outputs: outputs, started: started))
        }
        return out
    }

    /// The loaders' chunk buffers and the chunk cache come out of the encoder's memory limit, like
    /// everything else: loaders (each a chunk buffer and a decode scratch, 2 chunks) take at most a
    /// quarter of it, the cache at most an eighth; the engine's plan gets the rest. At the default
    /// 256M: 8 loaders (what was measured best here) and a 32 MiB cache. A live restore lets the
    /// cache take up to a third (`cacheShare` 3): its clients read what the restore loaded. From a
    /// server, the chunks received ahead of the loaders (``Options/streams``, one chunk each) take
    /// at most another quarter: 16 streams of 4 MiB chunks at 256M. `images`: written at the same
    /// time (a live restore's drives), each with its smallest write buffers in the engine's part.
    ///
    /// A limit that cannot hold one loader and the engine is refused with the smallest limit (whole
    /// MiB) that can: the shares grow with the limit, so that is searched for, not subtracted.
    static func fit(_ o: Options, _ e: EncoderOptions, chunkSize: Int, cacheShare: Int = 8,
                    remote: Bool = false, images: Int = 1) throws(QcowPressError) -> (Options, EncoderOptions) {
        let split = { (limit: Int) in Self.split(o, e, limit: limit, chunkSize: chunkSize, cacheShare: cacheShare, remote: remote, images: images) }
        if let fitted = split(e.memoryLimit) { return fitted }
        var need = ((e.memoryLimit >> 20) + 1) << 20
        while split(need) == nil { need += 1 << 20 }
        throw .invalidArgument("memory limit \(e.memoryLimit >> 20)M cannot hold a chunk loader (\(2 * chunkSize >> 20)M for \(chunkSize >> 20) MiB chunks) and the engine: at least \(need >> 20)M is needed")
    }

    /// `limit` divided as ``fit(_:_:chunkSize:cacheShare:remote:images:)`` says; nil when the
    /// engine's part is under 4 MiB or cannot hold one worker and every image's write buffers.
    private static func split(_ o: Options, _ e: EncoderOptions, limit: Int, chunkSize: Int, cacheShare: Int,
                              remote: Bool, images: Int) -> (Options, EncoderOptions)? {
        var o = o, e = e
        let perLoader = 2 * chunkSize
        o.loaders = max(1, min(o.loaders, limit / 4 / perLoader))
        o.cacheBytes = min(o.cacheBytes, limit / cacheShare)
        o.streams = remote ? max(1, min(o.streams, limit / 4 / chunkSize)) : 0
        e.memoryLimit = limit - o.loaders * perLoader - o.cacheBytes - o.streams * chunkSize
        guard e.memoryLimit >= 4 << 20, MemoryPlan.fixedBytes(e, images: images, threads: 1) <= e.memoryLimit else { return nil }
        return (o, e)
    }
}

extension QcowPressError {
    /// Maps a backup-source error to the error a caller switches on.
    init(_ e: SourceError) {
        switch e.kind {
        case .unsupported: self = .unsupported(path: e.path, what: e.detail)
        case .io: self = .io(IOError(errno: e.errno ?? EIO, operation: e.detail, path: e.path))
        case .network: self = .io(IOError(errno: e.errno ?? EIO, operation: "network", path: e.path, reason: e.detail))
        case .damaged, .missing, .wrongKey: self = .inputDamaged(path: e.path, location: e.detail)
        }
    }
}
