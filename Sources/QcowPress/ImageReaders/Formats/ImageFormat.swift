import DirectIO
import Glibc

/// Image formats by qemu-img's names: which QcowPress reads, how a file's format is probed (by
/// magic, as qemu's `bdrv_probe_all` does: each driver's probe looks at the first 512 bytes), and
/// the one-line refusal for a format QcowPress knows by its magic but does not read. A file whose
/// magic names another format is never read as raw unless `-f raw` says so (as qemu-img).
public enum ImageFormat {
    /// What `-f` accepts: the formats QcowPress reads.
    public static let readable = ["raw", "qcow2", "vdi", "vpc", "vhdx", "vmdk"]

    /// qemu reads the first 512 bytes (BLOCK_PROBE_BUF_SIZE) and gives them to every probe.
    static let probeBytes = 512

    /// The format of `path` by magic: "qcow2", "vmdk", "vhdx", "vdi", "vpc" (a dynamic VHD:
    /// `conectix` at 0), "raw" (no magic; a fixed VHD too, as qemu-img, whose vpc probe looks only
    /// at offset 0), or the qemu-img name of a format QcowPress does not read ("qed", "dmg", …).
    public static func probe(path: String) throws(QcowPressError) -> String {
        let f: InputFile
        do { f = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        // As qemu: an empty file is raw without probing.
        guard f.size > 0 else { return "raw" }
        let n = Int(min(UInt64(probeBytes), f.size))
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: probeBytes, alignment: 8)
        defer { buf.deallocate() }
        let got: Int
        do { got = try f.read(into: buf.baseAddress!, length: n, offset: 0) } catch { throw .from(error) }
        // qemu probes 512 bytes whatever the file's size (a shorter file reads as zero-padded).
        var head = [UInt8](repeating: 0, count: probeBytes)
        for i in 0..<min(n, got) { head[i] = buf[i] }
        if let name = probe(head: head, fileName: path) { return name }
        // Not a qemu probe: a `koly` trailer 512 bytes before the end marks an Apple disk image
        // whatever its name (qemu probes dmg by the ".dmg" name only); refused rather than read raw.
        if f.size >= 1024 {
            var tail: UInt32 = 0
            do {
                _ = try withUnsafeMutableBytes(of: &tail) { (p) throws(IOError) -> Int in try f.read(into: p.baseAddress!, length: 4, offset: f.size - 512) }
            } catch { throw .from(error) }
            if UInt32(bigEndian: tail) == 0x6B6F_6C79 { return "dmg" }
        }
        return "raw"
    }

    /// The probes of qemu's drivers over the first 512 bytes (zero-padded); nil is raw.
    public static func probe(head b: [UInt8], fileName: String) -> String? {
        func starts(_ s: String, at o: Int = 0) -> Bool {
            let u = Array(s.utf8)
            return b.count >= o + u.count && Array(b[o..<(o + u.count)]) == u
        }
        func be32(_ o: Int) -> UInt32 { b[o..<(o + 4)].reduce(0) { $0 << 8 | UInt32($1) } }
        func le32(_ o: Int) -> UInt32 { b[o..<(o + 4)].reversed().reduce(0) { $0 << 8 | UInt32($1) } }
        if b.count >= 8 && be32(0) == 0x5146_49FB {
            // qcow2_probe wants version ≥ 2, qcow_probe version 1.
            return be32(4) == 1 ? "qcow" : "qcow2"
        }
        if starts("KDMV") || starts("COWD") || vmdkDescriptor(b) { return "vmdk" }
        if starts("vhdxfile") { return "vhdx" }
        if starts("conectix") { return "vpc" }
        if b.count >= 512 && le32(64) == 0xBEDA_107F { return "vdi" }
        if b.count >= 68 && starts("QED\0") { return "qed" }
        if b.count >= 64 && (starts("WithoutFreeSpace") || starts("WithouFreSpacExt")) && le32(16) == 2 { return "parallels" }
        if b.count >= 512 && starts("Bochs Virtual HD Image\0") && starts("Redolog\0", at: 32) && starts("Growing\0", at: 48)
            && (le32(64) == 0x0002_0000 || le32(64) == 0x0001_0000) { return "bochs" }
        // LUKS: magic, then a big-endian version 1 (luks2 is version 2: named too).
        if b.count >= 8 && b[0..<6].elementsEqual([0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE]) && b[6] == 0 && (b[7] == 1 || b[7] == 2) {
            return "luks"
        }
        // cloop_probe: its script header (score 2).
        let cloop = Array("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".utf8)
        if !b.isEmpty && Array(b.prefix(cloop.count)) == Array(cloop.prefix(b.count)) { return "cloop" }
        // dmg_probe goes by the file name (score 2).
        if fileName.count > 4 && fileName.hasSuffix(".dmg") { return "dmg" }
        return nil
    }

