#!/usr/bin/env python3
# FormatFile window reads (#31): a 512-misaligned file read of CHUNK bytes on 2 threads, buffered
# (dropped behind, as InputFile) vs O_DIRECT of the aligned middle + memmove + buffered head/tail.
#   bench/window_read.py FILE CHUNK TOTAL   (root: caches dropped before each run)
import os, mmap, ctypes, time, sys, threading
path = sys.argv[1]; chunk = int(sys.argv[2]); total = int(sys.argv[3]); nthreads = 2
def drop():
    os.sync(); open('/proc/sys/vm/drop_caches','w').write('3')
base = 512
def run(mode):
    fdd = os.open(path, os.O_RDONLY | os.O_DIRECT); fb = os.open(path, os.O_RDONLY)
    nxt = [0]; lock = threading.Lock()
    def worker():
        buf = mmap.mmap(-1, chunk + 8192); addr = ctypes.addressof(ctypes.c_char.from_buffer(buf)); mv = memoryview(buf)
        head = 4096 - base % 4096; middle = (chunk - head) // 4096 * 4096; tail = chunk - head - middle
        while True:
            with lock:
                i = nxt[0]; nxt[0] += 1
            off = base + i * chunk
            if off + chunk > total: break
            if mode == 'buffered':
                os.preadv(fb, [mv[:chunk]], off); os.posix_fadvise(fb, off, chunk, os.POSIX_FADV_DONTNEED)
            else:
                os.preadv(fdd, [mv[:middle]], off + head); ctypes.memmove(addr + head, addr, middle)
                os.preadv(fb, [mv[:head]], off); os.posix_fadvise(fb, off, head, os.POSIX_FADV_DONTNEED)
                os.preadv(fb, [mv[head+middle:chunk]], off + head + middle); os.posix_fadvise(fb, off+head+middle, tail, os.POSIX_FADV_DONTNEED)
        del mv; buf.close()
    ts = [threading.Thread(target=worker) for _ in range(nthreads)]
    [t.start() for t in ts]; [t.join() for t in ts]
    os.close(fdd); os.close(fb)
for mode in ['buffered', 'direct', 'buffered', 'direct', 'buffered', 'direct']:
    drop(); t = time.time(); c = time.process_time(); run(mode); dt = time.time() - t
    print(f"{chunk>>10} KiB x2 threads {mode}: {total/dt/1e6:.0f} MB/s CPU {time.process_time()-c:.2f}s")
