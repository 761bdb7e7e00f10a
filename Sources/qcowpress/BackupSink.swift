import DirectIO
import Foundation
import NBDExports
import QcowPress

extension Export {
    /// Serves the sink on `socket` until the client disconnects, then finishes DST (or removes it).
    func runSink(socket: String, destination: String) throws {
        let parsed = try ImageOptionParser(encoder.formatOptions)
        var args = encoder
        if parsed.values["compression_type"] == nil { args.formatOptions.append("compression_type=zstd") }
        var baseImage: (any GuestImage)? = nil
        var baseFormat: String? = nil
        // The disk's size, as clients see it.
        let diskSize: UInt64
        if let base {
            let fmt = try RawImageReader.detectFormat(path: base)
            baseFormat = fmt
            baseImage = try openImage(base, format: fmt, openBacking: true)
            diskSize = baseImage!.virtualSize
        } else {
            diskSize = UInt64(try parseSize(size!, what: "--size"))
            guard diskSize > 0 else { throw QcowPressError.invalidArgument("--size must be more than 0") }
        }
        // The image's size: the disk's rounded up to 512 bytes, as `qemu-img create` and QEMU's raw
        // driver round (QEMU reads a qcow2 size in whole sectors: an odd one would lose its tail).
        let virtualSize = (diskSize + 511) & ~511
        var options = try args.encoderOptions(virtualSize: virtualSize, compressByDefault: true)
        if let base {
            options.protectedInputs = try ProtectedInput.imageAndBackingChain(base, role: "the base (-b)")
            options.backingFile = relativePath(from: destination, to: base)
            options.backingFormat = baseFormat
        }
        warnAboutLeftovers(besides: destination)
        let enc = try Qcow2Encoder(destination: destination, options: options)
        watch(enc)
        let sink: BackupSink
        do {
            let timeout = handshakeTimeout ?? 10
            sink = try BackupSink(encoder: enc, clusterSize: options.clusterSize, base: baseImage, socket: socket, size: diskSize,
                                  handshakeTimeout: timeout == 0 ? nil : .milliseconds(Int64(timeout * 1000)),
                                  log: { writeStderr("qcowpress: \($0)\n") })
        } catch {
            enc.cancel()
            throw error
        }
        SignalWatcher.onExit { FileNames.unlink(socket) }
        // An interrupt says what it left (the signal watcher removed the temporary files first).
        let before = FileNames.status(destination)
        SignalWatcher.onExit { writeStderr("qcowpress: interrupted: \(Self.leftBehind(destination, before: before))\n") }
        try printURLs(sink.urls, json: encoder.output == .json)
        // SIGUSR1: bytes received of the virtual size (an incremental backup sends only what changed).
        ProgressReport.follow(total: virtualSize) { enc.bytesReceived }
        let bar = encoder.progress ? ProgressBar(total: base == nil ? virtualSize : nil) { enc.bytesReceived } : nil
        let summary: EncoderSummary
        do {
            summary = try sink.run()
        } catch {
            bar?.stop()
            throw error
        }
        bar?.stop()
        if encoder.output == .json {
            struct SinkSummary: Encodable {
                var image: EncoderSummary
                var incrementalBase: String?
                var nbd: BackupSinkCounts
            }
            // One line: stdout is JSON lines here (the URL came first).
            print(try encodeJSONLine(SinkSummary(image: summary, incrementalBase: base, nbd: sink.counts)))
        }
    }

    /// What an interrupted sink run leaves at `destination`, which was `before` when it started.
    static func leftBehind(_ destination: String, before: NameStatus?) -> String {
        let now = FileNames.status(destination)
        if now?.kind == .blockDevice {
            return "\(destination) not finished: the device holds partial data, its first cluster zeroed (no image header)"
        }
        if let now, now.identity != before?.identity { return "\(destination) was finished before the signal and is complete" }
        if before != nil { return "\(destination) not written (the existing file is unchanged); nothing left behind" }
        return "\(destination) not written; nothing left behind"
    }
}
