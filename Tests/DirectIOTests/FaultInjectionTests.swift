import Foundation
import DirectIO
import Glibc
import Testing

/// The syscall seam forces ENOSPC, EIO, EINTR and short writes; the I/O layer reports the first
/// two with errno, path and offset, and retries or completes the others.
@Suite(.tags(.faults, .fast), .serialized) struct FaultInjectionTests {
    func withFile(_ body: (OutputFile, String) throws -> Void) throws {
        let path = "/tmp/qp-fault-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(path) }
        let f = try OutputFile(creating: path, direct: true)
        try body(f, path)
    }

    @Test(arguments: [ENOSPC, EIO, EDQUOT])
    func failureIsReported(errno e: Int32) throws {
        try withFile { f, path in
            let buf = AlignedBuffer(capacity: 8192)
            FaultInjection.install(.init(operation: .write, index: 2, kind: .fail(e), fd: f.fd))
            defer { FaultInjection.install(nil) }
            try f.pwriteAll(buf.pointer, length: 4096, offset: 0)
            do {
                try f.pwriteAll(buf.pointer, length: 4096, offset: 4096)
                Issue.record("no error")
            } catch let error as IOError {
                #expect(error.errno == e)
                #expect(error.offset == 4096)
                #expect(error.path == path)
            }
        }
    }

    @Test func shortWritesAndEINTRComplete() throws {
        try withFile { f, _ in
            let buf = AlignedBuffer(capacity: 65536)
            for i in 0..<65536 { buf.pointer.storeBytes(of: UInt8(i % 251), toByteOffset: i, as: UInt8.self) }
            for kind in [FaultInjection.Kind.short, .fail(EINTR)] {
                FaultInjection.install(.init(operation: .write, index: 1, kind: kind, fd: f.fd))
                try f.pwriteAll(buf.pointer, length: 65536, offset: 0)
                FaultInjection.install(nil)
                let back = AlignedBuffer(capacity: 65536)
                #expect(pread(f.fd, back.pointer, 65536, 0) == 65536)
                #expect(memcmp(back.pointer, buf.pointer, 65536) == 0)
            }
        }
    }

    @Test func writerThatNeverProgressesFails() throws {
        try withFile { f, _ in
            let buf = AlignedBuffer(capacity: 4096)
            // Sticky "short" on a 512-byte remainder transfers 0 bytes: reported, not a hang.
            FaultInjection.install(.init(operation: .write, index: 1, kind: .short, sticky: true, fd: f.fd))
            defer { FaultInjection.install(nil) }
            #expect(throws: IOError.self) { try f.pwriteAll(buf.pointer, length: 512, offset: 0) }
        }
    }

    @Test(arguments: [IOMode.uring, .pwrite])
    func asyncWritersReportErrors(mode: IOMode) throws {
        try withFile { f, _ in
            let (w, _) = makeBufferWriter(f, mode: mode, queueDepth: 4)
            let bufs = (0..<3).map { _ in AlignedBuffer(capacity: 1 << 20) }
            FaultInjection.install(.init(operation: .write, index: 3, kind: .fail(ENOSPC), fd: f.fd))
            defer { FaultInjection.install(nil) }
            var caught: IOError?
            do {
                for (i, b) in bufs.enumerated() { try w.submit(b, length: 1 << 20, offset: UInt64(i << 20), tag: i) }
                try w.drain()
            } catch let error as IOError {
                caught = error
            }
            #expect(caught?.errno == ENOSPC)
        }
    }

    @Test(arguments: [IOMode.uring, .pwrite])
    func asyncWritersCompleteShortWrites(mode: IOMode) throws {
        try withFile { f, _ in
            let (w, _) = makeBufferWriter(f, mode: mode, queueDepth: 4)
            let b = AlignedBuffer(capacity: 1 << 20)
            // Every byte distinct by position, so a tail written from the wrong place shows.
            for i in 0..<(1 << 18) { b.pointer.storeBytes(of: UInt32(i) &* 2_654_435_761, toByteOffset: i * 4, as: UInt32.self) }
            FaultInjection.install(.init(operation: .write, index: 1, kind: .short, fd: f.fd))
            defer { FaultInjection.install(nil) }
            try w.submit(b, length: 1 << 20, offset: 4096, tag: 0)
            try w.drain()
            var st = stat()
            fstat(f.fd, &st)
            #expect(st.st_size == 4096 + 1 << 20)
            let back = AlignedBuffer(capacity: 1 << 20)
            #expect(pread(f.fd, back.pointer, 1 << 20, 4096) == 1 << 20)
            #expect(memcmp(back.pointer, b.pointer, 1 << 20) == 0, "the rest of a short write lands after what was written")
        }
    }

    /// Releasing a pwrite writer ends its thread (it used to hold the writer, so neither ever went).
    @Test(.enabled(if: ThreadEnd.supported, "waits for the thread's end: needs pidfd_open(PIDFD_THREAD), Linux 6.9"))
    func pwriteWriterThreadEndsWithTheWriter() throws {
        try withFile { f, _ in
            weak var weakWriter: PwriteWriter?
            var started: [pid_t] = []
            do {
                var w: PwriteWriter?
                started = ThreadEnd.started(named: "qp-pwrite") { w = PwriteWriter(file: f) }
                weakWriter = w
                let b = AlignedBuffer(capacity: 4096)
                try w!.submit(b, length: 4096, offset: 0, tag: 0)
                try w!.drain()
                #expect(started.count == 1, "one thread per writer: \(started)")
            }
            #expect(weakWriter == nil)
            #expect(ThreadEnd.wait(for: started, timeout: 30), "the writer's thread is still there")
        }
    }
}

