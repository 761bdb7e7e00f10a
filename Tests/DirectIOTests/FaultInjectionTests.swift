import Foundation
import DirectIO
import Glibc
import Testing

/// The syscall seam forces ENOSPC, EIO, EINTR and short writes; the I/O layer reports the first
/// two with errno, path and offset, and retries or completes the others.
@Suite(.serialized) struct FaultInjectionTests {
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
    @Test func pwriteWriterThreadEndsWithTheWriter() throws {
        // Threads named qp-pwrite in this process (other suites may run threads of other names).
        func threads() -> Int {
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
            return tasks.filter { (try? String(contentsOfFile: "/proc/self/task/\($0)/comm", encoding: .utf8))?.hasPrefix("qp-pwrite") == true }.count
        }
        try withFile { f, _ in
            // Writers of earlier tests may still be winding down: wait for them first.
            var before = threads()
            for _ in 0..<200 where before > 0 {
                usleep(10_000)
                before = threads()
            }
            weak var weakWriter: PwriteWriter?
            do {
                let w = PwriteWriter(file: f)
                weakWriter = w
                let b = AlignedBuffer(capacity: 4096)
                try w.submit(b, length: 4096, offset: 0, tag: 0)
                try w.drain()
                #expect(threads() == before + 1)
            }
            #expect(weakWriter == nil)
            var after = threads()
            for _ in 0..<100 where after > before {
                usleep(10_000)
                after = threads()
            }
            #expect(after == before)
        }
    }
}
