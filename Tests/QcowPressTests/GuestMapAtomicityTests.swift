import Foundation
@testable import QcowPress
import Synchronization
import Testing

/// A range marked zero or claimed by a copy changes in one step (#27): a concurrent reader sees
/// it all before or all after, and a range refused for an overlap leaves nothing claimed.
@Suite(.tags(.fast)) struct GuestMapAtomicityTests {
    /// 512-byte clusters: 64 entries per L2 table, so a region is 64 clusters (32 KiB) and short
    /// ranges span regions.
    static let cs = 512
    static let perRegion = 64

    static func tempDir() throws -> URL {
        let url = URL(fileURLWithPath: "/tmp").appendingPathComponent("qp-gm-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    static func encoder(in dir: URL, clusters: Int) throws -> (Qcow2Encoder, String) {
        var o = EncoderOptions(virtualSize: UInt64(clusters * cs))
        o.clusterSize = cs
        o.memoryLimit = 16 << 20
        o.threads = 1
        let path = dir.appendingPathComponent("out.qcow2").path
        return (try Qcow2Encoder(destination: path, options: o), path)
    }

    static func readBack(_ path: String, count: Int) throws -> [UInt8] {
        let img = try Qcow2Image(path: path)
        var out = [UInt8](repeating: 0xEE, count: count)
        try out.withUnsafeMutableBytes { p in try img.read(at: 0, count: count, into: p.baseAddress!, context: ReadContext()) }
        return out
    }

    static func pattern(_ c: Int) -> [UInt8] { (0..<cs).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ c &+ 1) } }

    /// A zero range over two regions refused because its last cluster was written: the first
    /// region was not marked zero, so it can still be written.
    @Test func aRefusedZeroRangeMarksNothing() async throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let n = 4 * Self.perRegion
        let (enc, path) = try Self.encoder(in: dir, clusters: n)
        try await enc.write(at: UInt64(100 * Self.cs), Self.pattern(100))
        await #expect(throws: QcowPressError.self) {
            try await enc.writeZeroes(at: 0, length: UInt64(2 * Self.perRegion * Self.cs))
        }
        #expect(enc.map.states(0..<100).allSatisfy { $0 == .untouched }, "part of a refused range was marked zero")
        for c in 0..<100 { try await enc.write(at: UInt64(c * Self.cs), Self.pattern(c)) }
        _ = try await enc.finish()
        let got = try Self.readBack(path, count: n * Self.cs)
        for c in 0...100 { #expect(Array(got[(c * Self.cs)..<((c + 1) * Self.cs)]) == Self.pattern(c), "cluster \(c)") }
    }

    /// A copy refused because one destination cluster was written claims none of the others.
    @Test func aRefusedCopyClaimsNothing() async throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let n = 4 * Self.perRegion
        let (enc, path) = try Self.encoder(in: dir, clusters: n)
        try await enc.write(at: UInt64(40 * Self.cs), Self.pattern(40))
        #expect(throws: QcowPressError.self) {
            try enc.writeCopy(at: UInt64(32 * Self.cs), from: UInt64(128 * Self.cs), length: UInt64(64 * Self.cs))
        }
        #expect(enc.map.states(32..<40).allSatisfy { $0 == .untouched }, "part of a refused copy stays claimed")
        for c in 32..<40 { try await enc.write(at: UInt64(c * Self.cs), Self.pattern(c)) }
        _ = try await enc.finish()
        let got = try Self.readBack(path, count: n * Self.cs)
        for c in 32...40 { #expect(Array(got[(c * Self.cs)..<((c + 1) * Self.cs)]) == Self.pattern(c), "cluster \(c)") }
    }

    /// Ranges of 64 clusters straddling two regions, marked zero or claimed by a copy one after
    /// another, while a reader snapshots the range being changed: no snapshot is half changed.
    @Test func readersNeverSeeHalfARange() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let regions = 160
        let (enc, _) = try Self.encoder(in: dir, clusters: regions * Self.perRegion)
        defer { enc.cancel() }
        // Range i: clusters [i*64 + 32, i*64 + 96), i ≥ 1; copies read from region 0.
        @Sendable func range(_ i: Int) -> Range<UInt64> { UInt64(i * 64 + 32)..<UInt64(i * 64 + 96) }
        let current = Atomic<Int>(1)
        let done = Atomic<Bool>(false)
        let seen = Mutex<(snapshots: Int, torn: [String])>((0, []))
        let finished = DispatchSemaphore(value: 0)
        let reader = Thread {
            defer { finished.signal() }
            while !done.load(ordering: .acquiring) {
                let i = current.load(ordering: .acquiring)
                let s = enc.map.states(range(i))
                let untouched = s.filter { $0 == .untouched }.count
                seen.withLock { v in
                    v.snapshots += 1
                    if untouched != 0 && untouched != s.count && v.torn.count < 5 {
                        v.torn.append("range \(i): \(untouched) of \(s.count) clusters untouched")
                    }
                }
            }
        }
        reader.start()
        for i in 1..<(regions - 2) {
            current.store(i, ordering: .releasing)
            let r = range(i)
            if i % 2 == 0 {
                try enc.writeZeroesBlocking(at: r.lowerBound * UInt64(Self.cs), length: UInt64(r.count * Self.cs))
            } else {
                try enc.writeCopy(at: r.lowerBound * UInt64(Self.cs), from: 0, length: UInt64(r.count * Self.cs))
            }
            // Give the reader a look at each range while it changes (and after).
            let target = seen.withLock { $0.snapshots } + 20
            while seen.withLock({ $0.snapshots }) < target {}
        }
        done.store(true, ordering: .releasing)
        finished.wait()
        let v = seen.withLock { $0 }
        #expect(v.torn.isEmpty, "\(v.torn)")
    }
}
