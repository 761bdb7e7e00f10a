import Foundation
import NBDServer
import QcowPress
import Synchronization

/// `export --nbd-sink`: one writable NBD export named `backup` whose writes go into a
/// `Qcow2Encoder`, for QEMU's backup job (`blockdev-backup` into an nbd node). Writes may come in
/// any order and length (the engine assembles partial clusters); `NBD_CMD_WRITE_ZEROES` and
/// `NBD_CMD_TRIM` become zero clusters; `NBD_CMD_FLUSH` is answered (the image is durable only once
/// finished). A write to a cluster that was already written gets an error reply and is counted:
/// the image is then not finished (it would not be what the client wrote).
///
/// The outcome is decided by the clients: when the last attached client ends with `NBD_CMD_DISC`
/// the backup is complete; a client that drops without it fails the backup at once.
final class BackupSinkExport: NBDExport, @unchecked Sendable {
    let name = "backup"
    let encoder: Qcow2Encoder
    var size: UInt64 { encoder.virtualSize }
    var isReadOnly: Bool { false }
    /// The image's cluster size: writes of whole clusters need no assembly.
    let preferredBlockSize: Int
    /// One image, finished at the client's `NBD_CMD_DISC`: one client at a time is what a backup
    /// job uses, so multi-conn is not offered.
    var allowsMultipleConnections: Bool { false }

    enum Outcome: Equatable {
        /// Every client that attached ended with `NBD_CMD_DISC`.
        case disconnected
        /// A client's connection dropped without `NBD_CMD_DISC`.
        case dropped
    }

    struct Counts: Encodable {
        var connections = 0
        var writeRequests = 0
        /// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_TRIM` (both become zero clusters).
        var zeroRequests = 0
        var flushRequests = 0
        var bytesWritten: UInt64 = 0
        var bytesZeroed: UInt64 = 0
        /// Requests answered with an error (a cluster written twice, beyond the engine's contract).
        var requestsRefused = 0
    }

    private struct State {
        var attached = 0
        var outcome: Outcome?
        var counts = Counts()
        var firstRefusal: String?
    }
    private let state = Mutex(State())
    private let decided = DispatchSemaphore(value: 0)

    init(encoder: Qcow2Encoder, clusterSize: Int) {
        self.encoder = encoder
        preferredBlockSize = clusterSize
    }

    func clientAttached() throws(NBDError) {
        let refused: Bool = state.withLock { s in
            if s.outcome != nil { return true }
            s.attached += 1
            s.counts.connections += 1
            return false
        }
        if refused { throw NBDError(NBD.ESHUTDOWN, "the backup is over; no new clients") }
    }

    func clientDetached(sentDisc: Bool) {
        let decidedNow: Bool = state.withLock { s in
            s.attached -= 1
            guard s.outcome == nil else { return false }
            if !sentDisc {
                s.outcome = .dropped
            } else if s.attached == 0 {
                s.outcome = .disconnected
            }
            return s.outcome != nil
        }
        if decidedNow { decided.signal() }
    }

    /// Blocks until the clients decided the outcome.
    func waitForOutcome() -> Outcome {
        decided.wait()
        return state.withLock { $0.outcome! }
    }

    var counts: Counts { state.withLock { $0.counts } }
    var firstRefusal: String? { state.withLock { $0.firstRefusal } }

    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawBufferPointer) throws(NBDError) {
        throw NBDError(NBD.EINVAL, "the backup sink is write-only")
    }

    /// Everything is data as far as the client is concerned (nothing here is readable).
    func blockStatus(at offset: UInt64, length: UInt64) throws(NBDError) -> [(length: UInt64, flags: UInt32)] {
        [(length, 0)]
    }

    func write(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws(NBDError) {
        state.withLock { $0.counts.writeRequests += 1 }
        do throws(QcowPressError) {
            try encoder.writeBlocking(at: offset, bytes)
        } catch {
            throw refuse(error)
        }
        state.withLock { $0.counts.bytesWritten += UInt64(bytes.count) }
    }

    func writeZeroes(at offset: UInt64, length: UInt64) throws(NBDError) {
        state.withLock { $0.counts.zeroRequests += 1 }
        do throws(QcowPressError) {
            try encoder.writeZeroesBlocking(at: offset, length: length)
        } catch {
            throw refuse(error)
        }
        state.withLock { $0.counts.bytesZeroed += length }
    }

    func flush() throws(NBDError) {
        state.withLock { $0.counts.flushRequests += 1 }
    }

    /// The error reply for a request the engine refused, counted (the first one is kept for the
    /// final message).
    private func refuse(_ e: QcowPressError) -> NBDError {
        state.withLock { s in
            s.counts.requestsRefused += 1
            if s.firstRefusal == nil { s.firstRefusal = e.message }
        }
        if case .outOfSpace = e { return NBDError(NBD.ENOSPC, e.message) }
        return NBDError(NBD.EIO, e.message)
    }
}

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
        let sink = BackupSinkExport(encoder: enc, clusterSize: options.clusterSize)
        let server: NBDServer
        do {
            server = try startServer([sink], socket: socket, listen: nil)
        } catch {
            enc.cancel()
            throw error
        }
        let bar = encoder.progress ? ProgressBar(total: base == nil ? virtualSize : nil) { enc.bytesReceived } : nil
        let outcome = sink.waitForOutcome()
        let summary: EncoderSummary
        do {
            guard outcome == .disconnected else {
                throw QcowPressError.invalidArgument("\(socket): the client disconnected without NBD_CMD_DISC; \(destination) not written")
            }
            let refused = sink.counts.requestsRefused
            if refused > 0 {
                throw QcowPressError.invalidArgument("\(destination) not written: \(refused) request\(refused == 1 ? " was" : "s were") refused (first: \(sink.firstRefusal ?? "?"))")
            }
            // A full backup (QEMU's sync=full) writes every byte, holes as WRITE_ZEROES: less means
            // the job stopped early (cancelled, failed) and the image would silently miss data.
            if baseImage == nil && enc.bytesReceived < virtualSize {
                throw QcowPressError.invalidArgument("\(destination) not written: the client wrote \(enc.bytesReceived) of \(virtualSize) bytes before NBD_CMD_DISC (a full backup writes every byte; was the job cancelled?)")
            }
            // Bytes of partly written clusters that no client wrote read what BASE reads (without
            // a base they stay zero, as in any fresh export).
            if let baseImage {
                let ctx = ReadContext()
                for gap in enc.unwrittenRangesOfPartialClusters {
                    let n = Int(gap.count)
                    let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 4096)
                    defer { buf.deallocate() }
                    try baseImage.read(at: gap.lowerBound, count: n, into: buf.baseAddress!, context: ctx)
                    try enc.writeBlocking(at: gap.lowerBound, UnsafeRawBufferPointer(buf))
                }
            }
            summary = try enc.finishBlocking()
        } catch {
            enc.cancel()
            bar?.stop()
            unlink(socket)
            throw error
        }
        bar?.stop()
        server.shutdown()
        unlink(socket)
        if encoder.output == .json {
            struct SinkSummary: Encodable {
                var image: EncoderSummary
                var incrementalBase: String?
                var nbd: BackupSinkExport.Counts
            }
            print(try encodeJSON(SinkSummary(image: summary, incrementalBase: base, nbd: sink.counts)))
        }
    }
}
