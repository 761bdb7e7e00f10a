import DirectIO
import Glibc

/// Where the chunks of a snapshot come from: a datastore directory on this machine
/// (``PBSDatastoreChunks``) or a Proxmox Backup Server over the network (the `PBSRemote` target).
/// A store hands out the chunk's blob as stored; ``PBSChunkReader`` checks and decodes it (CRC,
/// decryption, decompression, digest) the same way whatever the store.
public protocol PBSChunkStore: Sendable {
    /// Names chunk `digest` in errors: its file, or its URL on the server.
    func location(of digest: ArraySlice<UInt8>) -> String
    /// The stored blob of chunk `digest` into `buffer` (grown as needed); returns its length.
    /// `what` names the chunk in errors (index, offset, archive).
    func fetch(_ digest: ArraySlice<UInt8>, into buffer: inout [UInt8], what: String) throws(SourceError) -> Int
    /// The chunks about to be fetched, in the order they will be asked for (each once). A remote
    /// store keeps up to `window` of them in flight ahead of the consumers; a local one ignores it.
    /// A new call replaces the previous list.
    func willFetch(_ digests: [ArraySlice<UInt8>], window: Int)
    /// True when the chunks come over the network (the restore then sizes its fetch window).
    var isRemote: Bool { get }
}

extension PBSChunkStore {
    public func willFetch(_ digests: [ArraySlice<UInt8>], window: Int) {}
    public var isRemote: Bool { false }
}

/// The `.chunks` directory of a local datastore: `<datastore>/.chunks/<first 4 hex>/<hex digest>`.
public struct PBSDatastoreChunks: PBSChunkStore {
    public let datastore: String
    public init(datastore: String) { self.datastore = datastore }

    public func location(of digest: ArraySlice<UInt8>) -> String {
        let hex = hexString(digest)
        return datastore + "/.chunks/" + hex.prefix(4) + "/" + hex
    }

    public func fetch(_ digest: ArraySlice<UInt8>, into buffer: inout [UInt8], what: String) throws(SourceError) -> Int {
        let path = location(of: digest)
        do {
            return try WholeFile.read(path: path, limit: PBSBlob.maxBlobSize, into: &buffer)
        } catch {
            switch error {
            case .io(let e) where e.operation == "open":
                throw SourceError(e.errno == ENOENT ? .missing : .io, path: path, "\(what): cannot open chunk: \(e.errnoName)", errno: e.errno)
            case .io(let e):
                throw SourceError(.io, path: path, "\(what): \(e.reason ?? "\(e.operation) failed: \(e.errnoName)")", errno: e.errno)
            case .notRegular(let kind):
                throw SourceError(.damaged, path: path, "\(what): chunk is \(kind.rawValue), not a regular file")
            case .tooLarge(let n):
                throw SourceError(.damaged, path: path, "\(what): chunk file is \(n) bytes (limit 128 MiB)")
            }
        }
    }
}
