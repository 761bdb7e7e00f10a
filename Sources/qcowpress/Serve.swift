import ArgumentParser
import DirectIO
import Foundation
import NBDExports
import QcowPress
import QEMUControl
import Synchronization

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve images read-only over NBD.",
        subcommands: [ServeImage.self, ServePBS.self])
}

struct ServeImage: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image",
        abstract: "Serve raw or qcow2 images (any kind qemu-img makes) read-only over NBD until SIGINT/SIGTERM.")

    @Option(help: ArgumentHelp("Unix socket to listen on.", valueName: "path"), completion: .file())
    var socket: String?
    @Option(help: ArgumentHelp("TCP address to listen on.", valueName: "addr:port"))
    var listen: String?
    @OptionGroup(title: "Over TCP") var tcp: ServeSecurityArguments
    @Option(name: .customShort("f"), help: ArgumentHelp("Format of every FILE: \(ImageFormat.readable.joined(separator: ", ")) (probed by magic when absent).", valueName: "format"))
    var format: String?
    @Option(name: .customLong("cache-size"), help: ArgumentHelp("Memory for decoded qcow2 clusters, shared by every export and client (0 for none).", valueName: "size"))
    var cacheSize: String = "256M"
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: "Serve an image another process has open for writing, as qemu-img -U (with a warning: what clients read may change underneath).")
    var forceShare = false
    @Argument(help: ArgumentHelp("Images to serve; each export is named after its file's base name.", valueName: "file"), completion: .file())
    var files: [String]

    func validate() throws {
        try validateListen(socket, listen)
        guard !files.isEmpty else { throw ValidationError("name at least one FILE") }
        if let format, !ImageFormat.readable.contains(format) { throw ValidationError("-f takes \(ImageFormat.readable.joined(separator: ", "))") }
    }

    func run() throws {
        // Locked for as long as they are served (until the signal ends the process).
        let locks = try lockForReading(files.map { ($0, true) }, forceShare: forceShare)
        for p in locks.inUseForWriting {
            writeStderr("qcowpress: warning: \(p): open for writing by another process; served anyway (-U): the data may change underneath\n")
        }
        holdUntilExit(locks)
        var images: [(path: String, image: any GuestImage)] = []
        for f in files {
            let detected = try ImageFormat.resolve(path: f, given: format)
            if format == "qcow2" && detected != "qcow2" { throw notQcow2(f) }
            images.append((f, try openImage(f, format: format ?? detected, openBacking: true)))
        }
        try serveForever(try ExportSet.images(images, cacheBytes: try parseSize(cacheSize, what: "--cache-size")), socket: socket, listen: listen, security: tcp.security)
    }
}

struct ServePBS: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pbs",
        abstract: "Serve the disk archives of a PBS snapshot read-only over NBD through one shared chunk cache, until SIGINT/SIGTERM.")

    @OptionGroup var pbs: PBSSourceArguments
    @Option(help: ArgumentHelp("Unix socket to listen on.", valueName: "path"), completion: .file())
    var socket: String?
    @Option(help: ArgumentHelp("TCP address to listen on.", valueName: "addr:port"))
    var listen: String?
    @OptionGroup(title: "Over TCP") var tcp: ServeSecurityArguments
    @Option(name: .customLong("cache-size"), help: ArgumentHelp("Memory for decoded chunks, shared by every export and client.", valueName: "size"))
    var cacheSize: String = "256M"
    @Option(help: ArgumentHelp("With --s3: requests in flight (default 32).", valueName: "n"))
    var streams: Int?
    @Argument(help: ArgumentHelp("The snapshot, e.g. vm/100/2026-11-20T10:00:00Z.", valueName: "snapshot"))
    var snapshot: String
    @Argument(help: ArgumentHelp("Archives to serve (drive-scsi0.img.fidx, \".img.fidx\" optional); all when none.", valueName: "archive"))
    var archives: [String] = []

    func validate() throws { try validateListen(socket, listen) }

    func run() throws {
        let restore = try pbs.resolve(streams: streams).open(snapshot: snapshot)
        let set = try ExportSet.pbs(restore, archives: archives, cacheBytes: try parseSize(cacheSize, what: "--cache-size"))
        // At the stop, what the cache did (one line on stderr: stdout holds only the URLs).
        if let report = set.report { SignalWatcher.onExit { writeStderr("qcowpress serve: \(report())\n") } }
        try serveForever(set, socket: socket, listen: listen, security: tcp.security)
    }
}

func validateListen(_ socket: String?, _ listen: String?) throws {
    guard (socket == nil) != (listen == nil) else { throw ValidationError("give one of --socket PATH or --listen ADDR:PORT") }
}

/// Prints one URL per export on stdout, flushed at once (a script waits for them to connect).
/// With `json`, stdout carries JSON only: each URL is a line `{"export":NAME,"uri":URL}` (the
/// command's summary follows as one more line).
func printURLs(_ urls: [(export: String, uri: String)], json: Bool) throws {
    for u in urls {
        if json {
            struct Announced: Encodable { var export: String; var uri: String }
            print(try encodeJSONLine(Announced(export: u.export, uri: u.uri)))
        } else {
            print(u.uri)
        }
    }
    fflush(nil)  // every stream: the URLs must reach a pipe at once
}

