import Foundation
import Testing

/// The Examples target (public API only) runs, and README's snippet is exactly the compiled one.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3"))
struct ExamplesTests {
    static var root: URL { BadCorpusTests.dir.deletingLastPathComponent().deletingLastPathComponent() }
    static var examples: String { URL(fileURLWithPath: Harness.binary).deletingLastPathComponent().appendingPathComponent("qcowpress-examples").path }

    @Test func readmeShowsTheCompiledExample() throws {
        let source = try String(contentsOf: Self.root.appendingPathComponent("Examples/ReadmeExample.swift"), encoding: .utf8)
        let begin = source.range(of: "// README: begin\n")!.upperBound
        let end = source.range(of: "// README: end")!.lowerBound
        let snippet = String(source[begin..<end])
        #expect(snippet.split(separator: "\n").count <= 10)
        let readme = try String(contentsOf: Self.root.appendingPathComponent("README.md"), encoding: .utf8)
        #expect(readme.contains(snippet), "README.md must contain Examples/ReadmeExample.swift's snippet verbatim")
    }

    @Test func examplesRun() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 8)
        let dst = dir.appendingPathComponent("out.qcow2").path
        let r = try Harness.run(Self.examples, ["convert", src.path, dst])
        #expect(r.status == 0 && r.stdout.contains("bytes written"), "\(r.stdout)")
        try Harness.expectGood(dst, equals: src.path)
        let w = try Harness.run(Self.examples, ["write", dir.appendingPathComponent("w.qcow2").path])
        #expect(w.stdout.contains("wrote"), "\(w.stdout)")
        #expect(try Harness.qemuImg(["check", dir.appendingPathComponent("w.qcow2").path]).status == 0)
        let disks = try VMARestoreTests.makeDisks(in: dir, count: 2)
        let archive = try VMARestoreTests.makeArchive(dir, disks: disks, name: "a.vma.zst")
        let v = try Harness.run(Self.examples, ["restore-vma", archive, dir.appendingPathComponent("vma").path])
        #expect(v.stdout.contains("restored 2 disks"), "\(v.stdout)")
        for d in disks { try Harness.expectGood(dir.appendingPathComponent("vma/\(d.name).qcow2").path, equals: d.path) }
    }
}
