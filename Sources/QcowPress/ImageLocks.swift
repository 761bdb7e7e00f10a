import DirectIO
import Glibc
import Synchronization

/// The locks an output holds from its start to its commit, so that neither QEMU nor another
/// QcowPress run writes the destination meanwhile, and QcowPress never replaces an image QEMU
/// has open:
/// - the file or block device already at the destination: QEMU's write lock (``ImageLock``), so
///   an image a VM, qemu-storage-daemon or qemu-img has open is refused at the start ("Failed to
///   get "write" lock"), and QEMU refuses it while the run goes on;
/// - the destination's name (regular files): an exclusive ``NameLock`` on a lock file beside it,
///   `.<name>.qcowpress-lock`, so a second run writing the same destination is refused at the
///   start whether or not the file exists yet (each run writes its own temporary file: a lock on
///   that would not meet the other's). The lock file is removed when released; one left by a
///   killed run is taken over by the next;
/// - the temporary file, once created: QEMU's write lock, kept through the rename, so the
///   committed image is never unlocked in between.
///
/// Before the rename a destination that appeared (or was replaced) meanwhile is locked too, or
/// the commit refused. After the commit every lock is dropped except the image's own, which
/// shares everything from then on (as qemu-img -U): QEMU can open it read-write (a live
/// restore's switch) while the run still reads it.
final class DestinationLock: Sendable {
    let destination: String
    /// The name written (symbolic links resolved).
    let path: String
    private struct State {
        var name: NameLock?
        var existing: ImageLock?
        var temporary: ImageLock?
    }
    private let state: Mutex<State>

    /// Locks `path` (`destination` as given, for errors); `exists` when something is there.
    init(destination: String, path: String, exists: Bool, blockDevice: Bool) throws(QcowPressError) {
        self.destination = destination
        self.path = path
        var s = State()
        do throws(IOError) {
            if !blockDevice {
                // Registered before it is created (as temporary outputs are), so a signal at any
                // moment removes it; forgotten again when it is not ours.
                let file = Self.lockFile(for: path)
                TemporaryFiles.paths.withLock { _ = $0.insert(file) }
                do throws(IOError) {
                    s.name = try NameLock(lockFile: file, displayPath: destination)
                } catch {
                    TemporaryFiles.paths.withLock { _ = $0.remove(file) }
                    throw error
                }
                if s.name == nil { TemporaryFiles.paths.withLock { _ = $0.remove(file) } }
            }
            if exists || blockDevice { s.existing = try ImageLock(path: path, use: .write, displayPath: destination) }
        } catch {
            Self.release(s)
            throw .from(error)
        }
        state = Mutex(s)
    }

    deinit { release() }

    /// `.<name>.qcowpress-lock` beside `path`.
    static func lockFile(for path: String) -> String {
        let slash = path.lastIndex(of: "/")
        let dir = slash.map { String(path[...$0]) } ?? ""
        let name = slash.map { String(path[path.index(after: $0)...]) } ?? path
        return "\(dir).\(name).qcowpress-lock"
    }

    /// Takes QEMU's write lock on the temporary file just created for the destination.
    func lockTemporary(_ temporary: String) throws(IOError) {
        let l = try ImageLock(path: temporary, use: .write, displayPath: destination)
        state.withLock { $0.temporary = l }
    }

    /// Right before the temporary file is renamed over the destination: a file that is there now
    /// and is not the one locked at the start (it appeared, or was replaced) is locked first.
    func lockBeforeReplacing() throws(IOError) {
        guard let now = FileNames.status(path) else { return }
        let locked = state.withLock { $0.existing?.identity }
        if locked == now.identity { return }
        let l = try ImageLock(path: path, use: .write, displayPath: destination)
        let old = state.withLock { s in
            defer { s.existing = l }
            return s.existing
        }
        old?.release()
    }

