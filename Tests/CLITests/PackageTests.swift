import Foundation
import Testing

/// The one reason the package tests skip (outside the suite type: its trait cannot name its own members).
private let haveDpkgDeb = FileManager.default.isExecutableFile(atPath: "/usr/bin/dpkg-deb")

/// The Debian package from scripts/package.sh: what it holds, what it depends on, and that the
/// binary it installs runs with an empty environment on a machine that has no Swift runtime in
/// its library path. The suite builds it from a static debug build (QCOWPRESS_PKG_CONFIG=debug, in
/// .build-pkg, its .deb in .build-pkg/dist): the same script and steps as the release package, at a
/// fraction of a cold release build's minutes; the tests share one run of the script.
@Suite(.tags(.e2e), .enabled(if: haveDpkgDeb, "needs dpkg-deb (Debian's dpkg) to build and inspect the .deb"))
struct PackageTests {
    static var root: URL { BadCorpusTests.dir.deletingLastPathComponent().deletingLastPathComponent() }

    struct Built {
        var deb: String
        /// The .deb extracted into a throwaway root (dpkg-deb -x), as `apt install` would lay it out.
        var installRoot: URL
        var installed: String { installRoot.appendingPathComponent("usr/bin/qcowpress").path }
        var control: [String: String]
    }

