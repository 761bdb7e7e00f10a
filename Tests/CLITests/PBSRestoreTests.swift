import Foundation
import Testing

/// `restore pbs` against datastores made by Tests/Support/pbs_datastore.py (an independent writer
/// that follows proxmox-backup's sources; see PBS-FORMAT-NOTES.md).
@Suite(.tags(.e2e, .pbs), .enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3"))
struct PBSRestoreTests {
    static let snapshot = "vm/100/2026-11-20T10:00:00Z"

    @Test(arguments: [
        PBSFixture.Variant(name: "plain 4 MiB chunks", chunk: 4 << 20),
        PBSFixture.Variant(name: "uncompressed blobs", chunk: 1 << 20, extra: ["--no-compress"]),
        PBSFixture.Variant(name: "encrypted, kdf none", chunk: 1 << 20, kdf: "none"),
        PBSFixture.Variant(name: "encrypted, scrypt", chunk: 1 << 20, kdf: "scrypt"),
        PBSFixture.Variant(name: "encrypted, pbkdf2, namespace", chunk: 1 << 20, kdf: "pbkdf2", ns: "team/a"),
    ])
    func restoresEveryKind(variant: PBSFixture.Variant) throws {
        let f = try PBSFixture(variant)
        defer { f.remove() }
        for codec in [[], ["-c"], ["-c", "-o", "compression_type=zstd"]] {
            let dst = f.dir.appendingPathComponent("out.qcow2").path
            try? FileManager.default.removeItem(atPath: dst)
            let r = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [Self.snapshot, "drive-scsi0.img", dst, "--output", "json"] + codec)
            #expect(r.status == 0, "\(variant.name) \(codec): \(r.stderr)")
            try Harness.expectGood(dst, equals: f.rawA)
            let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
            #expect((json["chunksZero"] as? Int ?? 0) > 0, "zero chunks are recognised by digest")
            #expect((json["chunksShared"] as? Int ?? 0) > 0, "repeated chunks are stored once")
        }
    }

    /// `--list` of a group names its snapshots (oldest first); `--output json` for both listings.
    @Test func listGroupAndJSON() throws {
        let f = try PBSFixture(.init(name: "group list", chunk: 1 << 20))
        defer { f.remove() }
        // A second, later snapshot of the same group.
        let later = "vm/100/2026-11-21T10:00:00Z"
        try f.addLaterSnapshot(later)
        let text = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + ["vm/100", "--list"])
        #expect(text.status == 0 && text.stdout == "\(Self.snapshot)\n\(later)\n", "\(text.stdout)\(text.stderr)")
        let json = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + ["vm/100", "--list", "--output", "json"])
        #expect((try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String]) == [Self.snapshot, later])
        let archives = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [Self.snapshot, "--list", "--output", "json"])
        let list = try JSONSerialization.jsonObject(with: Data(archives.stdout.utf8)) as? [[String: Any]]
        #expect(list?.compactMap { $0["name"] as? String }.contains("drive-scsi0.img.fidx") == true, "\(archives.stdout)")
        let missing = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + ["vm/999", "--list"])
        #expect(missing.status == 1 && missing.stderr.contains("backup group does not exist"), "\(missing.stderr)")
    }

    /// Directory listing and creation go through the fault seam: an unreadable group and a
    /// directory that cannot be made are one line each, exit 1, nothing left behind.
    @Test func listingAndMkdirFaults() throws {
        let f = try PBSFixture(.init(name: "seam", chunk: 1 << 20))
        defer { f.remove() }
        let list = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + ["vm/100", "--list"], env: ["QCOWPRESS_FAULT": "open:1:EIO"])
        #expect(list.status == 1, "\(list.stdout)\(list.stderr)")
        #expect(list.stderr.contains("cannot list the backup group") && list.stderr.contains("Input/output error"), "\(list.stderr)")
        #expect(list.stderr.split(separator: "\n").count == 1 && list.stdout.isEmpty)
        let out = f.dir.appendingPathComponent("new/deeper").path
        let all = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [Self.snapshot, "--all", out], env: ["QCOWPRESS_FAULT": "mkdir:2:EIO"])
        #expect(all.status == 1 && all.stderr.contains("mkdir") && all.stderr.contains("Input/output error"), "\(all.stderr)")
        #expect(!FileManager.default.fileExists(atPath: f.dir.appendingPathComponent("new").path), "the directory it made is removed")
    }

    @Test func listAndAllDrives() throws {
        let f = try PBSFixture(.init(name: "two drives", chunk: 1 << 20))
        defer { f.remove() }
        let list = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [Self.snapshot, "--list"])
        #expect(list.status == 0)
        #expect(list.stdout.contains("drive-scsi0.img.fidx") && list.stdout.contains("drive-virtio1.img.fidx"))
        let out = f.dir.appendingPathComponent("all").path
        let r = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [Self.snapshot, "--all", out, "-c", "-o", "compression_type=zstd"])
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(out + "/drive-scsi0.qcow2", equals: f.rawA)
        try Harness.expectGood(out + "/drive-virtio1.qcow2", equals: f.rawB)
        // A second run refuses to overwrite.
        let again = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [Self.snapshot, "--all", out])
        #expect(again.status == 1 && again.stderr.contains("already exists"))
        // --no-dedup writes repeated chunks again and still equals the source.
        let nd = f.dir.appendingPathComponent("nd.qcow2").path
        let r2 = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [Self.snapshot, "drive-scsi0.img", nd, "--no-dedup", "--output", "json"])
        #expect(r2.status == 0)
        #expect(r2.stdout.contains("\"chunksShared\" : 0"))
        try Harness.expectGood(nd, equals: f.rawA)
    }

    static let damageModes: [(mode: String, kdf: String?)] =
        ["chunk-crc", "chunk-digest", "chunk-zstd", "chunk-truncated", "chunk-empty", "blob-magic",
         "missing-chunk", "fidx-magic", "fidx-csum", "fidx-size", "fidx-digest", "truncated-fidx",
         "missing-fidx", "manifest-csum", "manifest-size", "manifest-crc", "manifest-json"].map { ($0, nil) }
        + ["chunk-tag", "chunk-iv", "wrong-key", "manifest-signature"].map { ($0, "none") }

    @Test(arguments: damageModes)
    func damagedDatastoreIsRefused(mode: String, kdf: String?) throws {
        let f = try PBSFixture(.init(name: mode, chunk: 1 << 20, kdf: kdf, corrupt: mode))
        defer { f.remove() }
        let dst = f.dir.appendingPathComponent("out.qcow2")
        let r = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [Self.snapshot, "drive-scsi0.img", dst.path])
        #expect(r.status == 1, "\(mode): status \(r.status) \(r.stderr)")
        #expect(r.stderr.split(separator: "\n").count == 1, "\(mode): \(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dst.path))
        #expect(try Harness.strayFiles(in: f.dir, except: ["a.raw", "b.raw", "ds", "key.json", "pw"]).isEmpty)
    }

    @Test func namesCannotLeaveTheDatastore() throws {
        let f = try PBSFixture(.init(name: "paths", chunk: 1 << 20))
        defer { f.remove() }
        for (snap, archive) in [("vm/100/../../..", "drive-scsi0.img"), ("vm/../x", "a"), (Self.snapshot, "../../../etc/passwd"),
                                (Self.snapshot, "a/b.fidx")] {
            let r = try Harness.qcowpress(["restore", "pbs"] + f.datastoreArgs + [snap, archive, f.dir.appendingPathComponent("o.qcow2").path])
            #expect(r.status == 1, "\(snap) \(archive): \(r.stderr)")
        }
        let r = try Harness.qcowpress(["restore", "pbs", "--datastore", f.datastore, "--ns", "../..", Self.snapshot, "drive-scsi0.img", f.dir.appendingPathComponent("o.qcow2").path])
        #expect(r.status == 1)
    }
}

