import DirectIO
import Foundation
import Glibc
import Synchronization
import Testing

/// A `StreamFile` over a non-blocking pipe (#27: it spun on EAGAIN): a reader waiting for data
/// sleeps in the kernel, and still gets the data, and the end, when they come.
@Suite(.tags(.fast)) struct StreamFileTests {
    /// A StreamFile on the read end of a new pipe, set non-blocking (as a pipe inherited from a
    /// caller may be); the write end is returned for the test to feed.
    static func nonBlockingPipe() throws -> (StreamFile, writeEnd: Int32) {
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        let f = try StreamFile(path: "/proc/self/fd/\(fds[0])")
        close(fds[0])
        _ = fcntl(f.fd, F_SETFL, fcntl(f.fd, F_GETFL) | O_NONBLOCK)
        return (f, fds[1])
    }

    static func threadCPUSeconds() -> Double {
        var ru = rusage()
        // RUSAGE_THREAD (Linux; the Glibc module does not import it): this thread only, so
        // tests running in parallel in the process do not count.
        getrusage(1, &ru)
        func s(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
        return s(ru.ru_utime) + s(ru.ru_stime)
    }

    @Test func waitingForDataBurnsNoCPU() throws {
        let (f, w) = try Self.nonBlockingPipe()
        defer { close(w) }
        let result = Mutex<(bytes: [UInt8]?, cpu: Double)>((nil, 0))
        let done = DispatchSemaphore(value: 0)
        Thread {
            let t0 = Self.threadCPUSeconds()
            var buf = [UInt8](repeating: 0, count: 64)
            let n = try? buf.withUnsafeMutableBytes { try f.read(into: $0.baseAddress!, count: 64) }
            let cpu = Self.threadCPUSeconds() - t0
            result.withLock { $0 = (n.map { Array(buf[0..<$0]) }, cpu) }
            done.signal()
        }.start()
        // Time is the subject here: the reader waits 300 ms with nothing to read.
        usleep(300_000)
        let hello: [UInt8] = Array("hello".utf8)
        #expect(write(w, hello, hello.count) == hello.count)
        done.wait()
        let r = result.withLock { $0 }
        #expect(r.bytes == hello)
        #expect(r.cpu < 0.05, "the reader spent \(r.cpu) s of CPU waiting 0.3 s for data")
    }

    @Test func theEndOfAnEmptyPipeIsSeen() throws {
        let (f, w) = try Self.nonBlockingPipe()
        let done = DispatchSemaphore(value: 0)
        let n = Mutex<Int?>(nil)
        Thread {
            var buf = [UInt8](repeating: 0, count: 64)
            let r = try? buf.withUnsafeMutableBytes { try f.read(into: $0.baseAddress!, count: 64) }
            n.withLock { $0 = r }
            done.signal()
        }.start()
        close(w)
        done.wait()
        #expect(n.withLock { $0 } == 0)
    }
}
