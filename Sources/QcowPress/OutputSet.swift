import DirectIO
import Glibc
import Synchronization

/// The outputs of one run (images, config files, the directories made for them), which appear
/// together or not at all: the one commit-and-rollback mechanism of every command that writes
/// several outputs (`restore pbs` with one drive or `--all`, live or not, from a directory or a
/// server; `restore vma`).
///
/// Images are finished under their temporary names (their encoders' commits are deferred),
/// config files are written under temporary names, and only when everything is complete are they
/// renamed into place (``commitAll()``). A file an output replaces (`overwrite`) is first given a
/// second name (a hard link beside it, named as a temporary file), so that ``rollback(keeping:)``
/// can put it back: after a failure — even one in the middle of the renames — the user's files are
/// exactly as they were, and every directory the run created is gone (if empty). The second
/// names are removed once the whole run succeeded.
///
/// One output may be committed before the others (``commitNow(_:)``: a live restore's drive that
/// a running VM is switched onto); a rollback still puts back what it replaced unless the caller
/// says it must stay (it is in use).
///
/// Thread-safe: a live restore commits from its restore thread while its QMP switcher asks.
final class OutputSet: Sendable {
    let overwrite: Bool

    /// An output renamed into place, and the second name of the file it replaced (if any).
    private struct Committed {
        var destination: String
        var replaced: String?
        var encoder: Qcow2Encoder?
        /// Written in place (a block device): there is no earlier file to put back, and the name
        /// is the device's, never to be removed.
        var inPlace = false
    }
    private struct State {
        var createdDirectories: [String] = []
        var encoders: [Qcow2Encoder] = []
        var files: [(temporary: String, destination: String)] = []
        var committed: [Committed] = []
    }
    private let state = Mutex(State())

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
            state.withLock { $0.createdDirectories.append(prefix) }
        }
    }

    /// Defers an encoder's commit to ``commitAll()`` (or ``commitNow(_:)``). Call right after
    /// creating it.
    func add(_ encoder: Qcow2Encoder) {
        encoder.output.deferCommit.store(true, ordering: .releasing)
        state.withLock { $0.encoders.append(encoder) }
    }

    /// Writes a small file (a config) under a temporary name beside `destination`.
    func stage(_ bytes: [UInt8], as destination: String) throws(QcowPressError) {
        let target = try OutputTarget(destination: destination, overwrite: overwrite, protecting: [])
        guard !target.isBlockDevice else { throw .invalidArgument("\(destination): is a block device") }
        let out = try target.open(direct: false)
        state.withLock { $0.files.append((out.temporaryPath!, target.path)) }
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

    /// Gives the regular file at `path` (if any, and only when overwriting) a second name, so a
    /// rollback can put it back after something was renamed over it. Where hard links are refused
    /// (a file system without them), nothing is kept: the rename replaces it as before.
    private func keepReplaced(_ path: String) -> String? {
        guard overwrite, let st = FileNames.status(path), st.kind == .regular, !FileNames.isSymbolicLink(path) else { return nil }
        let second = TemporaryFiles.name(for: path)
        return FileNames.link(path, second) ? second : nil
    }

    /// Renames one finished image into place now, before the others (a drive a VM is about to
    /// use). What it replaced is kept until the run ends.
    func commitNow(_ encoder: Qcow2Encoder) throws(QcowPressError) {
        let pending = state.withLock { s -> Bool in
            guard let i = s.encoders.firstIndex(where: { $0 === encoder }) else { return false }
            s.encoders.remove(at: i)
            return true
        }
        guard pending else { return }
        do throws(QcowPressError) { try commitImage(encoder) } catch {
            state.withLock { $0.encoders.append(encoder) }
            throw error
        }
    }

    private func commitImage(_ e: Qcow2Encoder) throws(QcowPressError) {
        let path = e.output.target.path
        let replaced = e.output.target.isBlockDevice ? nil : keepReplaced(path)
        do { try e.output.commitDeferred() } catch {
            if let replaced { FileNames.unlink(replaced) }
            throw error
        }
        state.withLock { $0.committed.append(Committed(destination: path, replaced: replaced, encoder: e, inPlace: e.output.target.isBlockDevice)) }
    }

    /// Renames every finished output into place; on a failure (a destination that appeared
    /// meanwhile) rolls everything back and throws. Once all are in place, the second names of
    /// the files they replaced are removed.
    func commitAll() throws(QcowPressError) {
        let (encoders, files) = state.withLock { s in
            let taken = (s.encoders, s.files)
            s.encoders = []
            s.files = []
            return taken
        }
        do throws(QcowPressError) {
            for (n, e) in encoders.enumerated() {
                do throws(QcowPressError) { try commitImage(e) } catch {
                    // Not committed yet: back in the set, so the rollback discards them.
                    state.withLock {
                        $0.encoders.append(contentsOf: encoders[n...])
                        $0.files.append(contentsOf: files)
                    }
                    throw error
                }
            }
            for (n, f) in files.enumerated() {
                let replaced = keepReplaced(f.destination)
                do { try TemporaryFiles.commit(f.temporary, to: f.destination, overwrite: overwrite) } catch {
                    if let replaced { FileNames.unlink(replaced) }
                    state.withLock { $0.files.append(contentsOf: files[n...]) }
                    throw .from(error)
                }
                state.withLock { $0.committed.append(Committed(destination: f.destination, replaced: replaced, encoder: nil)) }
                FileNames.syncDirectory(of: f.destination)
            }
        } catch {
            rollback()
            throw error
        }
        let committed = state.withLock { s in
            let c = s.committed
            s = State()
            return c
        }
        for c in committed { if let r = c.replaced { FileNames.unlink(r) } }
    }

    /// Undoes the run: outputs not yet in place are removed; outputs already renamed into place
    /// are removed and the files they replaced put back — except images `keep` says must stay (in
    /// use by a running VM), whose replaced files are then dropped, and complete images written
    /// into a block device, which stay (what the device held is gone; its node is never removed);
    /// the directories the run created go (if empty).
    func rollback(keeping keep: (Qcow2Encoder) -> Bool = { _ in false }) {
        let s = state.withLock { s in
            let taken = s
            s = State()
            return taken
        }
        for e in s.encoders {
            e.cancel()
            e.output.discard()
        }
        for f in s.files { TemporaryFiles.discard(f.temporary) }
        for c in s.committed.reversed() {
            if c.inPlace {
                // A block device keeps the complete image written into it.
                continue
            } else if let e = c.encoder, keep(e) {
                if let r = c.replaced { FileNames.unlink(r) }
            } else if let r = c.replaced {
                try? FileNames.rename(r, c.destination)
                FileNames.syncDirectory(of: c.destination)
            } else {
                FileNames.unlink(c.destination)
            }
        }
        for d in s.createdDirectories.reversed() { FileNames.removeEmptyDirectory(d) }
    }
}
