#ifndef CURING_SHIM_H
#define CURING_SHIM_H
// glibc headers first: liburing.h pulls in kernel types that clash with a
// clean debug build's view of fd_set otherwise (found on this machine).
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <signal.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#if __has_include(<liburing.h>)
#include <liburing.h>
#else
#error "liburing.h not found: install liburing-dev (apt-get install -y liburing-dev), or run scripts/bootstrap.sh"
#endif

// O_DIRECT is a macro Swift does not import.
static const int CURING_O_DIRECT = __O_DIRECT;

static inline int curing_queue_init(unsigned entries, struct io_uring *ring) {
    return io_uring_queue_init(entries, ring, 0);
}
static inline struct io_uring_sqe *curing_get_sqe(struct io_uring *ring) {
    return io_uring_get_sqe(ring);
}
static inline void curing_prep_write(struct io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes, unsigned long long offset, unsigned long long user_data) {
    io_uring_prep_write(sqe, fd, buf, nbytes, offset);
    io_uring_sqe_set_data64(sqe, user_data);
}
static inline void curing_prep_write_fixed(struct io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes, unsigned long long offset, int buf_index, unsigned long long user_data) {
    io_uring_prep_write_fixed(sqe, fd, buf, nbytes, offset, buf_index);
    io_uring_sqe_set_data64(sqe, user_data);
}
static inline void curing_prep_read(struct io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes, unsigned long long offset, unsigned long long user_data) {
    io_uring_prep_read(sqe, fd, buf, nbytes, offset);
    io_uring_sqe_set_data64(sqe, user_data);
}
/// Waits for one completion; returns 0 and fills res/user_data, or -errno.
static inline int curing_wait_cqe(struct io_uring *ring, int *res, unsigned long long *user_data) {
    struct io_uring_cqe *cqe = 0;
    int ret = io_uring_wait_cqe(ring, &cqe);
    if (ret < 0) return ret;
    *res = cqe->res;
    *user_data = io_uring_cqe_get_data64(cqe);
    io_uring_cqe_seen(ring, cqe);
    return 0;
}
static inline int curing_peek_cqe(struct io_uring *ring, int *res, unsigned long long *user_data) {
    struct io_uring_cqe *cqe = 0;
    int ret = io_uring_peek_cqe(ring, &cqe);
    if (ret < 0) return ret;
    *res = cqe->res;
    *user_data = io_uring_cqe_get_data64(cqe);
    io_uring_cqe_seen(ring, cqe);
    return 0;
}
static inline int curing_errno(void) { return errno; }
/// sync_file_range needs _GNU_SOURCE, which Swift's Glibc module is not built with.
static inline int curing_sync_file_range(int fd, long long offset, long long nbytes, unsigned flags) {
    return (int)syscall(SYS_sync_file_range, fd, offset, nbytes, flags);
}
/// renameat2 and fallocate need _GNU_SOURCE too; called through syscall(2) so an old glibc
/// without the wrapper still links. Return 0 or -1 with errno set.
static inline int curing_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned flags) {
    return (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
}
static inline int curing_fallocate(int fd, int mode, long long offset, long long len) {
    return (int)syscall(SYS_fallocate, fd, mode, offset, len);
}
static const unsigned CURING_RENAME_NOREPLACE = 1;      // linux/fs.h
static const int CURING_FALLOC_FL_KEEP_SIZE = 0x01;     // linux/falloc.h
static const int CURING_FALLOC_FL_ZERO_RANGE = 0x10;    // linux/falloc.h
static const int CURING_AT_FDCWD = -100;                // fcntl.h
/// QEMU-compatible image locks: open-file-description byte-range locks (fcntl F_OFD_SETLK and
/// F_OFD_GETLK, Linux 3.15; the commands need _GNU_SOURCE). `type` is CURING_F_RDLCK, _WRLCK or
/// _UNLCK. setlk returns 0 or -1 with errno set; getlk returns 1 when another open file
/// description holds a lock that conflicts with `type` on the range, 0 when none does, -1 on error.
static const short CURING_F_RDLCK = F_RDLCK;
static const short CURING_F_WRLCK = F_WRLCK;
static const short CURING_F_UNLCK = F_UNLCK;
static inline int curing_ofd_setlk(int fd, short type, long long start, long long len) {
    struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len, .l_pid = 0 };
    return fcntl(fd, 37 /* F_OFD_SETLK */, &fl);
}
static inline int curing_ofd_getlk(int fd, short type, long long start, long long len) {
    struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len, .l_pid = 0 };
    if (fcntl(fd, 36 /* F_OFD_GETLK */, &fl) < 0) return -1;
    return fl.l_type == F_UNLCK ? 0 : 1;
}
static inline void curing_set_thread_name(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }
static const unsigned CURING_SYNC_RANGE_ALL = 1 | 2 | 4; // WAIT_BEFORE | WRITE | WAIT_AFTER
#endif