/// Listens (a unix socket, removed at a signal, or TCP) and prints the URLs.
func startServer(_ set: ExportSet, socket: String?, listen: String?, security: ServerSecurity = ServerSecurity(), json: Bool = false) throws -> ExportServer {
    // Clients refused (their address and why) and warnings: one line each on stderr.
    let server = try ExportServer(set, socket: socket, listen: listen, security: security) { writeStderr("qcowpress serve: \($0)\n") }
    if let socket { SignalWatcher.onExit { FileNames.unlink(socket) } }
    try printURLs(server.urls, json: json)
    return server
}

/// Serves until SIGINT or SIGTERM, which end the process with status 0 and remove the socket.
func serveForever(_ set: ExportSet, socket: String?, listen: String?, security: ServerSecurity) throws -> Never {
    // Before the URLs are printed: a client (or a script) that stops the server as soon as it
    // reads them gets status 0, never 143 (it was set after printing, a race tests lost).
    SignalWatcher.exitStatusOnSignal = 0
    _ = try startServer(set, socket: socket, listen: listen, security: security)
    while true { pause() }
}

extension RestorePBS {
    /// `restore pbs --live PATH`: every drive is served over NBD before the first chunk is
    /// restored; reads load what they need ahead of the restore (written from the same load); once
    /// every drive is complete, serving goes on until the last client disconnects. The images
    /// appear together at the end (a drive QEMU is switched onto, when it is complete); after a
    /// failure every destination is as it was, except drives QEMU was switched onto.
    func runLive(_ live: PBSLiveRestore, socket: String) throws {
        var nodes: [String: String] = [:]
        let server: ExportServer
        do {
            for n in node {
                guard let eq = n.firstIndex(of: "="), eq != n.startIndex else { throw QcowPressError.invalidArgument("--node \(n): expected EXPORT=NODE") }
                nodes[String(n[..<eq])] = String(n[n.index(after: eq)...])
            }
            if qmp != nil && nodes.isEmpty { throw QcowPressError.invalidArgument("--qmp needs at least one --node EXPORT=NODE") }
            if qmp == nil && !nodes.isEmpty { throw QcowPressError.invalidArgument("--node needs --qmp") }
            for e in nodes.keys where !live.drives.contains(where: { $0.name == e }) {
                throw QcowPressError.invalidArgument("--node \(e)=…: no export named '\(e)' (exports: \(live.drives.map(\.name).joined(separator: ", ")))")
            }
            for d in live.drives { watch(d.encoderForSignals) }
            server = try startServer(.live(live), socket: socket, listen: nil, json: encoder.output == .json)
        } catch {
            live.cancel()
            throw error
        }
        let switcher = qmp.map { socket in
            QMPSwitcher(socket: socket, nodes: nodes, timeout: .seconds(qmpTimeout)) { export, node, image in
                server.withdraw(export: export)  // new NBD clients no longer see a drive QEMU left
                writeStderr("qcowpress: \(node) now reads \(image)\n")
            }
        }
        ProgressReport.follow(total: live.totalBytes) { live.bytesDone }
        let bar = encoder.progress ? ProgressBar(total: live.totalBytes, label: "live") { live.bytesDone } : nil
        let summaries: [PBSRestore.Summary]
        do {
            // Each drive is switched as soon as it is complete, while the next one is restored.
            summaries = try live.run(commitEarly: Set(nodes.keys), driveDone: { d, _ in switcher?.enqueue(export: d.name, image: d.destination) },
                                     keep: { d in switcher?.stopAndReportSwitched().contains(d.name) ?? false })
            bar?.stop()
            try switcher?.finish()
        } catch {
            bar?.stop()
            _ = switcher?.stopAndReportSwitched()
            server.shutdown()
            throw error
        }
        // Complete: serve until every client is gone (QEMU left the switched exports already).
        server.waitUntilNoConnections()
        server.shutdown()
        if encoder.output == .json {
            struct Live: Encodable {
                var drives: [PBSRestore.Summary]
                var chunksServed: Int
                var chunksServedAheadOfOrder: Int
                var nbdRequests: Int
                var cacheHits: Int
                var cacheLoads: Int
                var readsFromImage: Int
                var switched: [String]?
            }
            let c = live.cache.stats
            // One line: stdout is JSON lines here (the URLs came first).
            print(try encodeJSONLine(Live(drives: summaries, chunksServed: live.drives.reduce(0) { $0 + $1.chunksServed },
                                          chunksServedAheadOfOrder: live.drives.reduce(0) { $0 + $1.chunksAheadOfOrder },
                                          nbdRequests: server.counts.requests, cacheHits: c.hits, cacheLoads: c.loads,
                                          readsFromImage: live.drives.reduce(0) { $0 + $1.readsFromImage },
                                          switched: switcher.map { s in live.drives.map(\.name).filter { s.switched.contains($0) } })))
        }
    }
}
