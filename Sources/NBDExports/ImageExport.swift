import NBDServer
import QcowPress
import Foundation

/// A guest image as a read-only NBD export: reads through the image reader (any qcow2 it reads,
/// backing chains included); block status reports holes where the reader knows the guest reads
/// zeros without reading data (raw holes, zero or unallocated qcow2 clusters).
// @unchecked: the read contexts (not Sendable) are only touched under `lock`.
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

extension ExportSet {
    /// Guest images (raw or qcow2, backing chains included) as read-only exports named after
    /// their files' base names, sharing one cache of decoded qcow2 clusters of `cacheBytes` (0:
    /// none; raw files are cached by the kernel's page cache).
    public static func images(_ images: [(path: String, image: any GuestImage)], cacheBytes: Int) throws(QcowPressError) -> ExportSet {
        let cache = cacheBytes > 0 ? BlockCache(capacity: cacheBytes) : nil
        var names = Set<String>()
        var exports: [any NBDExport] = []
        for (path, image) in images {
            let name = String(path.split(separator: "/", omittingEmptySubsequences: false).last ?? Substring(path))
            guard names.insert(name).inserted else { throw .invalidArgument("\(path): a second export named '\(name)'") }
            exports.append(ImageExport(name: name, image: image, cache: (image as? Qcow2Image).flatMap { q in cache.map { ($0, q.geometry.clusterSize) } }))
        }
        return ExportSet(exports)
    }
}
