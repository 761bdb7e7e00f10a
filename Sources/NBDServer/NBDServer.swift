import Foundation
import NIOCore
import NIOPosix
import Synchronization

/// What every connection of a server shares: the exports, the thread pool export I/O runs on,
/// limits and counters.
final class NBDServerCore: Sendable {
    /// Option data a client may send in one option (export names are ≤ 4096 bytes; meta-context
    /// queries a few more). Longer ends the connection without reading it.
    static let maxOptionLength: UInt32 = 64 << 10
    /// The largest read or write (NBD's customary 32 MiB maximum block size, advertised).
    static let maxRequest = 32 << 20
    /// Requests of one connection running at once; reading from its socket pauses at this many.
    /// 16 × 32 MiB bounds one connection's reply memory at 512 MiB in the worst case; clients read
    /// far smaller requests (nbdcopy 256 KiB, qemu-img 2 MiB).
    static let maxInFlight = 16
    /// Request bytes (write payloads, read replies) of one connection in flight; no further request
    /// is taken beyond this (one always is). QEMU's backup job writes ≤ 1 MiB per request, so its 16
    /// requests hold ≤ 16 MiB; a client sending 32 MiB writes holds at most 64 MiB in flight plus
    /// the one being received, instead of 16 × 32 MiB.
    static let maxInFlightBytes = 64 << 20

    /// Reply bytes a connection queues before it stops taking requests (high), and where it takes
    /// them again (low). NIO's default 64 KiB stops a connection after each 256 KiB reply of
    /// nbdcopy's until the client has read it.
    static let writeWaterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 1 << 20, high: 4 << 20)

    let exports: [String: any NBDExport]
    let exportOrder: [String]
    let pool: NIOThreadPool
    /// TLS required of every client (nil: plaintext only, `NBD_OPT_STARTTLS` refused).
    let tls: NBDTLS?
    /// How long a client may take from connecting to the transmission phase (nil: no limit).
    let handshakeTimeout: Duration?
    /// One line per client refused during the negotiation (its address and why).
    let log: @Sendable (String) -> Void
    private let stats = Mutex((connections: 0, open: 0, requests: 0))
    /// Exports no longer offered to new connections (connections already on them go on).
    private let withdrawn = Mutex<Set<String>>([])

    init(exports: [any NBDExport], poolThreads: Int, tls: NBDTLS?, handshakeTimeout: Duration?, log: @escaping @Sendable (String) -> Void) {
        self.tls = tls
        self.handshakeTimeout = handshakeTimeout
        self.log = log
        var map: [String: any NBDExport] = [:]
        for e in exports { map[e.name] = e }
        self.exports = map
        exportOrder = exports.map(\.name)
        pool = NIOThreadPool(numberOfThreads: poolThreads)
        pool.start()
    }

    func withdraw(_ name: String) { _ = withdrawn.withLock { $0.insert(name) } }
    /// The exports new connections may use, in the order given.
    var offered: [String] {
        let w = withdrawn.withLock { $0 }
        return exportOrder.filter { !w.contains($0) }
    }
    func export(named name: String) -> (any NBDExport)? {
        withdrawn.withLock { $0.contains(name) } ? nil : exports[name]
    }

    /// Reads handed to an export's ``NBDExport/read(at:count:then:)`` whose callback has not yet
    /// passed the reply to its event loop: the loops outlive them (``NBDServer/shutdown()``).
    private let handedOver = Mutex(0)
    func handOverStarted() { handedOver.withLock { $0 += 1 } }
    func handOverEnded() { handedOver.withLock { $0 -= 1 } }
    func waitForHandOvers() {
        while handedOver.withLock({ $0 }) > 0 { usleep(1000) }
    }

    /// Broadcast whenever a connection closes (``waitUntilNoConnections()``).
    private let closings = NSCondition()
    func connectionOpened() { stats.withLock { $0.connections += 1; $0.open += 1 } }
    func connectionClosed() {
        stats.withLock { $0.open -= 1 }
        closings.lock()
        closings.broadcast()
        closings.unlock()
    }
    /// Returns once no connection is open.
    func waitUntilNoConnections() {
        closings.lock()
        while stats.withLock({ $0.open }) > 0 { closings.wait() }
        closings.unlock()
    }
    func countRequest() { stats.withLock { $0.requests += 1 } }
    var counts: (connections: Int, open: Int, requests: Int) { stats.withLock { $0 } }
}

/// A read-only (or, for a writable export, read-write) NBD server: fixed newstyle negotiation,
/// `NBD_OPT_GO`/`INFO`/`LIST`/`ABORT`/`EXPORT_NAME`, structured replies, `base:allocation` block
/// status, multi-conn; on a unix socket or TCP; TLS through `NBD_OPT_STARTTLS` (``NBDTLS``).
public final class NBDServer: Sendable {
    let core: NBDServerCore
    let group: MultiThreadedEventLoopGroup
    private let channels = Mutex<[any Channel]>([])

    /// - Parameters:
    ///   - ioThreads: threads the exports' reads run on (blocking I/O, decompression).
    ///   - tls: TLS every client must start (``NBDTLS``); nil serves plaintext.
    ///   - handshakeTimeout: a client not in the transmission phase this long after it connected
    ///     is refused (nil: no limit).
    ///   - log: gets one line for each client refused during the negotiation.
    public init(exports: [any NBDExport], ioThreads: Int = 4, tls: NBDTLS? = nil, handshakeTimeout: Duration? = nil,
                log: @escaping @Sendable (String) -> Void = { _ in }) {
        core = NBDServerCore(exports: exports, poolThreads: max(1, ioThreads), tls: tls, handshakeTimeout: handshakeTimeout, log: log)
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    private func bootstrap() -> ServerBootstrap {
        let core = self.core
        return ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: NBDServerCore.writeWaterMark)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NBDConnection(core: core))
                }
            }
    }

    /// Listens on a unix socket; a socket file already there is replaced (the caller refuses any
    /// other kind of file first: this target makes no file system calls of its own).
    public func listen(unixSocket path: String) throws {
        let ch = try bootstrap().bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).wait()
        channels.withLock { $0.append(ch) }
    }

    /// Listens on TCP; returns the port (useful with port 0).
    @discardableResult
    public func listen(host: String, port: Int) throws -> Int {
        let ch = try bootstrap().bind(host: host, port: port).wait()
        channels.withLock { $0.append(ch) }
        return ch.localAddress?.port ?? port
    }

    /// Connections so far, open now, and requests served.
    public var counts: (connections: Int, open: Int, requests: Int) { core.counts }

    /// Returns once no client is connected (at once when none is).
    public func waitUntilNoConnections() { core.waitUntilNoConnections() }

    /// Stops offering an export to new connections (`NBD_OPT_LIST` leaves it out, `NBD_OPT_GO`
    /// finds no such export); connections already on it go on until they disconnect.
    public func withdraw(export name: String) { core.withdraw(name) }

    /// Stops listening and closes every connection. Requests still running finish first (their
    /// replies go nowhere) — on the pool or handed to an export — so the event loop outlives every
    /// task that reports to it.
    public func shutdown() {
        for ch in channels.withLock({ $0 }) { try? ch.close().wait() }
        try? core.pool.syncShutdownGracefully()
        core.waitForHandOvers()
        try? group.syncShutdownGracefully()
    }
}

public struct NBDServerError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}
