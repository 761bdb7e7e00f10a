import BackupSources
import DirectIO
import Foundation
import Glibc

/// Restores a vzdump VMA archive (plain, .zst or .gz, from a file or a pipe) into one qcow2 per
/// device, reading the archive exactly once, front to back. Zero blocks named by the archive's
/// masks become zero clusters without any zero test.
public struct VMARestore: Sendable {
    public struct Summary: Sendable, Codable {
        public var archive: String
        /// none, zstd or gzip (detected by magic).
        public var compression: String
        /// Bytes of the archive read (compressed, as stored).
        public var archiveBytes: UInt64
        public var images: [EncoderSummary]
        /// Config files written beside the images.
        public var configs: [String]
    }

    public let archive: String
    public let outdir: String
    public var device: String? = nil
    public var overwrite = false

    public init(archive: String, outdir: String) {
        self.archive = archive
        self.outdir = outdir
    }

    /// Runs the restore. `progress` is told the archive's reader (bytes read, total when known).
    public func run(encoder template: EncoderOptions, started: (Qcow2Encoder) -> Void = { _ in },
                    progress: (@escaping @Sendable () -> UInt64, UInt64?) -> Void = { _, _ in }) throws(QcowPressError) -> Summary {
        let (file, reader) = try open()
        progress({ file.position }, file.size)
        var selected = Array(reader.devices.indices)
        if let device { selected = [try index(of: device, in: reader)] }
        let imageNames = reader.devices.map { $0.name + ".qcow2" }
        let configNames = reader.configs.map(\.name)
        // A config named like an image (drive-scsi0.qcow2) or like another config would replace
        // it: refused before anything is written.
        try OutputSet.checkDistinct(zip(imageNames, reader.devices).map { ($0, "the image of device \($1.name)") }
                                    + configNames.map { ($0, "config '\($0)'") }, in: outdir)
        let imagePaths = imageNames.map { outdir + "/" + $0 }
        let configPaths = configNames.map { outdir + "/" + $0 }
        if FileNames.exists(outdir) && !FileNames.isDirectory(outdir) {
            throw .invalidArgument("\(outdir): is not a directory")
        }
        let protected = archive == "-" ? [] : [ProtectedInput(path: archive, role: "the archive being restored")]
        for i in selected { _ = try OutputTarget(destination: imagePaths[i], overwrite: overwrite, protecting: protected) }
        for p in configPaths { _ = try OutputTarget(destination: p, overwrite: overwrite, protecting: protected) }
        let outputs = OutputSet(overwrite: overwrite)
        // One engine per device, all sharing one worker pool and one memory budget.
        let group = try EncoderGroup(threads: template.threads, memoryLimit: template.memoryLimit,
                                     clusterSize: template.clusterSize, compression: template.compression,
                                     images: selected.count)
        defer { group.shutdown() }
        var encoders = [Qcow2Encoder?](repeating: nil, count: reader.devices.count)
        var images: [EncoderSummary] = []
        do throws(QcowPressError) {
            try outputs.makeDirectory(outdir)
            for i in selected {
                var o = template
                o.virtualSize = (reader.devices[i].size + 511) & ~511
                o.group = group
                o.overwrite = overwrite
                o.protectedInputs += protected
                let e = try Qcow2Encoder(destination: imagePaths[i], options: o)
                outputs.add(e)
                encoders[i] = e
                started(e)
            }
            try stream(reader, into: encoders)
            for i in selected { images.append(try encoders[i]!.finishBlocking()) }
            // Configs last, each under a temporary name, then everything renamed into place.
            for (k, c) in reader.configs.enumerated() { try outputs.stage(Array(c.data), as: configPaths[k]) }
            try outputs.commitAll()
        } catch {
            outputs.rollback()
            throw error
        }
        return Summary(archive: archive, compression: reader.stream.compression.rawValue, archiveBytes: file.position,
                       images: images, configs: configPaths)
    }

