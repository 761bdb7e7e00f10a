import DirectIO
import Synchronization

/// Every temporary output file this process has open (an image or config being written under a
/// temporary name). Registered before the file is created and forgotten once it is renamed into
/// place or removed, so a signal handler can remove exactly the partial output at any moment.
public enum TemporaryFiles {
    static let paths = Mutex<Set<String>>([])

    /// A fresh temporary name beside `destination`, registered for ``removeAll()``.
    static func make(for destination: String) -> String {
        let p = Qcow2Encoder.temporaryName(for: destination)
        paths.withLock { _ = $0.insert(p) }
        return p
    }

    /// Removes the file (if it exists) and forgets it.
    static func discard(_ p: String) {
        FileNames.unlink(p)
        paths.withLock { _ = $0.remove(p) }
    }

    /// Renames the file into place and forgets it.
    static func commit(_ p: String, to destination: String) throws(IOError) {
        try FileNames.rename(p, destination)
        paths.withLock { _ = $0.remove(p) }
    }

    /// Removes every temporary output file of this process. For signal handlers: after it, nothing
    /// partial is left; whatever was writing them fails on its next write.
    public static func removeAll() {
        for p in paths.withLock({ let all = $0; $0.removeAll(); return all }) { FileNames.unlink(p) }
    }
}