    /// One run of scripts/package.sh for every test of the suite (a static let runs once).
    static let built: Result<Built, PackageError> = {
        do {
            // The build's log goes to a file: Harness.run reads stdout to its end before stderr,
            // and minutes of compiler output would fill the stderr pipe and stall the script.
            let scratch = root.appendingPathComponent(".build-pkg")
            try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
            let log = scratch.appendingPathComponent("package-test.log").path
            let r = try Harness.run("/bin/bash", ["-c", "exec bash \"$0\" 2>\"$1\"",
                                                  root.appendingPathComponent("scripts/package.sh").path, log],
                                    env: ["QCOWPRESS_PKG_CONFIG": "debug"])
            guard r.status == 0, let last = r.stdout.split(separator: "\n").last else {
                let tail = (try? String(contentsOfFile: log, encoding: .utf8))?.suffix(4000) ?? "(no log)"
                return .failure(PackageError("scripts/package.sh exited \(r.status); the end of \(log):\n\(tail)"))
            }
            let deb = last.hasPrefix("/") ? String(last) : root.appendingPathComponent(String(last)).path
            // Beside the build (git-ignored), replaced on every run: nothing left in /tmp.
            let installRoot = root.appendingPathComponent(".build-pkg/test-root")
            try? FileManager.default.removeItem(at: installRoot)
            try FileManager.default.createDirectory(at: installRoot, withIntermediateDirectories: true)
            let x = try Harness.run("/usr/bin/dpkg-deb", ["-x", deb, installRoot.path])
            guard x.status == 0 else { return .failure(PackageError("dpkg-deb -x \(deb): \(x.stderr)")) }
            let info = try Harness.run("/usr/bin/dpkg-deb", ["--field", deb])
            var control: [String: String] = [:]
            for line in info.stdout.split(separator: "\n") where !line.hasPrefix(" ") {
                guard let colon = line.firstIndex(of: ":") else { continue }
                control[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
            return .success(Built(deb: deb, installRoot: installRoot, control: control))
        } catch {
            return .failure(PackageError("running scripts/package.sh: \(error)"))
        }
    }()

    struct PackageError: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }

    /// Runs `exe` with an empty environment (env -i): no PATH, no LD_LIBRARY_PATH, no HOME.
    static func runClean(_ exe: String, _ args: [String]) throws -> Harness.Output {
        try Harness.run("/usr/bin/env", ["-i", exe] + args)
    }

    @Test func packageHoldsBinaryManualAndCompletions() throws {
        let b = try Self.built.get()
        let version = try Harness.qcowpress(["--version"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let arch = try Harness.run("/usr/bin/dpkg", ["--print-architecture"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(b.deb.hasSuffix("dist/qcowpress_\(version)_\(arch).deb"), "\(b.deb): named after `qcowpress --version` (\(version))")
        #expect(b.control["Package"] == "qcowpress")
        #expect(b.control["Version"] == version)
        #expect(b.control["Architecture"] == arch)
        let contents = try Harness.run("/usr/bin/dpkg-deb", ["--contents", b.deb])
        #expect(contents.status == 0, "\(contents.stderr)")
        // Lines look like "-rwxr-xr-x root/root 41234 2026-11-30 18:00 ./usr/bin/qcowpress".
        let files = Set(contents.stdout.split(separator: "\n").compactMap { $0.split(separator: " ").last.map(String.init) })
        for path in ["./usr/bin/qcowpress", "./usr/share/man/man1/qcowpress.1.gz",
                     "./usr/share/bash-completion/completions/qcowpress",
                     "./usr/share/zsh/vendor-completions/_qcowpress",
                     "./usr/share/fish/vendor_completions.d/qcowpress.fish"] {
            #expect(files.contains(path), "\(path) missing from the .deb:\n\(contents.stdout)")
        }
        let binaryLine = contents.stdout.split(separator: "\n").first { $0.hasSuffix(" ./usr/bin/qcowpress") }
        #expect(binaryLine?.hasPrefix("-rwxr-xr-x root/root") == true, "the binary is not executable and root's: \(binaryLine ?? "")")

        // The manual is swift-argument-parser's mdoc page and documents the subcommands.
        let man = try Harness.run("/bin/sh", ["-c", "gzip -dc '\(b.installRoot.path)/usr/share/man/man1/qcowpress.1.gz'"])
        let isManual = man.stdout.contains(".Dt QCOWPRESS 1")
        #expect(isManual, "not an mdoc page for section 1:\n\(man.stdout.prefix(500))")
        // mdoc spells --memory-limit as "Fl -memory-limit".
        for word in ["Em convert", "Em restore", "Em pbs", "Em vma", "Em export", "Em check", "Fl -memory-limit", "Fl -io"] {
            let found = man.stdout.contains(word)
            #expect(found, "the manual lacks '\(word)'")
        }
    }

    @Test func dependsNamesThePackagesOfEveryLinkedLibrary() throws {
        let b = try Self.built.get()
        let depends = try #require(b.control["Depends"], "no Depends field")
        let names = Set(depends.split(separator: ",").map {
            String($0.trimmingCharacters(in: .whitespaces).split(separator: " ").first ?? "")
        })
        for pkg in ["liburing2", "libzstd1", "zlib1g", "libisal2", "libc6"] {
            #expect(names.contains(pkg), "Depends '\(depends)' lacks \(pkg)")
        }
        // Every library the binary loads comes from a package it depends on (libc6's loader aside).
        let ldd = try Harness.run("/usr/bin/ldd", [b.installed])
        #expect(ldd.status == 0, "\(ldd.stderr)")
        #expect(!ldd.stdout.contains("not found"), "unresolved libraries:\n\(ldd.stdout)")
        for line in ldd.stdout.split(separator: "\n") {
            guard let path = line.split(separator: " ").first(where: { $0.hasPrefix("/") }).map(String.init) else { continue }
            let owner = try Self.owningPackage(path)
            #expect(owner.map { names.contains($0) } == true,
                    "\(path) (package \(owner ?? "none")) is linked but not in Depends: \(depends)")
        }
    }

    /// The package that installed `path` (`dpkg -S`), trying the /usr-merged spelling too.
    static func owningPackage(_ path: String) throws -> String? {
        let real = (try? FileManager.default.destinationOfSymbolicLink(atPath: path)).map {
            $0.hasPrefix("/") ? $0 : URL(fileURLWithPath: path).deletingLastPathComponent().appendingPathComponent($0).path
        }
        for candidate in [path, real, "/usr" + path, path.replacingOccurrences(of: "/usr/", with: "/")].compactMap({ $0 }) {
            let r = try Harness.run("/usr/bin/dpkg", ["-S", candidate])
            if r.status == 0, let colon = r.stdout.firstIndex(of: ":") {
                return String(r.stdout[..<colon])
            }
        }
        return nil
    }

    @Test func installedBinaryRunsWithAnEmptyEnvironment() throws {
        let b = try Self.built.get()
        // No Swift runtime from the toolchain: everything Swift is inside the binary.
        let ldd = try Harness.run("/usr/bin/ldd", [b.installed])
        for lib in ["libswift", "libFoundation", "libdispatch", "libBlocksRuntime"] {
            #expect(!ldd.stdout.contains(lib), "\(b.installed) links \(lib):\n\(ldd.stdout)")
        }
        let version = try Self.runClean(b.installed, ["--version"])
        #expect(version.status == 0 && version.stdout == "\(b.control["Version"] ?? "?")\n", "\(version)")
        let help = try Self.runClean(b.installed, ["--help"])
        #expect(help.status == 0, "\(help.stderr)")
        for word in ["USAGE: qcowpress", "convert", "restore", "export", "info", "check"] {
            let found = help.stdout.contains(word)
            #expect(found, "--help lacks \(word):\n\(help.stdout)")
        }

        // A real conversion, judged by qemu-img.
        try #require(Harness.haveQemuImg, "qemu-img judges the conversion (scripts/bootstrap.sh installs qemu-utils)")
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let src = dir.appendingPathComponent("src.raw")
        try SourceImage.mixed(at: src, blocks: 12)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        let c = try Self.runClean(b.installed, ["convert", "-c", "-o", "compression_type=zstd", "--output", "json", src.path, dst])
        #expect(c.status == 0, "convert: \(c.stderr)")
        #expect(c.stdout.contains("\"bytesOut\""), "no JSON summary: \(c.stdout)")
        try Harness.expectGood(dst, equals: src.path)
        let zlib = dir.appendingPathComponent("zlib.qcow2").path
        #expect(try Self.runClean(b.installed, ["convert", "-c", src.path, zlib]).status == 0)
        try Harness.expectGood(zlib, equals: src.path)
        let check = try Self.runClean(b.installed, ["check", dst])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
    }

    /// Asks the installed bash completion what it offers after `words` (the last one being
    /// completed), as bash does on TAB.
    static func bashComplete(_ b: Built, _ words: [String], in dir: URL) throws -> [String] {
        let script = b.installRoot.appendingPathComponent("usr/share/bash-completion/completions/qcowpress").path
        let quoted = words.map { "'\($0)'" }.joined(separator: " ")
        let program = """
            cd '\(dir.path)'
            [ -r /usr/share/bash-completion/bash_completion ] && . /usr/share/bash-completion/bash_completion
            . '\(script)'
            COMP_WORDS=(\(quoted)); COMP_CWORD=\(words.count - 1)
            COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}
            fn=$(complete -p qcowpress | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p')
            "$fn" qcowpress "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
            printf '%s\\n' "${COMPREPLY[@]}"
            """
        let r = try Harness.run("/bin/bash", ["-c", program])
        #expect(r.status == 0, "bash completion failed: \(r.stderr)")
        return r.stdout.split(separator: "\n").map(String.init).sorted()
    }

    @Test func completionsOfferFileNamesAndOptionValues() throws {
        let b = try Self.built.get()
        let dir = try Harness.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        FileManager.default.createFile(atPath: dir.appendingPathComponent("disk.raw").path, contents: Data())
        FileManager.default.createFile(atPath: dir.appendingPathComponent("disk.qcow2").path, contents: Data())

        #expect(try Self.bashComplete(b, ["qcowpress", "convert", "--io", ""], in: dir) == ["buffered", "pwrite", "uring"])
        #expect(try Self.bashComplete(b, ["qcowpress", "convert", "-O", ""], in: dir) == ["qcow2", "raw"])
        #expect(try Self.bashComplete(b, ["qcowpress", "convert", "-f", "q"], in: dir) == ["qcow2"])
        #expect(try Self.bashComplete(b, ["qcowpress", "convert", "--output", ""], in: dir) == ["human", "json"])
        #expect(try Self.bashComplete(b, ["qcowpress", "info", "disk."], in: dir) == ["disk.qcow2", "disk.raw"])
        #expect(try Self.bashComplete(b, ["qcowpress", "convert", "-c", "disk.r"], in: dir) == ["disk.raw"])
        #expect(try Self.bashComplete(b, ["qcowpress", "convert", "-B", "disk.q"], in: dir) == ["disk.qcow2"])

        // zsh and fish: the same values are in their scripts (the shells themselves are not installed here).
        let share = b.installRoot.appendingPathComponent("usr/share")
        let zsh = try String(contentsOf: share.appendingPathComponent("zsh/vendor-completions/_qcowpress"), encoding: .utf8)
        let fish = try String(contentsOf: share.appendingPathComponent("fish/vendor_completions.d/qcowpress.fish"), encoding: .utf8)
        let compdef = zsh.hasPrefix("#compdef qcowpress")
        #expect(compdef, "not a zsh completion: \(zsh.prefix(200))")
        for script in [zsh, fish] {
            for value in ["uring pwrite buffered", "raw qcow2", "human json"] {
                let found = script.contains(value) || script.contains(value.replacingOccurrences(of: " ", with: "' '"))
                #expect(found, "a completion script lacks '\(value)'")
            }
        }
        for spec in ["':source:_files'", "':destination:_files'", ":backing:_files'", ":dir:_files -/'", "':outdir:_files -/'"] {
            let found = zsh.contains(spec)
            #expect(found, "zsh script lacks \(spec)")
        }
        for command in ["convert", "info", "check", "export"] {
            let found = fish.contains("\"qcowpress \(command)\" -eq 1' -F")
            #expect(found, "fish script does not complete files for \(command)'s first argument")
        }
    }
}
