import DirectIO
import Glibc

/// Partial clusters: assembled in a slot while the pool allows (``SlotPool/reservePartial()``),
/// else in the ``SpillFile``, and read back into a slot once complete. A slot held by a partial
/// cluster comes back only when a client writes the rest, so if they could take every slot, the
/// next write would wait forever (a backup job writing out of order into large clusters did).
extension Qcow2Encoder {
    /// Takes [range) of cluster `c` (the bytes at `src`) into its assembly. False when it needs a
    /// slot (nothing was claimed: the caller waits for one and comes back); a spilled cluster it
    /// completed is left in `cursor.readback`.
    func intakePartial(_ c: UInt64, _ range: Range<Int>, _ src: UnsafeRawPointer, _ cursor: inout IntakeCursor) throws(QcowPressError) -> Bool {
        let home: PartialHome
        if let raw = try map.claimPartial(c, range: range) {
            home = PartialHome(raw: raw)
        } else {
            let fresh: PartialHome
            if pool.reservePartial() {
                guard let s = takeSlot(&cursor) else {
                    pool.endPartial()
                    return false
                }
                memset(pool.pointer(s), 0, clusterSize)
                fresh = PartialHome(slot: s)
            } else {
                fresh = try spill.allocate()
            }
            switch map.installPartial(c, range: range, slot: fresh.raw) {
            case .success(let (raw, installed)):
                if !installed { giveBack(fresh) }
                home = PartialHome(raw: raw)
            case .failure(let e):
                giveBack(fresh)
                throw e
            }
        }
        if let slot = home.slot {
            memcpy(pool.pointer(slot) + range.lowerBound, src, range.count)
        } else if let region = home.spilledRegion {
            do throws(QcowPressError) {
                try spill.write(region: region, at: range.lowerBound, src, count: range.count)
            } catch {
                // The range is claimed but its bytes are not there: the image cannot be finished.
                fail(error)
                throw error
            }
        }
        switch map.filledPartial(c, count: range.count) {
        case .incomplete: break
        case .complete:
            if let slot = home.slot {
                pool.endPartial()
                cursor.batch.append(WorkItem(cluster: c, slot: slot))
            } else if let region = home.spilledRegion {
                cursor.readback = (c, region)
            }
        case .abandoned:
            // The encoder stopped during the copy, and this was the last one into the cluster:
            // it is ours to give back.
            giveBack(home)
            try failIfStopped()
        }
        return true
    }

    /// Reads a spilled cluster this call completed into a slot and batches it; false when no
    /// slot is free now (after handing the batch to the workers): the caller waits for one.
    func readBackCompleted(_ cursor: inout IntakeCursor) throws(QcowPressError) -> Bool {
        guard let (c, region) = cursor.readback else { return true }
        guard let slot = takeSlot(&cursor) else { return false }
        cursor.readback = nil
        cursor.batch.append(try readBack(c, region: region, into: slot))
        return true
    }

    /// Reads spilled cluster `c` from `region` into `slot` (the rest of the slot zeroed) and gives
    /// the region back; the slot comes back on a failure, which fails the encoder.
    func readBack(_ c: UInt64, region: Int32, into slot: Int32) throws(QcowPressError) -> WorkItem {
        let n = validBytes(c)
        do throws(QcowPressError) {
            try spill.read(region: region, into: pool.pointer(slot), count: n)
        } catch {
            pool.release(slot)
            fail(error)
            throw error
        }
        if n < clusterSize { memset(pool.pointer(slot) + n, 0, clusterSize - n) }
        spill.free(region: region)
        return WorkItem(cluster: c, slot: slot)
    }

    /// Gives a partial cluster's home back: its slot to the pool, or its spill region.
    func giveBack(_ home: PartialHome) {
        if let slot = home.slot {
            pool.endPartial()
            pool.release(slot)
        } else if let region = home.spilledRegion {
            spill.free(region: region)
        }
    }

    /// At finish: every partly written cluster goes to the workers (its unwritten bytes are
    /// zero); those in slots at once, the spilled ones are returned to be read back.
    func queuePartialsInSlots() -> [(cluster: UInt64, region: Int32)] {
        var batch: [WorkItem] = []
        var spilled: [(cluster: UInt64, region: Int32)] = []
        for p in map.takePartials() {
            let home = PartialHome(raw: p.slot)
            if let slot = home.slot {
                pool.endPartial()
                batch.append(WorkItem(cluster: p.cluster, slot: slot))
            } else if let region = home.spilledRegion {
                spilled.append((p.cluster, region))
            }
        }
        flush(&batch)
        return spilled.sorted { $0.cluster < $1.cluster }
    }
}