/// A datastore with two drives: A has zero chunks, repeated chunks, random (incompressible)
/// chunks and a size that is not a multiple of the chunk size; B repeats A's chunks.
struct PBSFixture {
    struct Variant: Sendable, CustomTestStringConvertible {
        var name: String
        var chunk: Int
        var extra: [String] = []
        var kdf: String? = nil
        var ns: String? = nil
        var corrupt: String? = nil
        var testDescription: String { name }
    }
    static var script: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Support/pbs_datastore.py").path
    }
    static var available: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") }

    let dir: URL
    let rawA: String
    let rawB: String
    let datastore: String
    let datastoreArgs: [String]
    let chunk: Int

    init(_ v: Variant) throws {
        dir = try Harness.tempDir()
        rawA = dir.appendingPathComponent("a.raw").path
        rawB = dir.appendingPathComponent("b.raw").path
        let c = v.chunk
        chunk = c
        var a = Data()
        let text = SourceImage.text(c, seed: 1)
        let noise = SourceImage.noise(c, seed: 2)
        for i in 0..<9 { a += [Data(count: c), text, noise, text][i % 4] }
        a += SourceImage.text(c / 2 + 4096, seed: 3)  // short last chunk, 512-aligned
        try a.write(to: URL(fileURLWithPath: rawA))
        try (text + Data(count: c) + noise).write(to: URL(fileURLWithPath: rawB))
        datastore = dir.appendingPathComponent("ds").path
        var args = ["--datastore", datastore, "--snapshot", PBSRestoreTests.snapshot, "--chunk-size", String(c),
                    "--drive", "drive-scsi0.img=\(rawA)", "--drive", "drive-virtio1.img=\(rawB)", "--seed", "5"] + v.extra
        var restoreArgs = ["--datastore", datastore]
        if let ns = v.ns {
            args += ["--ns", ns]
            restoreArgs += ["--ns", ns]
        }
        if let kdf = v.kdf {
            let key = dir.appendingPathComponent("key.json").path
            var make = ["--make-key", key, "--kdf", kdf, "--seed", "6"]
            if kdf != "none" {
                make += ["--password", "secret-pass"]
                try Data("secret-pass\n".utf8).write(to: dir.appendingPathComponent("pw"))
                restoreArgs += ["--password-file", dir.appendingPathComponent("pw").path]
                args += ["--password", "secret-pass"]
            }
            let mk = try Harness.run("/usr/bin/python3", [Self.script] + make)
            guard mk.status == 0 else { throw FixtureError(message: mk.stderr) }
            args += ["--encrypt-keyfile", key]
            restoreArgs += ["--keyfile", key]
        }
        if let m = v.corrupt { args += ["--corrupt", m] }
        let r = try Harness.run("/usr/bin/python3", [Self.script] + args)
        guard r.status == 0 else { throw FixtureError(message: r.stdout + r.stderr) }
        datastoreArgs = restoreArgs
    }

    func remove() { try? FileManager.default.removeItem(at: dir) }

    /// Writes `snapshot` of `drives` (archive name → raw file, in name order) into datastore `ds`.
    static func writeSnapshot(_ snapshot: String, of drives: [String: String], into ds: String, chunk: Int = 1 << 20, seed: Int) throws {
        let r = try Harness.run("/usr/bin/python3", [script, "--datastore", ds, "--snapshot", snapshot, "--chunk-size", String(chunk)]
                                    + drives.sorted { $0.key < $1.key }.flatMap { ["--drive", "\($0.key)=\($0.value)"] } + ["--seed", String(seed)])
        guard r.status == 0 else { throw FixtureError(message: r.stdout + r.stderr) }
    }

    /// A datastore `ds` in `dir` holding snapshot ``PBSRestoreTests/snapshot`` of `drives` in
    /// 1 MiB chunks.
    static func datastore(in dir: URL, drives: [String: String], seed: Int) throws -> String {
        let ds = dir.appendingPathComponent("ds").path
        try writeSnapshot(PBSRestoreTests.snapshot, of: drives, into: ds, seed: seed)
        return ds
    }

    /// A copy of `raw` (in the fixture's directory, replaced on each call) rounded up to 512 bytes:
    /// what a guest sees of the archive, as QEMU sizes block devices.
    func padded(_ raw: String) throws -> String {
        let padded = dir.appendingPathComponent("padded.raw").path
        try? FileManager.default.removeItem(atPath: padded)
        try FileManager.default.copyItem(atPath: raw, toPath: padded)
        let size = try FileManager.default.attributesOfItem(atPath: raw)[.size] as! UInt64
        try FileHandle(forWritingTo: URL(fileURLWithPath: padded)).truncate(atOffset: (size + 511) & ~511)
        return padded
    }

    /// A datastore whose second drive has a chunk of its own, then deleted: the first drive
    /// restores completely before the second fails. Returns the datastore and the lost digest.
    func damagedSecondDrive(in dir: URL) throws -> (datastore: String, digest: String) {
        let unique = SourceImage.noise(1 << 20, seed: 1234)
        let rawC = dir.appendingPathComponent("c.raw").path
        try (Data(count: 1 << 20) + unique).write(to: URL(fileURLWithPath: rawC))
        let ds = try PBSFixture.datastore(in: dir, drives: ["drive-scsi0.img": rawA, "drive-virtio1.img": rawC], seed: 5)
        let chunkFile = dir.appendingPathComponent("unique.bin").path
        try unique.write(to: URL(fileURLWithPath: chunkFile))
        let hex = String(try Harness.run("/usr/bin/sha256sum", [chunkFile]).stdout.prefix(64))
        try FileManager.default.removeItem(atPath: "\(ds)/.chunks/\(hex.prefix(4))/\(hex)")
        return (ds, hex)
    }

    /// Adds a later snapshot of the same group (`vm/100`) holding drive B as `drive-scsi0.img`.
    func addLaterSnapshot(_ snapshot: String) throws {
        try Self.writeSnapshot(snapshot, of: ["drive-scsi0.img": rawB], into: datastore, chunk: chunk, seed: 6)
    }
}

