import ArgumentParser
import DirectIO
import Foundation
import NBDServer
import NIOCore
import QcowPress
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
    @Option(name: .customShort("f"), help: ArgumentHelp("Format of every FILE: raw or qcow2 (detected by magic when absent).", valueName: "format"))
    var format: String?
    @Option(name: .customLong("cache-size"), help: ArgumentHelp("Memory for decoded qcow2 clusters, shared by every export and client (0 for none).", valueName: "size"))
    var cacheSize: String = "256M"
    @Argument(help: ArgumentHelp("Images to serve; each export is named after its file's base name.", valueName: "file"), completion: .file())
    var files: [String]

    func validate() throws {
        try validateListen(socket, listen)
        guard !files.isEmpty else { throw ValidationError("name at least one FILE") }
        if let format, format != "raw" && format != "qcow2" { throw ValidationError("-f takes raw or qcow2") }
    }

    func run() throws {
        var exports: [any NBDExport] = []
        var names = Set<String>()
        let bytes = try parseSize(cacheSize, what: "--cache-size")
        let cache = bytes > 0 ? BlockCache(capacity: Int(bytes)) : nil
        for f in files {
            let detected = try RawImageReader.detectFormat(path: f)
            if format == "qcow2" && detected != "qcow2" { throw notQcow2(f) }
            let image = try openImage(f, format: format ?? detected, openBacking: true)
            let name = (f as NSString).lastPathComponent
            guard names.insert(name).inserted else { throw QcowPressError.invalidArgument("\(f): a second export named '\(name)'") }
            // Raw files are cached by the kernel's page cache; qcow2 clusters are decoded here.
            exports.append(ImageExport(name: name, image: image, cache: (image as? Qcow2Image).flatMap { q in cache.map { ($0, q.geometry.clusterSize) } }))
        }
        try serveForever(exports, socket: socket, listen: listen)
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
    @Option(name: .customLong("cache-size"), help: ArgumentHelp("Memory for decoded chunks, shared by every export and client.", valueName: "size"))
    var cacheSize: String = "256M"
    @Argument(help: ArgumentHelp("The snapshot, e.g. vm/100/2026-11-20T10:00:00Z.", valueName: "snapshot"))
    var snapshot: String
    @Argument(help: ArgumentHelp("Archives to serve (drive-scsi0.img.fidx, \".img.fidx\" optional); all when none.", valueName: "archive"))
    var archives: [String] = []

    func validate() throws { try validateListen(socket, listen) }

    func run() throws {
        let restore = try pbs.resolve().open(snapshot: snapshot)
        let names = archives.isEmpty ? restore.archives.map(\.name) : archives.map { $0.hasSuffix(".fidx") || $0.hasSuffix(".img") ? $0 : $0 + ".img.fidx" }
        let indexes = try names.map { n throws(QcowPressError) in (n, try restore.openArchive(n)) }
        let cache = PBSChunkCache(reader: restore.reader, capacity: try parseSize(cacheSize, what: "--cache-size"), indexes: indexes.map(\.1))
        let exports: [any NBDExport] = indexes.map { n, idx in
            PBSExport(view: PBSArchiveView(name: PBSRestore.driveName(n), index: idx, cache: cache))
        }
        // At the stop, what the cache did (one line on stderr: stdout holds only the URLs).
        SignalWatcher.onExit {
            let s = cache.stats
            writeStderr("qcowpress serve: \(s.loads) chunk loads, \(s.hits) cache hits\n")
        }
        try serveForever(exports, socket: socket, listen: listen)
    }
}

func validateListen(_ socket: String?, _ listen: String?) throws {
    guard (socket == nil) != (listen == nil) else { throw ValidationError("give one of --socket PATH or --listen ADDR:PORT") }
}

