import Crypto

/// An OVA's manifest (`.mf`): one line per file, `SHA256(disk1.vmdk)= hex` or `SHA1(…)= hex`
/// (SHA512 too). The digests are computed while the files stream (``FileDigest``) and compared
/// before anything is put in place.
struct OVAManifest: Sendable, Equatable {
    enum Algorithm: String, Sendable { case sha1 = "SHA1", sha256 = "SHA256", sha512 = "SHA512" }
    struct Entry: Sendable, Equatable {
        var algorithm: Algorithm
        var digest: String
    }
    var entries: [String: Entry] = [:]

    init(text: [UInt8], path: String) throws(QcowPressError) {
        for (n, raw) in text.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).enumerated() {
            let line = String(decoding: raw, as: UTF8.self).trimmingWhitespace
            if line.isEmpty { continue }
            func bad(_ why: String) -> QcowPressError { .inputDamaged(path: path, location: "line \(n + 1): \(why)") }
            // ALGORITHM(file)= digest: the digest after the last '=', the name between the first
            // '(' and the ')' before that '='.
            guard let eq = line.lastIndex(of: "=") else { throw bad("is not 'ALGORITHM(file)= digest'") }
            let head = String(line[..<eq]).trimmingWhitespace
            guard head.hasSuffix(")"), let o = head.firstIndex(of: "(") else {
                throw bad("is not 'ALGORITHM(file)= digest'")
            }
            let algo = String(head[..<o]).trimmingWhitespace.uppercased().filter { $0 != "-" }
            guard let a = Algorithm(rawValue: algo) else {
                throw .unsupported(path: path, what: "line \(n + 1): digest algorithm '\(algo)' (SHA1, SHA256 and SHA512 are checked)")
            }
            let file = String(head[head.index(after: o)..<head.index(before: head.endIndex)])
            let hex = String(line[line.index(after: eq)...]).trimmingWhitespace.lowercased()
            let want = a == .sha1 ? 40 : a == .sha256 ? 64 : 128
            guard hex.count == want, hex.allSatisfy({ $0.isHexDigit }) else {
                throw bad("the \(a.rawValue) digest of '\(file)' is not \(want) hex digits")
            }
            guard entries[file] == nil else { throw bad("'\(file)' is listed twice") }
            entries[file] = Entry(algorithm: a, digest: hex)
        }
    }
}

/// A digest computed over bytes as they pass.
struct FileDigest {
    private var sha1: Insecure.SHA1?
    private var sha256: SHA256?
    private var sha512: SHA512?
    let algorithm: OVAManifest.Algorithm

    init(_ a: OVAManifest.Algorithm) {
        algorithm = a
        switch a {
        case .sha1: sha1 = Insecure.SHA1()
        case .sha256: sha256 = SHA256()
        case .sha512: sha512 = SHA512()
        }
    }

    mutating func update(_ p: UnsafeRawBufferPointer) {
        sha1?.update(bufferPointer: p)
        sha256?.update(bufferPointer: p)
        sha512?.update(bufferPointer: p)
    }

    func hex() -> String {
        let bytes: [UInt8]
        if let sha1 { bytes = Array(sha1.finalize()) }
        else if let sha256 { bytes = Array(sha256.finalize()) }
        else if let sha512 { bytes = Array(sha512.finalize()) }
        else { bytes = [] }
        return bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }
}
