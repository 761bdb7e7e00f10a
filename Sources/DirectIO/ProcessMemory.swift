import Glibc

/// What the kernel says of this process's memory.
public enum ProcessMemory {
    /// Peak resident memory: VmHWM from /proc/self/status. (getrusage's ru_maxrss is only the
    /// fallback: Linux carries the pre-exec high-water mark over execve, so a child forked from a
    /// big parent reports the parent's size.)
    public static func peakResidentBytes() -> Int {
        let fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC)
        if fd >= 0 {
            defer { close(fd) }
            var buf = [UInt8](repeating: 0, count: 8192)
            // Not through the seam's read (it would shift the indexes of injected read faults).
            let n = Sys.retryingEINTR { buf.withUnsafeMutableBytes { p -> Int in
                let r = read(fd, p.baseAddress, p.count)
                return r < 0 ? -Int(errno) : r
            } }
            if n > 0 {
                for line in String(decoding: buf[0..<n], as: UTF8.self).split(separator: "\n") where line.hasPrefix("VmHWM:") {
                    if let kb = line.split(separator: " ").compactMap({ Int($0) }).first { return kb * 1024 }
                }
            }
        }
        var ru = rusage()
        getrusage(RUSAGE_SELF.rawValue, &ru)
        return Int(ru.ru_maxrss) * 1024
    }
}