/// Listens (a unix socket, removed at a signal, or TCP) and prints one URL per export on stdout,
/// flushed at once.
func startServer(_ exports: [any NBDExport], socket: String?, listen: String?) throws -> NBDServer {
    // 16 pool threads, one connection's whole in-flight window (NBDServerCore.maxInFlight): the
    // requests of one connection that wait on one chunk's load cannot hold every thread while
    // another connection's chunk is cached. Not faster on 2 cores in bench/nbd_bench.py (serve
    // pbs + nbdcopy within noise of 4 threads); threads that wait cost no CPU.
    let server = NBDServer(exports: exports, ioThreads: 16)
    var urls: [String] = []
    do {
        if let socket {
            try server.listen(unixSocket: socket)
            urls = exports.map { "nbd+unix:///\($0.name)?socket=\(socket)" }
            SignalWatcher.onExit { unlink(socket) }
        } else if let listen {
            guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]) else {
                throw QcowPressError.invalidArgument("--listen \(listen): expected ADDR:PORT")
            }
            let host = String(listen[..<colon])
            let bound = try server.listen(host: host, port: port)
            urls = exports.map { "nbd://\(host):\(bound)/\($0.name)" }
        }
    } catch let e as QcowPressError {
        throw e
    } catch {
        throw QcowPressError.invalidArgument("cannot listen on \(socket ?? listen ?? ""): \(error)")
    }
    for u in urls { print(u) }
    fflush(nil)  // every stream: the URLs must reach a pipe at once
    return server
}

/// Serves until SIGINT or SIGTERM, which end the process with status 0 and remove the socket.
func serveForever(_ exports: [any NBDExport], socket: String?, listen: String?) throws -> Never {
    _ = try startServer(exports, socket: socket, listen: listen)
    SignalWatcher.exitStatusOnSignal = 0
    while true { pause() }
}

/// A PBS archive as a read-only NBD export: reads through the shared chunk cache; block status
/// reports the all-zero chunks as holes (known from the index, never loaded).
final class PBSExport: NBDExport, @unchecked Sendable {
    let view: PBSArchiveView
    var name: String { view.name }
    var size: UInt64 { view.size }
    var isReadOnly: Bool { true }
    init(view: PBSArchiveView) { self.view = view }

    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawBufferPointer) throws(NBDError) {
        do throws(QcowPressError) { try view.read(at: offset, count: count, into: into) } catch { throw NBDError.io(error.message) }
    }

    /// A read inside one chunk is a slice of the cached chunk, sent without a copy.
    func readBuffer(at offset: UInt64, count: Int) throws(NBDError) -> ByteBuffer? {
        do throws(QcowPressError) { return try view.slice(at: offset, count: count) } catch { throw NBDError.io(error.message) }
    }

    func readNow(at offset: UInt64, count: Int) -> ByteBuffer? { view.cachedSlice(at: offset, count: count) }

    func read(at offset: UInt64, count: Int, then: @escaping @Sendable (Result<ByteBuffer, NBDError>) -> Void) -> Bool {
        view.slice(at: offset, count: count) { r in then(r.mapError { NBDError.io($0.message) }) }
    }

    func blockStatus(at offset: UInt64, length: UInt64) throws(NBDError) -> [(length: UInt64, flags: UInt32)] {
        let cs = UInt64(view.index.chunkSize)
        return NBD.extents(from: offset, to: min(offset + length, size), granule: cs) { at, _ in
            let i = Int(at / cs)
            return i >= view.index.chunkCount || view.isZeroChunk(i)
        }
    }
}

/// A guest image as a read-only NBD export: reads through the image reader (any qcow2 it reads,
/// backing chains included); block status reports holes where the reader knows the guest reads
/// zeros without reading data (raw holes, zero or unallocated qcow2 clusters).
final class ImageExport: NBDExport, @unchecked Sendable {
    let name: String
    let image: any GuestImage
    var size: UInt64 { image.virtualSize }
    var isReadOnly: Bool { true }
    /// Per-request reader scratch, reused (a context is not shared by two requests at once).
    private let lock = NSLock()
    private var contexts: [ReadContext] = []
    /// Block status looks at 64 KiB at a time and answers for at most 1 GiB per request (the
    /// client asks again for the rest, as the protocol allows).
    static let granule: UInt64 = 64 << 10
    static let maxStatus: UInt64 = 1 << 30

    /// The shared cache of decoded clusters and this image's cluster size (qcow2 images).
    let cache: (BlockCache, Int)?

