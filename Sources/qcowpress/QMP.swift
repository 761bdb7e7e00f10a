import Foundation
import Glibc
import QcowPress

/// A QMP client on a unix socket: greeting, `qmp_capabilities`, then one command at a time
/// (events are skipped). Errors are one line naming the command.
final class QMPClient {
    let path: String
    private let fd: Int32
    private var pending = Data()

    init(path: String) throws {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw QcowPressError.io(IOError(errno: errno, operation: "socket", path: path)) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            close(fd)
            throw QcowPressError.invalidArgument("\(path): socket path too long")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        let r = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0 else {
            let e = errno
            close(fd)
            throw QcowPressError.io(IOError(errno: e, operation: "connect to QMP", path: path))
        }
        _ = try message()  // greeting
        _ = try execute("qmp_capabilities")
    }
    deinit { close(fd) }

    private func message() throws -> [String: Any] {
        while true {
            if let nl = pending.firstIndex(of: 0x0A) {
                let line = pending[pending.startIndex..<nl]
                pending.removeSubrange(pending.startIndex...nl)
                guard let obj = try? JSONSerialization.jsonObject(with: line) as? [String: Any] else {
                    throw QcowPressError.inputDamaged(path: path, location: "QMP sent something that is not a JSON object")
                }
                if obj["event"] != nil { continue }
                return obj
            }
            var buf = [UInt8](repeating: 0, count: 65536)
            let n = read(fd, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw QcowPressError.io(IOError(errno: n < 0 ? errno : EPIPE, operation: "read from QMP", path: path)) }
            pending.append(contentsOf: buf[0..<n])
        }
    }

    /// Runs one command; returns its "return" value or throws its error description.
    @discardableResult
    func execute(_ command: String, _ arguments: [String: Any]? = nil) throws -> Any {
        var obj: [String: Any] = ["execute": command]
        if let arguments { obj["arguments"] = arguments }
        var data = try JSONSerialization.data(withJSONObject: obj)
        data.append(0x0A)
        try data.withUnsafeBytes { p in
            var off = 0
            while off < p.count {
                let n = write(fd, p.baseAddress! + off, p.count - off)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw QcowPressError.io(IOError(errno: errno, operation: "write to QMP", path: path)) }
                off += n
            }
        }
        let reply = try message()
        if let e = reply["error"] as? [String: Any] {
            throw QcowPressError.invalidArgument("QMP \(command) failed: \(e["desc"] as? String ?? "\(e)")")
        }
        return reply["return"] ?? [:]
    }

    /// The block graph: node names by id, and edges (parent, child-role, child).
    func blockGraph() throws -> (names: [Int: (name: String, type: String)], edges: [(parent: Int, role: String, child: Int)]) {
        guard let g = try execute("x-debug-query-block-graph") as? [String: Any],
              let nodes = g["nodes"] as? [[String: Any]], let edges = g["edges"] as? [[String: Any]] else {
            throw QcowPressError.inputDamaged(path: path, location: "x-debug-query-block-graph returned no graph")
        }
        var names: [Int: (String, String)] = [:]
        for n in nodes { if let id = n["id"] as? Int { names[id] = (n["name"] as? String ?? "", n["type"] as? String ?? "") } }
        let e = edges.compactMap { x -> (Int, String, Int)? in
            guard let p = x["parent"] as? Int, let c = x["child"] as? Int else { return nil }
            return (p, x["name"] as? String ?? "", c)
        }
        return (names, e)
    }

    /// Moves block node `node` (an overlay whose backing is the live NBD export) onto the restored
    /// image without stopping the guest: blockdev-add of the image read-only, blockdev-reopen of
    /// the overlay with it as backing, blockdev-del of the NBD node, change-backing-file to the
    /// image's path (so the overlay's header names it).
    func switchBacking(node: String, to image: String, newNode: String) throws {
        let g = try blockGraph()
        guard let id = g.names.first(where: { $0.value.name == node && $0.value.type == "block-driver" })?.key else {
            throw QcowPressError.invalidArgument("QMP: no block node named '\(node)'")
        }
        guard let fileID = g.edges.first(where: { $0.parent == id && $0.role == "file" })?.child,
              let oldID = g.edges.first(where: { $0.parent == id && $0.role == "backing" })?.child else {
            throw QcowPressError.invalidArgument("QMP: node '\(node)' has no file and backing child (is it the qcow2 overlay over the live export?)")
        }
        // The node that owns the chain: walk up through block-driver parents.
        var root = id
        while let up = g.edges.first(where: { $0.child == root && g.names[$0.parent]?.type == "block-driver" })?.parent { root = up }
        try execute("blockdev-add", ["driver": "qcow2", "node-name": newNode, "read-only": true,
                                     "file": ["driver": "file", "filename": image]])
        try execute("blockdev-reopen", ["options": [["node-name": node, "driver": "qcow2", "file": g.names[fileID]!.name, "backing": newNode]]])
        try execute("blockdev-del", ["node-name": g.names[oldID]!.name])
        try execute("change-backing-file", ["device": g.names[root]!.name, "image-node-name": node, "backing-file": image])
    }

    /// True once a block node of that name exists.
    func hasNode(_ node: String) throws -> Bool {
        try blockGraph().names.values.contains { $0.name == node }
    }
}
