import BackupSources
import Crypto
import DirectIO
import Foundation
import Testing

@Suite(.tags(.fast)) struct VMAReaderTests {
    static var archive: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/fuzz/vma/one.vma").path
    }

    @Test func readsHeaderAndEveryCluster() throws {
        let r = try VMAReader(stream: ArchiveStream(file: StreamFile(path: Self.archive)))
        #expect(r.devices.map(\.name) == ["drive-scsi0"])
        #expect(r.devices[0].size == 32768)
        #expect(r.configs.map(\.name) == ["qemu-server.conf"])
        var clusters = 0
        while try r.nextExtent({ (c) throws(SourceError) in
            clusters += 1
            #expect(c.data.count == c.mask.nonzeroBitCount * 4096)
        }) {}
        #expect(clusters == 1)
        try r.checkComplete()
    }

    @Test func truncatedHeaderNamesTheOffset() throws {
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: Self.archive)))
        let path = "/tmp/qp-vma-\(UUID().uuidString).vma"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(bytes[0..<5000]).write(to: URL(fileURLWithPath: path))
        do {
            _ = try VMAReader(stream: ArchiveStream(file: StreamFile(path: path)))
            Issue.record("no error")
        } catch let e as SourceError {
            #expect(e.detail == "archive offset 5000: archive is truncated in the header")
        }
    }

    /// A device size the archive cannot back (issue 14: 2^50 used to cost 2 GiB of bitmap before
    /// failing) is refused at the header, naming the field; nothing is allocated for it.
    @Test func deviceSizeTheArchiveCannotBackIsRefused() throws {
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: Self.archive)))
        func be32(_ at: Int) -> UInt32 { bytes[at..<(at + 4)].reduce(0) { $0 << 8 | UInt32($1) } }
        let id = try #require((1..<256).first { be32(4096 + 32 * $0) != 0 })
        let at = 4096 + 32 * id + 8
        for i in 0..<8 { bytes[at + i] = UInt8(truncatingIfNeeded: UInt64(1 << 50) >> (56 - 8 * UInt64(i))) }
        let headerSize = Int(be32(56))
        var header = Array(bytes[0..<headerSize])
        for i in 32..<48 { header[i] = 0 }
        let md5 = Array(Insecure.MD5.hash(data: header))
        for i in 0..<16 { bytes[32 + i] = md5[i] }
        let path = "/tmp/qp-vma-\(UUID().uuidString).vma"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        do {
            _ = try VMAReader(stream: ArchiveStream(file: StreamFile(path: path)))
            Issue.record("no error")
        } catch let e as SourceError {
            #expect(e.detail.hasPrefix("archive offset \(at): device sizes"), "\(e.detail)")
            #expect(e.detail.contains("need at least"), "\(e.detail)")
        }
    }
}
