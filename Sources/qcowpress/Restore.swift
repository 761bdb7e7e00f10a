import ArgumentParser
import enum DirectIO.Terminal
import Foundation
import QcowPress

struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Restore disk images from backups into qcow2.",
                                                    subcommands: [RestorePBS.self, RestoreVMA.self])
}

struct RestorePBS: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "pbs", abstract: "Restore from a Proxmox Backup Server datastore: a local directory or a server.")

    @OptionGroup var pbs: PBSSourceArguments
    @Flag(help: "List the snapshot's disk archives with their sizes; with a group (vm/100) instead of a snapshot, its snapshots.")
    var list = false
    @Flag(name: .customLong("verify-only"), help: "Read and verify every chunk of the archive (or of all archives); write nothing.")
    var verifyOnly = false
    @Option(help: ArgumentHelp("Restore every drive into this directory, one qcow2 each.", valueName: "outdir"), completion: .directory)
    var all: String?
    @Option(help: ArgumentHelp("Chunk loader threads (default: 4 per core, at most 16).", valueName: "n"))
    var loaders: Int?
    @Flag(name: .customLong("no-dedup"), help: "Write repeated chunks again instead of sharing their clusters.")
    var noDedup = false
    @Option(name: .customLong("chunk-cache"), help: ArgumentHelp("Memory for chunks used more than once (default 64M; with --live 128M, for every chunk clients may read again, added to the memory limit).", valueName: "size"))
    var chunkCache: String?
    @Option(help: ArgumentHelp("With --repository or --s3: chunk requests in flight (default 32, lowered to fit the memory limit).", valueName: "n"))
    var streams: Int?
    @Option(help: ArgumentHelp("Serve every drive over NBD on this unix socket while it is restored (live restore).", valueName: "path"))
    var live: String?
    @Option(help: ArgumentHelp("With --live: QEMU's QMP socket, to switch its block nodes onto the restored images.", valueName: "path"))
    var qmp: String?
    @Option(name: .customLong("qmp-timeout"), help: ArgumentHelp("With --qmp: seconds QEMU may take to answer each QMP exchange (default 30). Waiting for the socket and the node to appear is separate (up to 10 minutes).", valueName: "seconds"),
            transform: { s in
                guard let v = Double(s), v > 0, v <= 86400 else { throw ValidationError("expected a number of seconds greater than 0") }
                return v
            })
    var qmpTimeout: Double = 30
    @Option(help: ArgumentHelp("With --qmp: the QEMU node (an overlay backed by the live export) to switch when EXPORT is restored.", valueName: "export=node"))
    var node: [String] = []
    @OptionGroup var encoder: EncoderArguments
    @Argument(help: ArgumentHelp("The snapshot, e.g. vm/100/2026-11-20T10:00:00Z (with --list, a group such as vm/100 lists its snapshots; none lists the namespace's namespaces and groups).", valueName: "snapshot"))
    var snapshot: String?
    @Argument(help: ArgumentHelp("The disk archive, e.g. drive-scsi0.img.fidx (\".fidx\" optional).", valueName: "archive"))
    var archive: String?
    @Argument(help: "Destination qcow2.", completion: .file())
    var destination: String?

    func run() throws {
        boundMallocForManyImages()
        let source = try pbs.resolve(streams: streams)
        guard let snapshot else {
            // A namespace (the root without --ns): its child namespaces and backup groups.
            guard list else { throw QcowPressError.invalidArgument("restore pbs needs SNAPSHOT (or --list alone for the namespace's groups)") }
            let c = try source.contents()
            if encoder.output == .json {
                struct Contents: Encodable { var namespaces: [String]; var groups: [String] }
                print(try encodeJSON(Contents(namespaces: c.namespaces, groups: c.groups)))
            } else {
                for n in c.namespaces { print("ns \(n)") }
                for g in c.groups { print(g) }
            }
            return
        }
        if list && snapshot.split(separator: "/").count == 2 {
            // A group (vm/100): its snapshots.
            let snaps = try source.snapshots(group: snapshot)
            if encoder.output == .json { print(try encodeJSON(snaps)) } else { for s in snaps { print(s) } }
            return
        }
        let restore = try source.open(snapshot: snapshot)
        if list {
            if encoder.output == .json {
                struct Archive: Encodable { var name: String; var size: UInt64 }
                print(try encodeJSON(restore.archives.map { Archive(name: $0.name, size: $0.size) }))
            } else {
                for a in restore.archives { print("\(a.name)\t\(a.size)") }
            }
            return
        }
        if verifyOnly {
            let names = archive.map { [$0] } ?? restore.archives.map(\.name)
            let v = try restore.verify(names, loaders: loaders ?? PBSRestore.Options().loaders)
            if encoder.output == .json {
                print(try encodeJSON(v))
            } else {
                let mbs = v.seconds > 0 ? Double(v.bytes) / v.seconds / 1e6 : 0
                print("verified \(v.chunks) chunks (\(v.bytes) bytes) of \(v.archives) archives in \(v.seconds) s (\(Int(mbs)) MB/s)")
            }
            return
        }
        let eo = try encoder.encoderOptions(virtualSize: 0)
        var ro = PBSRestore.Options()
        if let loaders { ro.loaders = loaders }
        if let streams {
            guard streams >= 1 else { throw QcowPressError.invalidArgument("--streams \(streams): must be at least 1") }
            ro.streams = streams
        }
        ro.dedup = !noDedup
        if let c = chunkCache { ro.cacheBytes = try parseSize(c, what: "--chunk-cache") }
        if let live {
            // Clients read what the restore has loaded: a larger cache spares loads. 128M: a whole-
            // disk copy (nbdcopy, 4 connections) during the restore of a 3 GiB disk loaded 1.66×
            // the distinct chunks with the 32M a restore gets, 1.16-1.22× with 128M, and took
            // 0.9-1.0× the restore's time instead of 1.25-1.75× (bench/nbd_bench.py).
            var eo = eo
            if chunkCache == nil {
                ro.cacheBytes = 128 << 20
                if encoder.memoryLimit == nil { eo.memoryLimit += 128 << 20 }
            }
            eo.overwrite = encoder.force
            let liveRestore: PBSLiveRestore
            if let all {
                guard archive == nil, destination == nil else { throw QcowPressError.invalidArgument("--all OUTDIR takes no ARCHIVE or DST") }
                warnAboutLeftovers(in: all)
                liveRestore = try PBSLiveRestore(restore, allInto: all, encoder: eo, options: ro)
            } else {
                guard let archive, let destination else {
                    throw QcowPressError.invalidArgument("restore pbs --live needs SNAPSHOT ARCHIVE DST or --all OUTDIR")
                }
                warnAboutLeftovers(besides: destination)
                liveRestore = try PBSLiveRestore(restore, jobs: [(archive, destination)], encoder: eo, options: ro)
            }
            try runLive(liveRestore, socket: live)
            return
        }
        var bar: ProgressBar? = nil
        let drivesProgress = DriveSequenceProgress(total: all == nil ? nil : restore.archives.reduce(0) { $0 + (($1.size + 511) & ~511) })
        let started = { (enc: Qcow2Encoder, ordered: OrderedProgress) in
            watch(enc)
            drivesProgress.started(ordered)
            bar?.stop()
            bar = encoder.progress ? ProgressBar(total: ordered.total, label: all != nil ? (enc.destination as NSString).lastPathComponent : "") { ordered.bytesDone } : nil
        }
        let summaries: [PBSRestore.Summary]
        if let all {
            guard archive == nil, destination == nil else {
                throw QcowPressError.invalidArgument("--all OUTDIR takes no ARCHIVE or DST")
            }
            warnAboutLeftovers(in: all)
            summaries = try restore.restoreAll(into: all, overwrite: encoder.force, encoder: eo, options: ro, started: started).images
        } else {
            guard let archive, let destination else {
                throw QcowPressError.invalidArgument("restore pbs needs SNAPSHOT ARCHIVE DST (or --list, or --all OUTDIR)")
            }
            warnAboutLeftovers(besides: destination)
            summaries = try restore.restore([(archive, destination)], encoder: eo, options: ro, started: started)
        }
        bar?.stop()
        if encoder.output == .json {
            print(try encodeJSON(summaries.count == 1 && all == nil ? AnyEncodable(summaries[0]) : AnyEncodable(summaries)))
        }
    }
}

