import ClusterCompression
import Glibc

/// A sequential byte source: stdin, a tar entry, a gzip inflater.
public protocol VMDKByteSource: AnyObject {
    /// Reads up to `buffer.count` bytes into `buffer`; 0 at the end.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(QcowPressError) -> Int
}

/// Decodes a streamOptimized VMDK read front to back, never seeking (an OVA on stdin): the header,
/// then from its overhead on, markers: a grain (LBA, size > 0, zlib data padded to 512 bytes), or
/// metadata (size 0; type 1 grain table, 2 grain directory, 3 footer, each followed by the number
/// of sectors its first field gives; 0 end of stream). The tables are skipped: each grain carries
/// its own place. Grains must come in increasing LBA order inside the capacity (VMware's and
/// qemu-img's writers do); anything else is refused, so no guest range can be written twice.
///
/// Memory: one buffer of two grains plus a sector (QEMU's bound on a grain's zlib data).
public final class VMDKStreamReader {
    public let virtualSize: UInt64
    public let grainSize: Int
    let name: String
    let source: any VMDKByteSource
    let header: VMDKSparseHeader
    /// Bytes consumed so far (for messages: the offset of what is being read).
    private(set) var position: UInt64 = 0
    private var nextLBA: UInt64 = 0
    private let buffer: UnsafeMutableRawBufferPointer
    private var inflated: UnsafeMutableRawBufferPointer?
    private let inflater = ZlibGrainInflater()
    private var ended = false

    /// Reads the header (KDMV; compressed with markers) and skips to its overhead, where the
    /// grains begin.
    public init(source: any VMDKByteSource, name: String) throws(QcowPressError) {
        self.source = source
        self.name = name
        let head = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)
        defer { head.deallocate() }
        try Self.fill(source, head, name: name, at: 0, what: "VMDK header")
        let h = try VMDKSparseHeader(Array(head), at: 0, path: name)
        guard h.compressed, h.hasMarkers else {
            throw .unsupported(path: name, what: "a VMDK that is not streamOptimized (flags 0x\(String(h.flags, radix: 16)), compressAlgorithm \(h.compressAlgorithm)) cannot be read from a stream; pass the file")
        }
        guard h.overhead >= 1, h.overhead <= 1 << 32 else {
            throw .inputDamaged(path: name, location: "VMDK header field overHead (offset 64) is \(h.overhead): not from 1 to 2^32 sectors")
        }
        header = h
        virtualSize = h.capacity * 512
        grainSize = Int(h.grainBytes)
        buffer = .allocate(byteCount: grainSize * 2 + 1024, alignment: 4096)
        position = 512
        try skip(h.overhead * 512 - 512, what: "VMDK descriptor and tables before the grains (overHead)")
    }

    deinit {
        buffer.deallocate()
        inflated?.deallocate()
    }

    /// Reads exactly `b.count` bytes or throws naming where the stream ended.
    static func fill(_ s: any VMDKByteSource, _ b: UnsafeMutableRawBufferPointer, name: String, at: UInt64, what: String) throws(QcowPressError) {
        var got = 0
        while got < b.count {
            let n = try s.read(into: UnsafeMutableRawBufferPointer(rebasing: b[got...]))
            guard n > 0 else { throw .inputDamaged(path: name, location: "stream ended at offset \(at + UInt64(got)) inside \(what) (truncated)") }
            got += n
        }
    }

    private func skip(_ count: UInt64, what: String) throws(QcowPressError) {
        var left = count
        while left > 0 {
            let n = Int(min(left, UInt64(buffer.count)))
            try Self.fill(source, UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), name: name, at: position, what: what)
            position += UInt64(n)
            left -= UInt64(n)
        }
    }

    /// The next grain in file order, still compressed: its guest offset, its zlib bytes (valid
    /// until the next call) and the length it must inflate to. nil after the end-of-stream marker.
    public func nextCompressed() throws(QcowPressError) -> (offset: UInt64, zlib: UnsafeRawBufferPointer, length: Int)? {
        while !ended {
            let at = position
            try Self.fill(source, UnsafeMutableRawBufferPointer(rebasing: buffer[0..<512]), name: name, at: at, what: "a VMDK marker")
            position += 512
            let m = FieldReader(b: Array(buffer[0..<16]))
            let value = m.le64(0), size = Int(m.le32(8))
            if size > 0 {
                let sector = value
                guard size <= grainSize * 2 else {
                    throw .inputDamaged(path: name, location: "VMDK grain marker at offset \(at) has size \(size): more than two grains (\(grainSize * 2) bytes)")
                }
                guard sector % header.grainSectors == 0, sector < header.capacity, sector >= nextLBA else {
                    throw .inputDamaged(path: name, location: "VMDK grain marker at offset \(at) has LBA \(sector): not a grain boundary inside the disk (\(header.capacity) sectors) after the previous grain")
                }
                let total = (12 + size + 511) & ~511
                if total > 512 {
                    try Self.fill(source, UnsafeMutableRawBufferPointer(rebasing: buffer[512..<total]), name: name, at: position, what: "the VMDK grain at offset \(at)")
                    position += UInt64(total - 512)
                }
                nextLBA = sector + header.grainSectors
                let offset = sector * 512
                let length = Int(min(UInt64(grainSize), virtualSize - offset))
                return (offset, UnsafeRawBufferPointer(start: buffer.baseAddress! + 12, count: size), length)
            }
            switch m.le32(12) {
            case VMDKMarker.endOfStream:
                ended = true
            case VMDKMarker.grainTable, VMDKMarker.grainDirectory, VMDKMarker.footer:
                guard value <= (1 << 32) else {
                    throw .inputDamaged(path: name, location: "VMDK metadata marker at offset \(at) says \(value) sectors follow (more than a table can hold)")
                }
                try skip(value * 512, what: "the VMDK table after the marker at offset \(at)")
            case let t:
                throw .inputDamaged(path: name, location: "VMDK marker at offset \(at) has type \(t) (not 0-3)")
            }
        }
        return nil
    }

    /// Inflates one grain from ``nextCompressed()`` into `into` (at least `length` bytes, at most
    /// a grain is written); any thread, with its own inflater.
    public static func inflate(_ zlib: UnsafeRawBufferPointer, length: Int, into: UnsafeMutableRawBufferPointer,
                               inflater: ZlibGrainInflater, name: String, offset: UInt64) throws(QcowPressError) {
        let got: Int
        do { got = try inflater.inflate(zlib, into: into) } catch {
            throw .inputDamaged(path: name, location: "VMDK grain for guest offset \(offset): \(error.description)")
        }
        guard got >= length else {
            throw .inputDamaged(path: name, location: "VMDK grain for guest offset \(offset) inflates to \(got) bytes, not the grain's \(length)")
        }
    }

    /// The next grain inflated (valid until the next call), or nil at the end of the stream.
    public func next() throws(QcowPressError) -> (offset: UInt64, data: UnsafeRawBufferPointer)? {
        guard let g = try nextCompressed() else { return nil }
        let out = inflated ?? .allocate(byteCount: grainSize, alignment: 4096)
        inflated = out
        try Self.inflate(g.zlib, length: g.length, into: out, inflater: inflater, name: name, offset: g.offset)
        return (g.offset, UnsafeRawBufferPointer(rebasing: out[0..<g.length]))
    }
}
