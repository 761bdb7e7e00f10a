import Glibc

/// A page-aligned, zero-initialised byte buffer suitable for O_DIRECT.
///
/// Ownership: exactly one thread uses a buffer at a time; it is handed between the writer thread and
/// the kernel (io_uring) or the pwrite thread, and never touched while a request on it is in flight.
/// That rule is what makes sending it sound.
// @unchecked: owns raw memory (a pointer is never Sendable); one user at a time, by the rule above.
public final class AlignedBuffer: @unchecked Sendable {
    /// 4096 satisfies O_DIRECT on every Linux block device and file system in use (logical block ≤ 4 KiB).
    public static let alignment = 4096
    public let pointer: UnsafeMutableRawPointer
    public let capacity: Int

    /// - Parameter zeroed: false leaves fresh pages untouched, so a large arena costs resident
    ///   memory only as it is used (posix_memalign maps large blocks lazily, already zero).
    public init(capacity requested: Int, zeroed: Bool = true) {
        precondition(requested > 0)
        let rounded = (requested + Self.alignment - 1) & ~(Self.alignment - 1)
        var p: UnsafeMutableRawPointer? = nil
        let r = posix_memalign(&p, Self.alignment, rounded)
        precondition(r == 0 && p != nil, "posix_memalign(\(rounded)) failed: out of memory")
        pointer = p!
        self.capacity = rounded
        if zeroed { memset(pointer, 0, rounded) }
    }
    deinit { free(pointer) }

    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: pointer, count: capacity) }
    public func zero(from: Int, to: Int) {
        if to > from { memset(pointer + from, 0, to - from) }
    }
}
