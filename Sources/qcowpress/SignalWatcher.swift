import Glibc
import QcowPress

/// Turns SIGINT, SIGTERM, SIGHUP (a closed ssh session or terminal) and SIGQUIT into a clean
/// stop: the signals are blocked in every thread (the watcher is created first thing in `main`,
/// before any other thread), and a dedicated thread waits for them with sigwait, removes every
/// temporary output the library registered (`TemporaryFiles`), and exits 128 + the signal's number
/// (130, 143, 129, 131). Nothing else needs to run: exit ends the engine's threads.
///
/// A signal the command was started with ignored stays ignored (`nohup qcowpress …` survives the
/// hangup, a background job without job control keeps ignoring SIGINT): a blocked signal is
/// queued even when its action is SIG_IGN, so those are left out of the set.
enum SignalWatcher {
    nonisolated(unsafe) private static var started = false
    /// Commands that run until stopped (serve) end with this status instead of 128 + signal.
    nonisolated(unsafe) static var exitStatusOnSignal: Int32? = nil
    /// Extra clean-up at a signal (a server's socket file).
    nonisolated(unsafe) private static var cleanups: [() -> Void] = []
    static func onExit(_ body: @escaping () -> Void) { cleanups.append(body) }
    nonisolated(unsafe) private static var watched = sigset_t()

    static func install() {
        guard !started else { return }
        started = true
        sigemptyset(&watched)
        for sig in [SIGINT, SIGTERM, SIGHUP, SIGQUIT] where !isIgnored(sig) {
            sigaddset(&watched, sig)
        }
        pthread_sigmask(SIG_BLOCK, &watched, nil)
        var thread = pthread_t()
        pthread_create(&thread, nil, { _ in
            var set = SignalWatcher.watched
            var sig: Int32 = 0
            sigwait(&set, &sig)
            TemporaryFiles.removeAll()
            for c in SignalWatcher.cleanups { c() }
            exit(SignalWatcher.exitStatusOnSignal ?? 128 + sig)
        }, nil)
    }

    private static func isIgnored(_ sig: Int32) -> Bool {
        var old = sigaction()
        guard sigaction(sig, nil, &old) == 0 else { return false }
        // Function pointers are not Equatable: compare SIG_IGN's bit pattern (1).
        return unsafeBitCast(old.__sigaction_handler.sa_handler, to: Int.self) == unsafeBitCast(SIG_IGN, to: Int.self)
    }
}
