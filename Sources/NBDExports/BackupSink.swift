import Foundation
import NBDServer
import QcowPress
import Synchronization

/// What the clients of a ``BackupSink`` sent.
public struct BackupSinkCounts: Encodable, Sendable {
    public var connections = 0
    public var writeRequests = 0
    /// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_TRIM` (both become zero clusters).
    public var zeroRequests = 0
    public var flushRequests = 0
    public var bytesWritten: UInt64 = 0
    public var bytesZeroed: UInt64 = 0
    /// Requests answered with an error (a cluster written twice, beyond the engine's contract).
    public var requestsRefused = 0
}

/// `export --nbd-sink`: one writable NBD export named `backup` whose writes go into a
/// `Qcow2Encoder`, for QEMU's backup job (`blockdev-backup` into an nbd node). Writes may come in
/// any order and length (the engine assembles partial clusters); `NBD_CMD_WRITE_ZEROES` and
/// `NBD_CMD_TRIM` become zero clusters; `NBD_CMD_FLUSH` is answered (the image is durable only once
/// finished). A write to a cluster that was already written gets an error reply and is counted:
/// the image is then not finished (it would not be what the client wrote).
///
/// The outcome is decided by the clients: when the last attached client ends with `NBD_CMD_DISC`
/// the backup is complete; a client that drops without it fails the backup at once.
final class BackupSinkExport: NBDExport, Sendable {
    let name = "backup"
    let encoder: Qcow2Encoder
    /// The disk's size as the client sees it; the image's virtual size is this rounded up to 512
    /// bytes (the bytes past it read as zero).
    let size: UInt64
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


    private struct State {
        var attached = 0
        var outcome: Outcome?
        var counts = BackupSinkCounts()
        var firstRefusal: String?
    }
    private let state = Mutex(State())
    private let decided = DispatchSemaphore(value: 0)

    init(encoder: Qcow2Encoder, clusterSize: Int, size: UInt64) {
        self.encoder = encoder
        self.size = size
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

    var counts: BackupSinkCounts { state.withLock { $0.counts } }
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

/// `export --nbd-sink`: serves one writable export named `backup` on a unix socket, encodes what
/// the client (QEMU's backup job) writes, and decides when the clients are done whether the
/// image is complete: it is finished only after every client ended with `NBD_CMD_DISC`, no
/// request was refused, and — for a full backup — every byte was written; otherwise the
/// destination is not written. Over a base (an incremental), the bytes of partly written clusters
/// that no client wrote read what the base reads.
public final class BackupSink: Sendable {
    let export: BackupSinkExport
    let server: ExportServer
    let base: (any GuestImage)?
    let destination: String

    /// Listens on `socket` at once; `encoder` is the destination's (`clusterSize` its clusters,
    /// the block size clients are told to prefer), `base` the image an incremental is taken over.
    /// `size` is the disk's, which clients see (by default the encoder's virtual size, which may
    /// be it rounded up to 512 bytes). `handshakeTimeout`: a client still negotiating this long
    /// after it connected is dropped (nil: no limit); `log` gets one line for each client dropped.
    public init(encoder: Qcow2Encoder, clusterSize: Int, base: (any GuestImage)?, socket: String, size: UInt64? = nil,
                handshakeTimeout: Duration? = .seconds(10), log: @escaping @Sendable (String) -> Void = { _ in }) throws(QcowPressError) {
        export = BackupSinkExport(encoder: encoder, clusterSize: clusterSize, size: size ?? encoder.virtualSize)
        self.base = base
        destination = encoder.destination
        server = try ExportServer(ExportSet([export]), socket: socket, listen: nil,
                                  security: ServerSecurity(handshakeTimeout: handshakeTimeout), log: log)
    }

    /// The export's name and URL.
    public var urls: [(export: String, uri: String)] { server.urls }
    /// What the clients sent.
    public var counts: BackupSinkCounts { export.counts }

    /// Waits for the clients, then finishes the image (or cancels it and throws why not); the
    /// server is stopped and the socket removed either way.
    public func run() throws(QcowPressError) -> EncoderSummary {
        let enc = export.encoder
        let socket = server.socket ?? ""
        let outcome = export.waitForOutcome()
        defer { server.shutdown() }
        do throws(QcowPressError) {
            guard outcome == .disconnected else {
                throw .invalidArgument("\(socket): the client disconnected without NBD_CMD_DISC; \(destination) not written")
            }
            let refused = export.counts.requestsRefused
            if refused > 0 {
                throw .invalidArgument("\(destination) not written: \(refused) request\(refused == 1 ? " was" : "s were") refused (first: \(export.firstRefusal ?? "?"))")
            }
            // A full backup (QEMU's sync=full) writes every byte, holes as WRITE_ZEROES: less means
            // the job stopped early (cancelled, failed) and the image would silently miss data.
            if base == nil && enc.bytesReceived < export.size {
                throw .invalidArgument("\(destination) not written: the client wrote \(enc.bytesReceived) of \(export.size) bytes before NBD_CMD_DISC (a full backup writes every byte; was the job cancelled?)")
            }
            if let base {
                let ctx = ReadContext()
                for gap in enc.unwrittenRangesOfPartialClusters {
                    let n = Int(gap.count)
                    let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 4096)
                    defer { buf.deallocate() }
                    try base.read(at: gap.lowerBound, count: n, into: buf.baseAddress!, context: ctx)
                    try enc.writeBlocking(at: gap.lowerBound, UnsafeRawBufferPointer(buf))
                }
            }
            return try enc.finishBlocking()
        } catch {
            enc.cancel()
            throw error
        }
    }
}
