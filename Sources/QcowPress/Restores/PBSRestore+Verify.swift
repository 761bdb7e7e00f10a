import BackupSources
import DirectIO

extension PBSRestore {
    /// What ``verify(_:loaders:)`` checked.
    public struct VerifySummary: Sendable, Codable {
        public var archives: Int
        public var chunks: Int
        public var bytes: UInt64
        public var seconds: Double
    }

    /// Reads and verifies (CRC, decryption, decompression, digest) every distinct non-zero chunk of
    /// the archives, writing nothing. With one loader this is the single-thread compute cost of a
    /// restore, the bench's reference.
    public func verify(_ archives: [String], loaders: Int) throws(QcowPressError) -> VerifySummary {
        let t0 = monotonicNanoseconds()
        var work: [(digest: ArraySlice<UInt8>, length: Int, what: String)] = []
        var seen = Set<ArraySlice<UInt8>>()
        for a in archives {
            let drive = try drive(a)
            let idx = drive.index
            for i in 0..<idx.chunkCount where !drive.isZeroChunk(i) {
                let d = idx.digest(i)
                if seen.insert(d).inserted { work.append((d, idx.chunkLength(i), "chunk \(i) of \(drive.archive)")) }
            }
        }
        let reader = self.reader
        let items = work
        let largest = items.map(\.length).max() ?? 0
        if reader.store.isRemote {
            reader.store.willFetch(items.map(\.digest), window: max(1, min(Options().streams, (128 << 20) / max(largest, 1))))
        }
        try forEachIndex(UInt64(items.count), threads: loaders, name: "qp-verify") {
            let buf = AlignedBuffer(capacity: max(largest, 4096), zeroed: false)
            let scratch = PBSChunkReader.Scratch()
            return { (i) throws(QcowPressError) in
                let w = items[Int(i)]
                do throws(SourceError) {
                    try reader.load(digest: w.digest, length: w.length, into: UnsafeMutableRawBufferPointer(start: buf.pointer, count: w.length),
                                    scratch: scratch, what: w.what)
                } catch {
                    throw QcowPressError(error)
                }
            }
        }
        return VerifySummary(archives: archives.count, chunks: items.count, bytes: items.reduce(0) { $0 + UInt64($1.length) },
                             seconds: Double(monotonicNanoseconds() - t0) / 1e9)
    }
}
