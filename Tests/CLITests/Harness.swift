import Foundation
import Glibc
import Testing

/// Runs the real `qcowpress` binary and the qemu-img oracle.
enum Harness {
    /// The binary built next to the test bundle (same build directory).
    static let binary: String = {
        if let p = ProcessInfo.processInfo.environment["QCOWPRESS_BIN"] { return p }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        while dir.path != "/" {
            let candidate = dir.appendingPathComponent("qcowpress").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return "qcowpress"
    }()

    struct Output {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    @discardableResult
    static func run(_ exe: String, _ args: [String], env: [String: String] = [:], stdin: FileHandle? = nil) throws -> Output {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe.hasPrefix("/") ? exe : "/usr/bin/\(exe)")
        p.arguments = args
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        p.environment = e
        let out = Pipe()
        let err = Pipe()
        p.standardOutput = out
        p.standardError = err
        if let stdin { p.standardInput = stdin }
        try p.run()
        // Read both pipes fully, at the same time, before waiting: a child that fills one pipe
        // (qemu-img check writes its ERROR lines to stderr, often more than a pipe holds) while
        // the other is being drained must not block.
        let errReader = PipeReader(err.fileHandleForReading)
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let r = errReader.wait()
        p.waitUntilExit()
        return Output(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: r, as: UTF8.self))
    }

    static func qcowpress(_ args: [String], env: [String: String] = [:]) throws -> Output {
        try run(binary, args, env: env)
    }

    static func qemuImg(_ args: [String]) throws -> Output {
        try run("/usr/bin/qemu-img", args)
    }

    /// qemu-io's commands (`write -P 0x5a 0 64k`, …) on `image` of `format`; it must succeed.
    static func qemuIO(_ image: String, _ cmds: [String], format: String = "qcow2") throws {
        let r = try run("/usr/bin/qemu-io", ["-f", format] + cmds.flatMap { ["-c", $0] } + [image])
        #expect(r.status == 0, "qemu-io \(cmds): \(r.stderr)")
    }

    static var haveQemuImg: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img") }

    /// A fresh directory for one test, removed by the caller's defer.
    static func tempDir() throws -> URL {
        let base = ProcessInfo.processInfo.environment["QCOWPRESS_TEST_DIR"] ?? "/tmp"
        let url = URL(fileURLWithPath: base).appendingPathComponent("qp-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// Asserts the image is clean and equal to the source, as qemu-img sees it.
    static func expectGood(_ image: String, equals source: String, sourceFormat: String = "raw",
                           sourceLocation: SourceLocation = #_sourceLocation) throws {
        let check = try qemuImg(["check", image])
        #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)", sourceLocation: sourceLocation)
        let cmp = try qemuImg(["compare", "-f", sourceFormat, "-F", "qcow2", source, image])
        #expect(cmp.status == 0, "qemu-img compare: \(cmp.stdout) \(cmp.stderr)", sourceLocation: sourceLocation)
    }

    /// Files in a directory other than the ones named (to find leaked temporary files).
    static func strayFiles(in dir: URL, except: Set<String>) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { !except.contains($0) }
    }
}

/// Reads a pipe to its end on its own thread.
final class PipeReader: @unchecked Sendable {
    private var data = Data()
    private let done = DispatchSemaphore(value: 0)
    init(_ h: FileHandle) {
        Thread.detachNewThread { [self] in
            data = h.readDataToEndOfFile()
            done.signal()
        }
    }
    func wait() -> Data {
        done.wait()
        return data
    }
}

/// Deterministic test images.
enum SourceImage {
    /// Pseudo-random bytes from a seed (xorshift), fast and repeatable.
    static func noise(_ n: Int, seed: UInt64) -> Data {
        var x = seed | 1
        var d = Data(count: n)
        d.withUnsafeMutableBytes { (p: UnsafeMutableRawBufferPointer) in
            let words = n / 8
            let w = p.baseAddress!.assumingMemoryBound(to: UInt64.self)
            for i in 0..<words {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                w[i] = x
            }
            for i in (words * 8)..<n { p[i] = UInt8(truncatingIfNeeded: i &* 31) }
        }
        return d
    }

    /// Text-like data that compresses about 3:1.
    static func text(_ n: Int, seed: UInt64) -> Data {
        let alphabet = [UInt8]("the quick brown fox jumps over a lazy dog 0123456789\n".utf8)
        var x = seed | 1
        var d = Data(count: n)
        d.withUnsafeMutableBytes { (p: UnsafeMutableRawBufferPointer) in
            for i in 0..<n {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                p[i] = alphabet[Int(x % UInt64(alphabet.count))]
            }
        }
        return d
    }

    /// Zeros, text, random data and a hole, in blocks of `block` bytes, plus `tail` unaligned bytes.
    static func mixed(at url: URL, blocks: Int, block: Int = 256 << 10, tail: Int = 1234, seed: UInt64 = 42) throws {
        FileManager.default.createFile(atPath: url.path, contents: nil)
        let h = try FileHandle(forWritingTo: url)
        defer { try? h.close() }
        for i in 0..<blocks {
            switch i % 4 {
            case 0: try h.seek(toOffset: UInt64((i + 1) * block))  // hole (sparse)
            case 1: try h.write(contentsOf: text(block, seed: seed &+ UInt64(i)))
            case 2: try h.write(contentsOf: noise(block, seed: seed &+ UInt64(i)))
            default: try h.write(contentsOf: Data(count: block))  // written zeros
            }
            if i % 4 == 0 { continue }
        }
        try h.seek(toOffset: UInt64(blocks * block))
        try h.write(contentsOf: text(tail, seed: seed))
    }
}

/// Waits for events with a deadline instead of polling: inotify for files and directories, a
/// pidfd for the end of a process or of one of this process's threads.
enum Wait {
    private typealias PidfdOpen = @convention(c) (pid_t, UInt32) -> Int32
    private static let pidfdOpen: PidfdOpen? = dlsym(nil, "pidfd_open").map { unsafeBitCast($0, to: PidfdOpen.self) }

