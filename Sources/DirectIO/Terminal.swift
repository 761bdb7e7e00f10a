import Glibc

/// The command line's standard streams and terminal: messages to a descriptor, whether it is a
/// terminal and how wide, a passphrase read without echo. Not through the fault seam: these are not
/// the data calls it counts (a message on stderr must not shift the index of an injected write fault).
public enum Terminal {
    /// Writes all of `text` to `fd` (stderr by default), going on after interrupted and short
    /// writes; gives up silently when the descriptor refuses (there is nowhere left to say so).
    public static func write(_ text: String, to fd: Int32 = 2) {
        var text = text
        text.withUTF8 { p in
            var done = 0
            while done < p.count {
                let r = Sys.retryingEINTR { () -> Int in
                    let n = Glibc.write(fd, p.baseAddress! + done, p.count - done)
                    return n < 0 ? -Int(Glibc.errno) : n
                }
                if r <= 0 { return }
                done += r
            }
        }
    }

    /// Whether `fd` is a terminal (isatty(3)).
    public static func isTerminal(_ fd: Int32) -> Bool { isatty(fd) != 0 }

    /// The width of the terminal on `fd` in columns (TIOCGWINSZ), or nil when it is none or does
    /// not say.
    public static func columns(_ fd: Int32) -> Int? {
        var w = winsize()
        return ioctl(fd, UInt(TIOCGWINSZ), &w) == 0 && w.ws_col > 0 ? Int(w.ws_col) : nil
    }

    /// A passphrase typed on the controlling terminal without echo (getpass(3)), after `prompt`;
    /// nil when standard input is not a terminal or nothing could be read.
    public static func readPassphrase(prompt: String) -> String? {
        guard isTerminal(0), let p = getpass(prompt) else { return nil }
        return String(cString: p)
    }
}
