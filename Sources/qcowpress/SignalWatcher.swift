import Glibc
import QcowPress
import Synchronization

/// Turns SIGINT/SIGTERM into a clean stop: the signals are blocked in every thread and a dedicated
/// thread waits for them with sigwait, cancels the running encoder (which removes its temporary
/// file), and exits 130/143.
final class SignalWatcher: @unchecked Sendable {
    static let shared = SignalWatcher()
    private let handler = Mutex<(@Sendable () -> Void)?>(nil)

    var onSignal: (@Sendable () -> Void)? {
        get { handler.withLock { $0 } }
        set { handler.withLock { $0 = newValue } }
    }

    private init() {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        var thread = pthread_t()
        pthread_create(&thread, nil, { _ in
            var set = sigset_t()
            sigemptyset(&set)
            sigaddset(&set, SIGINT)
            sigaddset(&set, SIGTERM)
            var sig: Int32 = 0
            sigwait(&set, &sig)
            SignalWatcher.shared.onSignal?()
            exit(128 + sig)
        }, nil)
    }
}
