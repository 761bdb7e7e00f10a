import DirectIO
import Glibc
import Qcow2Format

/// `qcowpress check`: recounts every reference in a qcow2 image (header, L1/L2 tables, data and
/// compressed clusters, refcount structures, snapshots, bitmaps) and compares with the stored
/// refcounts, as `qemu-img check` does, without repairing anything.
public struct Qcow2Checker: Sendable {
    public struct Result: Sendable, Codable {
        public var filename: String
        public var format = "qcow2"
        public var checkErrors: Int = 0
        public var corruptions: Int = 0
        public var leaks: Int = 0
        public var imageEndOffset: UInt64 = 0
        public var totalClusters: UInt64 = 0
        public var allocatedClusters: UInt64 = 0
        public var fragmentedClusters: UInt64 = 0
        public var compressedClusters: UInt64 = 0
        /// One line per problem, as qemu-img prints them.
        public var messages: [String] = []

        enum CodingKeys: String, CodingKey {
            case filename, format, messages
            case checkErrors = "check-errors"
            case corruptions, leaks
            case imageEndOffset = "image-end-offset"
            case totalClusters = "total-clusters"
            case allocatedClusters = "allocated-clusters"
            case fragmentedClusters = "fragmented-clusters"
            case compressedClusters = "compressed-clusters"
        }

        /// 0 clean, 1 check errors, 2 corruption, 3 leaks only (qemu-img's exit statuses).
        public var exitStatus: Int32 { checkErrors > 0 ? 1 : corruptions > 0 ? 2 : (leaks > 0 ? 3 : 0) }

        /// What `qemu-img check` prints on stdout, line for line: the verdict, the counts and the
        /// image end offset. The problem lines (``messages``) are qemu-img's stderr.
        public var text: String {
            var s = ""
            if corruptions == 0 && leaks == 0 && checkErrors == 0 {
                s += "No errors were found on the image.\n"
            } else {
                if corruptions > 0 {
                    s += "\n\(corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
                }
                if leaks > 0 {
                    s += "\n\(leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
                }
                if checkErrors > 0 {
                    s += "\n\(checkErrors) internal errors have occurred during the check.\n"
                }
            }
            if totalClusters > 0 && allocatedClusters > 0 {
                func pct(_ n: UInt64, _ d: UInt64) -> String {
                    let v = d == 0 ? 0 : Int((Double(n) * 10000 / Double(d)).rounded())
                    return "\(v / 100).\(v % 100 < 10 ? "0" : "")\(v % 100)%"
                }
                s += "\(allocatedClusters)/\(totalClusters) = \(pct(allocatedClusters, totalClusters)) allocated, \(pct(fragmentedClusters, allocatedClusters)) fragmented, \(pct(compressedClusters, allocatedClusters)) compressed clusters\n"
            }
            if imageEndOffset > 0 { s += "Image end offset: \(imageEndOffset)\n" }
            return s
        }
    }

    public let path: String
    public init(path: String) { self.path = path }

    /// At most this many problem lines are kept (qemu-img prints them all; a damaged 4 TiB image
    /// can have tens of millions, which would cost more memory than the check itself).
    public static let maxMessages = 10_000

    public func run() throws(QcowPressError) -> Result {
        let file: InputFile
        do { file = try InputFile(path: path, direct: false) } catch { throw .from(error) }
        guard let h = try readQcow2Header(file, path: path, requireMagic: true, tablesInsideFile: false) else {
            throw .inputDamaged(path: path, location: "magic at offset 0 is not QFI\\xfb (not a qcow2 image)")
        }
        var state = CheckState(file: file, header: h, path: path)
        try state.check()
        return state.res
    }
}