    /// The output is in place: the image's own lock shares everything from now on; the others go.
    func committed() {
        let s = state.withLock { s in
            let taken = s
            s.name = nil
            s.existing = nil
            return taken
        }
        // A block device is written in place: its lock is the image's own.
        let own = s.temporary ?? s.existing
        do { try own?.change(to: .readSharingAll) } catch { own?.release() }
        if s.temporary != nil { s.existing?.release() }
        releaseName(s.name)
    }

    /// Drops every lock (the output was discarded). Idempotent.
    func release() {
        let s = state.withLock { s in
            let taken = s
            s = State()
            return taken
        }
        Self.release(s)
    }

    private static func release(_ s: State) {
        s.temporary?.release()
        s.existing?.release()
        releaseName(s.name)
    }

    private static func releaseName(_ n: NameLock?) {
        guard let n else { return }
        // Forgotten first: once released, the name may be another run's lock file, which a
        // signal here must not remove (a stale one left by a signal in between is taken over).
        TemporaryFiles.paths.withLock { _ = $0.remove(n.lockFile) }
        n.release()
    }
    private func releaseName(_ n: NameLock?) { Self.releaseName(n) }
}

/// Shared locks on the images a command reads, held until ``release()`` or until the object goes:
/// QEMU's read lock (as qemu-img without -U), which refuses an image another process has open for
/// writing and makes QEMU refuse to write it meanwhile; with `forceShare` (-U) the lock shares
/// everything, as qemu-img -U: the image is read even while written (the copy may then be stale
/// or torn: the caller says so where it matters).
public final class ReadLocks: Sendable {
    public let forceShare: Bool
    private let locks = Mutex<[ImageLock]>([])

    public init(forceShare: Bool) { self.forceShare = forceShare }

    deinit { release() }

    /// What a command does with an image, which decides the lock as in qemu-img.
    public enum Purpose: Sendable {
        /// Reads its data (convert, export, check, serve): QEMU's read lock, or with `forceShare`
        /// one that shares everything.
        case read
        /// Reads a qcow2's metadata only (info): QEMU's lock without a permission held, only
        /// writes unshared; a raw file, or any with `forceShare`, gets none (qemu-img info locks
        /// nothing there).
        case inspect
    }

    /// Locks `path` and, with `backingChain`, every file of its backing chain (read from the
    /// headers, top first). `format` is the top image's when given (`-f`), else detected by magic.
    /// Throws the first refusal (QEMU's words, one line).
    public func lock(_ path: String, backingChain: Bool = true, purpose: Purpose = .read, format: String? = nil) throws(QcowPressError) {
        do throws(IOError) {
            if let top = try lockOne(path, purpose: purpose, format: format) { locks.withLock { $0.append(top) } }
        } catch {
            throw .from(error)
        }
        guard backingChain else { return }
        for input in try ProtectedInput.imageAndBackingChain(path, role: "").dropFirst() {
            do throws(IOError) {
                if let l = try lockOne(input.path, purpose: purpose, format: nil) { locks.withLock { $0.append(l) } }
            } catch {
                throw .from(error)
            }
        }
    }

    /// Locks each of `paths` (files already known, such as a chain the caller followed) to read.
    public func lock(paths: [String]) throws(QcowPressError) {
        for p in paths { try lock(p, backingChain: false) }
    }

    private func lockOne(_ path: String, purpose: Purpose, format: String?) throws(IOError) -> ImageLock? {
        switch purpose {
        case .read:
            return try ImageLock(path: path, use: forceShare ? .readSharingAll : .read)
        case .inspect:
            guard !forceShare, (format ?? (try? RawImageReader.detectFormat(path: path))) == "qcow2" else { return nil }
            return try ImageLock(path: path, use: .inspect)
        }
    }

    /// The images locked that another process has open for writing (only with `forceShare`:
    /// without it they are refused).
    public var inUseForWriting: [String] {
        locks.withLock { $0.filter(\.writerPresent).map(\.path) }
    }

    /// Drops every lock. Idempotent.
    public func release() {
        for l in locks.withLock({ let all = $0; $0 = []; return all }) { l.release() }
    }
}
