import ArgumentParser
import NBDExports

/// `serve image|pbs`: TLS as qemu-nbd speaks it, plaintext beyond loopback only when asked, and
/// the handshake's deadline.
struct ServeSecurityArguments: ParsableArguments {
    @Option(name: .customLong("tls-creds"), help: ArgumentHelp("Serve over TLS (NBD_OPT_STARTTLS) with QEMU's tls-creds-x509 files in DIR: ca-cert.pem, server-cert.pem, server-key.pem. Every client must present a certificate signed by ca-cert.pem.", valueName: "dir"),
            completion: .directory)
    var tlsCreds: String?
    @Option(name: .customLong("tls-allow"), help: ArgumentHelp("With --tls-creds: accept only client certificates with this subject CN (repeatable).", valueName: "cn"))
    var tlsAllow: [String] = []
    @Flag(help: "Allow plaintext NBD on an address other than loopback (refused without --tls-creds otherwise).")
    var insecure = false
    @Option(name: .customLong("handshake-timeout"), help: ArgumentHelp("Seconds a client may take to negotiate (TLS included) before it is dropped (0 for no limit).", valueName: "seconds"))
    var handshakeTimeout: Double = 10

    func validate() throws {
        guard handshakeTimeout >= 0, handshakeTimeout.isFinite else { throw ValidationError("--handshake-timeout takes seconds ≥ 0") }
        if !tlsAllow.isEmpty && tlsCreds == nil { throw ValidationError("--tls-allow needs --tls-creds DIR") }
    }

    var security: ServerSecurity {
        ServerSecurity(credentials: tlsCreds, allowedNames: tlsAllow, insecure: insecure,
                       handshakeTimeout: handshakeTimeout == 0 ? nil : .milliseconds(Int64(handshakeTimeout * 1000)))
    }
}
