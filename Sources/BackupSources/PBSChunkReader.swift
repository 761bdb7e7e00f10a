import Crypto
import DirectIO
import Foundation
import Glibc

/// Reads, checks (CRC, AES-GCM tag, digest) and decodes chunks. Thread-safe: every thread passes
/// its own scratch buffers.
public struct PBSChunkReader: Sendable {
    public let snapshot: PBSSnapshot
    public let key: PBSKey?

    public init(snapshot: PBSSnapshot, key: PBSKey?) {
        self.snapshot = snapshot
        self.key = key
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
        let path = snapshot.chunkPath(digest)
        let size: Int
        do {
            size = try WholeFile.read(path: path, limit: PBSBlob.maxBlobSize, into: &scratch.raw)
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
