import DirectIO
import Glibc
import Synchronization

/// Where partly written clusters go when memory cannot hold them: a file beside the destination,
/// one cluster-sized region per cluster. Writes into a spilled cluster land in its region; when
/// the cluster is complete (or at ``Qcow2Encoder/finish()``), it is read back into a slot and
/// goes to the workers like any other. So writes in any order finish within the memory budget:
/// the slots idle partial clusters may hold are capped (``SlotPool/reservePartial()``), and what
/// does not fit is bounded by disk only.
///
/// The file is made at the first spill (a run that never spills never creates it) under a
/// ``TemporaryFiles`` name and unlinked at once: it has no name while it is used, so nothing of it
/// is left behind after a failure, a signal or even SIGKILL; its blocks go back when the encoder
/// ends (``close()``) or the process does. A region given back is punched out (its blocks freed,
/// its bytes zero again) and reused; one the file system cannot punch is not reused. Buffered
/// I/O: pieces have any offset and length, and the page cache holds what is read back soon.
final class SpillFile: Sendable {
    let clusterSize: Int
    /// The image this file serves (errors name it).
    let destination: String

    private struct State {
        var file: OutputFile?
        /// The file could not be made or is closed: the error that says so.
        var unusable: QcowPressError?
        var freeRegions: [Int32] = []
        var nextRegion: Int32 = 0
        var inUse = 0
        var peakInUse = 0
        var clustersSpilled: UInt64 = 0
    }
    private let state = Mutex(State())

    init(clusterSize: Int, destination: String) {
        self.clusterSize = clusterSize
        self.destination = destination
    }

    /// The name errors use for the file.
    var displayName: String { "\(destination) (spill file of partly written clusters, beside it)" }

    /// A region for one cluster (zero bytes), as a partial cluster's home: the file is made on
    /// first use.
    func allocate() throws(QcowPressError) -> PartialHome {
        try state.withLock { (s: inout State) throws(QcowPressError) -> PartialHome in
            if let e = s.unusable { throw e }
            if s.file == nil {
                let temp = TemporaryFiles.make(for: destination)
                do throws(IOError) {
                    s.file = try OutputFile(creating: temp, direct: false, displayName: displayName)
                } catch {
                    TemporaryFiles.discard(temp)
                    throw QcowPressError.from(error)
                }
                // Unlinked while open: the descriptor keeps the data; no name can be left behind.
                TemporaryFiles.discard(temp)
            }
            let r: Int32
            if let f = s.freeRegions.popLast() {
                r = f
            } else {
                guard s.nextRegion < Int32.max - 1 else { throw .invalidArgument("\(displayName): too many spilled clusters") }
                r = s.nextRegion
                s.nextRegion += 1
            }
            s.inUse += 1
            s.peakInUse = max(s.peakInUse, s.inUse)
            s.clustersSpilled += 1
            return PartialHome(spilledRegion: r)
        }
    }

    private func file() throws(QcowPressError) -> OutputFile {
        try state.withLock { (s: inout State) throws(QcowPressError) -> OutputFile in
            guard let f = s.file else { throw s.unusable ?? .cancelled }
            return f
        }
    }

    private func offset(_ region: Int32, _ at: Int) -> UInt64 { UInt64(region) * UInt64(clusterSize) + UInt64(at) }

    /// Writes `count` bytes at byte `at` of the cluster in `region`.
    func write(region: Int32, at: Int, _ bytes: UnsafeRawPointer, count: Int) throws(QcowPressError) {
        let f = try file()
        do throws(IOError) {
            try f.pwriteAll(bytes, length: count, offset: offset(region, at))
        } catch {
            throw .from(error)
        }
    }

    /// Reads the first `count` bytes of the cluster in `region` into `into` (bytes never written
    /// read as zero).
    func read(region: Int32, into: UnsafeMutableRawPointer, count: Int) throws(QcowPressError) {
        let f = try file()
        do throws(IOError) {
            let n = try f.preadAll(into, length: count, offset: offset(region, 0))
            if n < count { memset(into + n, 0, count - n) }
        } catch {
            throw .from(error)
        }
    }

    /// Gives a region back: its blocks are freed and it is reused (zero again).
    func free(region: Int32) {
        guard let f = state.withLock({ $0.file }) else { return }
        let punched = f.punchHole(offset: offset(region, 0), length: UInt64(clusterSize))
        state.withLock { s in
            s.inUse -= 1
            if punched { s.freeRegions.append(region) }
        }
    }

    /// Closes the file (its blocks go back); later spills fail with `reason`.
    func close(reason: QcowPressError) {
        state.withLock { s in
            s.file = nil
            if s.unusable == nil { s.unusable = reason }
        }
    }

    /// Clusters spilled so far, and the most held on disk at once (× the cluster size: the
    /// file's peak use of the disk).
    var counts: (clusters: UInt64, peakBytes: UInt64) {
        state.withLock { ($0.clustersSpilled, UInt64($0.peakInUse) * UInt64(clusterSize)) }
    }
}

/// Where a partly written cluster's bytes are: a cluster slot (memory), or a region of the
/// encoder's ``SpillFile``. Kept in the ``GuestMap`` as its slot number: regions are negative.
struct PartialHome: Equatable {
    let raw: Int32
    init(raw: Int32) { self.raw = raw }
    init(slot: Int32) { raw = slot }
    init(spilledRegion r: Int32) { raw = -1 - r }
    /// The slot, when in memory.
    var slot: Int32? { raw >= 0 ? raw : nil }
    /// The spill file's region, when spilled.
    var spilledRegion: Int32? { raw < 0 ? -1 - raw : nil }
}
