import Crypto
import Foundation

/// The snapshot manifest `index.json.blob` (never encrypted; zstd or plain).
/// Source: proxmox-backup pbs-datastore/src/manifest.rs.
public struct PBSManifest: Sendable {
    public struct File: Sendable {
        public var filename: String
        /// Image size for `.fidx`; encoded blob length for `.blob`.
        public var size: UInt64
        /// index_csum for `.fidx`; SHA-256 of the whole blob file for `.blob`.
        public var csum: [UInt8]
        /// none, encrypt, sign-only.
        public var cryptMode: String
    }
    public var files: [File]
    public var signature: String?
    public var keyFingerprint: String?
    /// Canonical JSON of the manifest without `unprotected` and `signature` (what is signed).
    let signedCanonical: String

    public init(path: String) throws(SourceError) {
        let data = try readSourceFile(path, limit: PBSBlob.maxBlobSize, what: "manifest", cannotRead: "cannot read the snapshot manifest")
        try self.init(bytes: data, path: path)
    }

    /// Decodes a manifest blob fetched elsewhere (a server); `path` names it in errors.
    public init(bytes data: [UInt8], path: String) throws(SourceError) {
        var out = [UInt8](repeating: 0, count: 16 << 20)
        let r: Result<Int, SourceError> = data.withUnsafeBytes { p in
            out.withUnsafeMutableBytes { o in
                Result { () throws(SourceError) -> Int in try PBSBlob.decode(p, into: o, key: nil, path: path, what: "manifest") }
            }
        }
        let n = try r.get()
        guard let obj = try? JSONSerialization.jsonObject(with: Data(out[0..<n])) as? [String: Any] else {
            throw SourceError(.damaged, path: path, "manifest is not a JSON object")
        }
        guard let files = obj["files"] as? [[String: Any]] else {
            throw SourceError(.damaged, path: path, "manifest has no 'files' list")
        }
        var list: [File] = []
        for (i, f) in files.enumerated() {
            guard let name = f["filename"] as? String, let size = (f["size"] as? NSNumber)?.uint64Value,
                  let csumHex = f["csum"] as? String, let csum = bytesFromHex(csumHex), csum.count == 32 else {
                throw SourceError(.damaged, path: path, "manifest files[\(i)] lacks filename, size or a 32-byte csum")
            }
            list.append(File(filename: name, size: size, csum: csum, cryptMode: f["crypt-mode"] as? String ?? "none"))
        }
        self.files = list
        signature = obj["signature"] as? String
        keyFingerprint = (obj["unprotected"] as? [String: Any])?["key-fingerprint"] as? String
        var signed = obj
        signed["unprotected"] = nil
        signed["signature"] = nil
        signedCanonical = canonicalJSON(signed)
    }

    /// Checks the key against the manifest's fingerprint and HMAC signature (when signed).
    public func verify(key: PBSKey, path: String) throws(SourceError) {
        if let fp = keyFingerprint, fp != key.fingerprint {
            throw SourceError(.wrongKey, path: path, "wrong key: fingerprint \(key.fingerprint) is not the backup's \(fp)")
        }
        guard let signature else { return }
        let canonical = Array(signedCanonical.utf8)
        let mac = HMAC<SHA256>.authenticationCode(for: canonical, using: SymmetricKey(data: key.idKey))
        guard hexString(mac) == signature.lowercased() else {
            throw SourceError(.damaged, path: path, "manifest signature does not match (damaged manifest or wrong key)")
        }
    }
}

/// Canonical JSON as proxmox-serde writes it for signing: sorted keys, no whitespace.
func canonicalJSON(_ v: Any) -> String {
    switch v {
    case let d as [String: Any]:
        return "{" + d.keys.sorted().map { "\(quoteJSON($0)):\(canonicalJSON(d[$0]!))" }.joined(separator: ",") + "}"
    case let a as [Any]:
        return "[" + a.map(canonicalJSON).joined(separator: ",") + "]"
    case let s as String:
        return quoteJSON(s)
    case let n as NSNumber:
        if String(cString: n.objCType) == "c" { return n.boolValue ? "true" : "false" }
        return n.stringValue
    default:
        return "null"
    }
}

func quoteJSON(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        default:
            if u.value < 0x20 {
                let h = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
            } else {
                out.unicodeScalars.append(u)
            }
        }
    }
    return out + "\""
}
