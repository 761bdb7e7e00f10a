import BackupSources
import Foundation
import PBSRemote

/// A Proxmox Backup Server repository and how to log in to it, as proxmox-backup-client takes
/// them: `[[USER@REALM[!TOKEN]@]HOST[:PORT]:]DATASTORE` (port 8007), the password or API token
/// secret, and the SHA-256 fingerprint of the server's certificate (colon-separated hex) for a
/// certificate the system does not trust.
public struct PBSServer: Sendable {
    public let repository: String
    let parsed: PBSRepository
    let credentials: PBSCredentials

    public init(repository: String, secret: String?, fingerprint: String?) throws(QcowPressError) {
        self.repository = repository
        do throws(SourceError) {
            parsed = try PBSRepository(parsing: repository)
        } catch {
            throw .invalidArgument("\(error.path): \(error.detail)")
        }
        credentials = PBSCredentials(secret: secret, fingerprint: fingerprint?.lowercased())
    }

    /// `repository` (or `PBS_REPOSITORY` when nil) with the secret from `PBS_PASSWORD`,
    /// `PBS_PASSWORD_FD` or `PBS_PASSWORD_FILE` (or `passwordFile`'s first line) and the fingerprint
    /// from `PBS_FINGERPRINT`. Nil when neither names a repository.
    public static func fromEnvironment(repository: String?, passwordFile: String?) throws(QcowPressError) -> PBSServer? {
        guard let repo = repository ?? ProcessInfo.processInfo.environment["PBS_REPOSITORY"], !repo.isEmpty else { return nil }
        let c: PBSCredentials
        do throws(SourceError) { c = try PBSCredentials.fromEnvironment(passwordFile: passwordFile) } catch {
            throw .invalidArgument("\(error.path): \(error.detail)")
        }
        return try PBSServer(repository: repo, secret: c.secret, fingerprint: c.fingerprint)
    }

    func client() throws(SourceError) -> PBSRemoteClient {
        try PBSRemoteClient(repository: parsed, credentials: credentials)
    }
}
