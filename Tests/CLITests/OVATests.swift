import Foundation
import Testing

/// `convert VM.ova|VM.ovf|- OUTDIR` against packages made by Tests/Support/make_ova.py (Python's
/// tarfile; the OVF modelled on a VMware ovftool export), disks made by qemu-img
/// (streamOptimized VMDK). Every image is judged by qemu-img check and compare against its raw.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3"))
struct OVATests {
    static var script: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Support/make_ova.py").path
    }

    /// Two raw disks (one 5 MiB of mixed data, one 3 MiB + 512 mostly zero) and their
    /// streamOptimized VMDKs.
    struct Disks {
        var raw: [String]
        var vmdk: [String]
        var sizes: [Int]
    }

    static func makeDisks(_ dir: URL) throws -> Disks {
        let sizes = [5 << 20, (3 << 20) + 512]
        var raw: [String] = [], vmdk: [String] = []
        for (i, size) in sizes.enumerated() {
            var d = Data()
            while d.count < size {
                switch (d.count / 65536 + i) % 4 {
                case 0: d += Data(count: 65536)
                case 1: d += SourceImage.text(65536, seed: UInt64(i * 1000 + d.count))
                case 2: d += i == 1 ? Data(count: 65536) : SourceImage.noise(65536, seed: UInt64(d.count))
                default: d += Data(count: 4096) + SourceImage.text(8192, seed: 7) + Data(count: 65536 - 12288)
                }
            }
            let r = dir.appendingPathComponent("src\(i).raw").path
            try d.prefix(size).write(to: URL(fileURLWithPath: r))
            let v = dir.appendingPathComponent("src\(i).vmdk").path
            let q = try Harness.qemuImg(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", r, v])
            #expect(q.status == 0, "\(q.stderr)")
            raw.append(r)
            vmdk.append(v)
        }
        return Disks(raw: raw, vmdk: vmdk, sizes: sizes)
    }

    @discardableResult
    static func make(_ out: String, _ args: [String]) throws -> String {
        let r = try Harness.run("/usr/bin/python3", [script, out] + args)
        #expect(r.status == 0, "make_ova.py: \(r.stderr)")
        return out
    }

    /// The --disk arguments: HREF=PATH:CAPACITY[:gzip].
    static func diskArgs(_ d: Disks, hrefs: [String] = ["disk1.vmdk", "disk2.vmdk"], raw: Bool = false, gzip: Bool = false) -> [String] {
        hrefs.indices.flatMap { i in ["--disk", "\(hrefs[i])=\(raw ? d.raw[i] : d.vmdk[i]):\(d.sizes[i])\(gzip ? ":gzip" : "")"] }
    }

    static func stdin(_ path: String) throws -> FileHandle { try FileHandle(forReadingFrom: URL(fileURLWithPath: path)) }

    /// Both images right, and vm.json as the OVF says.
    static func expectImported(_ out: URL, _ d: Disks, names: [String] = ["disk1", "disk2"], files: [String] = ["disk1.vmdk", "disk2.vmdk"]) throws {
        for (i, n) in names.enumerated() { try Harness.expectGood(out.appendingPathComponent("\(n).qcow2").path, equals: d.raw[i]) }
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: out.appendingPathComponent("vm.json"))) as? [String: Any]
        #expect(json?["name"] as? String == "web-01 & co")
        #expect(json?["cpus"] as? Int == 4)
        #expect(json?["memoryMiB"] as? Int == 4096)
        let disks = json?["disks"] as? [[String: Any]] ?? []
        #expect(disks.map { $0["file"] as? String } == files)
        #expect(disks.map { $0["qcow2"] as? String } == names.map { "\($0).qcow2" })
        #expect(disks.map { ($0["capacity"] as? NSNumber)?.intValue } == d.sizes.map { ($0 + 511) & ~511 })
        let nics = json?["nics"] as? [[String: Any]] ?? []
        #expect(nics.map { $0["type"] as? String } == ["VmxNet3", "E1000"])
        #expect(nics.map { $0["connection"] as? String } == ["VM Network", "backup"])
        #expect(try Harness.strayFiles(in: out, except: Set(names.map { "\($0).qcow2" } + ["vm.json"])).isEmpty)
    }

    /// One line on stderr, exit 1, and OUTDIR absent (the run created it and removed it).
    static func expectRefused(_ r: Harness.Output, _ out: URL, mentioning: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status == 1, "status \(r.status): \(r.stderr)", sourceLocation: sourceLocation)
        let lines = r.stderr.split(separator: "\n")
        #expect(lines.count == 1, "\(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains(mentioning), "\(r.stderr)", sourceLocation: sourceLocation)
        #expect(!FileManager.default.fileExists(atPath: out.path), "OUTDIR left behind: \((try? FileManager.default.contentsOfDirectory(atPath: out.path)) ?? [])", sourceLocation: sourceLocation)
    }

    @Test func ovaFileTwoDisksSHA256() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let d = try Self.makeDisks(dir)
        let ova = try Self.make(dir.appendingPathComponent("vm.ova").path, Self.diskArgs(d) + ["--mf", "sha256"])
        let out = dir.appendingPathComponent("out")
        let r = try Harness.qcowpress(["convert", "-c", "--output", "json", ova, out.path])
        #expect(r.status == 0, "\(r.stderr)")
        try Self.expectImported(out, d)
        #expect(r.stdout.contains("\"SHA256 disk1.vmdk\""), "\(r.stdout)")
        #expect(r.stdout.contains("\"stagedBytes\" : 0") || r.stdout.contains("\"stagedBytes\":0"), "\(r.stdout)")
    }

    @Test func ovfFolderSHA1AndZstd() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let d = try Self.makeDisks(dir)
        let pkg = try Self.make(dir.appendingPathComponent("pkg").path, Self.diskArgs(d) + ["--folder", "--mf", "sha1"])
        let out = dir.appendingPathComponent("out")
        // Run from another directory: hrefs resolve against the OVF's folder, never the cwd.
        let r = try Harness.qcowpress(["convert", "-c", "-o", "compression_type=zstd", pkg + "/vm.ovf", out.path])
        #expect(r.status == 0, "\(r.stderr)")
        try Self.expectImported(out, d)
    }

    @Test func stdinRawDisksManifestLastAndGzip() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let d = try Self.makeDisks(dir)
        // Raw disks (streamed in order), the second stored gzip-compressed, SHA-1 manifest after the disks.
        let ova = try Self.make(dir.appendingPathComponent("vm.ova").path,
                                ["--disk", "disk1.img=\(d.raw[0]):\(d.sizes[0])", "--disk", "disk2.img=\(d.raw[1]):\(d.sizes[1]):gzip",
                                 "--mf", "sha1", "--mf-last", "--format", "gnu"])
        let out = dir.appendingPathComponent("out")
        let r = try Harness.run(Harness.binary, ["convert", "-c", "-", out.path], stdin: try Self.stdin(ova))
        #expect(r.status == 0, "\(r.stderr)")
        try Self.expectImported(out, d, files: ["disk1.img", "disk2.img"])
        // The same package as a file: the raw disk in place, the gzip one streamed.
        let out2 = dir.appendingPathComponent("out2")
        let r2 = try Harness.qcowpress(["convert", "-c", ova, out2.path])
        #expect(r2.status == 0, "\(r2.stderr)")
        try Self.expectImported(out2, d, files: ["disk1.img", "disk2.img"])
    }

    @Test func stdinStreamOptimizedAndGzipVMDKs() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let d = try Self.makeDisks(dir)
        // streamOptimized VMDKs decoded as the tar streams by (SHA-256 manifest after the OVF).
        let ova = try Self.make(dir.appendingPathComponent("vm.ova").path, Self.diskArgs(d) + ["--mf", "sha256"])
        let out = dir.appendingPathComponent("out")
        let r = try Harness.run(Harness.binary, ["convert", "-c", "-o", "compression_type=zstd", "-", out.path], stdin: try Self.stdin(ova))
        #expect(r.status == 0, "\(r.stderr)")
        try Self.expectImported(out, d)
        // gzip-stored VMDKs in an OVA file: inflated and decoded as a stream, the stored bytes hashed.
        let gz = try Self.make(dir.appendingPathComponent("gz.ova").path, Self.diskArgs(d, gzip: true) + ["--mf", "sha1"])
        let out2 = dir.appendingPathComponent("out2")
        let r2 = try Harness.qcowpress(["convert", "-c", gz, out2.path])
        #expect(r2.status == 0, "\(r2.stderr)")
        try Self.expectImported(out2, d)
        // A VMDK cut short inside the stream: one line, nothing left.
        let cut = try Self.make(dir.appendingPathComponent("cut.ova").path, Self.diskArgs(d) + ["--truncate", "70000"])
        let out3 = dir.appendingPathComponent("out3")
        Self.expectRefused(try Harness.run(Harness.binary, ["convert", "-", out3.path], stdin: try Self.stdin(cut)), out3, mentioning: "truncated")
    }

    @Test func longNamesUstarGnuPax() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let d = try Self.makeDisks(dir)
        let long = String(repeating: "very-long-disk-name-", count: 6)
        for format in ["gnu", "pax"] {
            let ova = try Self.make(dir.appendingPathComponent("\(format).ova").path,
                                    Self.diskArgs(d, hrefs: [long + "1.vmdk", "disk2.vmdk"]) + ["--format", format])
            let out = dir.appendingPathComponent("out-\(format)")
            let r = try Harness.qcowpress(["convert", "-c", ova, out.path])
            #expect(r.status == 0, "\(format): \(r.stderr)")
            try Self.expectImported(out, d, names: [long + "1", "disk2"], files: [long + "1.vmdk", "disk2.vmdk"])
        }
    }

    @Test func hostileArchivesAreRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let d = try Self.makeDisks(dir)
        let cases: [([String], String)] = [
            (["--hostile", "dotdot"], "'..'"),
            (["--hostile", "absolute"], "absolute"),
            (["--hostile", "symlink"], "symbolic link"),
            (["--hostile", "hardlink"], "hard link"),
            (["--hostile", "dup"], "twice"),
            (["--truncate", "3000"], "truncated"),
            (["--missing", "disk2.vmdk"], "no such file"),
            (["--bad-mf", "disk2.vmdk"], "digest"),
            (["--mf", "sha1", "--bad-mf", "vm.ovf"], "digest"),
            (["--href-override", "vmdisk2=../disk2.vmdk"], "'..'"),
            (["--href-override", "vmdisk2=/etc/disk2.vmdk"], "absolute"),
        ]
        for (n, (args, word)) in cases.enumerated() {
            let ova = try Self.make(dir.appendingPathComponent("h\(n).ova").path, Self.diskArgs(d) + args)
            let out = dir.appendingPathComponent("out\(n)")
            Self.expectRefused(try Harness.qcowpress(["convert", "-c", ova, out.path]), out, mentioning: word)
        }
        #expect(!FileManager.default.fileExists(atPath: dir.deletingLastPathComponent().appendingPathComponent("escape.vmdk").path))
    }

    @Test func hostileStreamsAreRefused() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let d = try Self.makeDisks(dir)
        let raw = ["--disk", "disk1.img=\(d.raw[0]):\(d.sizes[0])", "--disk", "disk2.img=\(d.raw[1]):\(d.sizes[1])"]
        // Refusals found after the first image was written: all of it is rolled back.
        let cases: [([String], String)] = [
            (["--truncate", "3000"], "truncated"),
            (["--missing", "disk2.img"], "no such file"),
            (["--mf", "sha1", "--mf-last", "--bad-mf", "disk1.img"], "digest"),
            (["--bad-mf", "disk2.img"], "digest"),
            (["--hostile", "symlink"], "symbolic link"),
        ]
        for (n, (args, word)) in cases.enumerated() {
            let ova = try Self.make(dir.appendingPathComponent("s\(n).ova").path, raw + args)
            let out = dir.appendingPathComponent("out\(n)")
            Self.expectRefused(try Harness.run(Harness.binary, ["convert", "-c", "-", out.path], stdin: try Self.stdin(ova)), out, mentioning: word)
        }
        // A disk that needs random access: a clear message saying to pass the file.
        let ova = try Self.make(dir.appendingPathComponent("sparse.ova").path, ["--disk", "disk1.vdi=\(try vdi(d, dir)):\(d.sizes[0])"])
        let out = dir.appendingPathComponent("outv")
        Self.expectRefused(try Harness.run(Harness.binary, ["convert", "-", out.path], stdin: try Self.stdin(ova)), out, mentioning: "pass the OVA as a file")
    }

    func vdi(_ d: Disks, _ dir: URL) throws -> String {
        let p = dir.appendingPathComponent("d.vdi").path
        _ = try Harness.qemuImg(["convert", "-f", "raw", "-O", "vdi", d.raw[0], p])
        return p
    }

    @Test func forceOverAnExistingOutdir() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let d = try Self.makeDisks(dir)
        let ova = try Self.make(dir.appendingPathComponent("vm.ova").path, Self.diskArgs(d))
        let out = dir.appendingPathComponent("out")
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        try Data("old".utf8).write(to: out.appendingPathComponent("disk2.qcow2"))
        let refused = try Harness.qcowpress(["convert", "-c", ova, out.path])
        #expect(refused.status == 1 && refused.stderr.contains("already exists"), "\(refused.stderr)")
        #expect(try Harness.strayFiles(in: out, except: ["disk2.qcow2"]).isEmpty)
        #expect(try Data(contentsOf: out.appendingPathComponent("disk2.qcow2")) == Data("old".utf8))
        let r = try Harness.qcowpress(["convert", "-c", "--force", ova, out.path])
        #expect(r.status == 0, "\(r.stderr)")
        try Self.expectImported(out, d)
        // A failing run with --force leaves the earlier images as they were.
        let bad = try Self.make(dir.appendingPathComponent("bad.ova").path, Self.diskArgs(d) + ["--bad-mf", "disk2.vmdk"])
        let before = try Data(contentsOf: out.appendingPathComponent("disk1.qcow2"))
        let f = try Harness.qcowpress(["convert", "--force", bad, out.path])
        #expect(f.status == 1)
        #expect(try Data(contentsOf: out.appendingPathComponent("disk1.qcow2")) == before)
        try Self.expectImported(out, d)
    }
}

