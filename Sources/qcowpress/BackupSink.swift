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
        let virtualSize: UInt64
        if let base {
            let fmt = try RawImageReader.detectFormat(path: base)
            baseImage = try openImage(base, format: fmt, openBacking: true)
            virtualSize = baseImage!.virtualSize
        } else {
            virtualSize = UInt64(try parseSize(size!, what: "--size"))
            guard virtualSize > 0 else { throw QcowPressError.invalidArgument("--size must be more than 0") }
        }
        var options = try args.encoderOptions(virtualSize: virtualSize, compressByDefault: true)
        if let base {
            options.protectedInputs = ProtectedInput.imageAndBackingChain(base, role: "the base (-b)")
            options.backingFile = relativePath(from: destination, to: base)
            options.backingFormat = try RawImageReader.detectFormat(path: base)
        }
        warnAboutLeftovers(besides: destination)
        let enc = try Qcow2Encoder(destination: destination, options: options)
        watch(enc)
        let sink: BackupSink
        do {
            sink = try BackupSink(encoder: enc, clusterSize: options.clusterSize, base: baseImage, socket: socket)
        } catch {
            enc.cancel()
            throw error
        }
        SignalWatcher.onExit { FileNames.unlink(socket) }
        try printURLs(sink.urls, json: encoder.output == .json)
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
}
