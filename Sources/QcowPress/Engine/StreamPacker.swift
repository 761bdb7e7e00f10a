/// The compressed write cache's placement logic, kept free of I/O so it can be property-tested.
///
/// Host space is written as a stream of equal, cluster-aligned buffers. Inside the buffer being
/// filled, compressed clusters are appended byte by byte from the front (they may start anywhere
/// and cross host-cluster boundaries, as qcow2 allows), while clusters that must be cluster-aligned
/// (uncompressed data, L2 tables) are placed at the front when it is aligned, otherwise taken from
/// the back. The buffer is full when the two ends meet; the gap left is smaller than the item that
/// did not fit, so no whole host cluster inside it is ever left unreferenced-but-counted. When no
/// aligned cluster was taken from the back, a compressed cluster that does not fit runs on into
/// the next buffer (``placeCompressedAcrossEnd(length:)``), so the buffer ends with no gap: the
/// gaps cost half a compressed cluster per buffer — 0.25 % of a zstd image of a 1 GiB ext4 disk
/// with 4 MiB buffers, measured (359,071,744 vs 358,198,784 bytes from qemu-img).
public struct StreamPacker: Sendable {
    public let clusterSize: Int
    public let bufferSize: Int
    /// Host offset of the buffer being filled (cluster-aligned).
    public private(set) var bufferStart: UInt64
    /// Next free byte for compressed data, relative to `bufferStart`.
    public private(set) var front: Int = 0
    /// Start of the back region of aligned clusters, relative to `bufferStart`.
    public private(set) var back: Int
    /// Bytes of a compressed cluster placed across the end of this buffer that continue at the
    /// start of the next one (where ``advance()`` puts the front).
    public private(set) var carried = 0

    public init(clusterSize: Int, bufferSize: Int, firstHostOffset: UInt64) {
        precondition(bufferSize % clusterSize == 0 && bufferSize >= 2 * clusterSize)
        precondition(firstHostOffset % UInt64(clusterSize) == 0)
        self.clusterSize = clusterSize
        self.bufferSize = bufferSize
        self.bufferStart = firstHostOffset
        self.back = bufferSize
    }

    public var isEmpty: Bool { front == 0 && back == bufferSize }

    /// Where a compressed cluster of `length` bytes goes (offset inside the buffer), or nil when the
    /// buffer is full: submit it and call ``advance()``.
    public mutating func placeCompressed(length: Int) -> Int? {
        precondition(length > 0 && length < clusterSize)
        guard front + length <= back else { return nil }
        let at = front
        front += length
        return at
    }

    /// Where a compressed cluster of `length` bytes that does not fit goes when it may run on into
    /// the next buffer: its offset here, the buffer's last `bufferSize - offset` bytes hold its
    /// head, and after ``advance()`` the next buffer's first ``carried`` bytes its tail. Nil when
    /// it fits (use ``placeCompressed(length:)``) or when aligned clusters sit at the back (the
    /// buffer does not end with the front).
    public mutating func placeCompressedAcrossEnd(length: Int) -> Int? {
        precondition(length > 0 && length < clusterSize)
        guard back == bufferSize, front + length > bufferSize, front < bufferSize else { return nil }
        let at = front
        carried = front + length - bufferSize
        front = bufferSize
        return at
    }

    /// Where a cluster-aligned cluster goes (offset inside the buffer), or nil when the buffer is full.
    public mutating func placeAligned() -> Int? {
        if front % clusterSize == 0 && front + clusterSize <= back {
            let at = front
            front += clusterSize
            return at
        }
        let frontClusterEnd = (front + clusterSize - 1) / clusterSize * clusterSize
        guard back - clusterSize >= frontClusterEnd else { return nil }
        back -= clusterSize
        return back
    }

    /// Moves the front to the next cluster boundary (the bytes skipped stay unused), so the next
    /// compressed cluster starts a fresh host cluster. False when that boundary is past the back.
    public mutating func skipToClusterBoundary() -> Bool {
        let next = (front + clusterSize - 1) / clusterSize * clusterSize
        guard next + 1 <= back else { return false }
        front = next
        return true
    }

    /// Host offset just past everything placed so far (cluster-aligned).
    public var hostEnd: UInt64 {
        if back < bufferSize { return bufferStart + UInt64(bufferSize) }
        return bufferStart + UInt64((front + clusterSize - 1) / clusterSize * clusterSize)
    }

    /// Moves on to the next buffer, right after the current one's last used cluster (after the
    /// tail of a compressed cluster carried over, if any).
    public mutating func advance() {
        bufferStart = hostEnd
        front = carried
        carried = 0
        back = bufferSize
    }
}

/// How the last buffer is closed up at the end: its back region's clusters move down to just after
/// the front's last (partly) used cluster, lowest first, so the file has no hole in the middle.
/// A pure function of the placements; the writer applies the moves (bytes, refcounts, entries).
public enum LastBufferCompaction {
    public struct Move: Equatable, Sendable {
        public var from: Int
        public var to: Int
    }
    public struct Plan: Equatable, Sendable {
        /// The front's end rounded up to a cluster: where the first moved cluster goes.
        public var frontEnd: Int
        /// One move per back cluster, in ascending `from` order (identity moves included). Every
        /// `to` is at or below its `from` and above every earlier `to`, so applying them in order
        /// with memmove never overwrites a cluster not yet moved.
        public var moves: [Move]
        /// Bytes of the buffer to write.
        public var end: Int
    }

    /// - Parameters: `front`: bytes used from the buffer's start; `back`: offsets of the clusters
    ///   placed from the back (any order, distinct, cluster-aligned, at or above `front`).
    public static func plan(front: Int, back: [Int], clusterSize cs: Int) -> Plan {
        let frontEnd = (front + cs - 1) / cs * cs
        let sorted = back.sorted()
        let moves = sorted.enumerated().map { Move(from: $1, to: frontEnd + $0 * cs) }
        return Plan(frontEnd: frontEnd, moves: moves, end: frontEnd + sorted.count * cs)
    }
}
