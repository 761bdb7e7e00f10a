/// One line of `qemu-img map`: a run of guest bytes with the same status.
public struct MapEntry: Equatable, Sendable {
    public var start: UInt64
    public var length: UInt64
    public var depth: Int
    public var present: Bool
    public var zero: Bool
    public var data: Bool
    /// The host offset, when the bytes lie somewhere as they are.
    public var offset: UInt64?
    /// The file ``offset`` is in.
    public var file: String?

    /// An entry starting at `start` with `status`'s flags.
    public init(start: UInt64, status s: BlockStatus) {
        (self.start, length, depth, present, zero, data, offset, file) = (start, s.length, s.depth, s.present, s.zero, s.data, s.offset, s.file)
    }

    /// qemu-img's `entry_mergeable`: same flags, depth and file, and host offsets that continue.
    func continues(into next: MapEntry) -> Bool {
        guard length > 0, zero == next.zero, data == next.data, depth == next.depth, present == next.present,
              file == next.file, (offset == nil) == (next.offset == nil) else { return false }
        if let offset, offset + length != next.offset { return false }
        return true
    }

    /// The JSON line `qemu-img map --output=json` prints for this entry (without the separator).
    public var json: String {
        var s = "{ \"start\": \(start), \"length\": \(length), \"depth\": \(depth), \"present\": \(present), \"zero\": \(zero), \"data\": \(data)"
        if let offset { s += ", \"offset\": \(offset)" }
        return s + "}"
    }

    /// The line of qemu-img map's human table (`%#-16x` columns: 0 without a prefix), or nil for
    /// an entry the table leaves out (not data, or zero).
    public var humanLine: String? {
        guard data && !zero else { return nil }
        func hex(_ v: UInt64) -> String {
            let s = v == 0 ? "0" : "0x" + String(v, radix: 16)
            return s + String(repeating: " ", count: max(0, 16 - s.count))
        }
        return hex(start) + hex(length) + hex(offset ?? 0) + (file ?? "")
    }
}

/// `qemu-img map`: an image's guest range as merged runs of block status.
public enum ImageMap {
    /// How far one status query looks (qemu-img map probes 1 GiB at a time).
    static let probe: UInt64 = 1 << 30

    /// Walks `image` front to back and hands each merged entry to `emit` as soon as it is complete
    /// (`last` is true for the final one), so the memory used does not grow with the image. With
    /// `human`, zero and unallocated runs merge as qemu-img's table merges them (it shows data
    /// only). An empty image gives one entry of length 0, as qemu-img.
    public static func walk(_ image: any GuestImage, human: Bool,
                            emit: (_ entry: MapEntry, _ last: Bool) throws -> Void) throws {
        let size = image.virtualSize
        var curr = MapEntry(start: 0, status: BlockStatus(length: 0, data: false, zero: false, present: false))
        var pos: UInt64 = 0
        while pos < size {
            let s = try BlockStatusQuery.status(of: image, at: pos, limit: min(size, pos + probe))
            guard s.length > 0 else {
                throw QcowPressError.inputDamaged(path: image.path, location: "block status at offset \(pos) covers no bytes")
            }
            var next = MapEntry(start: pos, status: s)
            pos += s.length
            if curr.continues(into: next) {
                curr.length += next.length
                continue
            }
            if curr.length > 0 {
                try emit(curr, false)
                if human && (!next.data || next.zero) {
                    next.data = false
                    next.zero = true
                }
            }
            curr = next
        }
        try emit(curr, true)
    }
}
