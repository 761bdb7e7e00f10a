import Crypto
import DirectIO
import Foundation
import Glibc

/// Checks (CRC, AES-GCM tag, digest) and decodes chunks fetched from a ``PBSChunkStore``.
/// Thread-safe: every thread passes its own scratch buffers.
public struct PBSChunkReader: Sendable {
    public let store: any PBSChunkStore
    public let key: PBSKey?

    public init(store: any PBSChunkStore, key: PBSKey?) {
        self.store = store
        self.key = key
    }

    /// Chunks of a local snapshot's datastore.
    public init(snapshot: PBSSnapshot, key: PBSKey?) {
        self.init(store: snapshot.chunks, key: key)
    }
    /// The digest every all-zero chunk of `length` bytes has in this backup.
    public func zeroDigest(length: Int) -> [UInt8] {
        let zeros = [UInt8](repeating: 0, count: length)
        return zeros.withUnsafeBytes { digest(of: $0) }
    }

    public func digest(of plain: UnsafeRawBufferPointer) -> [UInt8] {
        if let key { return key.digest(plain) }
        return Array(SHA256.hash(data: plain))
    }

    /// Per-thread scratch of a loader: the blob file's bytes (grown as needed) and a zstd context.
    public final class Scratch {
        var raw: [UInt8] = []
        let zstd = ZstdDecoder()
        public init() {}
    }

    /// Loads chunk `digest` into `out`, which must hold `length` bytes. `what` names the chunk in
    /// errors (index, offset, archive).
    public func load(digest: ArraySlice<UInt8>, length: Int, into out: UnsafeMutableRawBufferPointer,
                     scratch: Scratch, what: String) throws(SourceError) {
        let path = store.location(of: digest)
        let size = try store.fetch(digest, into: &scratch.raw, what: what)
        let k = key?.key
        let zstd = scratch.zstd
        let decoded: Result<Int, SourceError> = scratch.raw.withUnsafeBytes { p in
            Result { () throws(SourceError) -> Int in
                try PBSBlob.decode(UnsafeRawBufferPointer(rebasing: p[0..<size]), into: out, key: k, path: path, what: what, zstd: zstd)
            }
        }
        let n = try decoded.get()
        guard n == length else {
            throw SourceError(.damaged, path: path, "\(what): chunk holds \(n) bytes, the index expects \(length)")
        }
        let expected = digest
        let d = self.digest(of: UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(out)[0..<length]))
        guard d.elementsEqual(expected) else {
            throw SourceError(.damaged, path: path, "\(what): digest mismatch (content is \(hexString(d)))")
        }
    }
}
