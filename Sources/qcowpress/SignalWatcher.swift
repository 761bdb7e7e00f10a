import Glibc
import QcowPress

/// Every catchable signal whose default action would end the process ends it cleanly instead, and
/// SIGUSR1 prints one progress line as qemu-img does (`    (37.21/100%)`) and the run goes on.
///
/// The signals are blocked in every thread (the watcher is created first thing in `main`, before
/// any other thread), and a dedicated thread waits for them with sigwait. At SIGUSR1 it prints
/// ``ProgressReport/line()``; at any other it removes every temporary output the library
/// registered (`TemporaryFiles`) and exits 128 + the signal's number (INT 130, TERM 143, HUP 129,
/// QUIT 131, USR2 140, ALRM 142, PIPE 141, …). Nothing else needs to run: exit ends the engine's
/// threads.
///
/// Which signals (Linux, signal(7)): HUP INT QUIT TERM USR1 USR2 PIPE ALRM VTALRM PROF XCPU XFSZ
/// IO PWR STKFLT and the real-time signals glibc leaves to applications (SIGRTMIN…SIGRTMAX, 34…64).
/// A SIGPIPE or SIGXFSZ the kernel raises for a write (a reader gone, RLIMIT_FSIZE) is directed at
/// the writing thread, where it stays blocked: the write fails with EPIPE or EFBIG and the command
/// reports that error (as qemu-img, which ignores SIGPIPE); sent with kill(1) they end the run like
/// the others. Left out: the fault signals (SEGV, BUS, ILL, FPE, TRAP, SYS, ABRT) — they report a
/// fault in the process itself, which a blocked mask cannot hold back, and a core dump is worth
/// more than a cleanup then — and KILL and STOP, which cannot be caught.
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

    /// The signals that end a run cleanly (SIGUSR1 prints progress instead).
    static var handled: [Int32] {
        [SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGPIPE, SIGALRM, SIGVTALRM, SIGPROF, SIGXCPU, SIGXFSZ,
         SIGIO, SIGPWR, SIGSTKFLT] + Array(__libc_current_sigrtmin()...__libc_current_sigrtmax())
    }

    static func install() {
        guard !started else { return }
        started = true
        sigemptyset(&watched)
        for sig in handled where !isIgnored(sig) {
            sigaddset(&watched, sig)
        }
        pthread_sigmask(SIG_BLOCK, &watched, nil)
        var thread = pthread_t()
        pthread_create(&thread, nil, { _ in
            var set = SignalWatcher.watched
            while true {
                var sig: Int32 = 0
                guard sigwait(&set, &sig) == 0 else { continue }
                if sig == SIGUSR1 {
                    writeStderr(ProgressReport.line())
                    continue
                }
                TemporaryFiles.removeAll()
                for c in SignalWatcher.cleanups { c() }
                exit(SignalWatcher.exitStatusOnSignal ?? 128 + sig)
            }
        }, nil)
    }

    private static func isIgnored(_ sig: Int32) -> Bool {
        var old = sigaction()
        guard sigaction(sig, nil, &old) == 0 else { return false }
        // Function pointers are not Equatable: compare SIG_IGN's bit pattern (1).
        return unsafeBitCast(old.__sigaction_handler.sa_handler, to: Int.self) == unsafeBitCast(SIG_IGN, to: Int.self)
    }
}
