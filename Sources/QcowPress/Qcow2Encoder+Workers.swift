import ClusterCompression
import DirectIO
import Glibc

extension Qcow2Encoder {
    /// Clusters a worker takes at once. Small enough that both cores stay busy near the end of an
    /// image, large enough that the queue lock is taken once per ~512 KiB of data.
    static let workerBatch = 8

    /// One compression worker: zero test, compress in place into its slot, hand results over in a
    /// batch. Owns one codec context for its whole life.
    func workerLoop(_ settings: CompressionSettings?) {
        let compressor = settings.map { Codecs.makeCompressor($0, clusterSize: clusterSize) }
        let scratch = AlignedBuffer(capacity: clusterSize)
        var out: [ResultItem] = []
        out.reserveCapacity(Self.workerBatch)
        var local: [WorkItem] = []
        while true {
            local.removeAll(keepingCapacity: true)
            let stop: Bool = workLock.withLock {
                while workHead == workQueue.count && !workersStop { workLock.wait() }
                if workersStop { return true }
                let n = min(Self.workerBatch, workQueue.count - workHead)
                local.append(contentsOf: workQueue[workHead..<(workHead + n)])
                workHead += n
                if workHead > 4096 && workHead * 2 > workQueue.count {
                    workQueue.removeFirst(workHead)
                    workHead = 0
                }
                return false
            }
            if stop { return }
            let t0 = monotonicNanoseconds()
            for item in local {
                let p = pool.pointer(item.slot)
                if isAllZero(p, clusterSize) {
                    pool.release(item.slot)
                    out.append(ResultItem(cluster: item.cluster, slot: -1, kind: .zero))
                    continue
                }
                guard let compressor else {
                    out.append(ResultItem(cluster: item.cluster, slot: item.slot, kind: .raw))
                    continue
                }
                let src = UnsafeRawBufferPointer(start: p, count: clusterSize)
                switch compressor.compress(src, into: scratch.bytes) {
                case .compressed(let length):
                    memcpy(p, scratch.pointer, length)
                    out.append(ResultItem(cluster: item.cluster, slot: item.slot, kind: .compressed(length)))
                case .didNotFit:
                    out.append(ResultItem(cluster: item.cluster, slot: item.slot, kind: .raw))
                }
            }
            let dt = monotonicNanoseconds() - t0
            workLock.withLock { codecNanoseconds += dt }
            resultLock.withLock {
                results.append(contentsOf: out)
                resultLock.signal()
            }
            out.removeAll(keepingCapacity: true)
        }
    }

    func stopWorkers() {
        workLock.withLock {
            workersStop = true
            workLock.broadcast()
        }
    }
}
