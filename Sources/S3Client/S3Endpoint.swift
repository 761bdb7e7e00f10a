/// Where the bucket is served: scheme, host, port, region, addressing style and how the server's
/// certificate is trusted.
public struct S3Endpoint: Sendable, CustomStringConvertible {
    /// TLS (https://) or plain HTTP (http://, only when the endpoint says so).
    public var tls: Bool
    /// The host name or IP address (an IPv6 address without brackets).
    public var host: String
    public var port: Int
    public var region: String
    /// Path style (`host/bucket/key`) instead of virtual-hosted style (`bucket.host/key`). An
    /// endpoint given as an IP address always uses path style (as botocore does): a bucket cannot
    /// be a subdomain of an address.
    public var pathStyle: Bool
    /// The pinned SHA-256 fingerprint of the server's leaf certificate (lowercase "aa:bb:…"), in
    /// place of the system CAs; nil verifies against the system CAs.
    public var fingerprint: String?
    /// Connect to this address instead of resolving the (virtual) host name, as curl's --resolve:
    /// lets a test reach virtual-hosted names on a local server. The Host header and TLS name stay.
    public var connectAddress: String?

    /// endpoint nil = https://s3.<region>.amazonaws.com; "http://host:port" or "https://host[:port]".
    public init(endpoint: String?, region: String = "us-west-1", pathStyle: Bool, fingerprint: String?) throws(S3Error) {
        func bad(_ why: String) -> S3Error { S3Error(code: "endpoint", bucket: "", message: why) }
        guard !region.isEmpty, region.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }) else {
            throw bad("the region '\(region)' is not a region name (letters, digits and '-')")
        }
        self.region = region
        if let fingerprint {
            guard let fp = Self.normalizedFingerprint(fingerprint) else {
                throw bad("the fingerprint '\(fingerprint)' is not a SHA-256 fingerprint (32 hex bytes, as aa:bb:…)")
            }
            self.fingerprint = fp
        } else {
            self.fingerprint = nil
        }
        guard let endpoint else {
            tls = true
            host = "s3.\(region).amazonaws.com"
            port = 443
            self.pathStyle = pathStyle
            return
        }
        var rest: Substring
        if endpoint.lowercased().hasPrefix("https://") {
            tls = true
            rest = endpoint.dropFirst(8)
        } else if endpoint.lowercased().hasPrefix("http://") {
            tls = false
            rest = endpoint.dropFirst(7)
        } else {
            throw bad("the endpoint '\(endpoint)' must begin with https:// or http://")
        }
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        guard !rest.contains("/"), !rest.contains("?"), !rest.contains("@"), !rest.contains("#") else {
            throw bad("the endpoint '\(endpoint)' must be scheme://host[:port], without a path, user or query")
        }
        var hostPart: Substring
        var portPart: Substring? = nil
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw bad("the endpoint '\(endpoint)' has an unclosed '['") }
            hostPart = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw bad("the endpoint '\(endpoint)' has text after the address") }
                portPart = after.dropFirst()
            }
        } else if let colon = rest.lastIndex(of: ":") {
            hostPart = rest[..<colon]
            portPart = rest[rest.index(after: colon)...]
        } else {
            hostPart = rest
        }
        guard !hostPart.isEmpty else { throw bad("the endpoint '\(endpoint)' has no host") }
        host = String(hostPart)
        if let portPart {
            guard let p = Int(portPart), (1...65535).contains(p) else {
                throw bad("the endpoint '\(endpoint)' has a port that is not a number from 1 to 65535")
            }
            port = p
        } else {
            port = tls ? 443 : 80
        }
        if !tls, fingerprint != nil {
            throw bad("a fingerprint pins a TLS certificate, and the endpoint '\(endpoint)' is plain http://")
        }
        self.pathStyle = pathStyle || Self.isIPAddress(host)
    }

    /// "https://host:port" as given (the secret-free name errors use for the server).
    public var description: String {
        "\(tls ? "https" : "http")://\(bracketedHost):\(port)"
    }

    var bracketedHost: String { host.contains(":") ? "[\(host)]" : host }

    /// The Host header value (and TLS name) for `bucket`: `bucket.host` in virtual-hosted style.
    func hostHeader(bucket: String) -> String {
        let name = pathStyle ? bracketedHost : "\(bucket).\(host)"
        return port == (tls ? 443 : 80) ? name : "\(name):\(port)"
    }

    /// The name to connect to (and send in SNI) for `bucket`.
    func connectHost(bucket: String) -> String {
        if let connectAddress { return connectAddress }
        return pathStyle ? host : "\(bucket).\(host)"
    }

    func serverName(bucket: String) -> String? {
        if pathStyle { return Self.isIPAddress(host) ? nil : host }
        return "\(bucket).\(host)"
    }

    static func isIPAddress(_ h: String) -> Bool {
        if h.contains(":") { return true }
        let parts = h.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts.allSatisfy { UInt8($0) != nil }
    }

    /// Lowercase colon-separated form of a SHA-256 fingerprint given with or without colons.
    static func normalizedFingerprint(_ s: String) -> String? {
        let hex = s.lowercased().filter { $0 != ":" }
        guard hex.count == 64, hex.allSatisfy({ $0.isHexDigit }) else { return nil }
        var pairs: [String] = []
        var i = hex.startIndex
        while i < hex.endIndex {
            let j = hex.index(i, offsetBy: 2)
            pairs.append(String(hex[i..<j]))
            i = j
        }
        return pairs.joined(separator: ":")
    }
}
