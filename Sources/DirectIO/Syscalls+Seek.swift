import Glibc

extension Sys {
    /// lseek(2) with SEEK_DATA or SEEK_HOLE: the offset found, or -errno (ENXIO: no data past
    /// `offset`; EINVAL where the file system cannot tell).
    static func seek(_ fd: Int32, _ offset: UInt64, _ whence: Int32) -> Int64 {
        let r = Glibc.lseek(fd, off_t(offset), whence)
        return r < 0 ? -Int64(Glibc.errno) : Int64(r)
    }
}