/// Waiting for threads of this process to end, without polling: a pidfd for a thread
/// (PIDFD_THREAD, Linux 6.9) becomes readable when it ends.
enum ThreadEnd {
    private typealias PidfdOpen = @convention(c) (pid_t, UInt32) -> Int32
    private static let pidfdOpen: PidfdOpen? = dlsym(nil, "pidfd_open").map { unsafeBitCast($0, to: PidfdOpen.self) }
    private static func pidfd(thread: pid_t) -> Int32 {
        guard let pidfdOpen else { errno = ENOSYS; return -1 }
        return pidfdOpen(thread, UInt32(O_EXCL))  // PIDFD_THREAD
    }

    static let supported: Bool = {
        let fd = pidfd(thread: getpid())
        if fd >= 0 { close(fd) }
        return fd >= 0
    }()

    static func threads() -> [pid_t: String] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        var out: [pid_t: String] = [:]
        for t in tasks {
            if let id = pid_t(t), let name = try? String(contentsOfFile: "/proc/self/task/\(t)/comm", encoding: .utf8) { out[id] = name }
        }
        return out
    }

    /// The threads `body` started, named `prefix` or not named yet (a thread names itself once it
    /// runs; until then it bears its creator's name, which this thread takes for the call).
    static func started(named prefix: String, by body: () throws -> Void) rethrows -> [pid_t] {
        let comm = "/proc/thread-self/comm"
        let own = ((try? String(contentsOfFile: comm, encoding: .utf8)) ?? "").trimmingCharacters(in: .newlines)
        let mark = "qp-t\(UInt32.random(in: 0..<1_000_000))"
        try? mark.write(toFile: comm, atomically: false, encoding: .utf8)
        defer { try? own.write(toFile: comm, atomically: false, encoding: .utf8) }
        let before = Set(threads().keys)
        try body()
        return threads().filter { !before.contains($0.key) && ($0.value.hasPrefix(mark) || $0.value.hasPrefix(prefix)) }.map(\.key)
    }

    /// Waits for each of `tids` to end; false when `timeout` seconds passed first.
    static func wait(for tids: [pid_t], timeout: Double) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        for t in tids {
            let fd = pidfd(thread: t)
            if fd < 0 { continue }  // ended already (ESRCH)
            defer { close(fd) }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            while true {
                let left = deadline.timeIntervalSinceNow
                if left <= 0 { return false }
                let r = poll(&p, 1, Int32(left * 1000) + 1)
                if r > 0 { break }
                if r < 0 && errno != EINTR { return false }
            }
        }
        return true
    }
}
