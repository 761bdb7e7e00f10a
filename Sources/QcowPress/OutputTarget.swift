import DirectIO
import Glibc
import Synchronization

/// A file a job reads, which its output may never replace or write into, even with `overwrite`:
/// the source, a file of the source's backing chain, a backing file or export base. Compared by
/// device and inode (`FileIdentity`), so another name of the same file — a hard link, a
/// symbolic link, a second device node — is caught too.
public struct ProtectedInput: Sendable, Hashable {
    public var path: String
    /// What the file is to the job, for the error: "the source", "a backing file of the source".
    public var role: String
    public init(path: String, role: String) {
        self.path = path
        self.role = role
    }

    /// An image and every file of its backing chain (read from the headers, whether or not the
    /// job opens the backing files), as far as the chain can be followed.
    /// A read error while probing is thrown, never taken for "not qcow2": a source whose first
    /// bytes cannot be read is an error naming it. (Other formats end the chain: `-f raw` may
    /// read any file.)
    public static func imageAndBackingChain(_ path: String, role: String) throws(QcowPressError) -> [ProtectedInput] {
        var out = [ProtectedInput(path: path, role: role)]
        var current = path
        for _ in 0..<Qcow2Image.maxChainDepth {
            // A backing file that is missing, or not a file or block device, is reported where
            // it is opened ("does not resolve to a regular file").
            if current != path {
                guard let st = FileNames.status(current), st.kind == .regular || st.kind == .blockDevice else { break }
            }
            guard try ImageFormat.probe(path: current) == "qcow2",
                  let image = try? Qcow2Image(path: current, openBacking: false),
                  let name = image.header.backingFile else { break }
            current = Qcow2Image.resolve(name, relativeTo: current)
            out.append(ProtectedInput(path: current, role: "a backing file of \(role)"))
        }
        return out
    }
}

/// Where an output goes, decided (and refused) before anything is written:
/// - a new or existing regular file: written under a temporary name beside it and renamed;
///   an existing one only with `overwrite`;
/// - a block device: written in place (no temporary file, no rename), only with `overwrite`
///   (it holds data, as an existing file does);
/// - a symbolic link: followed, and the rules above apply to its target (which is replaced, the
///   link kept); a dangling link is refused;
/// - a directory, a character device (/dev/null), a FIFO or socket: refused;
/// - any of the job's ``ProtectedInput``s: refused;
/// - a destination another process writes or has open (QEMU, qemu-img, another QcowPress run):
///   refused, as qemu-img refuses it ("Failed to get "write" lock"); see ``DestinationLock``,
///   taken here and held until the commit.
struct OutputTarget: Sendable {
    enum Kind: Sendable { case file(exists: Bool), blockDevice }
    /// The name as given (errors and summaries use it).
    let destination: String
    /// The name written: `destination` with symbolic links resolved.
    let path: String
    let kind: Kind
    let overwrite: Bool
    /// Held from here to the commit (or the discard).
    let lock: DestinationLock

    init(destination: String, overwrite: Bool, protecting inputs: [ProtectedInput]) throws(QcowPressError) {
        self.destination = destination
        self.overwrite = overwrite
        var path = destination
        if FileNames.isSymbolicLink(destination) {
            do { path = try FileNames.resolved(destination) } catch {
                throw .invalidArgument("\(destination): symbolic link to a file that does not exist (refusing to follow it)")
            }
        }
        self.path = path
        guard let st = FileNames.status(path) else {
            kind = .file(exists: false)
            lock = try DestinationLock(destination: destination, path: path, exists: false, blockDevice: false)
            return
        }
        for input in inputs {
            if let other = FileNames.status(input.path), other.identity == st.identity {
                let same = input.path == destination ? "" : " (\(input.path))"
                throw .invalidArgument("\(destination): is \(input.role)\(same); refusing to overwrite it")
            }
        }
        switch st.kind {
        case .regular: kind = .file(exists: true)
        case .blockDevice: kind = .blockDevice
        case .directory: throw .invalidArgument("\(destination): is a directory")
        case .characterDevice:
            throw .invalidArgument("\(destination): is a character device; the destination must be a file or a block device")
        case .other:
            throw .invalidArgument("\(destination): is a FIFO or socket; the destination must be a file or a block device")
        }
        if !overwrite {
            if case .blockDevice = kind {
                throw .invalidArgument("\(destination): is a block device; writing into it needs --force")
            }
            throw .destinationExists(path: destination)
        }
        lock = try DestinationLock(destination: destination, path: path, exists: true, blockDevice: st.kind == .blockDevice)
    }