    /// Device names and sizes from an archive's header (reads only the header).
    public static func deviceSizes(archive: String) throws(QcowPressError) -> [String: UInt64] {
        guard archive != "-" else { throw .invalidArgument("a one-device pipe needs an archive file, not stdin") }
        let reader = try VMARestore(archive: archive, outdir: "").open().1
        return Dictionary(uniqueKeysWithValues: reader.devices.map { ($0.name, $0.size) })
    }

    /// Streams the archive once and writes one device into an encoder the caller opened and will
    /// finish; every cluster of that device must be present.
    public func pipe(device: String, into enc: Qcow2Encoder) throws(QcowPressError) {
        let reader = try open().1
        var encoders = [Qcow2Encoder?](repeating: nil, count: reader.devices.count)
        encoders[try index(of: device, in: reader)] = enc
        try stream(reader, into: encoders)
    }

    /// The archive opened (decompressed by magic) with its header read.
    private func open() throws(QcowPressError) -> (StreamFile, VMAReader) {
        let file: StreamFile
        do { file = try StreamFile(path: archive) } catch { throw .from(error) }
        do { return (file, try VMAReader(stream: ArchiveStream(file: file))) } catch { throw QcowPressError(error) }
    }

    private func index(of device: String, in reader: VMAReader) throws(QcowPressError) -> Int {
        guard let i = reader.devices.firstIndex(where: { $0.name == device }) else {
            let names = reader.devices.map(\.name).joined(separator: ", ")
            throw .invalidArgument("\(archive): no device '\(device)' (devices: \(names))")
        }
        return i
    }

    /// Every extent to the end; clusters go to `encoders[device]` (nil: checked, not written).
    /// Then every cluster of every device must have appeared.
    private func stream(_ reader: VMAReader, into encoders: [Qcow2Encoder?]) throws(QcowPressError) {
        let scratch = AlignedBuffer(capacity: VMAReader.clusterSize)
        while try nextExtent(reader, encoders, scratch) {}
        do { try reader.checkComplete() } catch { throw QcowPressError(error) }
    }

    private func nextExtent(_ reader: VMAReader, _ encoders: [Qcow2Encoder?], _ scratch: AlignedBuffer) throws(QcowPressError) -> Bool {
        var engineError: QcowPressError? = nil
        do throws(SourceError) {
            return try reader.nextExtent { (c) throws(SourceError) in
                guard let enc = encoders[c.device] else { return }
                do throws(QcowPressError) { try Self.deliver(c, to: enc, scratch: scratch) } catch {
                    engineError = error
                    throw SourceError(.io, path: enc.destination, error.message)
                }
            }
        } catch {
            throw engineError ?? QcowPressError(error)
        }
    }

    /// Writes one VMA cluster: masks name the zero blocks, so zeros are never tested or copied.
    static func deliver(_ c: VMAReader.Cluster, to enc: Qcow2Encoder, scratch: AlignedBuffer) throws(QcowPressError) {
        let start = UInt64(c.cluster) * UInt64(VMAReader.clusterSize)
        let end = min(start + UInt64(VMAReader.clusterSize), enc.virtualSize)
        let len = Int(end - start)
        if c.mask == 0 {
            try enc.writeZeroesBlocking(at: start, length: UInt64(len))
            return
        }
        if c.mask == 0xFFFF {
            try enc.writeBlocking(at: start, UnsafeRawBufferPointer(rebasing: c.data[0..<min(len, c.data.count)]))
            if len > c.data.count { try enc.writeZeroesBlocking(at: start + UInt64(c.data.count), length: UInt64(len - c.data.count)) }
            return
        }
        var pos = 0
        for b in 0..<16 {
            let dst = scratch.pointer + b * VMAReader.blockSize
            if c.mask & (1 << b) != 0 {
                memcpy(dst, c.data.baseAddress! + pos, VMAReader.blockSize)
                pos += VMAReader.blockSize
            } else {
                memset(dst, 0, VMAReader.blockSize)
            }
        }
        try enc.writeBlocking(at: start, UnsafeRawBufferPointer(start: scratch.pointer, count: len))
    }
}
