import ArgumentParser
import Glibc
import QcowPress

@main
struct Qcowpress: ParsableCommand {
    /// The one place the version lives (`--version`; scripts/package.sh names the .deb after it).
    static let version = "0.1.0"
    static let configuration = CommandConfiguration(
        commandName: "qcowpress",
        abstract: "Write qcow2 images fast: convert, restore (PBS, VMA), export, inspect, check, serve over NBD.",
        version: version,
        subcommands: [Convert.self, Restore.self, Export.self, Info.self, Check.self, Serve.self])

    /// Parses and runs; every failure is one line on stderr and exit status 1 (usage included),
    /// as qemu-img users expect; help and version exit 0.
    static func main() {
        // Block SIGINT/SIGTERM first, so a signal at any moment goes to the watcher thread (which
        // cancels whatever is running and exits 130/143), never to the default action.
        SignalWatcher.install()
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Glibc.exit(0)
            }
            if let e = error as? ExitCode { Glibc.exit(e.rawValue) }
            let message: String
            if let q = error as? QcowPressError { message = q.message } else { message = Self.message(for: error) }
            writeStderr("qcowpress: \(message)\n")
            Glibc.exit(1)
        }
    }
}

func writeStderr(_ s: String) {
    var s = s
    s.withUTF8 { p in _ = Glibc.write(2, p.baseAddress, p.count) }
}
