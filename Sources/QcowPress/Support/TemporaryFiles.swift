import DirectIO
import Glibc
import Synchronization

/// Every temporary output file this process has open (an image or config being written under a
/// temporary name). Registered before the file is created and forgotten once it is renamed into
/// place or removed, so a signal handler can remove exactly the partial output at any moment.
///
/// Names: `.<name>.qcowpress-<pid>-<random>.tmp` beside the destination, so a file left by a
/// process that was killed (SIGKILL, power loss) can be told apart and named (``leftovers(in:)``).
public enum TemporaryFiles {
    static let paths = Mutex<Set<String>>([])

    /// A fresh temporary name beside `destination`, registered for ``removeAll()``.
    static func make(for destination: String) -> String {
        let p = name(for: destination)
        paths.withLock { _ = $0.insert(p) }
        return p
    }

    static func name(for destination: String) -> String {
        let slash = destination.lastIndex(of: "/")
        let dir = slash.map { String(destination[...$0]) } ?? ""
        let name = slash.map { String(destination[destination.index(after: $0)...]) } ?? destination
        return "\(dir).\(name).qcowpress-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).tmp"
    }

    /// Removes the file (if it exists) and forgets it.
    static func discard(_ p: String) {
        FileNames.unlink(p)
        paths.withLock { _ = $0.remove(p) }
    }

    /// Renames the file into place and forgets it. Without `overwrite` an existing destination —
    /// one that appeared while the output was written, e.g. a second run — is never replaced:
    /// the rename fails with EEXIST (``QcowPressError/destinationExists(path:)``) and the
    /// temporary file stays for the caller to discard.
    static func commit(_ p: String, to destination: String, overwrite: Bool) throws(IOError) {
        if overwrite {
            try FileNames.rename(p, destination)
        } else {
            try FileNames.renameNoReplace(p, destination)
        }
        paths.withLock { _ = $0.remove(p) }
    }

    /// Removes every temporary output file of this process. For signal handlers: after it, nothing
    /// partial is left; whatever was writing them fails on its next write.
    public static func removeAll() {
        for p in paths.withLock({ let all = $0; $0.removeAll(); return all }) { FileNames.unlink(p) }
    }

    /// Temporary files in `directory` whose process no longer exists: what a killed run left
    /// behind (full paths, sorted). They are named, never removed: only the user knows whether
    /// another host's process (over NFS, another PID namespace) still writes them.
    public static func leftovers(in directory: String) -> [String] {
        FileNames.list(directory).compactMap { name -> String? in
            guard let pid = ownerPID(name), pid != getpid(), !FileNames.processExists(pid) else { return nil }
            return directory == "/" ? "/" + name : directory + "/" + name
        }.sorted()
    }

    /// ``leftovers(in:)`` of the directory that holds `path`.
    public static func leftovers(besides path: String) -> [String] {
        leftovers(in: FileNames.directory(of: path))
    }

    /// The process id in a temporary file's name, or nil when the name is not one of ours.
    static func ownerPID(_ name: String) -> Int32? {
        guard name.hasPrefix("."), name.hasSuffix(".tmp") else { return nil }
        let body = name.dropFirst().dropLast(4)  // "<name>.qcowpress-<pid>-<random>"
        guard let d2 = body.lastIndex(of: "-"), UInt32(body[body.index(after: d2)...]) != nil else { return nil }
        let head = body[..<d2]
        guard let d1 = head.lastIndex(of: "-"), let pid = Int32(head[head.index(after: d1)...]) else { return nil }
        guard head[..<d1].hasSuffix(".qcowpress") else { return nil }
        return pid
    }
}
