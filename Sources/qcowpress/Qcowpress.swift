import ArgumentParser
import enum DirectIO.Terminal
import Glibc
import QcowPress

@main
struct Qcowpress: ParsableCommand {
    /// The one place the version lives (`--version`; scripts/package.sh names the .deb after it).
    static let version = "0.1.0"
    static let configuration = CommandConfiguration(
        commandName: "qcowpress",
        abstract: "Write qcow2 images fast: convert, restore (PBS, VMA), export, inspect, check, serve over NBD.",
        discussion: """
            IMAGE LOCKS: as QEMU, QcowPress takes its file-posix driver's OFD byte-range locks, so it, \
            qemu-img, qemu-storage-daemon and running VMs see each other (block devices too). Every \
            image a command reads (convert/export SRC and backing chain, -B/-b base, info, check, \
            serve image) gets qemu-img's read lock for the whole run: an image another process has \
            open for writing is refused ('Failed to get shared "write" lock. Is another process \
            using the image [PATH]?', exit 1) unless -U/--force-share, which reads it anyway (the \
            copy may be stale or torn; serve image -U warns). Every image a command writes gets \
            QEMU's write lock from the start to the commit, on the existing destination (so --force \
            never replaces an image in use: 'Failed to get "write" lock') and on the temporary file \
            through the rename; the destination's name is locked too (.NAME.qcowpress-lock beside \
            it), so a second run writing the same destination is refused at its start. After the \
            commit the image's lock shares everything (a live restore's drive is handed to QEMU).
            """,
        version: version,
        subcommands: [Convert.self, Restore.self, Export.self, Info.self, Check.self, Serve.self,
                      Compare.self, Map.self, Measure.self])

    /// Parses and runs; every failure is one line on stderr and exit status 1, as qemu-img users
    /// expect (a usage error adds a second line naming the command's --help); help and version
    /// exit 0.
    static func main() {
        // At most two malloc arenas, whatever the thread count. glibc's default (8 per core) let
        // each of the NBD pool's threads keep its own freed 4 MiB chunk buffers: `serve pbs
        // --cache-size 16M` with three drives read at once peaked at 303-325 MiB RSS, 116-138 MiB
        // with one or two arenas; `restore pbs -c` of the 3 GiB bench disk took the same time
        // either way (8.3-8.7 s). (/tmp/rss.sh of the stop-20 note; bench/nbd_bench.py "rss".)
        limitMallocArenas(2)
        // Block SIGINT/SIGTERM first, so a signal at any moment goes to the watcher thread (which
        // cancels whatever is running and exits 130/143), never to the default action.
        SignalWatcher.install()
        let args = Array(CommandLine.arguments.dropFirst())
        if let (word, path) = CommandWords.unknownCommand(in: args) { CommandWords.refuseUnknown(word, path: path) }
        if let help = ImageOptionParser.helpRequested(in: args) {
            switch help {
            case .success(let text): print(text, terminator: "")
            case .failure(let e): writeStderr("qcowpress: \(e.message)\n"); Glibc.exit(1)
            }
            Glibc.exit(0)
        }
        var command: ParsableCommand
        do {
            command = try parseAsRoot()
        } catch {
            if exitCode(for: error) == .success {
                print(fullMessage(for: error))
                Glibc.exit(0)
            }
            usageError(message(for: error), args: args)
        }
        do {
            try command.run()
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Glibc.exit(0)
            }
            if let e = error as? ExitCode { Glibc.exit(e.rawValue) }
            if error is ValidationError { usageError(message(for: error), args: args) }
            let message: String
            if let q = error as? QcowPressError { message = q.message } else { message = Self.message(for: error) }
            writeStderr("qcowpress: \(message)\n")
            Glibc.exit(1)
        }
    }

    /// A usage error: its one line, then where the command's options are described; exit 1.
    static func usageError(_ message: String, args: [String]) -> Never {
        let line = message.split(separator: "\n", omittingEmptySubsequences: true).first.map(String.init) ?? message
        let path = CommandWords.commandPath(in: args)
        writeStderr("qcowpress: \(line)\nSee '\((["qcowpress"] + path).joined(separator: " ")) --help'.\n")
        Glibc.exit(1)
    }
}

/// The command words of a command line (`restore pbs`), and suggestions for mistyped ones.
enum CommandWords {
    /// The subcommand names that lead the arguments (`["restore", "pbs"]`), as far as they are known.
    static func commandPath(in args: [String]) -> [String] {
        var type: ParsableCommand.Type = Qcowpress.self
        var path: [String] = []
        for a in args {
            guard let next = type.configuration.subcommands.first(where: { $0._commandName == a }) else { break }
            type = next
            path.append(a)
        }
        return path
    }

