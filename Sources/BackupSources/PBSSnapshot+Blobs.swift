import Crypto
import Foundation

/// A snapshot of a PBS backup wherever it is: a datastore directory (``PBSSnapshot``) or a server
/// (the `PBSRemote` target). Everything read through it is checked against the manifest.
public protocol PBSSnapshotSource: Sendable {
    var manifest: PBSManifest { get }
    /// Names the manifest in errors (its path, or its URL).
    var manifestPath: String { get }
    /// Names the snapshot in errors (its directory, or its URL).
    var directory: String { get }
    /// Where its chunks are.
    var chunks: any PBSChunkStore { get }
    /// The stored bytes of a file of the snapshot (an index or a blob), at most `limit` bytes.
    func readFile(_ name: String, limit: Int) throws(SourceError) -> [UInt8]
}

extension PBSSnapshotSource {
    /// The archives of the snapshot that are disk images (`*.img.fidx`), with their sizes.
    public var images: [PBSManifest.File] {
        manifest.files.filter { $0.filename.hasSuffix(".fidx") }
    }

    /// The snapshot's blobs other than the manifest: the guest's config files
    /// (`qemu-server.conf.blob`, `fw.conf.blob`, `pct.conf.blob`), as listed in the manifest.
    public var configBlobs: [PBSManifest.File] {
        manifest.files.filter { $0.filename.hasSuffix(".blob") && $0.filename != "index.json.blob" }
    }

    /// Opens an image archive: `drive-scsi0.img.fidx` (".fidx" optional), checks its index against
    /// the manifest (size and csum).
    public func openImage(_ archive: String) throws(SourceError) -> (PBSFixedIndex, PBSManifest.File) {
        let name = archive.hasSuffix(".fidx") ? archive : archive + ".fidx"
        try PBSSnapshot.checkComponent(name, what: "archive name")
        guard let entry = manifest.files.first(where: { $0.filename == name }) else {
            let known = images.map(\.filename).joined(separator: ", ")
            throw SourceError(.missing, path: directory, "archive '\(name)' is not in the manifest (images: \(known))")
        }
        let bytes = try readFile(name, limit: PBSFixedIndex.maxFileSize)
        let index = try PBSFixedIndex(bytes: bytes, path: directory + "/" + name)
        guard index.indexCsum == entry.csum else {
            throw SourceError(.damaged, path: index.path, "index checksum does not match the manifest's csum for \(name)")
        }
        guard index.size == entry.size else {
            throw SourceError(.damaged, path: index.path, "size \(index.size) at offset 64 does not match the manifest's \(entry.size)")
        }
        return (index, entry)
    }

    /// Reads and decodes one blob of the snapshot: checked against the manifest (size, SHA-256 of
    /// the stored bytes), then CRC, decryption with `key` when encrypted, zstd.
    public func readBlob(_ name: String, key: PBSKey?) throws(SourceError) -> [UInt8] {
        try PBSSnapshot.checkComponent(name, what: "blob name")
        guard let entry = manifest.files.first(where: { $0.filename == name }) else {
            throw SourceError(.missing, path: directory, "blob '\(name)' is not in the manifest")
        }
        let path = directory + "/" + name
        let data = try readFile(name, limit: PBSBlob.maxBlobSize)
        guard UInt64(data.count) == entry.size else {
            throw SourceError(.damaged, path: path, "blob is \(data.count) bytes, the manifest says \(entry.size)")
        }
        guard Array(SHA256.hash(data: data)) == entry.csum else {
            throw SourceError(.damaged, path: path, "blob's SHA-256 does not match the manifest's csum")
        }
        var out = [UInt8](repeating: 0, count: 16 << 20)  // as the manifest: config files are small
        let k = key?.key
        let r: Result<Int, SourceError> = data.withUnsafeBytes { p in
            out.withUnsafeMutableBytes { o in
                Result { () throws(SourceError) -> Int in try PBSBlob.decode(p, into: o, key: k, path: path, what: "blob") }
            }
        }
        return Array(out[0..<(try r.get())])
    }
}
