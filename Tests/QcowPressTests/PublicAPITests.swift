import Foundation
import QcowPress
import Testing

/// The library's public API only (no @testable): progress, one-call conversion, typed errors.
// Tagged test by test: the progress test converts 24 MiB at zlib level 9 on one thread (seconds),
// so it is not in `fast`.
@Suite struct PublicAPITests {
    func tempDir() throws -> URL {
        let url = URL(fileURLWithPath: "/tmp").appendingPathComponent("qp-api-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    @Test func progressIsMonotonicAndEndsAtTotal() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try Data((0..<(24 << 20)).map { UInt8(truncatingIfNeeded: $0 * 7 / 3) }).write(to: src)
        var options = EncoderOptions(virtualSize: 0)
        options.compression = CompressionSettings(algorithm: .zlib, level: 9)
        options.threads = 1
        let events = EventLog()
        let s = try await convert(.raw(path: src.path), to: dir.appendingPathComponent("o.qcow2").path, options: options) { events.add($0) }
        let seen = events.all
        #expect(!seen.isEmpty)
        #expect(zip(seen, seen.dropFirst()).allSatisfy { $0.done <= $1.done })
        #expect(seen.last == ImageProgress(done: s.virtualSize, total: s.virtualSize))
    }

    @Test(.tags(.fast, .faults)) func errorsAreTypedValues() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = EncoderOptions(virtualSize: 0)
        // Missing source: an I/O error with errno and path.
        do {
            _ = try await convert(.raw(path: dir.appendingPathComponent("missing").path), to: dir.appendingPathComponent("a.qcow2").path, options: options)
            Issue.record("no error")
        } catch .io(let e) {
            #expect(e.errno == ENOENT)
            #expect(e.path.hasSuffix("missing"))
        } catch {
            Issue.record("unexpected \(error)")
        }
        // Damaged input: where it is damaged.
        let bad = dir.appendingPathComponent("bad.qcow2")
        var header = [UInt8](repeating: 0, count: 4096)
        header[0...3] = [0x51, 0x46, 0x49, 0xFB]
        header[7] = 9
        try Data(header).write(to: bad)
        do {
            _ = try await convert(.qcow2(path: bad.path), to: dir.appendingPathComponent("b.qcow2").path, options: options)
            Issue.record("no error")
        } catch .inputDamaged(let path, let location) {
            #expect(path == bad.path)
            #expect(location.contains("version at offset 4 is 9"))
        } catch {
            Issue.record("unexpected \(error)")
        }
        // Invalid options, existing destination, misuse, cancellation.
        options.clusterSize = 3
        await #expect(throws: QcowPressError.self) { _ = try await convert(.raw(path: bad.path), to: dir.appendingPathComponent("c.qcow2").path, options: options) }
        do {
            _ = try Qcow2Encoder(destination: bad.path, options: EncoderOptions(virtualSize: 1 << 20))
            Issue.record("no error")
        } catch .destinationExists(let p) {
            #expect(p == bad.path)
        } catch {
            Issue.record("unexpected \(error)")
        }
        let enc = try Qcow2Encoder(destination: dir.appendingPathComponent("d.qcow2").path, options: EncoderOptions(virtualSize: 1 << 20))
        do {
            try await enc.write(at: 1 << 20, [1])
            Issue.record("no error")
        } catch .misuse(let m) {
            #expect(m.contains("beyond the virtual size"))
        } catch {
            Issue.record("unexpected \(error)")
        }
        enc.cancel()
        do {
            _ = try await enc.finish()
        } catch .cancelled {
        } catch {
            Issue.record("unexpected \(error)")
        }
        #expect(QcowPressError.cancelled.message == "cancelled")
    }
}

final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private var events: [ImageProgress] = []
    func add(_ p: ImageProgress) { lock.lock(); events.append(p); lock.unlock() }
    var all: [ImageProgress] { lock.lock(); defer { lock.unlock() }; return events }
}
