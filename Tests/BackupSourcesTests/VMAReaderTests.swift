import BackupSources
import DirectIO
import Foundation
import Testing

@Suite struct VMAReaderTests {
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
}
