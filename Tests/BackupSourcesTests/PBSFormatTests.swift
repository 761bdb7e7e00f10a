import BackupSources
import Crypto
import Foundation
import Testing

@Suite(.tags(.pbs, .fast)) struct PBSFormatTests {
    /// Upstream test vector (pbs-key-config/src/lib.rs fingerprint_checks).
    @Test func keyFingerprintMatchesProxmox() {
        let key = PBSKey(rawKey: Array(0..<32))
        #expect(key.fingerprint == "0e:ab:d4:46:0b:6e:b9:ca:34:50:23:de:e2:b7:78:c7:90:e5:4a:16:83:b9:65:9c:0a:57:ae:19:90:90:15:9b")
    }

    /// The magics are the first 8 bytes of SHA-256 of their names (file_formats.rs).
    @Test func magicsAreHashesOfTheirNames() {
        let names = ["Proxmox Backup uncompressed blob v1.0", "Proxmox Backup zstd compressed blob v1.0",
                     "Proxmox Backup encrypted blob v1.0", "Proxmox Backup zstd compressed encrypted blob v1.0"]
        for (i, n) in names.enumerated() {
            let d = Array(SHA256.hash(data: Array(n.utf8)))
            let v = d[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            #expect(PBSBlob.magics[i].magic == v, "\(n)")
        }
        let fidx = Array(SHA256.hash(data: Array("Proxmox Backup fixed sized chunk index v1.0".utf8)))
        #expect(PBSFixedIndex.magic == fidx[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
    }

    @Test func pbkdf2MatchesRFC6070StyleVector() {
        // PBKDF2-HMAC-SHA256("password", "salt", 1, 32), a widely published vector.
        let out = PBSKey.pbkdf2(password: Array("password".utf8), salt: Array("salt".utf8), iterations: 1, length: 32)
        #expect(hexString(out) == "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b")
    }

    /// The blobs' CRC is CRC-32/IEEE as zlib and PBS (crc32fast) compute it: the catalogue check
    /// value, and every length up to 300 and some long odd ones (ISA-L folds 16/64/256-byte
    /// blocks, tails separately) at odd start addresses, against a bitwise reference.
    @Test func blobCRCIsCRC32IEEE() {
        #expect(Array("123456789".utf8).withUnsafeBytes { PBSBlob.crc32($0) } == 0xCBF4_3926)
        #expect(PBSBlob.crc32(UnsafeRawBufferPointer(start: nil, count: 0)) == 0)
        func reference(_ b: ArraySlice<UInt8>) -> UInt32 {
            var c: UInt32 = 0xFFFF_FFFF
            for x in b {
                c ^= UInt32(x)
                for _ in 0..<8 { c = c & 1 == 1 ? (c >> 1) ^ 0xEDB8_8320 : c >> 1 }
            }
            return ~c
        }
        var g = SystemRandomNumberGenerator()
        let data = (0..<70_000).map { _ in UInt8.random(in: 0...255, using: &g) }
        var wrong: [Int] = []
        for n in Array(0...300) + [1023, 4097, 65_537, 69_999] {
            let b = data[1..<(1 + n)]
            if b.withUnsafeBytes({ PBSBlob.crc32($0) }) != reference(b) { wrong.append(n) }
        }
        #expect(wrong.isEmpty, "lengths with a wrong CRC: \(wrong)")
    }

    func blobs() throws -> [(String, [UInt8])] {
        let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/fuzz/blob")
        return try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted().map {
            ($0, [UInt8](try Data(contentsOf: dir.appendingPathComponent($0))))
        }
    }

    func key() throws -> PBSKey {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/fuzz/keyfile/none.json").path
        return try PBSKey.load(path: path) { () throws(SourceError) -> String in "" }
    }

    /// Every seed blob (plain, zstd, encrypted, encrypted+zstd) decodes; a flipped byte is caught.
    @Test func blobsDecodeAndDamageIsCaught() throws {
        let k = try key()
        var kinds = Set<String>()
        for (name, b) in try blobs() {
            let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
            defer { out.deallocate() }
            let n = try b.withUnsafeBytes { try PBSBlob.decode($0, into: out, key: k.key, path: name, what: "blob") }
            #expect(n > 0)
            kinds.insert("\(b.withUnsafeBytes { PBSBlob.kind(of: $0)! })")
            var bad = b
            bad[bad.count - 1] ^= 1
            #expect(throws: SourceError.self) { try bad.withUnsafeBytes { try PBSBlob.decode($0, into: out, key: k.key, path: name, what: "blob") } }
        }
        #expect(kinds.count >= 3, "\(kinds)")
    }
}

/// Regressions found by the fuzzer.
@Suite(.tags(.faults, .fast)) struct FuzzRegressionTests {
    /// size 0x7fff_ffff_ffff_ffff with 4 KiB chunks overflowed the digest count (trap).
    @Test func fidxHugeSizeIsAnError() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/fuzz/fidx/regression-size-overflow.fidx").path
        #expect(throws: SourceError.self) { _ = try PBSFixedIndex(path: path) }
    }
}
