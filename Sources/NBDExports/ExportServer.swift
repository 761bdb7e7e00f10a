import DirectIO
import NBDServer
import QcowPress

/// What one server serves: NBD exports made from images (``ExportSet/images(_:cacheBytes:)``),
/// a PBS snapshot (``ExportSet/pbs(_:archives:cacheBytes:)``), a live restore
/// (``ExportSet/live(_:)``) or a backup sink (``BackupSink``). The command line never sees the
/// adapters, only their names.
public struct ExportSet: Sendable {
    let exports: [any NBDExport]
    /// One line saying what the exports' shared cache did, for when serving stops (`serve pbs`).
    public let report: (@Sendable () -> String)?

    init(_ exports: [any NBDExport], report: (@Sendable () -> String)? = nil) {
        self.exports = exports
        self.report = report
    }

    /// The export names, in the order served.
    public var names: [String] { exports.map(\.name) }
}

/// An NBD server of one ``ExportSet`` on a unix socket or a TCP address, and the URL of each
/// export. ``shutdown()`` stops it and removes the socket.
public final class ExportServer: Sendable {
    let server: NBDServer
    /// The unix socket listened on, if any.
    public let socket: String?
    /// Each export's name and URL (`nbd+unix:///NAME?socket=PATH`, `nbd://HOST:PORT/NAME`, or
    /// `nbds://HOST:PORT/NAME` with TLS).
    public let urls: [(export: String, uri: String)]

    /// Listens at once: a connection may come as soon as this returns.
    ///
    /// 16 pool threads, one connection's whole in-flight window (NBDServerCore.maxInFlight): the
    /// requests of one connection that wait on one chunk's load cannot hold every thread while
    /// another connection's chunk is cached. Not faster on 2 cores in bench/nbd_bench.py (serve
    /// pbs + nbdcopy within noise of 4 threads); threads that wait cost no CPU.
    ///
    /// `security`: TLS and the handshake's timeout (``ServerSecurity``); plaintext on TCP beyond
    /// loopback is refused unless it says `insecure`. `log` gets one line for each client refused
    /// (its address and why) and warnings about the credentials.
    public init(_ set: ExportSet, socket: String?, listen: String?, ioThreads: Int = 16, security: ServerSecurity = ServerSecurity(),
                log: @escaping @Sendable (String) -> Void = { _ in }) throws(QcowPressError) {
        guard (socket == nil) != (listen == nil) else { throw .invalidArgument("give one of --socket PATH or --listen ADDR:PORT") }
        var parsed: (host: String, port: Int)?
        if let listen {
            guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]) else {
                throw .invalidArgument("--listen \(listen): expected ADDR:PORT")
            }
            let host = String(listen[..<colon])
            try security.checkPlaintext(host: host)
            parsed = (host, port)
        }
        let tls = try security.load(warn: log)
        server = NBDServer(exports: set.exports, ioThreads: ioThreads, tls: tls, handshakeTimeout: security.handshakeTimeout, log: log)
        self.socket = socket
        do {
            if let socket {
                // A stale socket file is replaced; any other file is the user's.
                if FileNames.exists(socket) && !FileNames.isSocket(socket) {
                    throw QcowPressError.invalidArgument("\(socket): exists and is not a socket")
                }
                try server.listen(unixSocket: socket)
                urls = set.names.map { ($0, "\(tls == nil ? "nbd" : "nbds")+unix:///\($0)?socket=\(socket)") }
            } else if let (host, port) = parsed {
                let bare = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
                let bound = try server.listen(host: bare, port: port)
                let scheme = tls == nil ? "nbd" : "nbds"
                urls = set.names.map { ($0, "\(scheme)://\(host):\(bound)/\($0)") }
            } else {
                urls = []
            }
        } catch let e as QcowPressError {
            server.shutdown()
            throw e
        } catch {
            server.shutdown()
            throw .invalidArgument("cannot listen on \(socket ?? listen ?? ""): \(error)")
        }
    }

    /// Connections so far, open now, and requests served.
    public var counts: (connections: Int, open: Int, requests: Int) { server.counts }

    /// Returns once no client is connected (at once when none is).
    public func waitUntilNoConnections() { server.waitUntilNoConnections() }

    /// Stops offering `export` to new clients (those connected to it go on).
    public func withdraw(export: String) { server.withdraw(export: export) }

    /// Stops serving and removes the unix socket.
    public func shutdown() {
        server.shutdown()
        if let socket { FileNames.unlink(socket) }
    }
}
