extension QMPClient {
    /// The block graph (`x-debug-query-block-graph`).
    public func blockGraph() throws(QMPError) -> BlockGraph {
        let command = "x-debug-query-block-graph"
        guard let g = BlockGraph(qmpValue: try execute(command)) else {
            throw QMPError(socket: path, reason: .malformed("\(command) returned no graph"))
        }
        return g
    }

    /// True once a block node of that name exists.
    public func hasNode(_ node: String) throws(QMPError) -> Bool {
        try blockGraph().hasNode(named: node)
    }

    /// Moves block node `node` (an overlay whose backing is the live NBD export) onto `image`
    /// (absolute) without stopping the guest: the steps of ``BlockGraph/switchPlan(node:image:newNode:)``,
    /// one exchange each. `planned` gets them before the first is sent (to say what is left to do
    /// by hand when one fails).
    public func switchBacking(node: String, to image: String, newNode: String, planned: ([QMPStep]) -> Void = { _ in }) throws(QMPError) {
        let graph = try blockGraph()
        let steps: [QMPStep]
        do throws(BlockGraphError) {
            steps = try graph.switchPlan(node: node, image: image, newNode: newNode)
        } catch {
            throw QMPError(socket: path, reason: .blockGraph(error.message))
        }
        planned(steps)
        for s in steps { try execute(s.command, s.arguments) }
    }
}
