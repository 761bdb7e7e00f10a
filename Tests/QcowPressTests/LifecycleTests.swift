import Foundation
@testable import QcowPress
import Testing

/// An encoder's outcome is decided once: the first error stays the error, a late success does not
/// replace a failure, and an encoder leaves its group exactly once however it ends (#27).
@Suite(.tags(.fast)) struct LifecycleTests {
    /// The message of what `body` throws; nil when it throws nothing.
    static func thrown(_ body: () throws(QcowPressError) -> Void) -> String? {
        do throws(QcowPressError) {
            try body()
            return nil
        } catch {
            return error.message
        }
    }

    static func tempDir() throws -> URL {
        let url = URL(fileURLWithPath: "/tmp").appendingPathComponent("qp-life-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    static func summary() -> EncoderSummary {
        EncoderSummary(destination: "x", virtualSize: 0, clusterSize: 65536, compression: "none", bytesIn: 0, bytesOut: 0,
                       clustersZero: 0, clustersCompressed: 0, clustersUncompressed: 0, clustersShared: 0, codecSeconds: 0,
                       producerStallSeconds: 0, diskBusySeconds: 0, wallSeconds: 0, threads: 1, memoryLimit: 0,
                       peakRSSBytes: 0, ioMode: "", notes: [])
    }

    @Test func firstErrorWins() {
        let l = Lifecycle()
        #expect(l.markFailed(.misuse("first")))
        #expect(!l.markFailed(.cancelled))
        #expect(!l.markFailed(.misuse("second")))
        #expect(Self.thrown { () throws(QcowPressError) in try l.checkOpen() } == "first")
        #expect(Self.thrown { () throws(QcowPressError) in try l.beginFinish() } == "first")
    }

    /// The writer completing the image while a cancel (or an error elsewhere) lands: the failure,
    /// decided first, stays.
    @Test func doneDoesNotReplaceAFailure() {
        let l = Lifecycle()
        #expect(Self.thrown { () throws(QcowPressError) in try l.beginFinish() } == nil)
        #expect(l.markFailed(.misuse("disk gone")))
        l.markDone()
        #expect(l.isFailed)
        #expect(Self.thrown { () throws(QcowPressError) in try l.checkOpen() } == "disk gone")
    }

    /// Cancelled twice, then its writer's late success: the encoder left its group once, its write
    /// buffers went back once, and the group's other member still counts.
    @Test func anEncoderLeavesItsGroupOnce() throws {
        let dir = try Self.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let g = try EncoderGroup(threads: 1, memoryLimit: 64 << 20, clusterSize: 65536, images: 2)
        defer { g.shutdown() }
        var o = EncoderOptions(virtualSize: 1 << 20)
        o.group = g
        o.memoryLimit = 64 << 20
        let a = try Qcow2Encoder(destination: dir.appendingPathComponent("a.qcow2").path, options: o)
        let b = try Qcow2Encoder(destination: dir.appendingPathComponent("b.qcow2").path, options: o)
        #expect(g.memberCount == 2)
        a.cancel()
        a.cancel()
        #expect(g.memberCount == 1)
        a.succeed(Self.summary())
        #expect(g.memberCount == 1, "a late success left the group a second time")
        #expect(a.lifecycle.isFailed)
        b.cancel()
        #expect(g.memberCount == 0)
        #expect(g.writeBufferBytesInUse == 0, "write buffers given back once per image")
    }
}

/// The commit claim (#27): once the writer claims it, a cancel is refused; the writer's own
/// commit failure still counts; a cancel that came first makes the claim fail.
@Suite(.tags(.fast)) struct LifecycleCommitTests {
    @Test func aCancelWhileCommittingIsRefused() {
        let l = Lifecycle()
        #expect(LifecycleTests.thrown { () throws(QcowPressError) in try l.beginFinish() } == nil)
        #expect(l.beginCommit())
        #expect(!l.markFailed(.cancelled), "a cancel after the claim must not fail a committed image")
        #expect(l.markDone())
    }

    @Test func theCommittersOwnFailureCounts() {
        let l = Lifecycle()
        #expect(LifecycleTests.thrown { () throws(QcowPressError) in try l.beginFinish() } == nil)
        #expect(l.beginCommit())
        #expect(l.markFailed(.misuse("rename refused"), committer: true))
        #expect(!l.markDone())
        #expect(l.failure?.message == "rename refused")
    }

    @Test func aCancelFirstMakesTheClaimFail() {
        let l = Lifecycle()
        #expect(LifecycleTests.thrown { () throws(QcowPressError) in try l.beginFinish() } == nil)
        #expect(l.markFailed(.cancelled))
        #expect(!l.beginCommit())
    }
}