    init(name: String, image: any GuestImage, cache: (BlockCache, Int)? = nil) {
        self.name = name
        self.image = image
        self.cache = cache
    }

    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawBufferPointer) throws(NBDError) {
        let ctx = lock.withLock { contexts.popLast() } ?? ReadContext()
        defer { lock.withLock { contexts.append(ctx) } }
        do throws(QcowPressError) {
            if let cache {
                try cache.0.read(image, blockSize: cache.1, at: offset, count: count, into: into.baseAddress!, context: ctx)
            } else {
                try image.read(at: offset, count: count, into: into.baseAddress!, context: ctx)
            }
        } catch {
            throw NBDError.io(error.message)
        }
    }

    func blockStatus(at offset: UInt64, length: UInt64) throws(NBDError) -> [(length: UInt64, flags: UInt32)] {
        do throws(QcowPressError) {
            return try NBD.extents(from: offset, to: min(offset + min(length, Self.maxStatus), size), granule: Self.granule) {
                (at, next) throws(QcowPressError) in try image.isKnownZero(at: at, count: Int(next - at))
            }
        } catch {
            throw NBDError.io(error.message)
        }
    }
}

extension RestorePBS {
    /// `restore pbs --live PATH`: every drive is served over NBD before the first chunk is
    /// restored; reads load what they need ahead of the restore (written from the same load); once
    /// every drive is complete, serving goes on until the last client disconnects.
    func runLive(_ restore: PBSRestore, jobs: [(archive: String, destination: String)], encoder eo: EncoderOptions,
                 options: PBSRestore.Options, socket: String) throws {
        var nodes: [String: String] = [:]
        for n in node {
            guard let eq = n.firstIndex(of: "="), eq != n.startIndex else { throw QcowPressError.invalidArgument("--node \(n): expected EXPORT=NODE") }
            nodes[String(n[..<eq])] = String(n[n.index(after: eq)...])
        }
        if qmp != nil && nodes.isEmpty { throw QcowPressError.invalidArgument("--qmp needs at least one --node EXPORT=NODE") }
        if qmp == nil && !nodes.isEmpty { throw QcowPressError.invalidArgument("--node needs --qmp") }
        let live = try PBSLiveRestore(restore, jobs: jobs, encoder: eo, options: options)
        for e in nodes.keys where !live.drives.contains(where: { $0.name == e }) {
            throw QcowPressError.invalidArgument("--node \(e)=…: no export named '\(e)' (exports: \(live.drives.map(\.name).joined(separator: ", ")))")
        }
        for d in live.drives { watch(d.encoderForSignals) }
        let server = try startServer(live.drives.map { LiveExport(drive: $0) }, socket: socket, listen: nil)
        let switcher = qmp.map { QMPSwitcher(qmp: $0, nodes: nodes, server: server) }
        let bar = encoder.progress ? ProgressBar(total: live.totalBytes, label: "live") { live.bytesDone } : nil
        let summaries: [PBSRestore.Summary]
        do {
            // Each drive is switched as soon as it is complete, while the next one is restored.
            summaries = try live.run(driveDone: { d, _ in switcher?.enqueue(d) },
                                     keep: { d in switcher?.stopAndReportSwitched().contains(d.name) ?? false })
            bar?.stop()
            try switcher?.finish()
        } catch {
            bar?.stop()
            _ = switcher?.stopAndReportSwitched()
            server.shutdown()
            unlink(socket)
            throw error
        }
        // Complete: serve until every client is gone (QEMU left the switched exports already).
        while server.counts.open > 0 { usleep(100_000) }
        server.shutdown()
        unlink(socket)
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
            print(try encodeJSON(Live(drives: summaries, chunksServed: live.drives.reduce(0) { $0 + $1.chunksServed },
                                      chunksServedAheadOfOrder: live.drives.reduce(0) { $0 + $1.chunksAheadOfOrder },
                                      nbdRequests: server.counts.requests, cacheHits: c.hits, cacheLoads: c.loads,
                                      readsFromImage: live.drives.reduce(0) { $0 + $1.readsFromImage },
                                      switched: switcher.map { s in live.drives.map(\.name).filter { s.switched.contains($0) } })))
        }
    }
}

