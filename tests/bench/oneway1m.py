"""A measuring script, not a test: the bench's 1 MiB one-way row with the default
options, reduced to its loop, so that ``perf stat`` or ``strace -c`` can count what
each MiB costs (context switches, system calls, CPU). A child (pinned to CPU 1) sends
N messages of 1 MiB with ``send_bytes``; the parent (CPU 0) receives them with
``recv_bytes_into`` one reused buffer and prints MB/s. Comparing two checkouts: run it
alternately from each, e.g.

    PYTHONPATH=src perf stat -e context-switches,task-clock -- \\
        python tests/bench/oneway1m.py pipe 1000

TRANSPORT is pipe, fifo, unix or tcp.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import buzon

SIZE = 1 << 20


def _pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})
    except OSError:
        pass


def main(kind: str, count: int) -> None:
    msg = b"x" * SIZE
    tmp = tempfile.mkdtemp(prefix="bz1m-")
    lst = None
    if kind == "pipe":
        a, b = buzon.pipe()
        pid = os.fork()
        if pid == 0:
            _pin(1)
            b.recv_bytes()
            for _ in range(count):
                b.send_bytes(msg)
            b.recv_bytes()
            os._exit(0)
        r = w = a
    else:
        url = {"unix": f"unix:{tmp}/s", "fifo": f"fifo:{tmp}/f", "tcp": "tcp://127.0.0.1:0"}
        lst = buzon.listen(url[kind])
        address = str(lst.address)
        pid = os.fork()
        if pid == 0:
            _pin(1)
            c = buzon.connect(address, timeout=10)
            if kind != "fifo":
                c.recv_bytes()
            for _ in range(count):
                c.send_bytes(msg)
            if kind != "fifo":
                c.recv_bytes()
            else:
                c.flush()
            os._exit(0)
        r = w = lst.accept(timeout=10)
    _pin(0)
    buf = bytearray(SIZE)
    if kind != "fifo":
        w.send_bytes(b"go")
    start = time.perf_counter()
    for _ in range(count):
        r.recv_bytes_into(buf)
    elapsed = time.perf_counter() - start
    if kind != "fifo":
        w.send_bytes(b"end")
    os.waitpid(pid, 0)
    r.close()
    if lst is not None:
        lst.close()
    for name in os.listdir(tmp):
        os.unlink(os.path.join(tmp, name))
    os.rmdir(tmp)
    print(f"{kind} {count * SIZE / elapsed / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "pipe", int(sys.argv[2]) if len(sys.argv) > 2 else 500
    )
