import BackupSources

/// One drive of a PBS snapshot, worked out once and shared by everything that reads it —
/// `restore pbs` (one drive or `--all`), the live restore, `serve pbs`, `--verify-only`, from a
/// datastore directory or a server: the archive's name as the manifest has it, its index, and
/// which chunks are the all-zero chunk (known by digest, never loaded).
public struct PBSDrive: Sendable {
    /// The archive's name in the manifest: `drive-scsi0.img.fidx`.
    public let archive: String
    /// The drive's name: `drive-scsi0` (an image's base name in `--all`, an NBD export's name).
    public let name: String
    public let index: PBSFixedIndex
    /// Per chunk: the first chunk at or after it that is not the all-zero chunk (`chunkCount` when
    /// none); one more entry at the end. A chunk is zero when its digest is the digest of zeros
    /// of its length (the last chunk may be short).
    let nextData: [Int32]

    /// The one place an archive name a user typed becomes the manifest's: `drive-scsi0`,
    /// `drive-scsi0.img` and `drive-scsi0.img.fidx` all name `drive-scsi0.img.fidx`.
    public static func archiveName(_ typed: String) -> String {
        if typed.hasSuffix(".fidx") { return typed }
        if typed.hasSuffix(".img") { return typed + ".fidx" }
        return typed + ".img.fidx"
    }

    /// A drive's name from its archive's: `drive-scsi0.img.fidx` → `drive-scsi0`.
    public static func driveName(_ archive: String) -> String {
        var name = archive.split(separator: "/").last.map(String.init) ?? archive
        for suffix in [".fidx", ".img"] where name.hasSuffix(suffix) { name = String(name.dropLast(suffix.count)) }
        return name
    }

    init(archive: String, index: PBSFixedIndex, reader: PBSChunkReader) {
        self.archive = archive
        name = Self.driveName(archive)
        self.index = index
        let count = index.chunkCount
        let full = reader.zeroDigest(length: index.chunkSize)
        let last = index.chunkLength(max(0, count - 1))
        let lastZero = last == index.chunkSize ? full : reader.zeroDigest(length: last)
        var next = [Int32](repeating: Int32(count), count: count + 1)
        for i in stride(from: count - 1, through: 0, by: -1) {
            let zero = index.digest(i).elementsEqual(index.chunkLength(i) == index.chunkSize ? full : lastZero)
            next[i] = zero ? next[i + 1] : Int32(i)
        }
        nextData = next
    }

    /// Guest size: the archive's size rounded up to 512 bytes, as QEMU sizes block devices.
    public var size: UInt64 { (index.size + 511) & ~511 }

    /// True when chunk `i` is the all-zero chunk.
    public func isZeroChunk(_ i: Int) -> Bool { Int(nextData[i]) != i }

    /// The first chunk at or after `i` with data (`chunkCount` when none).
    func nextDataChunk(from i: Int) -> Int { Int(nextData[i]) }

    /// What happens to each chunk of a restore, in guest order: zero (by digest), a copy of the
    /// first chunk with the same digest (`dedup`, when the image's clusters can be shared), or a load.
    enum Step { case zero, copy(Int), load }

    func steps(dedup: Bool, encoder eo: EncoderOptions) -> [Step] {
        let cs = index.chunkSize
        // Sharing needs refcounts of at least 2 per cluster; narrow widths (refcount_bits 1…8)
        // would turn most copies into second copies read back from the image: load them instead.
        let canShare = dedup && cs % eo.clusterSize == 0 && eo.refcountOrder >= 4
        var firstAt: [ArraySlice<UInt8>: Int] = [:]
        var steps: [Step] = []
        steps.reserveCapacity(index.chunkCount)
        for i in 0..<index.chunkCount {
            let d = index.digest(i)
            if isZeroChunk(i) {
                steps.append(.zero)
            } else if canShare, index.chunkLength(i) == cs, let f = firstAt[d] {
                steps.append(.copy(f))
            } else {
                if firstAt[d] == nil { firstAt[d] = i }
                steps.append(.load)
            }
        }
        return steps
    }
}

extension PBSDrive {
    /// The digests `steps` load, each once, in guest order, leaving out those `held` says are at
    /// hand already: what a restore from a server asks for ahead of its loaders.
    func firstLoads(_ steps: [Step], except held: (ArraySlice<UInt8>) -> Bool) -> [ArraySlice<UInt8>] {
        var order: [ArraySlice<UInt8>] = []
        var seen = Set<ArraySlice<UInt8>>()
        for i in 0..<steps.count {
            guard case .load = steps[i] else { continue }
            let d = index.digest(i)
            if seen.insert(d).inserted && !held(d) { order.append(d) }
        }
        return order
    }
}

extension PBSRestore {
    /// Opens one drive (its archive named as ``PBSDrive/archiveName(_:)`` takes it): the index,
    /// checked against the manifest, and its zero chunks.
    public func drive(_ archive: String) throws(QcowPressError) -> PBSDrive {
        // drive-scsi0 → drive-scsi0.img.fidx; an archive not named *.img.fidx by its ".fidx"-less name.
        let plain = archive.hasSuffix(".fidx") ? archive : archive + ".fidx"
        let name = snapshot.images.contains { $0.filename == plain } ? plain : PBSDrive.archiveName(archive)
        do throws(SourceError) {
            return PBSDrive(archive: name, index: try snapshot.openImage(name).0, reader: reader)
        } catch {
            throw QcowPressError(error)
        }
    }
}
