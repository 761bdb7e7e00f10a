import ArgumentParser
import QcowPress
import Synchronization

/// -U / --force-share on every command that reads images, as qemu-img's.
let forceShareHelp = ArgumentHelp(
    "Read an image another process has open for writing, as qemu-img -U: share its lock instead of being refused (what is read may then be stale or torn).")

/// Shared locks (QEMU's, see ``ReadLocks``) on the images a command reads, taken before it reads
/// them and held until the caller releases them at the end of the run: each path with its backing
/// chain when `chain` says so. Refuses, as qemu-img, an image another process has open for writing
/// unless `forceShare`.
func lockForReading(_ images: [(path: String, chain: Bool)], forceShare: Bool,
                    purpose: ReadLocks.Purpose = .read, format: String? = nil) throws -> ReadLocks {
    let locks = ReadLocks(forceShare: forceShare)
    for i in images { try locks.lock(i.path, backingChain: i.chain, purpose: purpose, format: format) }
    return locks
}

/// Locks a command holds until the process ends (a server that only a signal stops: a local would
/// be released after its last use).
private let heldUntilExit = Mutex<[ReadLocks]>([])

func holdUntilExit(_ locks: ReadLocks) {
    heldUntilExit.withLock { $0.append(locks) }
}
