import Foundation
import Testing

/// qemu-img spellings a Proxmox/QEMU administrator types without thinking.
@Suite(.enabled(if: Harness.haveQemuImg, "qemu-img is the oracle"))
struct QemuImgHabitsTests {
    @Test func convertTakesDashFAndDashU() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 8)
        let base = dir.appendingPathComponent("base.raw").path
        FileManager.default.createFile(atPath: base, contents: nil)
        try FileHandle(forWritingTo: URL(fileURLWithPath: base)).truncate(atOffset: 8 << 20)
        let dst = dir.appendingPathComponent("top.qcow2").path
        let r = try Harness.qcowpress(["convert", "-U", "-B", "base.raw", "-F", "raw", src.path, dst])
        #expect(r.status == 0, "\(r.stderr)")
        let info = try JSONSerialization.jsonObject(with: Data(try Harness.qemuImg(["info", "--output", "json", dst]).stdout.utf8)) as? [String: Any]
        #expect(info?["backing-filename-format"] as? String == "raw", "\(String(describing: info))")
        let cmp = try Harness.qemuImg(["compare", "-f", "raw", "-F", "qcow2", src.path, dst])
        #expect(cmp.status == 0, "\(cmp.stdout) \(cmp.stderr)")

        for cmd in ["info", "check"] {
            let u = try Harness.qcowpress([cmd, "-U", dst])
            #expect(u.status == 0, "\(cmd) -U: \(u.stderr)")
        }

        let noB = try Harness.qcowpress(["convert", "-F", "raw", src.path, dir.appendingPathComponent("x.qcow2").path])
        #expect(noB.status == 1 && noB.stderr.contains("-F needs -B"), "\(noB.stderr)")
        let badF = try Harness.qcowpress(["convert", "-B", "base.raw", "-F", "vmdk", src.path, dir.appendingPathComponent("x.qcow2").path])
        #expect(badF.status == 1 && badF.stderr.contains("vmdk"), "\(badF.stderr)")
    }

    @Test func compressedRawIsAnError() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 4)
        let dst = dir.appendingPathComponent("dst.raw").path
        let r = try Harness.qcowpress(["convert", "-c", "-O", "raw", src.path, dst])
        #expect(r.status == 1 && r.stderr.split(separator: "\n").count == 1 && r.stderr.contains("-c needs -O qcow2"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dst))
    }
}
