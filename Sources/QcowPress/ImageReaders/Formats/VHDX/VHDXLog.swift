import DirectIO
import Glibc

/// The VHDX log (a circular buffer of `loge` entries that redo metadata and data writes). QcowPress
/// never writes its input and does not replay logs: an image whose current header names a log
/// (non-zero log GUID) holding a valid entry of that GUID is refused, naming how to replay it, as
/// QEMU refuses a read-only open of one. A log GUID whose log holds no valid entry (nothing to
/// replay) reads as QEMU reads it.
enum VHDXLog {
    static let sector = 4096
    /// The log is scanned in windows of this size (memory bounded whatever the log's length).
    static let window = 1 << 20

    /// Checks the log fields of `header`; returns the log's place in the file (for overlap checks),
    /// nil when it has no length.
    static func check(_ file: FormatFile, header h: VHDXHeader) throws(QcowPressError) -> Range<UInt64>? {
        let path = file.path
        func bad(_ why: String) -> QcowPressError { .inputDamaged(path: path, location: "VHDX header (sequence \(h.sequence)) \(why)") }
        // As QEMU: the log starts on a 1 MiB boundary past the header area, log version 0.
        guard h.logOffset >= VHDXLayout.mib, h.logOffset % VHDXLayout.mib == 0 else {
            throw bad("field log_offset is \(h.logOffset): not a multiple of 1 MiB past the first MiB")
        }
        guard VHDXLayout.le16(h.bytes, 64) == 0 else { throw bad("field log_version is \(VHDXLayout.le16(h.bytes, 64)), not 0") }
        guard h.logLength > 0 else { return nil }
        guard h.logOffset <= file.size, h.logLength <= file.size - h.logOffset else {
            throw bad("names a log of \(h.logLength) bytes at offset \(h.logOffset), past the end of the file (\(file.size) bytes)")
        }
        let range = h.logOffset..<(h.logOffset + h.logLength)
        guard h.logGuid.contains(where: { $0 != 0 }) else { return range }
        guard h.logLength % VHDXLayout.mib == 0 else { throw bad("field log_length is \(h.logLength), not a multiple of 1 MiB") }
        var start: UInt64 = 0
        while start < h.logLength {
            let n = Int(min(UInt64(window), h.logLength - start))
            let w = try file.bytes(at: h.logOffset + start, count: n, what: "VHDX log")
            for pos in stride(from: 0, to: n, by: sector) {
                let e = FieldReader(b: Array(w[pos..<(pos + 64)]))
                guard e.text(0, 4) == "loge", Array(e.b[32..<48]) == h.logGuid else { continue }
                let length = UInt64(e.le32(8)), sequence = e.le64(16)
                guard length >= UInt64(sector), length % UInt64(sector) == 0, length <= h.logLength, sequence != 0,
                      UInt64(e.le32(24)) * 32 <= length else { continue }
                if try checksumMatches(file, header: h, at: start + UInt64(pos), length: length, stored: e.le32(4)) {
                    throw .unsupported(path: path, what: "a VHDX image whose log holds writes to replay (log entry at offset \(h.logOffset + start + UInt64(pos)), sequence \(sequence)); QcowPress never writes its input: replay the log first (attach the disk once in Hyper-V, or run `qemu-img check -r all` on the image or a copy), then convert")
                }
            }
            start += UInt64(n)
        }
        return range
    }

    /// Whether the entry of `length` bytes at log position `at` (wrapping at the log's end) sums
    /// to `stored` with its checksum field taken as zero.
    static func checksumMatches(_ file: FormatFile, header h: VHDXHeader, at: UInt64, length: UInt64, stored: UInt32) throws(QcowPressError) -> Bool {
        var crc = CRC32C()
        var done: UInt64 = 0
        while done < length {
            let pos = (at + done) % h.logLength
            let n = Int(min(UInt64(window), length - done, h.logLength - pos))
            var b = try file.bytes(at: h.logOffset + pos, count: n, what: "VHDX log entry")
            if done == 0 { for i in 4..<8 { b[i] = 0 } }
            crc.update(b)
            done += UInt64(n)
        }
        return crc.value == stored
    }
}
