import Foundation
import QcowPress
import Synchronization

/// What SIGUSR1 prints: qemu-img's one progress line, `    (37.21/100%)` on stderr (qemu's
/// util/qemu-progress.c prints `"    (%3.2f/100%%)\n"`; incus and other tools send SIGUSR1 instead
/// of passing -p and read that line). Every long-running command names its progress here, from the
/// counters its -p bar shows, whether or not -p was given; before that (options, opening the
/// source) the line says 0.00, after the last byte 100.00.
enum ProgressReport {
    /// Percent done, 0…100.
    private static let source = Mutex<(@Sendable () -> Double)?>(nil)

    /// Progress from now on is `done` of `total` bytes (a total of 0 is done).
    static func follow(total: UInt64, done: @escaping @Sendable () -> UInt64) {
        follow { total == 0 ? 100 : Double(min(done(), total)) * 100 / Double(total) }
    }

    static func follow(percent: @escaping @Sendable () -> Double) {
        source.withLock { $0 = percent }
    }

    /// The line, as qemu-img formats it.
    static func line() -> String {
        let p = source.withLock { $0 }?() ?? 0
        return String(format: "    (%3.2f/100%%)\n", min(100, max(0, p)))
    }
}

/// Progress over drives restored one after another (`restore pbs`, one drive or `--all`): the
/// drives finished so far count whole, the one being restored by its own ordered progress.
final class DriveSequenceProgress: Sendable {
    private struct State {
        var finished: UInt64 = 0
        var current: OrderedProgress? = nil
    }
    private let state = Mutex(State())
    /// Every drive's guest size together; nil: the sizes of the drives as they start.
    private let total: UInt64?

    init(total: UInt64?) {
        self.total = total
        ProgressReport.follow { [self] in percent }
    }

    /// A drive starts (the one before it, if any, is done).
    func started(_ p: OrderedProgress) {
        state.withLock { s in
            if let c = s.current { s.finished += c.total }
            s.current = p
        }
    }

    var percent: Double {
        let (finished, current) = state.withLock { ($0.finished, $0.current) }
        let all = total ?? (finished + (current?.total ?? 0))
        guard all > 0 else { return current == nil ? 0 : 100 }
        return Double(min(all, finished + (current?.bytesDone ?? 0))) * 100 / Double(all)
    }
}

/// Progress of encoders written at the same time (`restore vma` from a pipe, whose length is not
/// known): guest bytes handed to them of all their sizes.
final class EncodersProgress: Sendable {
    private let encoders = Mutex<[Qcow2Encoder]>([])

    init() { ProgressReport.follow { [self] in percent } }

    func add(_ e: Qcow2Encoder) { encoders.withLock { $0.append(e) } }

    var percent: Double {
        let (done, total) = encoders.withLock { es in
            es.reduce((UInt64(0), UInt64(0))) { ($0.0 + min($1.bytesReceived, $1.virtualSize), $0.1 + $1.virtualSize) }
        }
        return total == 0 ? 0 : Double(done) * 100 / Double(total)
    }
}

/// A raw output that counts the guest bytes handed to it (SIGUSR1's progress of `convert -O raw`).
final class CountingSink: BlockingImageSink {
    private let inner: any BlockingImageSink
    private let counted = Atomic<UInt64>(0)
    init(_ inner: any BlockingImageSink) { self.inner = inner }
    var bytes: UInt64 { counted.load(ordering: .relaxed) }

    func writeBlocking(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws(QcowPressError) {
        try inner.writeBlocking(at: offset, bytes)
        counted.add(UInt64(bytes.count), ordering: .relaxed)
    }

    func writeZeroesBlocking(at offset: UInt64, length: UInt64) throws(QcowPressError) {
        try inner.writeZeroesBlocking(at: offset, length: length)
        counted.add(length, ordering: .relaxed)
    }
}
