import BackupSources
import DirectIO

extension PBSRestore {
    func restoreOne(_ drive: PBSDrive, destination: String, encoder eo: EncoderOptions,
                    options: Options, cache: ChunkCache, outputs: OutputSet,
                    started: (Qcow2Encoder, OrderedProgress) -> Void) throws(QcowPressError) -> Summary {
        let enc = try Qcow2Encoder(destination: destination, options: eo)
        outputs.add(enc)
        let counters = RestoreCounters(ordered: OrderedProgress(chunks: drive.index.chunkCount, chunkSize: UInt64(drive.index.chunkSize),
                                                                total: eo.virtualSize))
        started(enc, counters.ordered!)
        do throws(QcowPressError) {
            try feed(drive, into: enc, options: options, cache: cache, counters: counters)
        } catch {
            enc.cancel()
            throw error
        }
        let s = try enc.finishBlocking()
        return counters.summary(archive: drive.archive, image: s, chunks: drive.index.chunkCount)
    }

    /// Pipes one archive into an encoder the caller opened (its virtual size must be the image's,
    /// rounded up to 512) and will finish.
    public func pipe(archive: String, into enc: Qcow2Encoder, options: Options = Options()) throws(QcowPressError) {
        let drive = try drive(archive)
        guard enc.virtualSize == drive.size else {
            throw .invalidArgument("\(drive.archive): the image is \(drive.index.size) bytes, the encoder \(enc.virtualSize)")
        }
        var uses: [ArraySlice<UInt8>: Int] = [:]
        for i in 0..<drive.index.chunkCount { uses[drive.index.digest(i), default: 0] += 1 }
        try feed(drive, into: enc, options: options, cache: ChunkCache(capacity: options.cacheBytes, uses: uses), counters: RestoreCounters())
    }

    func feed(_ drive: PBSDrive, into enc: Qcow2Encoder, options: Options, cache: ChunkCache,
              counters: RestoreCounters) throws(QcowPressError) {
        let index = drive.index
        let cs = index.chunkSize
        let plan = drive.steps(dedup: options.dedup, encoder: enc.options)
        let reader = self.reader
        let name = drive.archive
        if reader.store.isRemote {
            // The first load of each digest not already cached, in the order the loaders take them.
            reader.store.willFetch(drive.firstLoads(plan, except: cache.contains), window: max(1, options.streams))
        }
        try forEachIndex(UInt64(index.chunkCount), threads: options.loaders, name: "qp-pbs") {
            let buf = AlignedBuffer(capacity: cs)
            let scratch = PBSChunkReader.Scratch()
            return { (i64) throws(QcowPressError) in
                let i = Int(i64)
                let at = UInt64(i) * UInt64(cs)
                let len = index.chunkLength(i)
                switch plan[i] {
                case .zero:
                    try enc.writeZeroesBlocking(at: at, length: UInt64(len))
                    counters.add(zero: 1)
                case .copy(let f):
                    try enc.writeCopy(at: at, from: UInt64(f) * UInt64(cs), length: UInt64(len))
                    counters.add(shared: 1, saved: UInt64(len))
                    cache.consume(index.digest(i))
                case .load:
                    let d = index.digest(i)
                    let out = UnsafeMutableRawBufferPointer(start: buf.pointer, count: len)
                    if cache.take(d, into: out) {
                        counters.add(cached: 1)
                    } else {
                        do throws(SourceError) {
                            try reader.load(digest: d, length: len, into: out, scratch: scratch,
                                            what: "chunk \(i) of \(name) (guest offset \(at))")
                        } catch {
                            throw QcowPressError(error)
                        }
                        counters.add(read: 1)
                        cache.offer(d, UnsafeRawBufferPointer(out))
                    }
                    try enc.writeBlocking(at: at, UnsafeRawBufferPointer(out))
                }
                counters.ordered?.complete(i)
            }
        }
    }
}
