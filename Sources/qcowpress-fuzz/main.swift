// qcowpress-fuzz: a deterministic mutation fuzzer for every parser QcowPress exposes to input.
//
//   qcowpress-fuzz TARGET CORPUS_DIR [--runs N] [--seconds S] [--seed X]
//
// Each run mutates a seed from CORPUS_DIR (bit flips, interesting 8/16/32/64-bit values at
// aligned offsets, truncation, extension, splices) and feeds it to the target. Thrown errors are
// the expected outcome; a trap, a crash or an iteration longer than 10 s kills the process, and the
// input that did it is written to ./fuzz-crash-TARGET.bin first (signal-safe).
import BackupSources
import Crypto
import DirectIO
import Foundation
import Glibc
import Qcow2Format
import QcowPress

nonisolated(unsafe) var currentInput: UnsafeMutableRawPointer? = nil
nonisolated(unsafe) var currentLength = 0
nonisolated(unsafe) var crashPath: [CChar] = []

func installCrashHandler(target: String) {
    crashPath = Array("fuzz-crash-\(target).bin".utf8CString)
    currentInput = .allocate(byteCount: 64 << 20, alignment: 16)
    for sig in [SIGILL, SIGTRAP, SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGALRM] {
        signal(sig) { s in
            crashPath.withUnsafeBufferPointer { p in
                let fd = open(p.baseAddress!, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
                if fd >= 0, let input = currentInput {
                    _ = write(fd, input, currentLength)
                    close(fd)
                }
            }
            signal(s, SIG_DFL)
            raise(s)
        }
    }
}

struct Rng {
    var s: UInt64
    mutating func next() -> UInt64 {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17
        return s
    }
    mutating func below(_ n: Int) -> Int { n <= 0 ? 0 : Int(next() % UInt64(n)) }
}

func mutate(_ seed: [UInt8], _ rng: inout Rng, others: [[UInt8]]) -> [UInt8] {
    var b = seed
    let interesting: [UInt64] = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF,
                                 0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, UInt64.max, 512, 4096, 65536, 1 << 21]
    for _ in 0..<(1 + rng.below(4)) {
        guard !b.isEmpty else { b = [UInt8](repeating: 0, count: 16); continue }
        switch rng.below(9) {
        case 0, 1:
            let i = rng.below(b.count)
            b[i] ^= UInt8(1 << rng.below(8))
        case 2:
            b[rng.below(b.count)] = UInt8(truncatingIfNeeded: interesting[rng.below(interesting.count)])
        case 3, 4:
            let width = [2, 4, 8][rng.below(3)]
            guard b.count >= width else { continue }
            let at = rng.below(b.count / width) * width
            let v = rng.below(3) == 0 ? rng.next() : interesting[rng.below(interesting.count)]
            for k in 0..<width { b[at + k] = UInt8(truncatingIfNeeded: v >> UInt64(8 * (width - 1 - k))) }
        case 5:
            b.removeLast(rng.below(b.count))
        case 6:
            b += (0..<rng.below(4096)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        case 7:
            if let o = others.randomElement(), !o.isEmpty {
                let from = rng.below(o.count)
                let n = min(o.count - from, rng.below(512) + 1)
                let at = rng.below(b.count)
                for k in 0..<n where at + k < b.count { b[at + k] = o[from + k] }
            }
        default:
            let at = rng.below(b.count)
            let n = min(b.count - at, rng.below(64) + 1)
            for k in 0..<n { b[at + k] = UInt8(truncatingIfNeeded: rng.next()) }
        }
    }
    return b
}

let args = CommandLine.arguments
guard args.count >= 3 else {
    print("usage: qcowpress-fuzz TARGET CORPUS_DIR [--runs N] [--seconds S] [--seed X]")
    print("targets: qcow2-header qcow2-entries qcow2-image fidx blob manifest keyfile vma vhdx vhd vdi vmdk vmdk-stream ova-tar ovf s3-xml image-tools")
    exit(2)
}
let target = args[1]
let corpusDir = args[2]
func option(_ name: String) -> String? {
    guard let i = args.firstIndex(of: name), i + 1 < args.count else { return nil }
    return args[i + 1]
}
let maxRuns = Int(option("--runs") ?? "") ?? Int.max
let seconds = Double(option("--seconds") ?? "") ?? (maxRuns == Int.max ? 10 : 1e9)
var rng = Rng(s: UInt64(option("--seed") ?? "") ?? 0x9E37_79B9_7F4A_7C15)
let seeds: [[UInt8]] = ((try? FileManager.default.contentsOfDirectory(atPath: corpusDir)) ?? []).sorted().compactMap {
    (try? Data(contentsOf: URL(fileURLWithPath: corpusDir + "/" + $0))).map { [UInt8]($0) }
}
guard !seeds.isEmpty || target == "qcow2-entries" || target == "self-test" else {
    print("no seeds in \(corpusDir)")
    exit(2)
}
installCrashHandler(target: target)
let scratch = "/tmp/qcowpress-fuzz-\(getpid())"
try? FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(atPath: scratch) }
let key: PBSKey? = {
    let keyPath = corpusDir + "/../keyfile/none.json"
    return try? PBSKey.load(path: keyPath) { () throws(SourceError) -> String in "" }
}()

func writeFile(_ name: String, _ b: [UInt8]) -> String {
    let p = scratch + "/" + name
    FileManager.default.createFile(atPath: p, contents: Data(b))
    return p
}

