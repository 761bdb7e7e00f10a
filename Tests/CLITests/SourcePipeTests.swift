import Foundation
import QcowPress
import Testing

/// Every kind of source is a value that pipes into a destination in one call.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3"))
struct SourcePipeTests {
    @Test func pbsArchiveAndVMADeviceConvertInOneCall() async throws {
        let f = try PBSFixture(.init(name: "pipe", chunk: 1 << 20))
        defer { f.remove() }
        var options = EncoderOptions(virtualSize: 0)
        options.compression = CompressionSettings(algorithm: .zstd)
        let restore = try PBSRestore(datastore: f.datastore, namespace: nil, snapshot: PBSRestoreTests.snapshot, keyFile: nil) { "" }
        let a = f.dir.appendingPathComponent("a.qcow2").path
        _ = try await convert(.pbs(restore, archive: "drive-scsi0.img"), to: a, options: options)
        try Harness.expectGood(a, equals: f.rawA)

        let disks = try VMARestoreTests.makeDisks(in: f.dir, count: 3)
        let archive = try VMARestoreTests.makeArchive(f.dir, disks: disks, name: "x.vma.gz")
        let v = f.dir.appendingPathComponent("v.qcow2").path
        _ = try await convert(.vma(archive: archive, device: "drive-scsi1"), to: v, options: options)
        try Harness.expectGood(v, equals: disks[1].path)
        let raw = f.dir.appendingPathComponent("r.qcow2").path
        _ = try await convert(.detect(path: f.rawB), to: raw, options: options)
        try Harness.expectGood(raw, equals: f.rawB)
    }
}
