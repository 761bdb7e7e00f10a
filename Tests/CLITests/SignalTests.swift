import Foundation
import Glibc
import Testing

/// Signals as qemu-img (#30): SIGUSR1 prints one progress line, `    (NN.NN/100%)`, and the run goes
/// on; every other catchable signal that would end the process ends it with 128 + the signal and no
/// temporary file left. Mid-run without sleeps: `restore vma -` reads an archive the test feeds
/// through a socket, so the run cannot end before the test sends the rest.
@Suite(.tags(.e2e), .enabled(if: Harness.haveQemuImg && PBSFixture.available, "needs qemu-img and python3"))
struct SignalTests {
    /// A `restore vma - OUT` fed by the test through a socket (sent with MSG_NOSIGNAL: a run that
    /// died fails the test instead of ending the test runner with SIGPIPE). Half the archive is
    /// sent, and the test waits (inotify) until the three images exist under temporary names.
    final class FedRestore {
        let process = Process()
        let feed: Int32
        let stderr = Pipe()
        let archive: Data
        var errText = ""
        let out: URL

        init(archive path: String, out: URL) throws {
            archive = try Data(contentsOf: URL(fileURLWithPath: path))
            self.out = out
            try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
            var fds: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
                throw POSIXError(.init(rawValue: errno) ?? .EIO)
            }
            feed = fds[1]
            process.executableURL = URL(fileURLWithPath: Harness.binary)
            process.arguments = ["restore", "vma", "-", out.path]
            process.standardInput = FileHandle(fileDescriptor: fds[0], closeOnDealloc: false)
            process.standardError = stderr
            process.standardOutput = FileHandle.nullDevice
            try SignalTests.runUnblocked(process)
            close(fds[0])
            send(archive.prefix(archive.count / 2))
        }

        deinit { close(feed) }

        @discardableResult
        func send(_ d: Data) -> Bool {
            d.withUnsafeBytes { b in
                var at = 0
                while at < b.count {
                    let n = Glibc.send(feed, b.baseAddress! + at, b.count - at, Int32(MSG_NOSIGNAL))
                    if n < 0 && errno == EINTR { continue }
                    if n <= 0 { return false }
                    at += n
                }
                return true
            }
        }

        /// Temporary files (`.tmp`) in the output directory.
        func temporaryFiles() throws -> [String] {
            try Harness.strayFiles(in: out, except: []).filter { $0.hasSuffix(".tmp") }
        }

        /// Waits until the three images are being written; false when the run ended first.
        func imagesExist() throws -> Bool {
            try Wait.until(watching: [out.path], orExitOf: process.processIdentifier) { try temporaryFiles().count == 3 }
        }

        /// Lines on stderr so far, waiting (poll, not sleep) until one more than `count` arrived.
        func waitForLine(after count: Int) -> [String]? {
            let fd = stderr.fileHandleForReading.fileDescriptor
            // The run's end too (other runs the test runner started may hold the pipe open).
            let exit = Wait.pidfd(process.processIdentifier)
            defer { if exit >= 0 { close(exit) } }
            let deadline = Wait.now() + 30
            var buf = [UInt8](repeating: 0, count: 4096)
            while errText.split(separator: "\n").count <= count {
                guard let ready = Wait.poll(exit >= 0 ? [fd, exit] : [fd], until: deadline) else { return nil }
                if ready[0] == 0 { return nil }  // ended, nothing more to read
                let n = read(fd, &buf, buf.count)
                if n <= 0 { return nil }
                errText += String(decoding: buf[0..<n], as: UTF8.self)
            }
            return errText.split(separator: "\n").map(String.init)
        }

        /// Sends SIGUSR1 until a progress line above zero comes back (at most 10,000 times: the
        /// half written holds whole extents); the lines seen.
        func progressUntilData() -> [Double] {
            var seen: [Double] = []
            while seen.last ?? 0 == 0 && seen.count < 10_000 {
                let before = errText.split(separator: "\n").count
                kill(process.processIdentifier, SIGUSR1)
                guard let lines = waitForLine(after: before), let p = SignalTests.percent(lines.last!) else { return seen }
                seen.append(p)
            }
            return seen
        }

        func finish() throws {
            send(archive.suffix(from: archive.count / 2))
            shutdown(feed, Int32(SHUT_WR))
            #expect(SignalTests.ended(process), "the run did not end")
            errText += String(decoding: stderr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        }
    }

    /// Starts `p` with no signal blocked, as from a shell: the test runner's threads (Dispatch
    /// workers) block most signals, and a child inherits that mask.
    /// Also with every signal's default action, as a shell starts a command: an ignored signal is
    /// inherited, and the test process ignores SIGPIPE as soon as any suite in it has used SwiftNIO
    /// (NIOPosix ignores it process-wide), so a child would keep ignoring a kill(1)'d PIPE — which
    /// qcowpress rightly respects, as it respects `nohup` — and the PIPE case failed depending on
    /// which suites ran first. coreutils' `env --default-signal` resets them and execs the command
    /// (same pid).
    static func runUnblocked(_ p: Process) throws {
        if let exe = p.executableURL?.path {
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = ["--default-signal", exe] + (p.arguments ?? [])
        }
        var empty = sigset_t(), saved = sigset_t()
        sigemptyset(&empty)
        pthread_sigmask(SIG_SETMASK, &empty, &saved)
        defer { pthread_sigmask(SIG_SETMASK, &saved, nil) }
        try p.run()
    }

