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
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            throw SourceError(e == ENOENT ? .missing : .io, path: path, "\(what): cannot open chunk: \(String(cString: strerror(e)))", errno: e)
        }
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        let size = Int(st.st_size)
        guard size <= PBSBlob.maxBlobSize else {
            throw SourceError(.damaged, path: path, "\(what): chunk file is \(size) bytes (limit 128 MiB)")
        }
        if scratch.raw.count < size { scratch.raw = [UInt8](repeating: 0, count: size) }
        let got: Int = scratch.raw.withUnsafeMutableBytes { p in
            var done = 0
            while done < size {
                let r = Glibc.read(fd, p.baseAddress! + done, size - done)
                if r < 0 && errno == EINTR { continue }
                if r <= 0 { break }
                done += r
            }
            return done
        }
        guard got == size else {
            throw SourceError(.io, path: path, "\(what): short read (\(got) of \(size) bytes)")
        }
        // Read once, then let the page cache forget it: a restore host's cache belongs to its VMs.
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
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
