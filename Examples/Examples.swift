// Examples of the QcowPress library API, built and run by the tests:
//   qcowpress-examples convert RAW DST.qcow2
//   qcowpress-examples restore-vma ARCHIVE OUTDIR
//   qcowpress-examples write DST.qcow2          (concurrent writers from 8 tasks)
import QcowPress

@main
struct Examples {
    static func main() async {
        let args = CommandLine.arguments
        do {
            switch args.count > 1 ? args[1] : "" {
            case "convert" where args.count == 4:
                try await readmeExample(source: args[2], destination: args[3])
            case "restore-vma" where args.count == 4:
                let restore = VMARestore(archive: args[2], outdir: args[3])
                var options = EncoderOptions(virtualSize: 0)
                options.compression = CompressionSettings(algorithm: .zstd)
                let summary = try restore.run(encoder: options)
                print("restored \(summary.images.count) disks from \(summary.archiveBytes) archive bytes")
            case "write" where args.count == 3:
                try await concurrentWriters(destination: args[2])
            default:
                print("usage: qcowpress-examples convert RAW DST | restore-vma ARCHIVE OUTDIR | write DST")
            }
        } catch {
            print("error: \(error.message)")
        }
    }

    /// Eight tasks write interleaved 1 MiB pieces of a 64 MiB image, in any order.
    static func concurrentWriters(destination: String) async throws(QcowPressError) {
        var options = EncoderOptions(virtualSize: 64 << 20)
        options.compression = CompressionSettings(algorithm: .zstd, level: 3)
        let encoder = try Qcow2Encoder(destination: destination, options: options)
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for t in 0..<8 {
                    group.addTask {
                        let piece = [UInt8](repeating: UInt8(t + 1), count: 1 << 20)
                        for i in stride(from: t, to: 64, by: 8) {
                            try await encoder.write(at: UInt64(i) << 20, piece)
                        }
                    }
                }
                try await group.waitForAll()
            }
        } catch {
            encoder.cancel()
            throw error as? QcowPressError ?? .cancelled
        }
        let summary = try await encoder.finish()
        print("wrote \(summary.bytesOut) bytes, \(summary.clustersCompressed) compressed clusters")
    }
}
