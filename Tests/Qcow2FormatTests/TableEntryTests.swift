import Qcow2Format
import Testing

@Suite(.tags(.fast)) struct TableEntryTests {
    /// L2 entries of `compressed-zlib-4k.qcow2`, as qemu-img wrote them.
    @Test func decodesQemuCompressedDescriptors() throws {
        let bytes = try fixture("compressed-zlib-4k.qcow2")
        let h = try bytes.withUnsafeBytes { try Qcow2Header(parsing: $0, fileSize: UInt64(bytes.count)) }
        let l2Offset = bytes.withUnsafeBytes { L1Entry(rawValue: loadBE64($0, Int(h.l1TableOffset))).l2Offset }
        #expect(l2Offset == 0x4000)
        let e0 = bytes.withUnsafeBytes { L2Entry(rawValue: loadBE64($0, Int(l2Offset))) }
        #expect(e0.rawValue == 0x4000_0000_0000_5000)
        #expect(e0.isCompressed)
        #expect(!e0.copied)
        let d = e0.compressedDescriptor(clusterBits: 12)
        #expect(d.hostOffset == 0x5000)
        #expect(d.additionalSectors == 0)
        // Re-encoding the same placement gives QEMU's bits.
        let e1 = bytes.withUnsafeBytes { L2Entry(rawValue: loadBE64($0, Int(l2Offset) + 8)) }
        let d1 = e1.compressedDescriptor(clusterBits: 12)
        #expect(d1.hostOffset == 0x5029)
        #expect(L2Entry.compressed(CompressedDescriptor(hostOffset: 0x5029, length: 0x29, clusterBits: 12)) == e1)
    }

    @Test(arguments: 9...21)
    func descriptorRoundTripsAtEveryClusterSize(bits: Int) {
        let cs = 1 << bits
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<500 {
            let x = CompressedDescriptor.offsetBits(clusterBits: bits)
            let maxOff = min((UInt64(1) << UInt64(x)) - UInt64(cs) - 1, UInt64(1) << 48)
            let off = UInt64.random(in: 0...maxOff, using: &rng)
            let len = Int.random(in: 1..<cs, using: &rng)
            let d = CompressedDescriptor(hostOffset: off, length: len, clusterBits: bits)
            let e = L2Entry.compressed(d)
            let back = e.compressedDescriptor(clusterBits: bits)
            #expect(back.hostOffset == off)
            #expect(back.additionalSectors == (off + UInt64(len) - 1) / 512 - off / 512)
            #expect(back.readLength >= len)
            #expect(back.readLength < len + 512)
            #expect(e.isCompressed && !e.copied)
        }
    }

    @Test func standardEntries() {
        let e = L2Entry.standard(hostOffset: 0x1_0000, copied: true)
        #expect(e.rawValue == 0x8000_0000_0001_0000)
        #expect(e.hostOffset == 0x1_0000)
        #expect(!e.isCompressed && !e.readsAsZero)
        #expect(L2Entry.zero.readsAsZero)
        #expect(L1Entry(l2Offset: 0x30000).rawValue == 0x8000_0000_0003_0000)
        #expect(L1Entry(l2Offset: 0).rawValue == 0)
    }

    @Test(arguments: 0...6)
    func refcountCodecRoundTrips(order: Int) {
        let codec = RefcountBlockCodec(refcountOrder: order)
        let cs = 512
        var block = [UInt8](repeating: 0, count: cs)
        let n = cs * 8 >> order
        var expected = [UInt64](repeating: 0, count: n)
        var rng = SystemRandomNumberGenerator()
        block.withUnsafeMutableBytes { p in
            for i in 0..<n {
                let v = UInt64.random(in: 0...codec.maxRefcount, using: &rng)
                expected[i] = v
                codec.set(p, i, v)
            }
            for i in 0..<n { #expect(codec.get(UnsafeRawBufferPointer(p), i) == expected[i]) }
        }
    }

    /// QEMU packs narrow refcounts least-significant bit first; 16-bit ones are big-endian.
    @Test func refcountBitLayout() {
        var b = [UInt8](repeating: 0, count: 8)
        b.withUnsafeMutableBytes { RefcountBlockCodec(refcountOrder: 0).set($0, 1, 1) }
        #expect(b[0] == 0b10)
        b = [UInt8](repeating: 0, count: 8)
        b.withUnsafeMutableBytes { RefcountBlockCodec(refcountOrder: 2).set($0, 1, 0xA) }
        #expect(b[0] == 0xA0)
        b = [UInt8](repeating: 0, count: 8)
        b.withUnsafeMutableBytes { RefcountBlockCodec(refcountOrder: 4).set($0, 1, 0x0102) }
        #expect(b[2] == 1 && b[3] == 2)
    }

    @Test func refcountLayoutCoversItself() {
        for bits in [9, 12, 16, 21] {
            let g = ClusterGeometry(clusterBits: bits)
            for order in 0...6 {
                for data in [UInt64(1), 100, 4096, 1 << 20] {
                    let (blocks, table) = g.refcountLayout(dataClusters: data, refcountOrder: order)
                    let total = data + blocks + table
                    #expect(blocks * g.clustersPerRefcountBlock(refcountOrder: order) >= total)
                    #expect(table * UInt64(g.clusterSize / 8) >= blocks)
                }
            }
        }
        #expect(ClusterGeometry(clusterBits: 16).clustersPerRefcountBlock(refcountOrder: 4) == 32768)
    }

    @Test func geometry() {
        let g = ClusterGeometry(clusterBits: 16)
        #expect(g.l2Entries == 8192)
        #expect(g.bytesPerL2 == 512 << 20)
        #expect(g.l1Entries(forVirtualSize: 1 << 40) == 2048)
        #expect(ClusterGeometry(clusterSize: 3000) == nil)
        #expect(ClusterGeometry(clusterSize: 256) == nil)
        #expect(ClusterGeometry(clusterSize: 4 << 20) == nil)
        #expect(ClusterGeometry(clusterBits: 16, extendedL2: true).l2Entries == 4096)
    }
}