    /// Waits (pidfd) for the run's end; kills it when it is still there after 30 s.
    static func ended(_ p: Process) -> Bool {
        if Wait.exit(of: p.processIdentifier, timeout: 30) {
            p.waitUntilExit()
            return true
        }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        return false
    }

    /// The percentage of a line exactly as qemu-img prints it (`    (%3.2f/100%%)`), else nil.
    static func percent(_ line: String) -> Double? {
        guard line.hasPrefix("    ("), line.hasSuffix("/100%)") else { return nil }
        let number = line.dropFirst(5).dropLast(6)
        guard let dot = number.firstIndex(of: "."), number.distance(from: dot, to: number.endIndex) == 3 else { return nil }
        return Double(number)
    }

    static func archive(in dir: URL) throws -> ([(name: String, path: String)], String) {
        let disks = try VMARestoreTests.makeDisks(in: dir, count: 3)
        // Small extents (4 clusters): the first half of the archive holds complete ones.
        return (disks, try VMARestoreTests.makeArchive(dir, disks: disks, name: "a.vma", extra: ["--per-extent", "4"]))
    }

    @Test func usr1PrintsOneProgressLineAndTheRestoreGoesOn() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (disks, archive) = try Self.archive(in: dir)
        let out = dir.appendingPathComponent("out")
        let run = try FedRestore(archive: archive, out: out)
        #expect(try run.imagesExist())
        let seen = run.progressUntilData()
        #expect(!seen.isEmpty && seen.last! > 0 && seen.last! < 100, "progress lines: \(run.errText)")
        try run.finish()
        #expect(run.process.terminationReason == .exit && run.process.terminationStatus == 0,
                "status \(run.process.terminationStatus): \(run.errText)")
        for d in disks { try Harness.expectGood(out.path + "/" + d.name + ".qcow2", equals: d.path) }
        // One progress line per signal (besides them, at most notes of fallbacks).
        let lines = run.errText.split(separator: "\n").map(String.init)
        #expect(lines.filter { Self.percent($0) != nil }.count == seen.count, "\(run.errText)")
        #expect(lines.allSatisfy { Self.percent($0) != nil || $0.hasPrefix("qcowpress: note:") }, "\(run.errText)")
    }

    /// The same line from `convert`, whose progress is the image's finished prefix: slow writes
    /// (100 ms each, through the fault seam) keep the run going while the test signals it.
    @Test func usr1DuringAConvert() throws {
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        FileManager.default.createFile(atPath: src.path, contents: SourceImage.noise(32 << 20, seed: 5))
        let dst = dir.appendingPathComponent("dst.qcow2").path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Harness.binary)
        p.arguments = ["convert", src.path, dst]
        var env = ProcessInfo.processInfo.environment
        env["QCOWPRESS_FAULT"] = "write:1:delay100:sticky"
        p.environment = env
        let err = Pipe()
        p.standardError = err
        try Self.runUnblocked(p)
        let reader = PipeReader(err.fileHandleForReading)
        let sawTemp = try Wait.until(watching: [dir.path], orExitOf: p.processIdentifier) {
            !(try Harness.strayFiles(in: dir, except: ["src.raw"])).isEmpty
        }
        #expect(sawTemp)
        kill(p.processIdentifier, SIGUSR1)
        #expect(Self.ended(p), "the run did not end")
        let stderr = String(decoding: reader.wait(), as: UTF8.self)
        #expect(p.terminationReason == .exit && p.terminationStatus == 0, "status \(p.terminationStatus): \(stderr)")
        let lines = stderr.split(separator: "\n").map(String.init)
        #expect(lines.filter { Self.percent($0) != nil }.count == 1, "\(stderr)")
        try Harness.expectGood(dst, equals: src.path)
    }

    /// USR2, ALRM, a kill(1)'d PIPE and a real-time signal end the run with 128 + the signal, and
    /// the images being written (under temporary names) are gone.
    @Test(arguments: [SIGUSR2, SIGALRM, SIGPIPE, SIGVTALRM, __libc_current_sigrtmin() + 2])
    func otherSignalsEndTheRunWithoutLeftovers(signal: Int32) throws {
        // Whatever ran before in this process: NIO ignores SIGPIPE process-wide once used, so do
        // it here too and the run must still start with the default action (runUnblocked).
        _ = Glibc.signal(SIGPIPE, SIG_IGN)
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (_, archive) = try Self.archive(in: dir)
        let out = dir.appendingPathComponent("out")
        let run = try FedRestore(archive: archive, out: out)
        #expect(try run.imagesExist(), "the images are being written")
        kill(run.process.processIdentifier, signal)
        #expect(Self.ended(run.process), "the run did not end")
        #expect(run.process.terminationReason == .exit && run.process.terminationStatus == 128 + signal,
                "status \(run.process.terminationStatus) (\(run.process.terminationReason == .exit ? "exit" : "killed"))")
        // (Lock files, `.NAME.qcowpress-lock`, may stay: they are no image.)
        #expect(try run.temporaryFiles().isEmpty, "a temporary file was left")
    }
}