    /// vmdk_probe's text form: comment and blank lines, then `version=1|2|3` on its own line.
    static func vmdkDescriptor(_ b: [UInt8]) -> Bool {
        var p = 0
        while p < b.count {
            if b[p] == UInt8(ascii: "#") {
                while p < b.count && b[p] != UInt8(ascii: "\n") { p += 1 }
                p += 1
                continue
            }
            if b[p] == UInt8(ascii: " ") {
                while p < b.count && b[p] == UInt8(ascii: " ") { p += 1 }
                if p < b.count && b[p] == UInt8(ascii: "\r") { p += 1 }
                if p == b.count || b[p] != UInt8(ascii: "\n") { return false }
                p += 1
                continue
            }
            for v in ["1", "2", "3"] {
                for end in ["\n", "\r\n"] {
                    let s = Array("version=\(v)\(end)".utf8)
                    if b.count - p >= s.count && Array(b[p..<(p + s.count)]) == s { return true }
                }
            }
            return false
        }
        return false
    }

    /// The one-line refusal for a file whose magic names a format QcowPress does not read.
    public static func refusal(path: String, format: String) -> QcowPressError {
        .unsupported(path: path, what: "a \(format) image; QcowPress does not read \(format) (qemu-img convert -O qcow2 can)")
    }

    /// `-f NAME`: one of ``readable`` or a one-line error.
    public static func validate(_ name: String?) throws(QcowPressError) {
        guard let name, !readable.contains(name) else { return }
        throw .invalidArgument("-f '\(name)': unknown or unsupported image format (QcowPress reads \(readable.joined(separator: ", ")))")
    }

    /// The format an image is read as: `given` (-f) when present (qcow2 must have its magic; raw
    /// reads any file, as qemu-img), otherwise probed; a foreign format is refused by name.
    public static func resolve(path: String, given: String?) throws(QcowPressError) -> String {
        try validate(given)
        if given == "raw" { return "raw" }
        let probed = try probe(path: path)
        if let given {
            if given == "qcow2" && probed != "qcow2" {
                throw .inputDamaged(path: path, location: "magic at offset 0 is not QFI\\xfb (not a qcow2 image)")
            }
            return given
        }
        guard readable.contains(probed) else { throw refusal(path: path, format: probed) }
        return probed
    }

    /// Opens a raw, vmdk, vhdx, vdi or vpc image (qcow2 has its own options: ``Qcow2Image``).
    public static func open(path: String, format: String) throws(QcowPressError) -> any GuestImage {
        switch format {
        case "raw": return try RawGuestImage(path: path)
        case "vdi": return try VDIImage(path: path)
        case "vpc": return try VHDImage.open(path: path)
        case "vmdk": return try VMDKImage.open(path: path)
        case "vhdx": return try VHDXImage(path: path)
        default: throw refusal(path: path, format: format)
        }
    }

    /// Opens a vdi or vpc image (and the formats added here) from a ``FormatFile``: a file, or a
    /// window of one (a disk inside an OVA's tar, read in place; errors name the window's name).
    static func open(file: FormatFile, format: String) throws(QcowPressError) -> any GuestImage {
        switch format {
        case "vdi": return try VDIImage(file: file)
        case "vpc": return try VHDImage.open(file: file)
        case "vmdk": return try VMDKImage.open(file: file)
        case "vhdx": return try VHDXImage(file: file)
        default: throw refusal(path: file.path, format: format)
        }
    }
}

extension ImageInfo {
    /// What `info` shows of a VDI or VHD image (nil for raw and qcow2): qemu-img's keys (format,
    /// virtual-size, cluster-size = the block size of a block-mapped image) and the subformat.
    init?(blockImage path: String, format: String) throws(QcowPressError) {
        let size: UInt64
        switch format {
        case "vdi":
            let i = try VDIImage(path: path)
            (size, clusterSize, subformat) = (i.virtualSize, Int(i.header.blockSize), i.subformat)
        case "vpc":
            switch try VHDImage.open(path: path) {
            case let d as VHDDynamicImage: (size, clusterSize, subformat) = (d.virtualSize, d.blockBytes, "dynamic")
            case let i: (size, subformat) = (i.virtualSize, "fixed")
            }
        case "vhdx":
            let i = try VHDXImage(path: path)
            (size, clusterSize, subformat) = (i.virtualSize, i.blockBytes, i.subformat)
        case "vmdk":
            let i = try VMDKImage.open(path: path)
            (size, clusterSize, subformat) = (i.virtualSize, i.grainSize, i.createType)
            formatSpecific = FormatSpecific(.vmdk(i.formatSpecific))
        default: return nil
        }
        virtualSize = size
        filename = path
        self.format = format
        // As qemu's vmdk_get_allocated_file_size: the descriptor's file plus every other file an
        // extent reads (a twoGbMaxExtent or flat disk is mostly its extents).
        var files = [path]
        if let v = formatSpecific?.vmdk {
            for e in v.extents where !files.contains(e.filename) { files.append(e.filename) }
        }
        actualSize = files.reduce(0) { $0 + ((try? FileStatus.of(path: $1))?.allocated ?? 0) }
        dirtyFlag = false
    }
}
