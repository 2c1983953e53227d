"""Ad-hoc shared-memory numbers (not a test, not the benchmark suite).

Run: ``PYTHONPATH=src python tests/shm/quick_bench.py`` (uses ``BUZON_RUNTIME_DIR`` or
the default runtime dir; leaves nothing behind). Two forked processes each time.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

import buzon
from buzon import shm


def ring_round_trip(n: int = 20000) -> str:
    a, b = shm.create_ring(1 << 20), shm.create_ring(1 << 20)
    pid = os.fork()
    if pid == 0:
        ra, rb = shm.attach_ring(a.name), shm.attach_ring(b.name)
        for _ in range(n + 100):
            rb.send(ra.recv())
        os._exit(0)
    msg = b"x" * 64
    lat = []
    for i in range(n + 100):
        t = time.perf_counter_ns()
        a.send(msg)
        b.recv()
        if i >= 100:
            lat.append(time.perf_counter_ns() - t)
    os.waitpid(pid, 0)
    for r in (a, b):
        r.close()
        shm.remove_segment(r.name)
    lat.sort()
    return f"64 B round trip, Ring: p50 {lat[n // 2] / 1000:.2f} us"


def ring_one_way(size: int, count: int) -> float:
    a = shm.create_ring(1 << 26)
    pid = os.fork()
    if pid == 0:
        r = shm.attach_ring(a.name)
        for _ in range(count):
            r.recv()
        os._exit(0)
    msg = b"y" * size
    t = time.perf_counter()
    for _ in range(count):
        a.send(msg)
    os.waitpid(pid, 0)
    dt = time.perf_counter() - t
    a.close()
    shm.remove_segment(a.name)
    return dt


def loan_numpy(count: int = 23) -> str:
    nbytes = 64 << 20
    a = shm.create_ring(1 << 28)
    pid = os.fork()
    if pid == 0:
        r = shm.attach_ring(a.name)
        for _ in range(count):
            view = r.recv_view()
            x = np.frombuffer(view, "f8")
            assert x[0] == x[-1]
            del x
            view.release()
        os._exit(0)
    arr = np.ones(nbytes // 8)
    times = []
    for _ in range(count):
        t = time.perf_counter()
        loan = a.reserve(nbytes)
        np.frombuffer(loan, "f8")[:] = arr
        loan.commit()
        times.append(time.perf_counter() - t)
    os.waitpid(pid, 0)
    a.close()
    shm.remove_segment(a.name)
    warm = sorted(times[8:])
    rate = nbytes / warm[len(warm) // 2] / 1e9
    return f"64 MiB numpy, loan + recv_view (one copy, warm ring): {rate:.1f} GB/s"


def channel_round_trip(n: int = 5000) -> str:
    lst = buzon.listen("shm:quick-bench")
    pid = os.fork()
    if pid == 0:
        c = buzon.connect("shm:quick-bench", timeout=5)
        for _ in range(n + 100):
            c.send_bytes(c.recv_bytes())
        c.close()
        os._exit(0)
    ch = lst.accept(timeout=5)
    msg = b"x" * 64
    lat = []
    for i in range(n + 100):
        t = time.perf_counter_ns()
        ch.send_bytes(msg)
        ch.recv_bytes()
        if i >= 100:
            lat.append(time.perf_counter_ns() - t)
    os.waitpid(pid, 0)
    ch.close()
    lst.close()
    lat.sort()
    return f"64 B round trip, shm: channels: p50 {lat[n // 2] / 1000:.2f} us"


def main() -> None:
    os.environ.setdefault("BUZON_RUNTIME_DIR", tempfile.mkdtemp(prefix="bz-bench-"))
    print(ring_round_trip())
    n = 1_000_000
    print(f"64 B one way, Ring: {n / ring_one_way(64, n) / 1e6:.2f} M msg/s")
    k = 3000
    print(f"1 MiB one way, Ring: {k * (1 << 20) / ring_one_way(1 << 20, k) / 1e9:.1f} GB/s")
    print(loan_numpy())
    print(channel_round_trip())


if __name__ == "__main__":
    main()
