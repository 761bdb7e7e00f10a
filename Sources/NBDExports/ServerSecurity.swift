import DirectIO
import Foundation
import NBDServer
import QcowPress

/// How a TCP server protects its exports: TLS from a directory of credentials in QEMU's
/// `tls-creds-x509` layout, the client CNs allowed, whether plaintext beyond loopback is wanted,
/// and how long a client may take to negotiate.
public struct ServerSecurity: Sendable {
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (QEMU's names), or nil for plaintext.
    public var credentials: String?
    /// Subject CNs of the client certificates accepted (any signed by the CA when empty).
    public var allowedNames: [String]
    /// Plaintext on an address other than loopback (refused otherwise).
    public var insecure: Bool
    /// A client still negotiating this long after it connected is refused (qemu-nbd's
    /// `--handshake-limit` is 10 s too; QEMU and libnbd negotiate in milliseconds).
    public var handshakeTimeout: Duration?

    public init(credentials: String? = nil, allowedNames: [String] = [], insecure: Bool = false, handshakeTimeout: Duration? = .seconds(10)) {
        self.credentials = credentials
        self.allowedNames = allowedNames
        self.insecure = insecure
        self.handshakeTimeout = handshakeTimeout
    }

    /// The credentials, read and checked: a missing, unreadable or malformed file is an error
    /// naming it; a private key others may read is a warning (`warn`).
    func load(warn: (String) -> Void) throws(QcowPressError) -> NBDTLS? {
        guard let dir = credentials else {
            if !allowedNames.isEmpty { throw .invalidArgument("--tls-allow needs --tls-creds DIR") }
            return nil
        }
        guard FileNames.isDirectory(dir) else { throw .invalidArgument("--tls-creds \(dir): not a directory") }
        func read(_ name: String) throws(QcowPressError) -> [UInt8] {
            let path = (dir as NSString).appendingPathComponent(name)
            guard FileNames.exists(path) else { throw .invalidArgument("\(path): missing (--tls-creds needs ca-cert.pem, server-cert.pem, server-key.pem)") }
            guard let data = FileManager.default.contents(atPath: path) else { throw .invalidArgument("\(path): cannot read it") }
            return [UInt8](data)
        }
        let ca = try read("ca-cert.pem"), cert = try read("server-cert.pem"), key = try read("server-key.pem")
        let keyPath = (dir as NSString).appendingPathComponent("server-key.pem")
        if let mode = (try? FileManager.default.attributesOfItem(atPath: keyPath))?[.posixPermissions] as? NSNumber, mode.intValue & 0o077 != 0 {
            warn("warning: \(keyPath) is readable by others (mode \(String(mode.intValue & 0o777, radix: 8))): chmod 600 it")
        }
        do throws(NBDTLS.CredentialError) {
            return try NBDTLS(caPEM: ca, certificatePEM: cert, keyPEM: key, allowedNames: allowedNames)
        } catch {
            throw .invalidArgument("\((dir as NSString).appendingPathComponent(error.file)): \(error.message)")
        }
    }

    /// Plaintext is served on loopback only, unless `insecure` says otherwise.
    func checkPlaintext(host: String) throws(QcowPressError) {
        guard credentials == nil, !insecure, !Self.isLoopback(host) else { return }
        throw .invalidArgument("--listen \(host): plaintext NBD beyond loopback; give --tls-creds DIR (or --insecure to serve it in the clear)")
    }

    /// 127.0.0.0/8, ::1 and localhost.
    static func isLoopback(_ host: String) -> Bool {
        let h = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        if h == "localhost" || h == "::1" || h == "0:0:0:0:0:0:0:1" { return true }
        let parts = h.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts[0] == "127" && parts.allSatisfy { UInt8($0) != nil }
    }
}
