import Glibc
import Synchronization

/// A progress bar on stderr, redrawn five times a second by its own thread.
final class ProgressBar: @unchecked Sendable {
    private let total: UInt64
    private let done: @Sendable () -> UInt64
    private let stopped = Mutex(false)

    init(total: UInt64, done: @escaping @Sendable () -> UInt64) {
        self.total = total
        self.done = done
        var thread = pthread_t()
        let me = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&thread, nil, { raw in
            let bar = Unmanaged<ProgressBar>.fromOpaque(raw!).takeRetainedValue()
            while !bar.stopped.withLock({ $0 }) {
                bar.draw()
                usleep(200_000)
            }
            return nil
        }, me)
    }

    func draw() {
        let d = min(done(), total)
        let pct = total == 0 ? 100.0 : Double(d) * 100 / Double(total)
        let width = 40
        let filled = Int(pct / 100 * Double(width))
        let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
        let tenths = Int(pct * 10)
        writeStderr("\r    (\(tenths / 10).\(tenths % 10)/100%) [\(bar)]")
    }

    func stop() {
        stopped.withLock { $0 = true }
        draw()
        writeStderr("\n")
    }
}
