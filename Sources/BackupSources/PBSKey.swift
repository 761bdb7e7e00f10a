import Crypto
import Foundation
import _CryptoExtras

/// An encryption key of a PBS backup and the values derived from it.
/// Source: proxmox-backup pbs-key-config/src/lib.rs, pbs-tools/src/crypt_config.rs.
public struct PBSKey: Sendable {
    let rawKey: [UInt8]
    public var key: SymmetricKey { SymmetricKey(data: rawKey) }
    /// PBKDF2-HMAC-SHA256(key, "_id_key", 10 iterations, 32 bytes): appended to plaintext for digests.
    public let idKey: [UInt8]

    public init(rawKey: [UInt8]) {
        self.rawKey = rawKey
        idKey = PBSKey.pbkdf2(password: rawKey, salt: Array("_id_key".utf8), iterations: 10, length: 32)
    }

    /// SHA-256(FINGERPRINT_INPUT || id_key), as colon-separated hex.
    public var fingerprint: String {
        let input = Array(SHA256.hash(data: Array("Proxmox Backup Encryption Key Fingerprint".utf8)))
        let d = Array(SHA256.hash(data: input + idKey))
        return d.map { hexString([$0]) }.joined(separator: ":")
    }

    /// Chunk digest for encrypted backups: SHA-256(plaintext || id_key).
    public func digest(_ plain: UnsafeRawBufferPointer) -> [UInt8] {
        var h = SHA256()
        h.update(bufferPointer: plain)
        h.update(data: idKey)
        return Array(h.finalize())
    }

    /// Loads a key file (JSON: kdf null | {"Scrypt":{n,r,p,salt}} | {"PBKDF2":{iter,salt}}, data =
    /// base64 raw key, or iv16 || tag16 || ciphertext32 under the password-derived key).
    public static func load(path: String, password: () throws(SourceError) -> String) throws(SourceError) -> PBSKey {
        let data = Data(try readSourceFile(path, limit: 1 << 20, what: "key file", cannotRead: "cannot read key file"))
        guard let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw SourceError(.damaged, path: path, "key file is not JSON")
        }
        guard let b64 = json["data"] as? String, let blob = Data(base64Encoded: b64) else {
            throw SourceError(.damaged, path: path, "key file field 'data' is missing or not base64")
        }
        let raw: [UInt8]
        if json["kdf"] == nil || json["kdf"] is NSNull {
            raw = [UInt8](blob)
        } else {
            guard let kdf = json["kdf"] as? [String: Any] else {
                throw SourceError(.damaged, path: path, "key file field 'kdf' is not understood")
            }
            let pw = Array(try password().utf8)
            guard pw.count >= 5 else { throw SourceError(.wrongKey, path: path, "passphrase is too short") }
            var derived: [UInt8]
            if let s = kdf["Scrypt"] as? [String: Any], let n = s["n"] as? Int, let r = s["r"] as? Int, let p = s["p"] as? Int,
               let saltB64 = s["salt"] as? String, let salt = Data(base64Encoded: saltB64) {
                // PBS writes n=65536, r=8, p=1 and lets OpenSSL use up to 1025 MiB: refuse parameters
                // that would need more (a key file must not make us allocate without bound).
                guard n >= 2, n & (n - 1) == 0, n <= 1 << 20, (1...32).contains(r), (1...16).contains(p), 128 * r * n <= 1025 << 20 else {
                    throw SourceError(.damaged, path: path, "scrypt parameters n=\(n) r=\(r) p=\(p) are out of range")
                }
                do {
                    let k = try KDF.Scrypt.deriveKey(from: pw, salt: salt, outputByteCount: 32, rounds: n, blockSize: r, parallelism: p, maxMemory: 1025 << 20)
                    derived = k.withUnsafeBytes { Array($0) }
                } catch {
                    throw SourceError(.damaged, path: path, "scrypt parameters are invalid")
                }
            } else if let p = kdf["PBKDF2"] as? [String: Any], let iter = p["iter"] as? Int, iter > 0, iter <= 10_000_000,
                      let saltB64 = p["salt"] as? String, let salt = Data(base64Encoded: saltB64) {
                derived = pbkdf2(password: pw, salt: [UInt8](salt), iterations: iter, length: 32)
            } else {
                throw SourceError(.unsupported, path: path, "key derivation function is not Scrypt or PBKDF2")
            }
            guard blob.count == 64 else {
                throw SourceError(.damaged, path: path, "encrypted key data is \(blob.count) bytes, expected 64")
            }
            do {
                let box = try AES.GCM.SealedBox(nonce: AES.GCM.Nonce(data: blob[0..<16]), ciphertext: blob[32..<64], tag: blob[16..<32])
                raw = [UInt8](try AES.GCM.open(box, using: SymmetricKey(data: derived)))
            } catch {
                throw SourceError(.wrongKey, path: path, "wrong password (key does not decrypt)")
            }
            derived.withUnsafeMutableBytes { p in for i in p.indices { p[i] = 0 } }
        }
        guard raw.count == 32 else {
            throw SourceError(.damaged, path: path, "key is \(raw.count) bytes, expected 32")
        }
        let key = PBSKey(rawKey: raw)
        if let fp = json["fingerprint"] as? String, fp != key.fingerprint {
            throw SourceError(.wrongKey, path: path, "key fingerprint does not match the key file's 'fingerprint'")
        }
        return key
    }

    /// PBKDF2 with HMAC-SHA256 (RFC 8018).
    public static func pbkdf2(password: [UInt8], salt: [UInt8], iterations: Int, length: Int) -> [UInt8] {
        let key = SymmetricKey(data: password)
        var out: [UInt8] = []
        var block: UInt32 = 1
        while out.count < length {
            var u = Array(HMAC<SHA256>.authenticationCode(for: salt + withUnsafeBytes(of: block.bigEndian, Array.init), using: key))
            var t = u
            if iterations > 1 {
                for _ in 1..<iterations {
                    u = Array(HMAC<SHA256>.authenticationCode(for: u, using: key))
                    for i in 0..<t.count { t[i] ^= u[i] }
                }
            }
            out += t
            block += 1
        }
        return Array(out.prefix(length))
    }
}
