/// The names a snapshot is addressed by, checked the same way whichever source holds it (a
/// datastore directory, a server, a bucket): every part a plain name, so that none can leave the
/// datastore, and a bad one refused with the same line everywhere.
extension PBSSnapshot {
    /// `vm/100` → ("vm", "100"): TYPE vm, ct or host, ID a plain name.
    public static func checkedGroup(_ group: String) throws(SourceError) -> (type: String, id: String) {
        let parts = group.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 2, ["vm", "ct", "host"].contains(parts[0]) else {
            throw SourceError(.damaged, path: group, "group must be TYPE/ID with TYPE vm, ct or host")
        }
        try checkComponent(parts[1], what: "backup id")
        return (parts[0], parts[1])
    }

    /// `vm/100/2026-11-20T10:00:00Z` → ("vm", "100", "2026-11-20T10:00:00Z"): TYPE vm, ct or host,
    /// ID a plain name. The time is the caller's to check: a datastore as a plain name (a
    /// directory or key), a server as the time it sends.
    public static func checkedSnapshot(_ snapshot: String) throws(SourceError) -> (type: String, id: String, time: String) {
        let parts = snapshot.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 3, ["vm", "ct", "host"].contains(parts[0]) else {
            throw SourceError(.damaged, path: snapshot, "snapshot must be TYPE/ID/TIME with TYPE vm, ct or host")
        }
        try checkComponent(parts[1], what: "backup id")
        return (parts[0], parts[1], parts[2])
    }

    /// `a/b` → ["a", "b"] (each becomes `ns/<component>`); [] for nil or "". At most 7 levels, as
    /// PBS (MAX_NAMESPACE_DEPTH).
    public static func checkedNamespace(_ namespace: String?) throws(SourceError) -> [String] {
        guard let namespace, !namespace.isEmpty else { return [] }
        let parts = namespace.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard parts.count <= 7 else { throw SourceError(.damaged, path: namespace, "namespace deeper than 7 levels") }
        for p in parts { try checkComponent(p, what: "namespace component") }
        return parts
    }
}