/// One execution; errors are expected, anything else is a finding.
func run(_ input: [UInt8]) {
    switch target {
    case "qcow2-header":
        _ = input.withUnsafeBytes { try? Qcow2Header(parsing: $0, fileSize: UInt64(input.count)) }
    case "qcow2-entries":
        var r = Rng(s: input.reduce(0x1234) { $0 &* 31 &+ UInt64($1) } | 1)
        for bits in 9...21 {
            let e = L2Entry(rawValue: r.next())
            let d = e.compressedDescriptor(clusterBits: bits)
            _ = (d.hostOffset, d.additionalSectors, d.readLength, e.hostOffset, e.readsAsZero)
            _ = L1Entry(rawValue: r.next()).l2Offset
            let codec = RefcountBlockCodec(refcountOrder: bits % 7)
            var block = [UInt8](repeating: 0, count: 512)
            let idx = r.below(512 * 8 >> (bits % 7))
            block.withUnsafeMutableBytes { codec.set($0, idx, r.next() & codec.maxRefcount) }
            _ = block.withUnsafeBytes { codec.get($0, idx) }
        }
    case "qcow2-image":
        let p = writeFile("img.qcow2", input)
        if let img = try? Qcow2Image(path: p, openBacking: false) {
            let ctx = ReadContext()
            let buf = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
            defer { buf.deallocate() }
            var off: UInt64 = 0
            // Bounded: at most 64 MiB of guest data per input.
            while off < min(img.virtualSize, 64 << 20) {
                let n = Int(min(1 << 20, img.virtualSize - off))
                if (try? img.read(at: off, count: n, into: buf, context: ctx)) == nil { break }
                off += UInt64(n)
            }
        }
        _ = try? Qcow2Checker(path: p).run()
    case "fidx":
        _ = try? PBSFixedIndex(path: writeFile("x.fidx", input))
    case "blob":
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 << 20, alignment: 16)
        defer { out.deallocate() }
        _ = input.withUnsafeBytes { try? PBSBlob.decode($0, into: out, key: key?.key, path: "fuzz", what: "blob") }
    case "manifest":
        if let m = try? PBSManifest(path: writeFile("index.json.blob", input)), let key {
            try? m.verify(key: key, path: "fuzz")
        }
    case "keyfile":
        _ = try? PBSKey.load(path: writeFile("key.json", input)) { () throws(SourceError) -> String in "fuzz-password" }
    case "vma":
        let p = writeFile("a.vma", input)
        if let f = try? StreamFile(path: p), let s = try? ArchiveStream(file: f), let r = try? VMAReader(stream: s) {
            var n = 0
            while (try? r.nextExtent({ (c) throws(SourceError) in n &+= c.data.count })) == true {}
            _ = try? r.checkComplete()
        }
    case "vmdk", "vmdk-stream":
        fuzzVMDK(target, input)
    case "vhdx", "vhd", "vdi":
        fuzzBlockFormat(target, input)
    case "s3-xml":
        fuzzS3XML(input)
    case "ova-tar", "ovf":
        fuzzOVA(target, input)
    case "image-tools":
        fuzzImageTools(input)
    case "self-test":
        // Proves the crash path to the tests: an input starting with "CRASH" traps.
        if input.starts(with: Array("CRASH".utf8)) { fatalError("self-test crash") }
    default:
        print("unknown target \(target)")
        exit(2)
    }
}

/// Recomputes the checksums a mutation broke, on half of the runs, so that the fuzzer gets past
/// them into the parsers behind (blob CRC, fidx index_csum, VMA header and extent MD5s).
func fixChecksums(_ b: inout [UInt8]) {
    switch target {
    case "blob", "manifest":
        guard b.count >= 12, let kind = b.withUnsafeBytes({ PBSBlob.kind(of: $0) }) else { return }
        let h = (kind == .encrypted || kind == .encryptedZstd) ? 44 : 12
        guard b.count >= h else { return }
        let crc = b[h...].withUnsafeBytes { PBSBlob.crc32($0) }
        for k in 0..<4 { b[8 + k] = UInt8(truncatingIfNeeded: crc >> UInt32(8 * k)) }
    case "fidx":
        guard b.count >= 4096 else { return }
        let d = Array(SHA256.hash(data: b[4096...]))
        b.replaceSubrange(32..<64, with: d)
    case "vma":
        guard b.count >= 12288 else { return }
        let hs = Int(b[56]) << 24 | Int(b[57]) << 16 | Int(b[58]) << 8 | Int(b[59])
        guard hs > 12288, hs <= b.count else { return }
        for k in 32..<48 { b[k] = 0 }
        b.replaceSubrange(32..<48, with: Array(Insecure.MD5.hash(data: b[0..<hs])))
        var at = hs
        while at + 512 <= b.count {
            for k in 24..<40 { b[at + k] = 0 }
            b.replaceSubrange((at + 24)..<(at + 40), with: Array(Insecure.MD5.hash(data: b[at..<(at + 512)])))
            let blocks = Int(b[at + 6]) << 8 | Int(b[at + 7])
            at += 512 + blocks * 4096
        }
    case "vhdx", "vhd":
        fixFormatChecksums(target, &b)
    default: break
    }
}

let start = Date()
var runs = 0
while runs < maxRuns && Date().timeIntervalSince(start) < seconds {
    let seed = seeds.isEmpty ? [UInt8](repeating: 0, count: 64) : seeds[rng.below(seeds.count)]
    var input = runs < seeds.count ? seed : mutate(seed, &rng, others: seeds)
    if runs >= seeds.count && rng.below(2) == 0 { fixChecksums(&input) }
    currentLength = min(input.count, 64 << 20)
    if currentLength > 0 { input.withUnsafeBytes { currentInput!.copyMemory(from: $0.baseAddress!, byteCount: currentLength) } }
    alarm(10)
    run(input)
    runs += 1
}
alarm(0)
print("\(target): \(runs) runs in \(Int(Date().timeIntervalSince(start))) s, 0 crashes")