/// Where a PBS snapshot is (`--datastore DIR`, or `--repository REPO` / `PBS_REPOSITORY`) and how
/// to read it: the options `restore pbs` and `serve pbs` share.
struct PBSSourceArguments: ParsableArguments {
    @Option(help: ArgumentHelp("The datastore directory.", valueName: "dir"), completion: .directory)
    var datastore: String?
    @Option(help: ArgumentHelp("A Proxmox Backup Server: [[USER@REALM[!TOKEN]@]HOST[:PORT]:]DATASTORE (default PBS_REPOSITORY; secret from PBS_PASSWORD, certificate fingerprint from PBS_FINGERPRINT).", valueName: "repo"))
    var repository: String?
    @Option(help: ArgumentHelp("A PBS 4 datastore on S3-compatible object storage, read from the bucket (no PBS server).", valueName: "s3://bucket/datastore"))
    var s3: String?
    @Option(help: ArgumentHelp("With --s3: https://host[:port] or http://host:port (default the AWS endpoint of the region).", valueName: "url"))
    var endpoint: String?
    @Option(help: ArgumentHelp("With --s3: the region (default us-west-1, as PBS).", valueName: "region"))
    var region: String?
    @Flag(name: .customLong("path-style"), help: "With --s3: path-style addressing (host/bucket/key) instead of virtual-hosted style.")
    var pathStyle = false
    @Option(name: .customLong("s3-fingerprint"), help: ArgumentHelp("With --s3: the SHA-256 fingerprint of the endpoint's certificate, trusted instead of the system CAs.", valueName: "sha256"))
    var s3Fingerprint: String?
    @Option(name: .customLong("s3-credentials"), help: ArgumentHelp("With --s3: a file of two lines, access key id and secret (default AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN).", valueName: "file"), completion: .file())
    var s3Credentials: String?
    @Option(help: ArgumentHelp("Namespace (a/b).", valueName: "ns"))
    var ns: String?
    @Option(help: ArgumentHelp("Key file of an encrypted backup.", valueName: "file"), completion: .file())
    var keyfile: String?
    @Option(name: .customLong("password-file"), help: ArgumentHelp("File holding the key file's passphrase (and the server's password when PBS_PASSWORD is not set).", valueName: "file"), completion: .file())
    var passwordFile: String?

