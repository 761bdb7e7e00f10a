import QcowPress

// README: begin
func readmeExample(source: String, destination: String) async throws(QcowPressError) {
    var options = EncoderOptions(virtualSize: 0)  // the size is taken from the source
    options.compression = CompressionSettings(algorithm: .zstd, level: 3)
    options.memoryLimit = 64 << 20
    let summary = try await convert(.detect(path: source), to: destination, options: options) { p in
        print("\(p.done) of \(p.total) bytes")
    }
    print("\(summary.bytesOut) bytes written, \(summary.clustersZero) zero clusters")
}
// README: end
