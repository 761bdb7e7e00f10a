import Logging
import Synchronization

/// A sparse extent's grain directory: the primary one (gdOffset) and, when the header's flag 1
/// says there is one, the redundant copy (rgdOffset) VMware and qemu-img keep of the directory and
/// of every grain table. qemu reads the primary copy only (it writes both); QcowPress reads the
/// primary copy too, and turns to the redundant one only when the primary directory or one of its
/// tables cannot be used (outside the file, over a directory, a read error, a grain entry past the
/// end): then it says so once on stderr. Both unusable is an error naming both fields. The healthy
/// path never reads the redundant copy.
struct VMDKGrainDirectory {
    /// The header's flag 1: a redundant grain directory at rgdOffset.
    static let flagRedundant: UInt32 = 1 << 1

    let entries: [UInt32]
    /// Where the directory in use lies (bytes).
    let at: UInt64

    /// Reads and checks the directory at `sector`: inside the file, and each table inside the file
    /// and over neither directory (`field` names the header field for messages).
    static func read(_ file: FormatFile, header h: VMDKSparseHeader, headerAt: UInt64, sector: UInt64,
                     field: (name: String, offset: Int), redundant: Bool) throws(QcowPressError) -> VMDKGrainDirectory {
        let what = redundant ? "VMDK redundant grain directory" : "VMDK grain directory"
        guard h.capacity == 0 || sector != 0 else {
            throw .inputDamaged(path: file.path, location: "VMDK header (offset \(headerAt)) field \(field.name) (offset \(headerAt + UInt64(field.offset))) is 0: no grain directory")
        }
        let bytes = h.gdEntries * 4
        guard sector <= file.size / 512, bytes <= file.size - sector * 512 else {
            throw .inputDamaged(path: file.path, location: "VMDK header (offset \(headerAt)) field \(field.name) (offset \(headerAt + UInt64(field.offset))) is \(sector): the \(redundant ? "redundant " : "")grain directory (\(h.gdEntries) entries) runs past the end of the file (\(file.size) bytes)")
        }
        let at = sector * 512
        let raw = FieldReader(b: try file.bytes(at: at, count: Int(bytes), what: "\(what) (header at \(headerAt))"))
        // Both directories, whole sectors: no table may lie over either.
        let dirs = [h.gdOffset, h.flags & flagRedundant != 0 ? h.redundantGDOffset : 0].filter { $0 != 0 && $0 <= file.size / 512 }
            .map { $0 * 512..<($0 * 512 + (bytes + 511) & ~511) }
        var gd = [UInt32](repeating: 0, count: Int(h.gdEntries))
        let tableBytes = UInt64(h.gtesPerGT) * 4
        for i in 0..<gd.count {
            let e = raw.le32(i * 4)
            gd[i] = e
            guard e != 0 else { continue }
            let table = UInt64(e) * 512..<(UInt64(e) * 512 + tableBytes)
            guard table.upperBound <= file.size else {
                throw .inputDamaged(path: file.path, location: "\(what) entry \(i) (offset \(at + UInt64(i) * 4)) is \(e): its grain table lies past the end of the file (\(file.size) bytes)")
            }
            if let d = dirs.first(where: { $0.overlaps(table) }) {
                throw .inputDamaged(path: file.path, location: "\(what) entry \(i) (offset \(at + UInt64(i) * 4)) is \(e): its grain table lies over the grain directory at \(d.lowerBound)")
            }
        }
        return VMDKGrainDirectory(entries: gd, at: at)
    }

    /// The directory a reader uses, and the redundant copy to fall back on (nil when there is
    /// none, or when it is the one in use).
    static func open(_ file: FormatFile, header h: VMDKSparseHeader, headerAt: UInt64) throws(QcowPressError) -> (VMDKGrainDirectory, VMDKRedundantDirectory?) {
        let hasCopy = h.flags & flagRedundant != 0
        do {
            let primary = try read(file, header: h, headerAt: headerAt, sector: h.gdOffset, field: ("gdOffset", 56), redundant: false)
            return (primary, hasCopy ? VMDKRedundantDirectory(file: file, header: h, headerAt: headerAt) : nil)
        } catch {
            guard hasCopy else { throw error }
            let redundant = VMDKRedundantDirectory(file: file, header: h, headerAt: headerAt)
            switch redundant.directory() {
            case .failure(let other): throw redundant.bothUnusable(error, other.why)
            case .success(let copy):
                VMDKRedundantDirectory.warn(file.path, "\(error.why); reading the redundant grain directory at \(copy.at) (rgdOffset) instead")
                return (copy, nil)
            }
        }
    }
}

/// The redundant grain directory, read only when a table of the primary one cannot be used.
final class VMDKRedundantDirectory: Sendable {
    let file: FormatFile
    let header: VMDKSparseHeader
    let headerAt: UInt64
    private struct State { var directory: Result<VMDKGrainDirectory, QcowPressError>?; var warned = false }
    private let state = Mutex(State())

    init(file: FormatFile, header: VMDKSparseHeader, headerAt: UInt64) {
        self.file = file
        self.header = header
        self.headerAt = headerAt
    }

    /// Says on stderr (the library's warning log) that a redundant copy is read.
    static func warn(_ path: String, _ what: String) {
        Logger(label: "qcowpress.vmdk").warning("\(path): \(what)")
    }

    /// The redundant directory, read and checked on first use (its failure is kept too).
    func directory() -> Result<VMDKGrainDirectory, QcowPressError> {
        state.withLock { s in
            if let d = s.directory { return d }
            let d = Result { () throws(QcowPressError) in
                try VMDKGrainDirectory.read(file, header: header, headerAt: headerAt, sector: header.redundantGDOffset, field: ("rgdOffset", 48), redundant: true)
            }
            s.directory = d
            return d
        }
    }

    /// The one-line error when the redundant copy cannot stand in for what `failure` says.
    func bothUnusable(_ failure: QcowPressError, _ why: String) -> QcowPressError {
        .inputDamaged(path: file.path, location: "\(failure.why); the redundant copy is unusable too: \(why)")
    }

    /// Grain table `t` from the redundant copy, after `failure` of the primary one; `load` reads
    /// and checks a table at a sector. Said once per extent on stderr.
    func table(_ t: Int, after failure: QcowPressError, load: (UInt64, String) throws(QcowPressError) -> [UInt64]) throws(QcowPressError) -> [UInt64] {
        let directory = directory()
        let first = state.withLock { s in
            defer { s.warned = true }
            return !s.warned
        }
        func both(_ why: String) -> QcowPressError { bothUnusable(failure, why) }
        let table: [UInt64]
        switch directory {
        case .failure(let e): throw both(e.why)
        case .success(let d):
            guard t < d.entries.count, d.entries[t] != 0 else { throw both("its grain directory entry \(t) is 0") }
            do { table = try load(UInt64(d.entries[t]), "VMDK redundant grain table \(t)") } catch { throw both(error.why) }
        }
        if first { Self.warn(file.path, "\(failure.why); reading the redundant copy of grain table \(t) instead (said once)") }
        return table
    }
}

extension QcowPressError {
    /// The message without the file's name (which the combined message names once).
    fileprivate var why: String {
        switch self {
        case .inputDamaged(_, let location): location
        case .unsupported(_, let what): what
        default: message
        }
    }
}
