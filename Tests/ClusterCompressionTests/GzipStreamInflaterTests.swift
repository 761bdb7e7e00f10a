import ClusterCompression
import Testing

/// The gzip stream decoder the OVA import and the VMA reader share: members, the two wrappers, and
/// the error value each caller words in its own way.
@Suite(.tags(.fast)) struct GzipStreamInflaterTests {
    /// `gzip -n` of "hello\n" and zlib's compress of "world\n".
    static let hello: [UInt8] = [31, 139, 8, 0, 0, 0, 0, 0, 2, 3, 203, 72, 205, 201, 201, 231, 2, 0, 32, 48, 58, 54, 6, 0, 0, 0]
    static let world: [UInt8] = [120, 156, 43, 207, 47, 202, 73, 225, 2, 0, 8, 217, 2, 51]

    /// Feeds `input` in pieces of `step` bytes; returns the output.
    func inflateAll(_ g: GzipStreamInflater, _ input: [UInt8], step: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 64)
        var produced = 0
        var at = 0
        while at < input.count {
            let piece = Array(input[at..<min(at + step, input.count)])
            var used = 0
            while used < piece.count {
                let r = try piece.withUnsafeBytes { i in
                    try out.withUnsafeMutableBytes { o in
                        try g.decode(UnsafeRawBufferPointer(rebasing: i[used...]), into: UnsafeMutableRawBufferPointer(rebasing: o[produced...]))
                    }
                }
                used += r.consumed
                produced += r.produced
                if r.consumed == 0 && r.produced == 0 { break }  // no progress: not a hang
            }
            at += step
        }
        return Array(out[..<produced])
    }

    @Test func concatenatedMembersByteByByte() throws {
        let g = GzipStreamInflater()
        #expect(try inflateAll(g, Self.hello + Self.hello, step: 1) == Array("hello\nhello\n".utf8))
        #expect(g.atMemberBoundary)
        let cut = GzipStreamInflater()
        _ = try inflateAll(cut, Array(Self.hello.dropLast(4)), step: 7)
        #expect(!cut.atMemberBoundary)
    }

    @Test func zlibMemberOnlyWhenAsked() throws {
        let either = GzipStreamInflater(wrapper: .gzipOrZlib)
        #expect(try inflateAll(either, Self.hello + Self.world, step: 100) == Array("hello\nworld\n".utf8))

        // Fed at once: the first member's 6 bytes were produced by the failing call.
        let gzipOnly = GzipStreamInflater()
        #expect {
            _ = try inflateAll(gzipOnly, Self.hello + Self.world, step: 100)
        } throws: { e in
            guard let e = e as? GzipStreamError else { return false }
            return e.code == -3 && e.produced == 6 && e.message == "incorrect header check"
        }

        // The DecompressionError form carries zlib's message.
        let input = Self.world
        var out = [UInt8](repeating: 0, count: 16)
        #expect {
            _ = try input.withUnsafeBytes { i in try out.withUnsafeMutableBytes { o in try GzipStreamInflater().inflate(i, into: o) } }
        } throws: { e in
            (e as? DecompressionError)?.description == "gzip data does not decompress: incorrect header check"
        }
    }
}
