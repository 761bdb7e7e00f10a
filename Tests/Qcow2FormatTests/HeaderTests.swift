import Qcow2Format
import Testing

@Suite(.tags(.fast)) struct HeaderTests {
    @Test func parsesQemuCreated64kHeader() throws {
        let bytes = try fixture("header-64k.bin")
        let h = try bytes.withUnsafeBytes { try Qcow2Header(parsing: $0) }
        #expect(h.version == 3)
        #expect(h.clusterBits == 16)
        #expect(h.size == 1 << 20)
        #expect(h.l1Size == 1)
        #expect(h.l1TableOffset == 0x30000)
        #expect(h.refcountTableOffset == 0x10000)
        #expect(h.refcountTableClusters == 1)
        #expect(h.refcountOrder == 4)
        #expect(h.headerLength == 112)
        #expect(h.compressionType == .zlib)
        #expect(h.extensions == [.featureNames(FeatureName.qemuDefaultTable)])
    }

    /// Our serialiser produces QEMU's bytes, byte for byte, for the same field values.
    @Test(arguments: ["header-64k.bin", "header-64k-zstd-backing.bin"])
    func serialisesLikeQemu(name: String) throws {
        let golden = try fixture(name)
        let parsed = try golden.withUnsafeBytes { try Qcow2Header(parsing: $0) }
        var h = Qcow2Header(clusterBits: parsed.clusterBits, size: parsed.size, l1Size: parsed.l1Size,
                            l1TableOffset: parsed.l1TableOffset, refcountTableOffset: parsed.refcountTableOffset,
                            refcountTableClusters: parsed.refcountTableClusters)
        h.compressionType = parsed.compressionType
        h.backingFile = parsed.backingFile
        h.extensions = Qcow2Header.defaultExtensions(clusterBits: parsed.clusterBits, backingFormat: parsed.backingFormat)
        let out = h.serialized()
        #expect(out == Array(golden[0..<out.count]))
        #expect(golden[out.count...].allSatisfy { $0 == 0 })
    }

    @Test func parsesBackingAndZstd() throws {
        let h = try fixture("header-64k-zstd-backing.bin").withUnsafeBytes { try Qcow2Header(parsing: $0) }
        #expect(h.compressionType == .zstd)
        #expect(h.incompatibleFeatures.contains(.compressionType))
        #expect(h.backingFile == "../Fixtures/empty-4k.qcow2")
        #expect(h.backingFormat == "qcow2")
    }

    @Test func smallClusterImagesHaveNoFeatureTable() throws {
        let bytes = try fixture("empty-4k.qcow2")
        let h = try bytes.withUnsafeBytes { try Qcow2Header(parsing: $0, fileSize: UInt64(bytes.count)) }
        #expect(h.extensions.isEmpty)
        #expect(Qcow2Header.defaultExtensions(clusterBits: 12, backingFormat: nil).isEmpty)
        var copy = h
        copy.extensions = []
        let out = copy.serialized()
        #expect(out == Array(bytes[0..<out.count]))
    }

    func damaged(_ patch: (inout [UInt8]) -> Void) throws -> FormatError? {
        var bytes = try fixture("empty-4k.qcow2")
        patch(&bytes)
        do {
            _ = try bytes.withUnsafeBytes { try Qcow2Header(parsing: $0, fileSize: UInt64(bytes.count)) }
            return nil
        } catch let e as FormatError {
            return e
        }
    }

    @Test func refusesDamagedHeaders() throws {
        #expect(try damaged { $0[0] = 0 }?.field == "magic")
        #expect(try damaged { $0[7] = 4 }?.field == "version")
        #expect(try damaged { $0[23] = 8 }?.field == "cluster_bits")
        #expect(try damaged { $0[23] = 22 }?.field == "cluster_bits")
        #expect(try damaged { $0[36] = 0xFF }?.field == "l1_size")
        #expect(try damaged { $0[47] = 0x01 }?.field == "l1_table_offset")
        #expect(try damaged { $0[46] = 0xF0 }?.field == "l1_table_offset")  // past EOF
        #expect(try damaged { $0[99] = 7 }?.field == "refcount_order")
        #expect(try damaged { $0[79] = 0x80 }?.field == "incompatible_features")
        #expect(try damaged { $0[104] = 1 }?.field == "compression_type")  // zstd without bit 3
        #expect(try damaged { $0[104] = 9; $0[79] = 8 }?.field == "compression_type")
        let e = try damaged { $0[23] = 30 }
        #expect(e?.offset == 20)
        #expect(e?.value == 30)
        #expect(e?.description == "cluster_bits at offset 20 is 30: must be 9…21")
    }

    @Test func truncatedHeaderIsAnError() {
        let bytes: [UInt8] = [0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 3]
        #expect(throws: FormatError.self) { try bytes.withUnsafeBytes { try Qcow2Header(parsing: $0) } }
    }
}

/// Offsets near 2^64 in a damaged header are errors, never arithmetic traps.
@Suite(.tags(.fast)) struct HeaderOverflowTests {
    func parse(_ patch: (inout [UInt8]) -> Void) throws -> FormatError? {
        var b = try fixture("header-64k-zstd-backing.bin")
        patch(&b)
        do {
            _ = try b.withUnsafeBytes { try Qcow2Header(parsing: $0, fileSize: 1 << 30) }
            return nil
        } catch let e as FormatError {
            return e
        }
    }
    func put64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) { for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) } }

    @Test func hugeOffsets() throws {
        #expect(try parse { put64(&$0, 8, UInt64.max) }?.field == "backing_file_offset")
        #expect(try parse { put64(&$0, 40, 0xFFFF_FFFF_FFFF_0000); $0[36] = 0x00; $0[37] = 0x10 }?.field == "l1_table_offset")
        #expect(try parse { put64(&$0, 48, 0xFFFF_FFFF_FFFF_0000) }?.field == "refcount_table_offset")
        #expect(fits(UInt64.max - 1, 8, within: UInt64.max) == false)
        #expect(fits(10, 5, within: 15))
    }
}