    var isBlockDevice: Bool {
        if case .blockDevice = kind { return true }
        return false
    }

    /// Creates the temporary file, or opens the block device. On a device, the first
    /// `zeroFirstBytes` are zeroed and synced before anything else is written, so an unfinished
    /// image never shows the header of what the device held before (the header is written last).
    func open(direct: Bool, zeroFirstBytes: Int = 0) throws(QcowPressError) -> PendingOutput {
        if isBlockDevice {
            let file: OutputFile
            do { file = try OutputFile(blockDevice: path, displayName: destination) } catch { throw .from(error) }
            let out = PendingOutput(file: file, target: self, temporaryPath: nil, zeroBytes: zeroFirstBytes)
            if zeroFirstBytes > 0 {
                guard UInt64(zeroFirstBytes) <= file.deviceSize! else {
                    throw .invalidArgument("\(destination): block device of \(file.deviceSize!) bytes is too small")
                }
                do { try out.zeroHead() } catch { throw .from(error) }
            }
            return out
        }
        let temp = TemporaryFiles.make(for: path)
        do {
            let file = try OutputFile(creating: temp, direct: direct, displayName: destination)
            try lock.lockTemporary(temp)
            return PendingOutput(file: file, target: self, temporaryPath: temp, zeroBytes: 0)
        } catch {
            TemporaryFiles.discard(temp)
            throw .from(error)
        }
    }
}

/// An output being written: the file, and how it becomes final (rename of the temporary file,
/// or nothing for a block device written in place) or goes away.
final class PendingOutput: Sendable {
    let file: OutputFile
    let target: OutputTarget
    /// nil: written in place (block device).
    let temporaryPath: String?
    /// Bytes at the device's start zeroed at open and again on discard (a qcow2 header cluster).
    let zeroBytes: Int
    private let state = Mutex(State.writing)
    private enum State { case writing, deferred, committed, discarded }
    /// When set, ``commit()`` leaves the finished file under its temporary name; the owner
    /// commits it with ``commitDeferred()`` (so a restore of several images makes them appear
    /// together, or none) or removes it with ``discard()``.
    let deferCommit = Atomic<Bool>(false)

    init(file: OutputFile, target: OutputTarget, temporaryPath: String?, zeroBytes: Int) {
        self.file = file
        self.target = target
        self.temporaryPath = temporaryPath
        self.zeroBytes = zeroBytes
    }

    /// Called once the file is complete and synced: renames it into place (never over a
    /// destination that appeared meanwhile, unless overwriting), unless commits are deferred.
    func commit() throws(IOError) {
        if deferCommit.load(ordering: .acquiring) {
            state.withLock { $0 = .deferred }
            return
        }
        try rename()
    }

    /// Commits a file whose commit was deferred.
    func commitDeferred() throws(QcowPressError) {
        do { try rename() } catch { throw .from(error) }
    }

    private func rename() throws(IOError) {
        if let temp = temporaryPath {
            if target.overwrite { try target.lock.lockBeforeReplacing() }
            try TemporaryFiles.commit(temp, to: target.path, overwrite: target.overwrite)
            FileNames.syncDirectory(of: target.path)
        }
        state.withLock { $0 = .committed }
        target.lock.committed()
    }

    /// Removes the unfinished (or finished but uncommitted) output: the temporary file, or on a
    /// device the header cluster is zeroed again. A committed output is left alone.
    func discard() {
        let go: Bool = state.withLock {
            switch $0 {
            case .writing, .deferred:
                $0 = .discarded
                return true
            case .committed, .discarded: return false
            }
        }
        guard go else { return }
        if let temp = temporaryPath {
            TemporaryFiles.discard(temp)
        } else if zeroBytes > 0 {
            try? zeroHead()
        }
        target.lock.release()
    }

    /// Zeroes and syncs the first ``zeroBytes`` of the device.
    func zeroHead() throws(IOError) {
        let b = AlignedBuffer(capacity: zeroBytes)
        b.zero(from: 0, to: zeroBytes)
        try file.pwriteAll(b.pointer, length: zeroBytes, offset: 0)
        try file.sync()
    }
}
