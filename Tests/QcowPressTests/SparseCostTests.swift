import Foundation
import Glibc
@testable import QcowPress
import Qcow2Format
import Synchronization
import Testing

/// Costs follow the data (#30): a zero or unallocated range is one extent from the reader, one
/// call into the sink and one range in the `GuestMap`, however long. Checked by counts, never by
/// time: before the fix a 16 TiB hole was 4 million 4 MiB chunks, each a `writeZeroes` call, and
/// the map held a member per 512 MiB region.
@Suite(.tags(.fast)) struct SparseCostTests {
    static let tib: UInt64 = 1 << 40
    static let cs = 65536
    static let geometry = ClusterGeometry(clusterSize: cs)!

    static func map(size: UInt64) -> (GuestMap, UInt64) {
        let n = geometry.guestClusters(forVirtualSize: size)
        return (GuestMap(geometry: geometry, guestClusters: n) { _ in cs }, n)
    }

    // MARK: - GuestMap

    @Test func aHugeZeroRangeIsOneRange() throws {
        let (m, n) = Self.map(size: 64 * Self.tib)
        let f = try m.markZero(0, n)
        #expect(f.isEmpty)
        let fp = m.footprint
        #expect(fp.tables == 0 && fp.completedRanges == 1 && fp.zeroRanges == 1, "\(fp)")
        #expect(m.clustersDoneInOrder == n)
        guard case .zero = m.readback(n / 2, count: 4) else { Issue.record("a cluster in the range does not read back as zero"); return }
        #expect(m.states((n - 3)..<n).allSatisfy { $0 == .zero })
    }

    /// Data clusters in a few regions and zero runs between them, as the copier announces them:
    /// the map keeps one range per run and no table for a region without data.
    @Test func zeroRunsBetweenDataAreRanges() throws {
        let (m, n) = Self.map(size: 16 * Self.tib)
        let data: [UInt64] = [5, 8192 * 3 + 100, 8192 * 3 + 101, n / 2 + 7, n - 1]
        var done = Set<Int>()
        var at: UInt64 = 0
        func take(_ f: Finalized) { for r in f.regions where m.takeTable(r) != nil { done.insert(r) } }
        for c in data {
            if c > at { take(try m.markZero(at, c)) }
            try m.reserve(c)
            take(m.setFinal(c, .final(UInt64(c + 1) << 16)))
            at = c + 1
        }
        if at < n { take(try m.markZero(at, n)) }
        let fp = m.footprint
        #expect(fp.tables == 0, "\(fp)")
        #expect(fp.completedRanges == 1, "every region is complete: one range (\(fp))")
        #expect(fp.zeroRanges <= data.count + 1, "\(fp)")
        #expect(done == Set(data.map { Self.geometry.l1Index(ofGuestCluster: $0) }), "only regions with data had a table")
        #expect(m.clustersDoneInOrder == n)
    }

    /// Whole-range atomicity holds for a huge range: refused for a cluster deep inside it, it
    /// marks nothing; the two ranges around that cluster are then accepted.
    @Test func aRefusedHugeZeroRangeMarksNothing() throws {
        let (m, n) = Self.map(size: 64 * Self.tib)
        let deep = n - 8192 * 5 + 3
        try m.reserve(deep)
        #expect(throws: QcowPressError.self) { _ = try m.markZero(0, n) }
        let fp = m.footprint
        #expect(fp.completedRanges == 0 && fp.zeroRanges == 0 && fp.tables == 1, "\(fp)")
        #expect(m.states(0..<4).allSatisfy { $0 == .untouched })
        #expect(m.clustersDoneInOrder == 0)
        _ = try m.markZero(0, deep)
        _ = try m.markZero(deep + 1, n)
        #expect(m.footprint.zeroRanges == 2)
        #expect(m.clustersDoneInOrder == deep)
        #expect(throws: QcowPressError.self) { _ = try m.markZero(deep - 1, deep) }
    }

    /// A copy waiting for a source inside a huge zero range is handed out by the mark.
    @Test func aWaitingCopyIsReleasedByAHugeZeroRange() throws {
        let (m, n) = Self.map(size: 64 * Self.tib)
        try m.reserve(0)
        let src = n / 3
        guard case .waiting = m.source(src, for: 0) else { Issue.record("source should wait"); return }
        let f = try m.markZero(8192, n)
        #expect(f.copies.count == 1 && f.copies.first?.dst == 0 && f.copies.first?.src == src)
        #expect(m.footprint.waiting == 0)
    }

    // MARK: - ImageCopier over extents

    /// Records what reaches the sink.
    final class CountingSink: BlockingImageSink {
        let zeros = Mutex<[Range<UInt64>]>([])
        let writes = Mutex<[(UInt64, [UInt8])]>([])
        func writeBlocking(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws(QcowPressError) {
            let b = [UInt8](bytes)
            writes.withLock { $0.append((offset, b)) }
        }
        func writeZeroesBlocking(at offset: UInt64, length: UInt64) throws(QcowPressError) {
            zeros.withLock { $0.append(offset..<(offset + length)) }
        }
        /// Every byte of [0, size) reached the sink once, as zeros or as a write.
        func covers(_ size: UInt64) -> Bool {
            let all = (zeros.withLock { $0 } + writes.withLock { $0.map { $0.0..<($0.0 + UInt64($0.1.count)) } }).sorted { $0.lowerBound < $1.lowerBound }
            var at: UInt64 = 0
            for r in all {
                if r.lowerBound != at { return false }
                at = r.upperBound
            }
            return at == size
        }
        func byte(at o: UInt64) -> UInt8? {
            writes.withLock { w in w.first { $0.0 <= o && o < $0.0 + UInt64($0.1.count) }.map { $0.1[Int(o - $0.0)] } }
        }
    }

    static func tempDir() throws -> URL {
        let url = URL(fileURLWithPath: "/tmp").appendingPathComponent("qp-sparse-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// A sparse raw file of `size` bytes with `count` bytes of `byte` at each offset.
    static func sparseRaw(_ path: String, size: UInt64, data: [(UInt64, Int, UInt8)]) throws {
        let fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0o644)
        guard fd >= 0 else { throw POSIXError(.EIO) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        for (at, n, b) in data {
            let bytes = [UInt8](repeating: b, count: n)
            guard pwrite(fd, bytes, n, off_t(at)) == n else { throw POSIXError(.EIO) }
        }
    }

    /// 16 TiB (ext4's file size limit, less 1 MiB) with a little scattered data: a handful of zero
    /// calls and only the chunks holding data read.
    @Test func aSparseRawIsCopiedByExtents() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let size = 16 * Self.tib - (1 << 20)
        let data: [(UInt64, Int, UInt8)] = [(5 << 20 + 123, 5000, 0x11), (3 * Self.tib + 7, 70000, 0x22),
                                            (9 * Self.tib + (4 << 20) - 100, 300, 0x33), (size - 5000, 5000, 0x44)]
        let path = dir.appendingPathComponent("sparse.raw").path
        try Self.sparseRaw(path, size: size, data: data)
        let sink = CountingSink()
        try ImageCopier(source: try RawGuestImage(path: path), clusterSize: Self.cs).feed(sink)
        let zeroCalls = sink.zeros.withLock { $0.count }, chunks = sink.writes.withLock { $0.count }
        #expect(zeroCalls <= data.count + 1, "\(zeroCalls) zero calls for \(data.count) data extents")
        #expect(chunks <= 2 * data.count, "\(chunks) chunks read")
        #expect(sink.covers(size))
        for (at, n, b) in data { #expect(sink.byte(at: at) == b && sink.byte(at: at + UInt64(n) - 1) == b) }
    }

    static func qemu(_ tool: String, _ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/\(tool)")
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "\(tool) \(args)")
    }

    /// A 64 TiB qcow2 (made by qemu-img) with data in a few clusters, a zero cluster and huge
    /// unallocated ranges, over a sparse raw backing file with data of its own: unallocated L1
    /// ranges are skipped whole, through the backing file's extents.
    @Test func aQcow2WithHugeUnallocatedRangesIsCopiedByExtents() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let size = 64 * Self.tib
        let backing = dir.appendingPathComponent("base.raw").path
        try Self.sparseRaw(backing, size: 8 * Self.tib, data: [(2 * Self.tib + 4096, 8192, 0x55)])
        let top = dir.appendingPathComponent("top.qcow2").path
        try Self.qemu("qemu-img", ["create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", top, "64T"])
        try Self.qemu("qemu-io", ["-f", "qcow2", "-c", "write -P 0x66 1T 100k", "-c", "write -z 1025G 64k",
                                  "-c", "write -P 0x77 40T 64k", "-c", "write -P 0x88 63T 3k", top])
        let sink = CountingSink()
        let image = try Qcow2Image(path: top)
        try ImageCopier(source: image, clusterSize: Self.cs).feed(sink)
        let zeroCalls = sink.zeros.withLock { $0.count }, chunks = sink.writes.withLock { $0.count }
        #expect(zeroCalls <= 6, "\(zeroCalls) zero calls")
        #expect(chunks <= 8, "\(chunks) chunks read")
        #expect(sink.covers(size))
        #expect(sink.byte(at: 2 * Self.tib + 4096) == 0x55 && sink.byte(at: Self.tib) == 0x66)
        #expect(sink.byte(at: 40 * Self.tib) == 0x77 && sink.byte(at: 63 * Self.tib + 3071) == 0x88)
        #expect(try image.knownZeroEnd(from: 0, limit: size) == Self.tib)
        #expect(try image.knownZeroEnd(from: 3 * Self.tib, limit: size) == 40 * Self.tib)
    }
}
