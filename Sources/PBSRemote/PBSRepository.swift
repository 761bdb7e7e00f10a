import BackupSources
import Foundation
import Glibc

/// A Proxmox Backup Server repository as proxmox-backup-client writes it:
/// `[[USER@REALM[!TOKEN]@]HOST[:PORT]:]DATASTORE` (pbs-api-types `BACKUP_REPO_URL_REGEX`; host
/// `localhost`, port 8007 and user `root@pam` by default, as in pbs-client's backup_repo.rs).
/// IPv6 hosts are written in brackets. See Tests/Support/PBS-PROTOCOL-NOTES.md.
public struct PBSRepository: Sendable, Equatable, CustomStringConvertible {
    /// `user@realm`, or `user@realm!token` for an API token.
    public var authID: String
    /// As written (an IPv6 address keeps its brackets).
    public var host: String
    public var port: Int
    public var datastore: String

    public static let defaultPort = 8007

    public var isToken: Bool { authID.contains("!") }
    /// `host:port`, how errors name the server.
    public var server: String { "\(host):\(port)" }
    public var description: String { "\(authID)@\(host):\(port):\(datastore)" }

    public init(authID: String = "root@pam", host: String = "localhost", port: Int = PBSRepository.defaultPort, datastore: String) {
        self.authID = authID
        self.host = host
        self.port = port
        self.datastore = datastore
    }

    /// Parses a repository; errors name the field that is wrong.
    public init(parsing text: String) throws(SourceError) {
        func bad(_ why: String) -> SourceError { SourceError(.damaged, path: "repository '\(text)'", why) }
        var rest = Substring(text)
        // DATASTORE: after the last ':' (a SAFE_ID has no ':' or brackets).
        let store: Substring
        if let colon = rest.lastIndex(of: ":") {
            store = rest[rest.index(after: colon)...]
            rest = rest[..<colon]
        } else {
            store = rest
            rest = ""
        }
        guard Self.isSafeID(store) else { throw bad("datastore '\(store)' is not a name ([A-Za-z0-9_][A-Za-z0-9._-]*)") }
        datastore = String(store)
        authID = "root@pam"
        host = "localhost"
        port = Self.defaultPort
        guard !rest.isEmpty else { return }
        // AUTHID@: everything up to the last '@' (user@realm has one of its own).
        if let at = rest.lastIndex(of: "@") {
            let auth = rest[..<at]
            rest = rest[rest.index(after: at)...]
            let parts = auth.split(separator: "@", omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty,
                  !auth.contains(where: { $0 == ":" || $0 == "/" || $0.isWhitespace }) else {
                throw bad("user '\(auth)' is not USER@REALM or USER@REALM!TOKEN")
            }
            let realmAndToken = parts[1].split(separator: "!", omittingEmptySubsequences: false)
            guard realmAndToken.count <= 2, realmAndToken.allSatisfy({ !$0.isEmpty }) else {
                throw bad("user '\(auth)' is not USER@REALM or USER@REALM!TOKEN")
            }
            authID = String(auth)
        }
        // HOST[:PORT]
        var portText: Substring? = nil
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw bad("IPv6 host '\(rest)' lacks its ']'") }
            host = String(rest[...close])
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw bad("expected ':' after host \(host)") }
                portText = after.dropFirst()
            }
        } else {
            let parts = rest.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count <= 2 else { throw bad("host '\(rest)': write an IPv6 address in brackets") }
            host = String(parts[0])
            if parts.count == 2 { portText = parts[1] }
            guard !host.isEmpty, host.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "." || $0 == "-") }) else {
                throw bad("host '\(host)' is not a DNS name or IP address")
            }
        }
        if let portText {
            guard (1...5).contains(portText.count), portText.allSatisfy({ $0.isASCII && $0.isNumber }),
                  let p = Int(portText), (1...65535).contains(p) else {
                throw bad("port '\(portText)' is not 1 to 65535")
            }
            port = p
        }
    }

    /// PROXMOX_SAFE_ID: `[A-Za-z0-9_][A-Za-z0-9._\-]*`.
    static func isSafeID(_ s: Substring) -> Bool {
        guard let first = s.first, first.isASCII, first.isLetter || first.isNumber || first == "_" else { return false }
        return s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "." || $0 == "-") }
    }

    /// The host to connect to (without IPv6 brackets).
    var connectHost: String {
        host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
    }
    /// True when the host is an IP literal (no SNI, no host name to verify).
    var hostIsIPAddress: Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, connectHost, &v4) == 1 || inet_pton(AF_INET6, connectHost, &v6) == 1
    }
}

/// What proves who we are to the server and who the server is.
public struct PBSCredentials: Sendable {
    /// The password (ticket login) or the API token's secret.
    public var secret: String?
    /// SHA-256 of the server certificate's DER form, colon-separated hex (PBS_FINGERPRINT).
    public var fingerprint: String?

    public init(secret: String?, fingerprint: String?) {
        self.secret = secret
        self.fingerprint = fingerprint
    }

    /// As proxmox-backup-client reads them (pbs-client/src/tools/mod.rs): the secret from
    /// `PBS_PASSWORD`, `PBS_PASSWORD_FD`, `PBS_PASSWORD_FILE` (first line of each), else the first line
    /// of `passwordFile`; the fingerprint from `PBS_FINGERPRINT`.
    public static func fromEnvironment(passwordFile: String?) throws(SourceError) -> PBSCredentials {
        let env = ProcessInfo.processInfo.environment
        func firstLine(_ s: String) -> String { String(s.split(separator: "\n", omittingEmptySubsequences: false).first ?? "").replacingOccurrences(of: "\r", with: "") }
        var secret: String? = nil
        if let p = env["PBS_PASSWORD"] {
            secret = firstLine(p)
        } else if let fd = env["PBS_PASSWORD_FD"] {
            guard let n = Int32(fd), n >= 0 else {
                throw SourceError(.damaged, path: "PBS_PASSWORD_FD", "'\(fd)' is not a file descriptor")
            }
            let h = FileHandle(fileDescriptor: n, closeOnDealloc: false)
            guard let d = try? h.readToEnd() else {
                throw SourceError(.io, path: "PBS_PASSWORD_FD", "cannot read file descriptor \(n)")
            }
            secret = firstLine(String(decoding: d, as: UTF8.self))
        } else if let f = env["PBS_PASSWORD_FILE"] ?? passwordFile {
            guard let s = try? String(contentsOfFile: f, encoding: .utf8) else {
                throw SourceError(.missing, path: f, "cannot read the password file")
            }
            secret = firstLine(s)
        }
        var fp = env["PBS_FINGERPRINT"]?.trimmingCharacters(in: .whitespaces).lowercased()
        if fp?.isEmpty == true { fp = nil }
        if let f = fp {
            let hex = f.split(separator: ":")
            guard hex.count == 32, hex.allSatisfy({ $0.count == 2 && $0.allSatisfy(\.isHexDigit) }) else {
                throw SourceError(.damaged, path: "PBS_FINGERPRINT", "'\(f)' is not 32 colon-separated hex bytes")
            }
        }
        return PBSCredentials(secret: secret, fingerprint: fp)
    }
}
