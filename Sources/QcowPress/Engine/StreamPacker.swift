/// The compressed write cache's placement logic, kept free of I/O so it can be property-tested.
///
/// Host space is written as a stream of equal, cluster-aligned buffers. Inside the buffer being
/// filled, compressed clusters are appended byte by byte from the front (they may start anywhere
/// and cross host-cluster boundaries, as qcow2 allows), while clusters that must be cluster-aligned
/// (uncompressed data, L2 tables) are placed at the front when it is aligned, otherwise taken from
/// the back. The buffer is full when the two ends meet; the gap left is smaller than the item that
/// did not fit, so no whole host cluster inside it is ever left unreferenced-but-counted.
public struct StreamPacker: Sendable {
    public let clusterSize: Int
    public let bufferSize: Int
    /// Host offset of the buffer being filled (cluster-aligned).
    public private(set) var bufferStart: UInt64
    /// Next free byte for compressed data, relative to `bufferStart`.
    public private(set) var front: Int = 0
    /// Start of the back region of aligned clusters, relative to `bufferStart`.
    public private(set) var back: Int

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

    /// Moves on to the next buffer, right after the current one's last used cluster.
    public mutating func advance() {
        bufferStart = hostEnd
        front = 0
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
