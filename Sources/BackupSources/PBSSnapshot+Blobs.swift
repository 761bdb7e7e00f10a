import Crypto
import Foundation

extension PBSSnapshot {
    /// The snapshot's blobs other than the manifest: the guest's config files
    /// (`qemu-server.conf.blob`, `fw.conf.blob`, `pct.conf.blob`), as listed in the manifest.
    public var configBlobs: [PBSManifest.File] {
        manifest.files.filter { $0.filename.hasSuffix(".blob") && $0.filename != "index.json.blob" }
    }

    /// Reads and decodes one blob of the snapshot: checked against the manifest (size, SHA-256 of
    /// the stored bytes), then CRC, decryption with `key` when encrypted, zstd.
    public func readBlob(_ name: String, key: PBSKey?) throws(SourceError) -> [UInt8] {
        try Self.checkComponent(name, what: "blob name")
        guard let entry = manifest.files.first(where: { $0.filename == name }) else {
            throw SourceError(.missing, path: directory, "blob '\(name)' is not in the manifest")
        }
        let path = directory + "/" + name
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw SourceError(.missing, path: path, "cannot read the blob")
        }
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
