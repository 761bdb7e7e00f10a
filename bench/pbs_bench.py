"""What bench/remote_bench.py and bench/s3_bench.py share: the datastore they both build, a test
server that prints a LISTENING line, one timed `restore pbs`, and the qemu-img check of its image."""
import os, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from restore_bench import drop  # noqa: E402  (sync + drop the page cache, one definition)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QP = os.environ.get("QCOWPRESS_BIN", os.path.join(ROOT, ".build", "release", "qcowpress"))
SNAP = "vm/100/2026-11-20T10:00:00Z"


def datastore(work, raw):
    """A PBS datastore of `raw` (4 MiB chunks, as PBS writes) in work/pbs, built once."""
    ds = os.path.join(work, "pbs")
    if not os.path.exists(ds):
        subprocess.run([sys.executable, os.path.join(ROOT, "Tests/Support/pbs_datastore.py"), "--datastore", ds,
                        "--snapshot", SNAP, "--drive", "drive-scsi0.img=" + raw], check=True, stdout=subprocess.DEVNULL)
    return ds


class ListeningServer:
    """A Tests/Support server started as `cmd`, stderr into `log`; `fields`: its LISTENING line's
    words after LISTENING."""
    def __init__(self, cmd, log):
        self.err = open(log, "w")
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True)
        line = self.p.stdout.readline().split()
        if not line or line[0] != "LISTENING":
            sys.exit("%s did not start" % os.path.basename(cmd[1]))
        self.fields = line[1:]

    def stop(self):
        self.p.kill()
        self.p.wait()
        self.err.close()


def restore(args, dst, env=None):
    """(seconds, peak RSS MiB) of one `restore pbs ARGS SNAP drive-scsi0.img DST`, page cache dropped before."""
    if os.path.exists(dst):
        os.unlink(dst)
    drop()
    t = time.monotonic()
    p = subprocess.Popen([QP, "restore", "pbs"] + args + [SNAP, "drive-scsi0.img", dst],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.monotonic() - t
    if status != 0:
        sys.exit("failed: %s\n%s" % (args, err))
    return dt, usage.ru_maxrss / 1024


def check_same(raw, dst, what):
    """Exits unless the restored qcow2 `dst` holds what `raw` does."""
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, dst], capture_output=True, text=True)
    if cmp.returncode != 0:
        sys.exit("%s: restored image differs: %s" % (what, cmp.stdout))
