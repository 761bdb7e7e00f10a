import Foundation
import Glibc
import QcowPress

/// Target image-tools: what `map` and `measure` read of a qcow2 beyond the reader itself — block
/// status through the clusters (the metadata-preallocation check reads the refcount blocks; a
/// preallocated-zero cluster's entry), the bitmaps directory measure sizes, and qcow2_measure's
/// arithmetic on sizes and options taken from the input. The walk is bounded (4096 runs).
func fuzzImageTools(_ input: [UInt8]) {
    withInputFile(input, suffix: "tools.qcow2") { p in fuzzImageTools(input, path: p) }
}

private func fuzzImageTools(_ input: [UInt8], path p: String) {
    var word: UInt64 = 0x9E37_79B9
    for b in input.prefix(4096) { word = word &* 31 &+ UInt64(b) }
    var o = MeasureOptions()
    o.clusterSize = 1 << (9 + Int(word % 13))
    o.refcountOrder = Int((word >> 8) % 7)
    o.extendedL2 = word & (1 << 20) != 0 && o.clusterSize >= 16384
    _ = try? ImageMeasure.qcow2(size: word >> UInt64(word % 40), options: o)
    guard let img = try? Qcow2Image(path: p, openBacking: false) else { return }
    var at: UInt64 = 0
    var runs = 0
    while at < img.virtualSize && runs < 4096 {
        guard let s = try? BlockStatusQuery.status(of: img, at: at, limit: img.virtualSize), s.length > 0 else { break }
        at += s.length
        runs += 1
    }
    _ = try? ImageMeasure.bitmapsSize(of: img, clusterSize: UInt64(o.clusterSize))
}