    /// The datastore or server these options name (a server's environment is read here).
    func resolve(streams: Int? = nil) throws -> Source {
        if [datastore != nil, repository != nil, s3 != nil].filter({ $0 }).count > 1 {
            throw QcowPressError.invalidArgument("give one of --datastore DIR, --repository REPO or --s3 s3://BUCKET/DATASTORE")
        }
        if s3 == nil, let stray = [endpoint.map { _ in "--endpoint" }, region.map { _ in "--region" }, pathStyle ? "--path-style" : nil,
                                   s3Fingerprint.map { _ in "--s3-fingerprint" }, s3Credentials.map { _ in "--s3-credentials" }].compactMap({ $0 }).first {
            throw QcowPressError.invalidArgument("\(stray) goes with --s3 s3://BUCKET/DATASTORE")
        }
        if let s3 {
            let bucket = try PBSBucket(url: s3, endpoint: endpoint, region: region, pathStyle: pathStyle, fingerprint: s3Fingerprint,
                                       credentialsFile: s3Credentials, environment: ProcessInfo.processInfo.environment,
                                       streams: streams ?? PBSRestore.Options().streams)
            return Source(options: self, datastore: nil, server: nil, bucket: bucket)
        }
        if let datastore { return Source(options: self, datastore: datastore, server: nil) }
        guard let server = try PBSServer.fromEnvironment(repository: repository, passwordFile: passwordFile) else {
            throw QcowPressError.invalidArgument("give --datastore DIR or --repository REPO (or set PBS_REPOSITORY)")
        }
        return Source(options: self, datastore: nil, server: server)
    }

