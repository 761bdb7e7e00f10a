import Glibc
import QcowPress
import Synchronization

/// Turns SIGINT/SIGTERM into a clean stop: the signals are blocked in every thread and a dedicated
/// thread waits for them with sigwait, cancels the running encoder (which removes its temporary
/// file), and exits 130/143.
final class SignalWatcher: @unchecked Sendable {
    static let shared = SignalWatcher()
    private let handlers = Mutex<[@Sendable () -> Void]>([])

    /// Adds work to do on SIGINT/SIGTERM before exiting (cancel an encoder, remove files).
    func add(_ h: @escaping @Sendable () -> Void) { handlers.withLock { $0.append(h) } }
    func run() { for h in handlers.withLock({ $0 }) { h() } }

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
            SignalWatcher.shared.run()
            TemporaryFiles.removeAll()
            exit(128 + sig)
        }, nil)
    }
}
