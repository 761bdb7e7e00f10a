import ArgumentParser
import Glibc
import QcowPress

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare two images as a guest reads them, as qemu-img compare.",
        discussion: """
            Prints 'Images are identical.' (exit 0) or 'Content mismatch at offset N!' (exit 1; N is \
            the start of the first differing 512-byte sector, as qemu-img prints it). Images of \
            different sizes are compared over the common part, then the larger one's extra part \
            must read as zeros ('Warning: Image size mismatch!'); with -s a size mismatch, or a \
            difference in block status (allocation, data, zero, host offset), is a mismatch, as \
            qemu-img -s. Any error is one line and exit 2. Runs both images know to be zero are \
            skipped without a read; the rest is read on every core, 1 MiB per image per thread.
            """)

    @Option(name: .customShort("f"), help: ArgumentHelp("Format of the first image: \(ImageFormat.readable.joined(separator: ", ")) (probed by magic when absent; a fixed VHD needs -f vpc).", valueName: "format"),
            completion: .list(ImageFormat.readable))
    var formatA: String?
    @Option(name: .customShort("F"), help: ArgumentHelp("Format of the second image (as -f).", valueName: "format"), completion: .list(ImageFormat.readable))
    var formatB: String?
    @Flag(name: .customShort("s"), help: "Strict: images of different sizes are different (exit 1, 'Strict mode: Image size mismatch!').")
    var strict = false
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp)
    var forceShare = false
    @Flag(name: .customShort("q"), help: "Quiet: print nothing; the exit status says the result.")
    var quiet = false
    @Option(help: ArgumentHelp("Reader threads (default: twice the cores, so reads overlap).", valueName: "n"))
    var threads: Int?
    @Argument(help: "The first image.", completion: .file())
    var imageA: String
    @Argument(help: "The second image.", completion: .file())
    var imageB: String

    func run() throws {
        // qemu-img compare's convention: 0 identical, 1 different, 2 an error.
        let result: ImageCompare.Result
        do {
            try ImageFormat.validate(formatA)
            try ImageFormat.validate(formatB)
            let locks = try lockForReading([], forceShare: forceShare)
            defer { locks.release() }
            let fa = try ImageFormat.resolve(path: imageA, given: formatA)
            let fb = try ImageFormat.resolve(path: imageB, given: formatB)
            try locks.lock(imageA, backingChain: true, format: fa)
            try locks.lock(imageB, backingChain: true, format: fb)
            let a = try openImage(imageA, format: fa, openBacking: true)
            let b = try openImage(imageB, format: fb, openBacking: true)
            result = try ImageCompare.compare(a, b, strict: strict, threads: max(1, threads ?? ImageCompare.defaultThreads))
        } catch {
            let message = (error as? QcowPressError)?.message ?? "\(error)"
            writeStderr("qcowpress: \(message)\n")
            Glibc.exit(2)
        }
        func say(_ s: String) { if !quiet { print(s) } }
        switch result {
        case .identical(let sizeMismatch):
            if sizeMismatch { say("Warning: Image size mismatch!") }
            say("Images are identical.")
        case .contentMismatch(let offset, let sizeMismatch):
            if sizeMismatch { say("Warning: Image size mismatch!") }
            say("Content mismatch at offset \(offset)!")
            throw ExitCode(1)
        case .strictSizeMismatch:
            say("Strict mode: Image size mismatch!")
            throw ExitCode(1)
        case .strictStatusMismatch(let offset):
            say("Strict mode: Offset \(offset) block status mismatch!")
            throw ExitCode(1)
        }
    }
}
