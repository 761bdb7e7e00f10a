import Foundation
import Synchronization

/// python3 for the tests: a script run to completion, or a server kept running on a pipe.
enum Python {
    /// Whether `python3 -c "import <module>"` succeeds.
    static func has(_ module: String) -> Bool {
        (try? run("import \(module)", args: []))?.status == 0
    }

    static let botocore = has("botocore")
    static let moto = has("moto.server") && has("boto3")

    /// Runs `script` with `args`, `stdin` fed in; returns the exit status and stdout (stderr is
    /// kept apart so a failing script's traceback shows in the test's message, not in the data).
    static func run(_ script: String, args: [String], stdin: String = "") throws -> (status: Int32, out: String, err: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", "-c", script] + args
        let inPipe = Pipe(), outPipe = Pipe(), errPipe = Pipe()
        p.standardInput = inPipe
        p.standardOutput = outPipe
        p.standardError = errPipe
        try p.run()
        inPipe.fileHandleForWriting.write(Data(stdin.utf8))
        try inPipe.fileHandleForWriting.close()
        // Read both pipes to the end before waiting (a full pipe would block the child).
        let errData = Mutex<Data>(Data())
        let errDone = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let d = errPipe.fileHandleForReading.readDataToEndOfFile()
            errData.withLock { $0 = d }
            errDone.signal()
        }
        let out = outPipe.fileHandleForReading.readDataToEndOfFile()
        errDone.wait()
        p.waitUntilExit()
        let err = errData.withLock { $0 }
        return (p.terminationStatus, String(decoding: out, as: UTF8.self), String(decoding: err, as: UTF8.self))
    }
}
