import DirectIO
import Glibc
import Foundation

/// A snapshot in a local PBS datastore directory: `<ds>/[ns/<a>/ns/<b>/]<type>/<id>/<time>/`.
/// Every name that comes from the command line or the manifest is checked so that no path can
/// leave the datastore (no `/` inside components, no `.` or `..`).
public struct PBSSnapshot: PBSSnapshotSource {
    public let datastore: String
    public let directory: String
    public let manifest: PBSManifest
    public let manifestPath: String

    /// - Parameters:
    ///   - snapshot: `vm/100/2026-11-20T10:00:00Z`.
    ///   - namespace: `a/b` (each component becomes `ns/<component>`), or nil.
    public init(datastore: String, namespace: String?, snapshot: String) throws(SourceError) {
        self.datastore = datastore
        // nil when the path does not exist; any other failure is reported as it is.
        func kind(_ p: String) throws(SourceError) -> FileStatus.Kind? {
            do { return try FileStatus.of(path: p).kind } catch {
                if error.errno == ENOENT || error.errno == ENOTDIR { return nil }
                throw SourceError(.io, path: p, "stat failed: \(error.errnoName)", errno: error.errno)
            }
        }
        guard try kind(datastore) == .directory else {
            throw SourceError(.missing, path: datastore, "datastore directory does not exist")
        }
        guard try kind(datastore + "/.chunks") == .directory else {
            throw SourceError(.damaged, path: datastore, "not a datastore (no .chunks directory)")
        }
        var dir = datastore
        for p in try Self.checkedNamespace(namespace) { dir += "/ns/" + p }
        let parts = try Self.checkedSnapshot(snapshot)
        try Self.checkComponent(parts.time, what: "backup time")
        dir += "/" + snapshot
        guard try kind(dir) != nil else {
            throw SourceError(.missing, path: dir, "snapshot does not exist")
        }
        directory = dir
        manifestPath = dir + "/index.json.blob"
        manifest = try PBSManifest(path: manifestPath)
    }

    /// The snapshots of a backup group (`vm/100`), oldest first: the time-named directories of the
    /// group that hold a manifest, as `vm/100/2026-11-20T10:00:00Z`.
    public static func snapshots(datastore: String, namespace: String?, group: String) throws(SourceError) -> [String] {
        var dir = datastore
        for p in try checkedNamespace(namespace) { dir += "/ns/" + p }
        _ = try checkedGroup(group)
        dir += "/" + group
        let names: [String]
        do throws(IOError) { names = try FileNames.listing(dir) } catch {
            if error.errno == ENOENT || error.errno == ENOTDIR { throw SourceError(.missing, path: dir, "backup group does not exist") }
            throw SourceError(.io, path: dir, "cannot list the backup group: \(error.errnoName)", errno: error.errno)
        }
        // RFC 3339 UTC times sort as text.
        return names.filter { n in
            (try? FileStatus.of(path: dir + "/" + n + "/index.json.blob"))?.kind == .regular
        }.sorted().map { group + "/" + $0 }
    }

    /// Refuses names that could escape the datastore.
    public static func checkComponent(_ s: String, what: String) throws(SourceError) {
        guard !s.isEmpty, s != ".", s != "..", !s.contains("/"), !s.contains("\0") else {
            throw SourceError(.damaged, path: s, "\(what) '\(s)' is not a plain name")
        }
    }

    public var chunks: any PBSChunkStore { PBSDatastoreChunks(datastore: datastore) }

    public func readFile(_ name: String, limit: Int) throws(SourceError) -> [UInt8] {
        try Self.checkComponent(name, what: "file name")
        return try readSourceFile(directory + "/" + name, limit: limit, what: name.hasSuffix(".fidx") ? "fixed index" : "blob",
                                  cannotRead: name.hasSuffix(".fidx") ? "cannot read fixed index" : "cannot read the blob")
    }

    public func chunkPath(_ digest: ArraySlice<UInt8>) -> String {
        let hex = hexString(digest)
        return datastore + "/.chunks/" + hex.prefix(4) + "/" + hex
    }
}
