import Synchronization

/// An encoder's life: open (accepting writes) → finishing (input closed, the writer completes the
/// image) → committing (the finished image goes into place) → done; or failed (first error wins;
/// everything stops and the temporary file goes).
///
/// Committing is claimed by the writer before the rename: from then on only the writer's own
/// error fails the encoder, and a cancel or another thread's error is refused. So a finished image
/// is either in place and reported done, or absent and reported failed — never in place and
/// reported failed. A cancel that comes first makes the claim fail, and the image never moves.
final class Lifecycle: Sendable {
    enum State: Sendable { case open, finishing, committing, done, failed(QcowPressError) }
    private let state = Mutex(State.open)

    /// Throws unless writes are accepted.
    func checkOpen() throws(QcowPressError) {
        try state.withLock { (s: inout State) throws(QcowPressError) in
            switch s {
            case .open: return
            case .failed(let e): throw e
            case .finishing, .committing, .done: throw .misuse("write after finish()")
            }
        }
    }

    /// open → finishing; throws when already finishing, done or failed.
    func beginFinish() throws(QcowPressError) {
        try state.withLock { (s: inout State) throws(QcowPressError) in
            switch s {
            case .open: s = .finishing
            case .failed(let e): throw e
            case .finishing, .committing, .done: throw .misuse("finish() called twice")
            }
        }
    }

    /// finishing → committing, claimed by the writer right before the image goes into place;
    /// false when it failed (or was cancelled) first: the image must not move.
    func beginCommit() -> Bool {
        state.withLock { s in
            guard case .finishing = s else { return false }
            s = .committing
            return true
        }
    }

    /// → done; false, changing nothing, when it failed meanwhile (the failure stands, and its path
    /// already stopped everything) or was already done.
    @discardableResult
    func markDone() -> Bool {
        state.withLock { s in
            switch s {
            case .failed, .done: return false
            case .open, .finishing, .committing:
                s = .done
                return true
            }
        }
    }

    /// → failed; false when it already failed or is done (the first outcome wins), and while
    /// committing unless `committer` (the writer failing its own commit: the image did not move).
    func markFailed(_ e: QcowPressError, committer: Bool = false) -> Bool {
        state.withLock { s in
            switch s {
            case .failed, .done: return false
            case .committing where !committer: return false
            case .open, .finishing, .committing:
                s = .failed(e)
                return true
            }
        }
    }

    var isFailed: Bool { failure != nil }

    /// The error that failed the encoder (the first one), or nil.
    var failure: QcowPressError? { state.withLock { if case .failed(let e) = $0 { e } else { nil } } }
}
