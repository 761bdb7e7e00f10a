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

    /// "qcow2" when the file starts with the qcow2 magic, otherwise "raw".
    public static func detectFormat(path: String) throws(QcowPressError) -> String {
        let f: InputFile
        do { f = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        guard f.size >= 4 else { return "raw" }
        var magic: UInt32 = 0
        do {
            _ = try withUnsafeMutableBytes(of: &magic) { (p) throws(IOError) -> Int in try f.read(into: p.baseAddress!, length: 4, offset: 0) }
        } catch { throw .from(error) }
        return UInt32(bigEndian: magic) == 0x5146_49FB ? "qcow2" : "raw"
    }

    /// Pushes the whole source into `encoder`: holes (SEEK_DATA/SEEK_HOLE) become zero ranges
    /// without a read; data is read with O_DIRECT in 4 MiB chunks by `readers` threads.
    public func feed(_ encoder: Qcow2Encoder, readers: Int = ImageCopier.defaultReaders) throws(QcowPressError) {
        var copier = ImageCopier(source: try RawGuestImage(path: path), clusterSize: encoder.options.clusterSize)
        copier.readers = readers
        try copier.feed(encoder)
    }
}
