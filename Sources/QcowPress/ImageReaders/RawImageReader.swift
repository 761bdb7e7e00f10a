import DirectIO
import Glibc

/// A raw file or block device as a source: its size, its format by magic, and `feed` (an
/// ``ImageCopier`` over a ``RawGuestImage``).
public struct RawImageReader: Sendable {
    public let path: String
    /// The image's virtual size: the file size rounded up to 512 bytes, as QEMU's raw driver
    /// reports it (the tail past the end of the file reads as zeros).
    public let size: UInt64

    public init(path: String) throws(QcowPressError) {
        let file: InputFile
        do { file = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        self.path = path
        size = (file.size + 511) & ~511
    }

    /// The format by magic, one of ``ImageFormat/readable`` ("raw" when no magic); a file whose
    /// magic names a format QcowPress does not read (vmdk, vhdx, …) is refused by name.
    public static func detectFormat(path: String) throws(QcowPressError) -> String {
        try ImageFormat.resolve(path: path, given: nil)
    }

    /// Pushes the whole source into `encoder`: holes (SEEK_DATA/SEEK_HOLE) become zero ranges
    /// without a read; data is read with O_DIRECT in 4 MiB chunks by `readers` threads.
    public func feed(_ encoder: Qcow2Encoder, readers: Int = ImageCopier.defaultReaders) throws(QcowPressError) {
        var copier = ImageCopier(source: try RawGuestImage(path: path), clusterSize: encoder.options.clusterSize)
        copier.readers = readers
        try copier.feed(encoder)
    }
}