    struct Source {
        let options: PBSSourceArguments
        let datastore: String?
        let server: PBSServer?
        var bucket: PBSBucket? = nil

        /// The namespace `--ns` (the root without it): child namespaces and backup groups.
        func contents() throws -> (namespaces: [String], groups: [String]) {
            if let bucket { return try PBSRestore.contents(bucket: bucket, namespace: options.ns) }
            if let datastore { return try PBSRestore.contents(datastore: datastore, namespace: options.ns) }
            throw QcowPressError.invalidArgument("--list without a group or snapshot lists a namespace of --datastore or --s3, not of a server")
        }

        func snapshots(group: String) throws -> [String] {
            if let bucket { return try PBSRestore.snapshots(bucket: bucket, namespace: options.ns, group: group) }
            if let server { return try PBSRestore.snapshots(server: server, namespace: options.ns, group: group) }
            return try PBSRestore.snapshots(datastore: datastore!, namespace: options.ns, group: group)
        }

        func open(snapshot: String) throws -> PBSRestore {
            let o = options
            let password = { () throws(QcowPressError) -> String in
                try readPassword(file: o.passwordFile, prompt: "Passphrase for \(o.keyfile ?? "key"): ")
            }
            if let bucket { return try PBSRestore(bucket: bucket, namespace: o.ns, snapshot: snapshot, keyFile: o.keyfile, password: password) }
            if let server { return try PBSRestore(server: server, namespace: o.ns, snapshot: snapshot, keyFile: o.keyfile, password: password) }
            return try PBSRestore(datastore: datastore!, namespace: o.ns, snapshot: snapshot, keyFile: o.keyfile, password: password)
        }
    }
}

struct AnyEncodable: Encodable {
    let value: any Encodable
    init(_ v: any Encodable) { value = v }
    func encode(to encoder: Encoder) throws { try value.encode(to: encoder) }
}

/// The passphrase from a file (first line) or from the terminal without echo.
func readPassword(file: String?, prompt: String) throws(QcowPressError) -> String {
    if let file {
        guard let s = try? String(contentsOfFile: file, encoding: .utf8) else {
            throw .invalidArgument("\(file): cannot read the password file")
        }
        return String(s.split(separator: "\n", omittingEmptySubsequences: false).first ?? "")
    }
    guard let p = Terminal.readPassphrase(prompt: prompt) else {
        throw .invalidArgument("the key file is protected by a passphrase: pass --password-file or run on a terminal")
    }
    return p
}

struct RestoreVMA: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vma", abstract: "Restore a vzdump VMA archive (.vma, .vma.zst, .vma.gz, or - for stdin): one qcow2 per disk plus the config files.")

    @Option(help: ArgumentHelp("Restore only this device (e.g. drive-scsi0).", valueName: "name"))
    var device: String?
    @OptionGroup var encoder: EncoderArguments
    @Argument(help: "The archive, or - for standard input.", completion: .file())
    var archive: String
    @Argument(help: "Output directory.", completion: .directory)
    var outdir: String

    func run() throws {
        boundMallocForManyImages()
        _ = try ImageOptionParser(encoder.formatOptions)
        var r = VMARestore(archive: archive, outdir: outdir)
        r.device = device
        r.overwrite = encoder.force
        warnAboutLeftovers(in: outdir)
        let eo = try encoder.encoderOptions(virtualSize: 0)
        var bar: ProgressBar? = nil
        let show = encoder.progress
        let encoders = EncodersProgress()
        let summary = try r.run(encoder: eo, started: { watch($0); encoders.add($0) }, progress: { done, total in
            // SIGUSR1: the archive read of its size; from a pipe, what the images received.
            if let total { ProgressReport.follow(total: total, done: done) }
            if show { bar = ProgressBar(total: total, done: done) }
        })
        bar?.stop()
        if encoder.output == .json { print(try encodeJSON(summary)) }
    }
}