/// A drive being restored as a read-only NBD export.
final class LiveExport: NBDExport, @unchecked Sendable {
    let drive: PBSLiveRestore.Drive
    let pbs: PBSExport
    var name: String { drive.name }
    var size: UInt64 { drive.size }
    var isReadOnly: Bool { true }
    init(drive: PBSLiveRestore.Drive) {
        self.drive = drive
        pbs = PBSExport(view: drive.view)
    }
    func read(at offset: UInt64, count: Int, into: UnsafeMutableRawBufferPointer) throws(NBDError) {
        do throws(QcowPressError) { try drive.read(at: offset, count: count, into: into) } catch { throw NBDError.io(error.message) }
    }
    func readNow(at offset: UInt64, count: Int) -> ByteBuffer? { drive.cachedSlice(at: offset, count: count) }
    func blockStatus(at offset: UInt64, length: UInt64) throws(NBDError) -> [(length: UInt64, flags: UInt32)] {
        try pbs.blockStatus(at: offset, length: length)
    }
}

/// Switches QEMU's nodes onto restored images one drive at a time, on a thread of its own, so the
/// next drive is restored while QEMU is waited for. For each drive with a `--node`: waits for
/// QEMU's QMP socket and the node (QEMU may start after qcowpress; up to 10 minutes), switches the
/// node onto the image, then stops offering the drive's export to new NBD clients. The first
/// failure stops it (QEMU's block graph is then in a state it cannot reason about).
final class QMPSwitcher: @unchecked Sendable {
    let qmp: String
    let nodes: [String: String]
    let server: NBDServer
    private let lock = ConditionLock()
    private var queue: [PBSLiveRestore.Drive] = []
    private var busy = false
    private var stopped = false
    private var failure: (any Error)?
    private var done: Set<String> = []

    init(qmp: String, nodes: [String: String], server: NBDServer) {
        self.qmp = qmp
        self.nodes = nodes
        self.server = server
        // The loop holds the switcher until it returns (stopped, finished or failed).
        startThread(name: "qp-qmp") { self.loop() }
    }

    /// Drives whose node reads the restored image now.
    var switched: Set<String> { lock.withLock { done } }

    func enqueue(_ d: PBSLiveRestore.Drive) {
        guard nodes[d.name] != nil else { return }
        lock.withLock {
            queue.append(d)
            lock.broadcast()
        }
    }

    /// Waits for every queued switch; throws the first failure.
    func finish() throws {
        let f: (any Error)? = lock.withLock {
            while (!queue.isEmpty || busy) && failure == nil { lock.wait() }
            while busy { lock.wait() }
            stopped = true
            lock.broadcast()
            return failure
        }
        if let f { throw f }
    }

    /// Drops what is queued, waits for a switch under way, and says which drives were switched.
    func stopAndReportSwitched() -> Set<String> {
        lock.withLock {
            stopped = true
            queue.removeAll()
            lock.broadcast()
            while busy { lock.wait() }
            return done
        }
    }

    private func loop() {
        var client: QMPClient?
        while true {
            let d: PBSLiveRestore.Drive? = lock.withLock {
                while queue.isEmpty && !stopped { lock.wait() }
                if stopped || failure != nil { return nil }
                busy = true
                return queue.removeFirst()
            }
            guard let d else { return }
            do {
                let deadline = Date().addingTimeInterval(600)
                while client == nil {
                    client = try? QMPClient(path: qmp)
                    if client == nil {
                        guard Date() < deadline, !isStopped else { throw QcowPressError.invalidArgument("\(qmp): no QMP server answered within 10 minutes") }
                        usleep(200_000)
                    }
                }
                let target = nodes[d.name]!
                while try !client!.hasNode(target) {
                    guard Date() < deadline, !isStopped else { throw QcowPressError.invalidArgument("QMP: node '\(target)' did not appear within 10 minutes") }
                    usleep(200_000)
                }
                let path = d.destination.hasPrefix("/") ? d.destination : FileManager.default.currentDirectoryPath + "/" + d.destination
                try client!.switchBacking(node: target, to: path, newNode: "qcowpress-\(d.name)")
                server.withdraw(export: d.name)
                writeStderr("qcowpress: \(target) now reads \(path)\n")
                lock.withLock {
                    done.insert(d.name)
                    busy = false
                    lock.broadcast()
                }
            } catch {
                lock.withLock {
                    failure = error
                    busy = false
                    lock.broadcast()
                }
                return
            }
        }
    }

    private var isStopped: Bool { lock.withLock { stopped } }
}
