/// Layout arithmetic for one cluster size: how guest offsets map to L1/L2 indexes, how many table
/// entries a virtual size needs, and how big the refcount structures must be.
public struct ClusterGeometry: Sendable, Equatable {
    /// log2 of the cluster size, 9…21.
    public let clusterBits: Int
    /// Extended L2 entries are 16 bytes (entry + subcluster bitmap) instead of 8.
    public let extendedL2: Bool

    public init(clusterBits: Int, extendedL2: Bool = false) {
        precondition((9...21).contains(clusterBits), "cluster_bits must be 9…21")
        self.clusterBits = clusterBits
        self.extendedL2 = extendedL2
    }

    /// Validates a user-supplied cluster size (a power of two, 512 B … 2 MiB).
    public init?(clusterSize: Int) {
        guard clusterSize > 0, clusterSize & (clusterSize - 1) == 0 else { return nil }
        let bits = clusterSize.trailingZeroBitCount
        guard (9...21).contains(bits) else { return nil }
        self.init(clusterBits: bits)
    }

    public var clusterSize: Int { 1 << clusterBits }
    public var l2EntrySize: Int { extendedL2 ? 16 : 8 }
    /// log2 of the number of entries in one L2 table (cluster_bits − 3, or − 4 with extended L2).
    public var l2Bits: Int { clusterBits - (extendedL2 ? 4 : 3) }
    public var l2Entries: Int { 1 << l2Bits }
    /// Guest bytes covered by one L2 table.
    public var bytesPerL2: UInt64 { UInt64(1) << UInt64(clusterBits + l2Bits) }

    public func clusterIndex(ofGuestOffset off: UInt64) -> UInt64 { off >> UInt64(clusterBits) }
    public func l1Index(ofGuestCluster c: UInt64) -> Int { Int(c >> UInt64(l2Bits)) }
    public func l2Index(ofGuestCluster c: UInt64) -> Int { Int(c & UInt64(l2Entries - 1)) }

    /// Number of guest clusters for a virtual size (the last one may be partial).
    public func guestClusters(forVirtualSize size: UInt64) -> UInt64 {
        (size + UInt64(clusterSize) - 1) >> UInt64(clusterBits)
    }
    /// L1 entries needed to map a virtual size.
    public func l1Entries(forVirtualSize size: UInt64) -> UInt64 {
        (size + bytesPerL2 - 1) / bytesPerL2
    }
    /// Clusters needed to hold `bytes` bytes.
    public func clusters(forBytes bytes: UInt64) -> UInt64 {
        (bytes + UInt64(clusterSize) - 1) >> UInt64(clusterBits)
    }

    /// Host clusters one refcount block describes at a given refcount_order.
    public func clustersPerRefcountBlock(refcountOrder: Int) -> UInt64 {
        (UInt64(clusterSize) * 8) >> UInt64(refcountOrder)
    }

    /// Sizes the refcount structures for an image whose other contents occupy `dataClusters` host
    /// clusters (header, data, L1/L2 included). The refcount blocks and table describe themselves too,
    /// so this iterates to a fixed point.
    public func refcountLayout(dataClusters: UInt64, refcountOrder: Int) -> (blocks: UInt64, tableClusters: UInt64) {
        let perBlock = clustersPerRefcountBlock(refcountOrder: refcountOrder)
        let entriesPerTableCluster = UInt64(clusterSize / 8)
        var blocks: UInt64 = 0
        var table: UInt64 = 1
        while true {
            let total = dataClusters + blocks + table
            let needBlocks = (total + perBlock - 1) / perBlock
            let needTable = max(1, (needBlocks + entriesPerTableCluster - 1) / entriesPerTableCluster)
            if needBlocks == blocks && needTable == table { return (blocks, table) }
            blocks = needBlocks
            table = needTable
        }
    }
}
