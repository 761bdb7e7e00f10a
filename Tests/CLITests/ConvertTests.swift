import Foundation
import Testing

@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg, "qemu-img is the oracle"))
struct ConvertTests {
    static let clusterSizes = ["512", "4096", "65536", "2M"]
    static let codecs: [[String]] = [[], ["-c"], ["-c", "-o", "compression_type=zstd"]]

    /// Every cluster size × codec on a source with holes, zeros, text, random data and a size
    /// that is not a multiple of the cluster size: qemu-img check is clean, compare is identical.
    @Test(arguments: clusterSizes, codecs)
    func matrix(clusterSize: String, codec: [String]) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 13, block: 192 << 10, tail: 1234)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        let r = try Harness.qcowpress(["convert"] + codec + ["-o", "cluster_size=\(clusterSize)", "--output", "json", src.path, dst])
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(dst, equals: src.path)
        let info = try Harness.qemuImg(["info", "--output", "json", dst]).stdout
        let json = try JSONSerialization.jsonObject(with: Data(info.utf8)) as! [String: Any]
        let expectedCS = clusterSize == "2M" ? 2 << 20 : Int(clusterSize)!
        #expect(json["cluster-size"] as? Int == expectedCS)
        let specific = (json["format-specific"] as! [String: Any])["data"] as! [String: Any]
        #expect(specific["compression-type"] as? String == (codec.contains("compression_type=zstd") ? "zstd" : "zlib"))
        #expect(try Harness.strayFiles(in: dir, except: ["src.raw", "dst.qcow2"]).isEmpty)
        let summary = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        // 192 KiB blocks: only clusters up to 64 KiB fall wholly inside a zero or random block.
        if expectedCS <= 65536 { #expect((summary["clustersZero"] as? Int ?? 0) > 0) }
        if codec.isEmpty {
            #expect(summary["clustersCompressed"] as? Int == 0)
        } else if expectedCS <= 65536 {
            #expect((summary["clustersCompressed"] as? Int ?? 0) > 0)
            #expect((summary["clustersUncompressed"] as? Int ?? 0) > 0)  // the random blocks
        }
    }

    @Test(arguments: [["-o", "compression_level=1"], ["-o", "compression_level=9"], ["-o", "compression_type=zstd,compression_level=19"], ["-o", "compression_type=zstd,compression_level=1"]])
    func levels(extra: [String]) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 8)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        let r = try Harness.qcowpress(["convert", "-c"] + extra + [src.path, dst])
        #expect(r.status == 0, "\(r.stderr)")
        try Harness.expectGood(dst, equals: src.path)
    }

    @Test(arguments: ["none", "zlib", "zstd"])
    func allZeroAndEmptySources(codec: String) throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let codecArgs = codec == "none" ? [] : ["-c", "-o", "compression_type=\(codec)"]
        for (name, size, written) in [("sparse.raw", 64 << 20, false), ("zeros.raw", 3 << 20, true), ("empty.raw", 0, false)] {
            let src = dir.appendingPathComponent(name)
            FileManager.default.createFile(atPath: src.path, contents: written ? Data(count: size) : nil)
            if !written && size > 0 { try FileHandle(forWritingTo: src).truncate(atOffset: UInt64(size)) }
            let dst = dir.appendingPathComponent(name + ".qcow2").path
            let r = try Harness.qcowpress(["convert"] + codecArgs + ["--output", "json", src.path, dst])
            #expect(r.status == 0, "\(name): \(r.stderr)")
            try Harness.expectGood(dst, equals: src.path)
            // Zero clusters are never written: the image is header + tables only.
            let size = try FileManager.default.attributesOfItem(atPath: dst)[.size] as! Int
            #expect(size <= 4 * 65536, "\(name): \(size) bytes")
        }
    }

    @Test func refcountWidthsAndIoModes() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 8)
        for (i, args) in [["-o", "refcount_bits=1"], ["-o", "refcount_bits=64"], ["-c", "-o", "refcount_bits=32"],
                          ["-c", "--io", "pwrite"], ["-c", "--io", "buffered"], ["--io", "pwrite"],
                          ["-c", "--threads", "1"], ["-c", "--threads", "3", "--memory-limit", "8M"]].enumerated() {
            let dst = dir.appendingPathComponent("d\(i).qcow2").path
            let r = try Harness.qcowpress(["convert"] + args + [src.path, dst])
            #expect(r.status == 0, "\(args): \(r.stderr)")
            try Harness.expectGood(dst, equals: src.path)
        }
    }

    @Test func infoReportsFields() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 4)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        #expect(try Harness.qcowpress(["convert", "-c", "-o", "compression_type=zstd,cluster_size=4096", src.path, dst]).status == 0)
        let ours = try JSONSerialization.jsonObject(with: Data(try Harness.qcowpress(["info", "--output", "json", dst]).stdout.utf8)) as! [String: Any]
        let theirs = try JSONSerialization.jsonObject(with: Data(try Harness.qemuImg(["info", "--output", "json", dst]).stdout.utf8)) as! [String: Any]
        for key in ["virtual-size", "cluster-size", "format", "dirty-flag"] {
            #expect("\(ours[key] ?? "nil")" == "\(theirs[key] ?? "nil")", "\(key)")
        }
        let a = (ours["format-specific"] as! [String: Any])["data"] as! [String: Any]
        let b = (theirs["format-specific"] as! [String: Any])["data"] as! [String: Any]
        for key in ["compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2"] {
            #expect("\(a[key] ?? "nil")" == "\(b[key] ?? "nil")", "\(key)")
        }
        let text = try Harness.qcowpress(["info", dst]).stdout
        #expect(text.contains("cluster_size: 4096"))
    }
}
