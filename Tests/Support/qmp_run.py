#!/usr/bin/env python3
"""qmp_run.py QMP_SOCKET STEP... - drives a QEMU (qemu-storage-daemon) over QMP for the tests.

Each STEP is a JSON object: a QMP command ({"execute": ..., "arguments": ...}),
{"wait-job": ID}, which waits for the BLOCK_JOB_COMPLETED event of that job and fails if it
carries an error, or {"wait-cancelled": ID}, which waits for its BLOCK_JOB_CANCELLED event. Prints one line per step (the command's return value, or the event). Exits 1 with
a one-line message on the first error.
"""
import json, socket, sys, time


class QMP:
    def __init__(self, path):
        # The caller starts this once the daemon listens (its QMP socket comes first on its
        # command line, before the NBD socket the caller waits for): one connect, no retries.
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.events = []
        self.read()  # greeting
        self.cmd({"execute": "qmp_capabilities"})

    def read(self):
        line = self.f.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def cmd(self, obj):
        self.f.write(json.dumps(obj).encode() + b"\n")
        self.f.flush()
        while True:
            m = self.read()
            if "event" in m:
                self.events.append(m)
                continue
            if "error" in m:
                raise RuntimeError("%s: %s" % (obj.get("execute"), m["error"].get("desc")))
            return m.get("return")

    def wait_cancelled(self, job, timeout=600):
        self.s.settimeout(timeout)
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == "BLOCK_JOB_CANCELLED" and e["data"].get("device") == job:
                    del self.events[i]
                    return e
            self.events.append(self.read())

    def wait_job(self, job, timeout=600):
        deadline = time.time() + timeout
        self.s.settimeout(timeout)
        while time.time() < deadline:
            for i, e in enumerate(self.events):
                if e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and e["data"].get("device") == job:
                    del self.events[i]
                    if e["event"] == "BLOCK_JOB_CANCELLED" or "error" in e["data"]:
                        raise RuntimeError("job %s: %s" % (job, e["data"].get("error", "cancelled")))
                    return e
            self.events.append(self.read())
        raise TimeoutError("job %s did not complete" % job)


def main():
    q = QMP(sys.argv[1])
    for step in sys.argv[2:]:
        obj = json.loads(step)
        if "wait-job" in obj:
            print(json.dumps(q.wait_job(obj["wait-job"])))
        elif "wait-cancelled" in obj:
            print(json.dumps(q.wait_cancelled(obj["wait-cancelled"])))
        else:
            print(json.dumps(q.cmd(obj)))
        sys.stdout.flush()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one line for the test's message
        print("FAIL %s" % e, file=sys.stderr)
        sys.exit(1)
