import enum DirectIO.Terminal
import Foundation
import Glibc
import Synchronization

/// Progress on stderr, sampled by its own thread. `done` is what reached the output in guest order
/// (or, for a stream of unknown length, the bytes consumed). On a terminal: a bar redrawn five
/// times a second with the rate and the time left, fitted to the terminal's width. Otherwise (a
/// log, a pipe): one plain line at most every 10 seconds, and one at the end.
final class ProgressBar: Sendable {
    private let total: UInt64?
    private let label: String
    private let done: @Sendable () -> UInt64
    private let stopped = Mutex(false)
    private let tty: Bool
    private let start = Date()
    /// What the sampling thread and `stop` share; held for a whole tick, so the final line never
    /// interleaves with a last sample.
    private struct Samples {
        /// Recent (time, bytes) samples: the rate is measured over the last few seconds.
        var recent: [(t: Double, bytes: UInt64)] = []
        var lastLine = 0.0
    }
    private let samples = Mutex(Samples())
    /// Seconds between plain lines when stderr is not a terminal (QCOWPRESS_PROGRESS_INTERVAL
    /// overrides it, for tests).
    private let lineInterval: Double

    init(total: UInt64?, label: String = "", done: @escaping @Sendable () -> UInt64) {
        self.total = total
        self.label = label
        self.done = done
        tty = Terminal.isTerminal(2)
        lineInterval = ProcessInfo.processInfo.environment["QCOWPRESS_PROGRESS_INTERVAL"].flatMap(Double.init) ?? 10
        var thread = pthread_t()
        let me = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&thread, nil, { raw in
            let bar = Unmanaged<ProgressBar>.fromOpaque(raw!).takeRetainedValue()
            while !bar.stopped.withLock({ $0 }) {
                bar.tick(final: false)
                usleep(200_000)
            }
            return nil
        }, me)
    }

    /// Bytes per second over the last ~5 s of samples (over the whole run at first).
    private static func rate(_ samples: inout [(t: Double, bytes: UInt64)], now: Double, bytes: UInt64) -> Double {
        samples.append((now, bytes))
        while samples.count > 2 && now - samples[0].t > 5 { samples.removeFirst() }
        guard let first = samples.first, now - first.t > 0.1, bytes >= first.bytes else { return 0 }
        return Double(bytes - first.bytes) / (now - first.t)
    }

    private func tick(final: Bool) {
        samples.withLock { s in
            let now = Date().timeIntervalSince(start)
            let d = total.map { min(done(), $0) } ?? done()
            let r = final ? (now > 0 ? Double(d) / now : 0) : Self.rate(&s.recent, now: now, bytes: d)
            if tty {
                // ESC [K clears what a longer earlier line left.
                writeStderr("\r" + Self.ttyLine(label: label, done: d, total: total, rate: r, width: Self.terminalWidth()) + "\u{1B}[K" + (final ? "\n" : ""))
            } else if final || now - s.lastLine >= lineInterval {
                s.lastLine = now
                writeStderr(Self.plainLine(label: label, done: d, total: total, rate: r, seconds: now, final: final) + "\n")
            }
        }
    }

    func stop() {
        stopped.withLock { $0 = true }
        tick(final: true)
    }

    static func terminalWidth() -> Int {
        Terminal.columns(2) ?? 80
    }

    /// "  37.2% [######------] 1.1 GiB/3.0 GiB 412 MB/s ETA 0:05", shortened to `width - 1` columns
    /// (the bar goes first, then the ETA, then the sizes).
    static func ttyLine(label: String, done: UInt64, total: UInt64?, rate: Double, width: Int) -> String {
        let room = max(10, width - 1)
        let prefix = label.isEmpty ? "" : label + " "
        guard let total else {
            return String((prefix + "\(bytes(done)) \(speed(rate))").prefix(room))
        }
        let pct = total == 0 ? 100.0 : Double(done) * 100 / Double(total)
        let pctText = String(format: "%5.1f%%", pct)
        let eta = rate > 0 && done < total ? " ETA " + clock(Double(total - done) / rate) : ""
        let tail = " \(bytes(done))/\(bytes(total)) \(speed(rate))"
        for parts in [[tail, eta], [eta], []] {
            let fixed = prefix.count + pctText.count + 3 + parts.joined().count
            let barWidth = min(40, room - fixed)
            if barWidth >= 10 {
                let filled = Int(pct / 100 * Double(barWidth))
                let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: barWidth - filled)
                return prefix + pctText + " [" + bar + "]" + parts.joined()
            }
        }
        return String((prefix + pctText + eta).prefix(room))
    }

    /// "qcowpress: 37% (1.1 GiB of 3.0 GiB), 412 MB/s, 0:05 left" — or, at the end, the total time.
    static func plainLine(label: String, done: UInt64, total: UInt64?, rate: Double, seconds: Double, final: Bool) -> String {
        let who = "qcowpress: " + (label.isEmpty ? "" : label + ": ")
        guard let total else {
            return who + "\(bytes(done)) read, \(speed(rate))" + (final ? ", done in \(clock(seconds))" : "")
        }
        let pct = total == 0 ? 100 : Int(Double(done) * 100 / Double(total))
        var s = who + "\(pct)% (\(bytes(done)) of \(bytes(total))), \(speed(rate))"
        if final {
            s += ", done in \(clock(seconds))"
        } else if rate > 0 && done < total {
            s += ", \(clock(Double(total - done) / rate)) left"
        }
        return s
    }

    static func bytes(_ n: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var v = Double(n)
        var u = 0
        while v >= 1024 && u < units.count - 1 {
            v /= 1024
            u += 1
        }
        return u == 0 ? "\(n) B" : String(format: "%.1f", v) + " " + units[u]
    }

    static func speed(_ r: Double) -> String {
        let mb = r / 1e6
        return mb >= 100 ? String(format: "%.0f MB/s", mb) : String(format: "%.1f MB/s", mb)
    }

    static func clock(_ s: Double) -> String {
        guard s.isFinite, s >= 0 else { return "?" }
        let t = Int(s.rounded())
        return t >= 3600 ? String(format: "%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60) : String(format: "%d:%02d", t / 60, t % 60)
    }
}
