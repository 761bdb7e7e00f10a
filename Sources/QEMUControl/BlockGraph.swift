import Foundation

/// QEMU's block graph as `x-debug-query-block-graph` returns it: nodes by id, and edges from a
/// parent to a child in a role ("file", "backing", ...).
public struct BlockGraph: Sendable, Equatable {
    public struct Node: Sendable, Equatable {
        public var name: String
        /// "block-driver" for a node of the block layer ("block-backend", "block-job" otherwise).
        public var type: String
        public init(name: String, type: String) {
            self.name = name
            self.type = type
        }
    }
    public struct Edge: Sendable, Equatable {
        public var parent: Int
        public var role: String
        public var child: Int
        public init(parent: Int, role: String, child: Int) {
            self.parent = parent
            self.role = role
            self.child = child
        }
    }
    public var nodes: [Int: Node]
    public var edges: [Edge]

    public init(nodes: [Int: Node], edges: [Edge]) {
        self.nodes = nodes
        self.edges = edges
    }

    /// The graph in a `x-debug-query-block-graph` return value; nil when it holds none.
    public init?(qmpValue: Any) {
        guard let g = qmpValue as? [String: Any], let ns = g["nodes"] as? [[String: Any]], let es = g["edges"] as? [[String: Any]] else {
            return nil
        }
        var nodes: [Int: Node] = [:]
        for n in ns {
            if let id = n["id"] as? Int { nodes[id] = Node(name: n["name"] as? String ?? "", type: n["type"] as? String ?? "") }
        }
        self.nodes = nodes
        edges = es.compactMap { e in
            guard let p = e["parent"] as? Int, let c = e["child"] as? Int else { return nil }
            return Edge(parent: p, role: e["name"] as? String ?? "", child: c)
        }
    }

    public func hasNode(named name: String) -> Bool { nodes.values.contains { $0.name == name } }

    /// The commands that move `node` — a qcow2 overlay whose backing is the live NBD export —
    /// onto `image` without stopping the guest: `blockdev-add` of the image read-only as
    /// `newNode`, `blockdev-reopen` of the overlay with it as backing, `blockdev-del` of the NBD
    /// node, `change-backing-file` to the image's path (so the overlay's header names it).
    /// `image` must be absolute (QEMU's working directory is not ours).
    public func switchPlan(node: String, image: String, newNode: String) throws(BlockGraphError) -> [QMPStep] {
        guard let id = nodes.first(where: { $0.value.name == node && $0.value.type == "block-driver" })?.key else {
            throw BlockGraphError(message: "no block node named '\(node)'")
        }
        guard let file = edges.first(where: { $0.parent == id && $0.role == "file" }).flatMap({ nodes[$0.child] }),
              let old = edges.first(where: { $0.parent == id && $0.role == "backing" }).flatMap({ nodes[$0.child] }) else {
            throw BlockGraphError(message: "node '\(node)' has no file and backing child (is it the qcow2 overlay over the live export?)")
        }
        // change-backing-file names the node that owns the chain: walk up through block-driver parents.
        var root = id
        while let up = edges.first(where: { $0.child == root && nodes[$0.parent]?.type == "block-driver" })?.parent { root = up }
        return [
            QMPStep("blockdev-add", ["driver": "qcow2", "node-name": newNode, "read-only": true,
                                     "file": ["driver": "file", "filename": image]]),
            QMPStep("blockdev-reopen", ["options": [["node-name": node, "driver": "qcow2", "file": file.name, "backing": newNode]]]),
            QMPStep("blockdev-del", ["node-name": old.name]),
            QMPStep("change-backing-file", ["device": nodes[root]!.name, "image-node-name": node, "backing-file": image]),
        ]
    }

    /// What ``switchPlan(node:image:newNode:)`` would send, for a graph not read: names QEMU
    /// alone knows are described in angle brackets.
    public static func manualSwitch(node: String, image: String, newNode: String) -> String {
        let add = QMPStep("blockdev-add", ["driver": "qcow2", "node-name": newNode, "read-only": true,
                                           "file": ["driver": "file", "filename": image]])
        let (n, i, b) = (QMPStep.json(node), QMPStep.json(image), QMPStep.json(newNode))
        return [
            add.description,
            #"blockdev-reopen {"options":[{"backing":\#(b),"driver":"qcow2","file":<its file node>,"node-name":\#(n)}]}"#,
            #"blockdev-del {"node-name":<its old (NBD) backing node>}"#,
            #"change-backing-file {"backing-file":\#(i),"device":<the top node of its chain>,"image-node-name":\#(n)}"#,
        ].joined(separator: "; ")
    }
}

/// The block graph does not allow the switch asked for.
public struct BlockGraphError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// One QMP command with its arguments (JSON values: strings, numbers, Bools, arrays,
/// dictionaries), printable as `command {json}`.
public struct QMPStep: CustomStringConvertible {
    public var command: String
    public var arguments: [String: Any]

    public init(_ command: String, _ arguments: [String: Any]) {
        self.command = command
        self.arguments = arguments
    }

    public var description: String { "\(command) \(Self.json(arguments))" }

    /// Compact JSON with sorted keys and unescaped slashes (paths read as typed).
    static func json(_ value: Any) -> String {
        guard let d = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .withoutEscapingSlashes, .fragmentsAllowed]) else {
            return "\(value)"
        }
        return String(decoding: d, as: UTF8.self)
    }
}
