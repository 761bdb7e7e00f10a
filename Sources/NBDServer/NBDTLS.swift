import NIOCore
import NIOSSL

/// TLS as QEMU's NBD server speaks it (`NBD_OPT_STARTTLS`, x509 credentials with
/// `verify-peer=on`): the server's certificate and key, the CA every client certificate must be
/// signed by, and the subject CNs allowed (any when empty, as qemu-nbd without `--tls-authz`).
/// TLS 1.2 and 1.3. Made from the files' bytes: this target reads no files of its own.
public struct NBDTLS: Sendable {
    let context: NIOSSLContext
    let allowedNames: Set<String>
    /// The CA's subject names: a refused certificate it issued was refused for another reason.
    let caNames: [[SSLCertificateName]]

    /// What is wrong with which of the three: `file` is "ca-cert.pem", "server-cert.pem" or
    /// "server-key.pem" (QEMU's names for them).
    public struct CredentialError: Error, Sendable {
        public var file: String
        public var message: String
    }

    public init(caPEM: [UInt8], certificatePEM: [UInt8], keyPEM: [UInt8], allowedNames: [String]) throws(CredentialError) {
        func parse<T>(_ file: String, _ what: String, _ body: () throws -> T) throws(CredentialError) -> T {
            do { return try body() } catch { throw CredentialError(file: file, message: "not a PEM \(what) (\(error))") }
        }
        let ca = try parse("ca-cert.pem", "certificate") { try NIOSSLCertificate.fromPEMBytes(caPEM) }
        let chain = try parse("server-cert.pem", "certificate") { try NIOSSLCertificate.fromPEMBytes(certificatePEM) }
        let key = try parse("server-key.pem", "private key") { try NIOSSLPrivateKey(bytes: keyPEM, format: .pem) }
        guard !ca.isEmpty else { throw CredentialError(file: "ca-cert.pem", message: "holds no certificate") }
        guard !chain.isEmpty else { throw CredentialError(file: "server-cert.pem", message: "holds no certificate") }
        var config = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        config.minimumTLSVersion = .tlsv12
        // verify-peer=on: a certificate signed by the CA (valid now, for client use) is required;
        // client certificates name no host.
        config.certificateVerification = .noHostnameVerification
        config.trustRoots = .certificates(ca)
        config.sendCANameList = true
        do {
            context = try NIOSSLContext(configuration: config)
        } catch {
            throw CredentialError(file: "server-key.pem", message: "does not go with server-cert.pem (\(error))")
        }
        self.allowedNames = Set(allowedNames)
        caNames = ca.map(\.subjectName)
    }

    /// The subject CNs of `certificate`.
    static func commonNames(_ certificate: NIOSSLCertificate) -> [String] {
        certificate.subjectName.filter { $0.type == .commonName }.map(\.value)
    }

    /// Why a client certificate the verification refused was refused, in words (BoringSSL's
    /// error says only that verification failed): expired, not yet valid, issued by another CA,
    /// or else (issued by this CA) not meant for a client (its key usage).
    func refusal(of certificate: NIOSSLCertificate, now: Int) -> String {
        let cn = Self.commonNames(certificate).first.map { " (CN \($0))" } ?? ""
        if Int(certificate.notValidAfter) < now { return "client certificate\(cn) expired" }
        if Int(certificate.notValidBefore) > now { return "client certificate\(cn) not valid yet" }
        if !caNames.contains(certificate.issuerName) { return "client certificate\(cn) not signed by ca-cert.pem" }
        return "client certificate\(cn) not for TLS client authentication (its key usage), or its signature is bad"
    }
}
