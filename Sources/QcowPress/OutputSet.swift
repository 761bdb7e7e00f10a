import DirectIO
import Glibc

/// The outputs of one restore (images, config files, the directories made for them), which
/// appear together or not at all. Images are finished under their temporary names (their
/// encoders' commits are deferred), config files are written under temporary names, and only
/// when everything is complete are they all renamed into place. On any failure ``rollback()``
/// removes every output of the run — finished or not, already renamed or not — and every
/// directory the run created (if it is empty).
final class OutputSet {
    let overwrite: Bool
    private var createdDirectories: [String] = []
    private var encoders: [Qcow2Encoder] = []
    private var files: [(temporary: String, destination: String)] = []
    private var committed: [String] = []

    init(overwrite: Bool) { self.overwrite = overwrite }

    /// Checks that no two outputs share a name; `outputs` are (name, what it is).
    static func checkDistinct(_ outputs: [(name: String, what: String)], in dir: String) throws(QcowPressError) {
        var seen: [String: String] = [:]
        for o in outputs {
            if let first = seen[o.name] {
                throw .invalidArgument("\(dir)/\(o.name): both \(first) and \(o.what) would be written there; refusing to restore")
            }
            seen[o.name] = o.what
        }
    }

    /// Creates `dir` and any missing parents (mkdir -p), remembering which it made.
    func makeDirectory(_ dir: String) throws(QcowPressError) {
        if FileNames.isDirectory(dir) { return }
        if FileNames.exists(dir) { throw .invalidArgument("\(dir): is not a directory") }
        var prefix = dir.hasPrefix("/") ? "" : "."
        for part in dir.split(separator: "/") {
            prefix += "/" + part
            if FileNames.isDirectory(prefix) { continue }
            guard FileNames.makeDirectory(prefix) else {
                throw .io(IOError(errno: errno, operation: "mkdir", path: prefix))
            }
            createdDirectories.append(prefix)
        }
    }

    /// Defers an encoder's commit to ``commitAll()``. Call right after creating it.
    func add(_ encoder: Qcow2Encoder) {
        encoder.output.deferCommit.store(true, ordering: .releasing)
        encoders.append(encoder)
    }

    /// Writes a small file (a config) under a temporary name beside `destination`.
    func stage(_ bytes: [UInt8], as destination: String) throws(QcowPressError) {
        let target = try OutputTarget(destination: destination, overwrite: overwrite, protecting: [])
        guard !target.isBlockDevice else { throw .invalidArgument("\(destination): is a block device") }
        let out = try target.open(direct: false)
        files.append((out.temporaryPath!, target.path))
        do throws(IOError) {
            if !bytes.isEmpty {
                let b = AlignedBuffer(capacity: bytes.count)
                bytes.withUnsafeBytes { b.pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
                try out.file.pwriteAll(b.pointer, length: bytes.count, offset: 0)
            }
            try out.file.sync()
        } catch {
            throw .from(error)
        }
    }

    /// Renames every finished output into place; on a failure (a destination that appeared
    /// meanwhile) rolls everything back and throws.
    func commitAll() throws(QcowPressError) {
        do throws(QcowPressError) {
            for e in encoders {
                try e.output.commitDeferred()
                committed.append(e.output.target.path)
            }
            for f in files {
                do { try TemporaryFiles.commit(f.temporary, to: f.destination, overwrite: overwrite) } catch { throw .from(error) }
                committed.append(f.destination)
                FileNames.syncDirectory(of: f.destination)
            }
        } catch {
            rollback()
            throw error
        }
        encoders = []
        files = []
    }

    /// Removes every output of this run and the directories it created.
    func rollback() {
        for e in encoders {
            e.cancel()
            e.output.discard()
        }
        for f in files { TemporaryFiles.discard(f.temporary) }
        for p in committed { FileNames.unlink(p) }
        for d in createdDirectories.reversed() { FileNames.removeEmptyDirectory(d) }
        encoders = []
        files = []
        committed = []
        createdDirectories = []
    }
}
