import DirectIO
import Logging

/// What a conversion reads from.
public enum ImageSource: Sendable {
    /// A raw file or block device (holes found with SEEK_DATA/SEEK_HOLE cost nothing).
    case raw(path: String)
    /// A qcow2 image; `openBacking: false` reads unallocated clusters as zeros.
    case qcow2(path: String, openBacking: Bool = true)
    /// The format by magic (``ImageFormat``): qcow2, vdi, raw when none; a format QcowPress does not
    /// read is refused by name.
    case detect(path: String)
    /// One disk archive (`drive-scsi0.img.fidx`) of an opened PBS snapshot.
    case pbs(PBSRestore, archive: String)
    /// One device of a VMA archive file (.vma, .vma.zst, .vma.gz; read twice: header, then data).
    case vma(archive: String, device: String)

    public var path: String {
        switch self {
        case .raw(let p), .qcow2(let p, _), .detect(let p): p
        case .pbs(let r, let a): r.snapshot.directory + "/" + a
        case .vma(let a, let d): a + "#" + d
        }
    }

    /// The image's virtual size in bytes.
    public func virtualSize() throws(QcowPressError) -> UInt64 {
        let (source, probed) = try resolved()
        switch source {
        case .raw(let p): return try RawImageReader(path: p).size
        case .qcow2(let p, let b): return try Qcow2Image(path: p, openBacking: b).virtualSize
        case .pbs(let r, let a):
            guard let img = r.archives.first(where: { $0.name == a || $0.name == a + ".fidx" }) else {
                throw .invalidArgument("\(a): not an image archive of the snapshot")
            }
            return (img.size + 511) & ~511
        case .vma(let a, let d):
            guard let size = try VMARestore.deviceSizes(archive: a)[d] else {
                throw .invalidArgument("\(a): no device '\(d)'")
            }
            return (size + 511) & ~511
        case .detect(let p): return try ImageFormat.open(path: p, format: try Self.format(probed, p)).virtualSize
        }
    }

    /// The format `resolved()` probed, or probed now.
    private static func format(_ probed: String?, _ path: String) throws(QcowPressError) -> String {
        if let probed { return probed }
        return try RawImageReader.detectFormat(path: path)
    }

    /// raw and qcow2 by their cases; another format QcowPress reads stays .detect, with the format
    /// it was probed as (opened by that name, without probing again).
    func resolved() throws(QcowPressError) -> (source: ImageSource, format: String?) {
        if case .detect(let p) = self {
            let format = try RawImageReader.detectFormat(path: p)
            return (format == "qcow2" ? .qcow2(path: p) : format == "raw" ? .raw(path: p) : self, format)
        }
        return (self, nil)
    }

    /// Pipes every byte of the source into `encoder` (reader threads; the caller's thread waits).
    public func pipe(into encoder: Qcow2Encoder) throws(QcowPressError) {
        let (source, probed) = try resolved()
        switch source {
        case .raw(let p): try RawImageReader(path: p).feed(encoder)
        case .qcow2(let p, let b):
            try ImageCopier(source: try Qcow2Image(path: p, openBacking: b), clusterSize: encoder.options.clusterSize).feed(encoder)
        case .pbs(let r, let a): try r.pipe(archive: a, into: encoder)
        case .vma(let a, let d): try VMARestore(archive: a, outdir: "").pipe(device: d, into: encoder)
        case .detect(let p):
            let image = try ImageFormat.open(path: p, format: try Self.format(probed, p))
            try ImageCopier(source: image, clusterSize: encoder.options.clusterSize).feed(encoder)
        }
    }
}

/// Progress of an image being written: guest bytes that reached the output in guest order (see
/// ``Qcow2Encoder/bytesDone``), of `total`.
public struct ImageProgress: Sendable, Equatable {
    public var done: UInt64
    public var total: UInt64
    public init(done: UInt64, total: UInt64) {
        self.done = done
        self.total = total
    }
}

extension Qcow2Encoder {
    /// Progress events, sampled every `interval` seconds: `done` never decreases and the last event,
    /// sent when the encoder finishes, has `done == total`. The stream ends after that (or on failure).
    public func progressUpdates(interval: Double = 0.2) -> AsyncStream<ImageProgress> {
        AsyncStream { continuation in
            let total = options.virtualSize
            let task = Task {
                var last: UInt64 = 0
                while !Task.isCancelled {
                    let finished = completion.isResolved
                    let done = min(total, bytesDone)
                    if done >= last {
                        last = done
                        continuation.yield(ImageProgress(done: done, total: total))
                    }
                    if finished {
                        if case .success = await completion.wait(), last < total {
                            continuation.yield(ImageProgress(done: total, total: total))
                        }
                        break
                    }
                    try? await Task.sleep(nanoseconds: UInt64(interval * 1e9))
                }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}

/// Converts an image to qcow2 in one call: opens the destination with `options` (its virtual size
/// is taken from the source), pipes the source in, and finishes. On any failure or cancellation of
/// the calling task the destination is not created. The destination is never the source or a file
/// of its backing chain, even with `options.overwrite`. The source file and its backing chain are
/// locked as QEMU locks what it reads (``ReadLocks``) for the whole conversion: one another process
/// has open for writing is refused, unless `forceShare` (qemu-img -U).
///
/// ```swift
/// let summary = try await convert(.detect(path: "disk.raw"), to: "disk.qcow2", options: options)
/// ```
public func convert(_ source: ImageSource, to destination: String, options: EncoderOptions,
                    forceShare: Bool = false, progress: (@Sendable (ImageProgress) -> Void)? = nil) async throws(QcowPressError) -> EncoderSummary {
    let locks = ReadLocks(forceShare: forceShare)
    defer { locks.release() }
    switch source {
    case .raw(let p), .qcow2(let p, _), .detect(let p): try locks.lock(p, backingChain: false)
    case .pbs, .vma: break
    }
    var o = options
    o.virtualSize = try source.virtualSize()
    switch source {
    case .raw(let p), .qcow2(let p, _), .detect(let p):
        let chain = try ProtectedInput.imageAndBackingChain(p, role: "the source")
        if case .qcow2(_, false) = source {} else { try locks.lock(paths: chain.dropFirst().map(\.path)) }
        o.protectedInputs += chain
    case .vma(let a, _) where a != "-":
        o.protectedInputs.append(ProtectedInput(path: a, role: "the archive being restored"))
    case .pbs, .vma: break
    }
    let encoder = try Qcow2Encoder(destination: destination, options: o)
    Logger(label: "qcowpress").debug("converting", metadata: ["source": "\(source.path)", "destination": "\(destination)"])
    let watcher = progress.map { p in
        Task {
            for await e in encoder.progressUpdates() { p(e) }
        }
    }
    defer { watcher?.cancel() }
    let feeder = Task.detached { () -> Result<Void, QcowPressError> in
        Result { () throws(QcowPressError) in try source.pipe(into: encoder) }
    }
    let fed = await withTaskCancellationHandler {
        await feeder.value
    } onCancel: {
        encoder.cancel()
    }
    if case .failure(let e) = fed {
        encoder.cancel()
        throw e
    }
    if Task.isCancelled {
        encoder.cancel()
        throw .cancelled
    }
    let s = try await encoder.finish()
    if let watcher { _ = await watcher.value }
    return s
}