extension OVATests {
    /// An OVA on stdin at a small limit with many threads: the inflate pipeline's batches and
    /// buffers come out of --memory-limit (the engine gets three quarters), so the peak stays near
    /// a plain convert's (the limit + the process's ~14 MiB). Before, 4 inflate workers with 8
    /// batches of 4 MiB queued came on top: 93 MiB here (111 MiB with a 128 MiB disk).
    /// A stream's inflate pipeline comes out of --memory-limit: stdin, and a gzip-stored disk of an
    /// OVA file (streamed too; it overshot by the pipeline's share before).
    @Test(arguments: ["stdin", "gzip-in-file"])
    func streamStaysWithinTheLimit(mode: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let raw = dir.appendingPathComponent("big.raw").path, vmdk = dir.appendingPathComponent("big.vmdk").path
        var d = Data()
        for i in 0..<768 {  // 48 MiB: noise, zeros and text in 64 KiB blocks
            d += i % 3 == 0 ? SourceImage.noise(65536, seed: UInt64(i)) : i % 3 == 1 ? Data(count: 65536) : SourceImage.text(65536, seed: UInt64(i))
        }
        try d.write(to: URL(fileURLWithPath: raw))
        #expect(try Harness.qemuImg(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, vmdk]).status == 0)
        let gzip = mode == "gzip-in-file"
        let ova = try Self.make(dir.appendingPathComponent("big.ova").path, ["--disk", "big.vmdk=\(vmdk):\(d.count)\(gzip ? ":gzip" : "")"])
        let out = dir.appendingPathComponent("out")
        let args = ["convert", "-c", "--threads", "8", "--memory-limit", "64M", "--output", "json", gzip ? ova : "-", out.path]
        let r = try Harness.run(Harness.binary, args, stdin: gzip ? nil : try Self.stdin(ova))
        #expect(r.status == 0, "\(r.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        let peak = ((json?["images"] as? [[String: Any]])?.first?["peakRSSBytes"] as? Int) ?? Int.max
        #expect(peak <= (64 + 24) << 20, "peak RSS \(peak >> 20) MiB")
        // The engine ran on three quarters of the limit; the pipeline had the rest.
        let engine = ((json?["images"] as? [[String: Any]])?.first?["memoryLimit"] as? Int) ?? 0
        #expect(engine == 48 << 20, "\(mode): engine limit \(engine >> 20) MiB")
        try Harness.expectGood(out.appendingPathComponent("big.qcow2").path, equals: raw)
    }
}