    /// A pidfd for process `pid` (or, with `thread`, thread `pid` of this process: PIDFD_THREAD,
    /// Linux 6.9); -1 with errno set when there is none.
    static func pidfd(_ pid: pid_t, thread: Bool = false) -> Int32 {
        guard let pidfdOpen else { errno = ENOSYS; return -1 }
        return pidfdOpen(pid, thread ? UInt32(O_EXCL) : 0)
    }

    static func now() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
    }

    /// Polls `fds` for input until `deadline`; the revents, or nil on timeout.
    static func poll(_ fds: [Int32], until deadline: Double) -> [Int16]? {
        var p = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        while true {
            let left = deadline - now()
            if left <= 0 { return nil }
            let r = Glibc.poll(&p, nfds_t(p.count), Int32(min(left * 1000 + 1, 3_600_000)))
            if r > 0 { return p.map(\.revents) }
            if r < 0 && errno != EINTR { fatalError("poll: \(String(cString: strerror(errno)))") }
        }
    }

    /// Waits until `ready()` holds, checking it again whenever inotify reports a change in one of
    /// `paths` (a file written or closed, a directory entry created or moved in) and when process
    /// `pid` ends. Returns `ready()`'s last value: false when `timeout` seconds passed first.
    static func until(watching paths: [String], orExitOf pid: pid_t? = nil, timeout: Double = 60,
                      _ ready: () throws -> Bool) rethrows -> Bool {
        let deadline = now() + timeout
        let ino = inotify_init1(Int32(IN_CLOEXEC | IN_NONBLOCK))
        precondition(ino >= 0, "inotify_init1: \(errno)")
        defer { close(ino) }
        for p in paths {
            precondition(inotify_add_watch(ino, p, UInt32(IN_CREATE | IN_MODIFY | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ATTRIB)) >= 0,
                         "inotify_add_watch \(p): \(errno)")
        }
        let exitFD = pid.map { pidfd($0) } ?? -1
        defer { if exitFD >= 0 { close(exitFD) } }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            if try ready() { return true }
            guard let revents = poll(exitFD >= 0 ? [ino, exitFD] : [ino], until: deadline) else { return try ready() }
            while read(ino, &buffer, buffer.count) > 0 {}
            if revents.count > 1 && revents[1] != 0 { return try ready() }  // the process ended
        }
    }

    /// Waits for process `pid` to end; false when `timeout` seconds passed first.
    static func exit(of pid: pid_t, timeout: Double) -> Bool {
        let fd = pidfd(pid)
        if fd < 0 { return errno == ESRCH }  // gone already
        defer { close(fd) }
        return poll([fd], until: now() + timeout) != nil
    }

    /// IDs of this process's threads whose name starts with `prefix`.
    static func threads(named prefix: String) -> [pid_t] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.filter { (try? String(contentsOfFile: "/proc/self/task/\($0)/comm", encoding: .utf8))?.hasPrefix(prefix) == true }
            .compactMap { pid_t($0) }
    }

    /// Runs `body` and returns the threads it started that are still there, told by their names:
    /// those named with one of `prefixes`, and those not named yet (a thread names itself once it
    /// runs; until then it bears its creator's name, which this thread takes for the call).
    static func threadsStarted(named prefixes: [String], by body: () throws -> Void) rethrows -> [pid_t] {
        let comm = "/proc/thread-self/comm"
        let own = ((try? String(contentsOfFile: comm, encoding: .utf8)) ?? "").trimmingCharacters(in: .newlines)
        let mark = "qp-t\(UInt32.random(in: 0..<1_000_000))"
        try? mark.write(toFile: comm, atomically: false, encoding: .utf8)
        defer { try? own.write(toFile: comm, atomically: false, encoding: .utf8) }
        let before = Set(threads(named: ""))
        try body()
        return threads(named: "").filter { t in
            guard !before.contains(t), let name = try? String(contentsOfFile: "/proc/self/task/\(t)/comm", encoding: .utf8) else { return false }
            return name.hasPrefix(mark) || prefixes.contains { name.hasPrefix($0) }
        }
    }

    /// True when the kernel can wait for a thread's end (pidfd_open with PIDFD_THREAD, Linux 6.9).
    static let canWaitForThreads: Bool = {
        let fd = pidfd(getpid(), thread: true)
        if fd >= 0 { close(fd) }
        return fd >= 0
    }()

    /// Waits for each thread in `tids` (of this process) to end; false when `timeout` seconds passed first.
    static func end(ofThreads tids: [pid_t], timeout: Double) -> Bool {
        let deadline = now() + timeout
        for t in tids {
            let fd = pidfd(t, thread: true)
            if fd < 0 {
                precondition(errno == ESRCH, "pidfd_open(PIDFD_THREAD): \(errno)")
                continue  // ended already
            }
            defer { close(fd) }
            if poll([fd], until: deadline) == nil { return false }
        }
        return true
    }
}