struct FixtureError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

extension PBSRestoreTests {
    @Test func missingKeyUnknownSnapshotAndArchive() throws {
        let enc = try PBSFixture(.init(name: "encrypted", chunk: 1 << 20, kdf: "none"))
        defer { enc.remove() }
        let out = enc.dir.appendingPathComponent("o.qcow2").path
        let noKey = try Harness.qcowpress(["restore", "pbs", "--datastore", enc.datastore, Self.snapshot, "drive-scsi0.img", out])
        #expect(noKey.status == 1 && noKey.stderr.contains("--keyfile"), "\(noKey.stderr)")
        let unknownSnap = try Harness.qcowpress(["restore", "pbs"] + enc.datastoreArgs + ["vm/100/2020-01-01T00:00:00Z", "drive-scsi0.img", out])
        #expect(unknownSnap.status == 1 && unknownSnap.stderr.contains("snapshot does not exist"), "\(unknownSnap.stderr)")
        let unknownArchive = try Harness.qcowpress(["restore", "pbs"] + enc.datastoreArgs + [Self.snapshot, "drive-sata9.img", out])
        #expect(unknownArchive.status == 1 && unknownArchive.stderr.contains("not in the manifest"), "\(unknownArchive.stderr)")
        let verify = try Harness.qcowpress(["restore", "pbs"] + enc.datastoreArgs + [Self.snapshot, "--verify-only"])
        #expect(verify.status == 0 && verify.stdout.contains("verified"), "\(verify.stdout)\(verify.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
    }
}
