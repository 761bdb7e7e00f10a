import Glibc
import QcowPress

/// Turns SIGINT/SIGTERM into a clean stop: the signals are blocked in every thread (the watcher is
/// created first thing in `main`, before any other thread), and a dedicated thread waits for them
/// with sigwait, removes every temporary output the library registered (`TemporaryFiles`), and
/// exits 130/143. Nothing else needs to run: exit ends the engine's threads.
enum SignalWatcher {
    nonisolated(unsafe) private static var started = false
    /// Commands that run until stopped (serve) end with this status instead of 128 + signal.
    nonisolated(unsafe) static var exitStatusOnSignal: Int32? = nil
    /// Extra clean-up at a signal (a server's socket file).
    nonisolated(unsafe) private static var cleanups: [() -> Void] = []
    static func onExit(_ body: @escaping () -> Void) { cleanups.append(body) }

    static func install() {
        guard !started else { return }
        started = true
        var set = stopSignals()
        pthread_sigmask(SIG_BLOCK, &set, nil)
        var thread = pthread_t()
        pthread_create(&thread, nil, { _ in
            var set = stopSignals()
            var sig: Int32 = 0
            sigwait(&set, &sig)
            TemporaryFiles.removeAll()
            for c in SignalWatcher.cleanups { c() }
            exit(SignalWatcher.exitStatusOnSignal ?? 128 + sig)
        }, nil)
    }
}

/// The signals that stop the command: SIGINT and SIGTERM.
private func stopSignals() -> sigset_t {
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGINT)
    sigaddset(&set, SIGTERM)
    return set
}