    /// The first command word that names no command (with the words before it), if the command line
    /// starts with one: `qcowpress conver ...`, `qcowpress restore pbz ...`.
    static func unknownCommand(in args: [String]) -> (String, [String])? {
        var type: ParsableCommand.Type = Qcowpress.self
        var path: [String] = []
        for a in args {
            let subs = type.configuration.subcommands
            if subs.isEmpty || a.hasPrefix("-") || (path.isEmpty && a == "help") { return nil }
            guard let next = subs.first(where: { $0._commandName == a }) else { return (a, path) }
            type = next
            path.append(a)
        }
        return nil
    }

    static func refuseUnknown(_ word: String, path: [String]) -> Never {
        var type: ParsableCommand.Type = Qcowpress.self
        for p in path { type = type.configuration.subcommands.first { $0._commandName == p }! }
        let names = type.configuration.subcommands.map { $0._commandName }
        let what = path.isEmpty ? "a command" : "a \(path.joined(separator: " ")) command"
        let hint: String
        if let best = suggestion(for: word, among: names) {
            hint = "Did you mean '\(best)'?"
        } else {
            hint = "See '\((["qcowpress"] + path).joined(separator: " ")) --help'."
        }
        writeStderr("qcowpress: '\(word)' is not \(what). \(hint)\n")
        Glibc.exit(1)
    }

    /// The closest name: within two edits, or one the word starts (at least two letters).
    static func suggestion(for word: String, among names: [String]) -> String? {
        let w = word.lowercased()
        let scored = names.map { n -> (String, Int) in
            let d = distance(w, n)
            return (n, n.hasPrefix(w) && w.count >= 2 ? min(d, 1) : d)
        }
        guard let best = scored.min(by: { $0.1 < $1.1 }), best.1 <= 2 else { return nil }
        return best.0
    }

    /// Levenshtein distance.
    static func distance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        if a.isEmpty { return b.count }
        var row = Array(0...b.count)
        for i in 1...a.count {
            var prev = row[0]
            row[0] = i
            for j in stride(from: 1, through: b.count, by: 1) {
                let cur = row[j]
                row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] == b[j - 1] ? 0 : 1))
                prev = cur
            }
        }
        return row[b.count]
    }
}

func writeStderr(_ s: String) { Terminal.write(s, to: 2) }

/// For the commands that write many images at once (restore pbs, restore vma): blocks of 256 KiB
/// and more always mmapped, and unmapped when freed. glibc raises its threshold to the size of any
/// mapped block freed (up to 32 MiB), after which the 1–4 MiB chunk, write and codec buffers each
/// drive allocates and frees came from the heap, which fragmented and never shrank: `restore pbs
/// --all --memory-limit 32M -c` peaked at 50 MiB RSS for 1 drive, 109–162 MiB for 64, 131–158 MiB
/// for 200 (8 MiB drives); with a fixed threshold of 256 KiB 42, 44 and 46 MiB (1 MiB: 42, 44, 49;
/// 2 MiB: 95, 117). The 3 GiB bench disk's restore: the same user time (12.4–12.7 s), sys
/// 0.41–0.48 → 0.58–0.66 s. (bench/memory_drives.sh, bench/RESULTS.md "memory over drives".)
/// Not for every command: the NBD sink's 2 MiB request buffers were then mapped and faulted in
/// per request (1 GiB through the sink: 0.84–0.95 s of system time instead of 0.39–0.42, wall
/// 3.4 s instead of 2.9–3.1), and one image does not fragment the heap that way.
func boundMallocForManyImages() {
    mallocOption(M_MMAP_THRESHOLD, 256 << 10)
}

/// glibc's `mallopt(M_ARENA_MAX, n)`. <malloc.h> is not in Swift's Glibc module, so the function
/// is looked up by name (it is always there in glibc; elsewhere this does nothing).
func limitMallocArenas(_ n: Int32) {
    mallocOption(M_ARENA_MAX, n)
}

/// <malloc.h>'s parameter numbers (not in Swift's Glibc module).
let M_ARENA_MAX: Int32 = -8
let M_MMAP_THRESHOLD: Int32 = -3

/// glibc's `mallopt(option, value)`, looked up by name (elsewhere this does nothing).
func mallocOption(_ option: Int32, _ value: Int32) {
    typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
    guard let f = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return }  // RTLD_DEFAULT
    _ = unsafeBitCast(f, to: Mallopt.self)(option, value)
}
