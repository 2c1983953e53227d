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
from buzon import _core, shm

WARM = 10  # messages before the clock starts (blocks created, pages faulted in)


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


def _channel_numpy(mode: str, count: int = 40) -> str:
    """64 MiB of float64 one way through a ``shm:`` channel, forked reader.

    ``send``: ``ch.send(arr)`` / ``ch.recv()`` (one copy: into a pooled block; the
    received array stays on the block). ``loan``: ``ch.loan`` filled from ``arr`` /
    ``ch.recv_view`` (the fill is the only copy: the send itself copies nothing).
    ``send_bytes``: ``send_bytes(arr)`` / ``recv_bytes()`` (a copy each side).
    Timed from the WARM-th message until the reader has taken the last one (it checks
    each); end to end, so the rate is what the two processes sustain together.
    """
    nbytes = 64 << 20
    url = f"shm:quick-bench-{mode}"
    lst = buzon.listen(url, max_frame=nbytes + 4096)
    pid = os.fork()
    if pid == 0:
        c = buzon.connect(url, timeout=5, max_frame=nbytes + 4096)
        for _ in range(count):
            if mode == "send":
                x = c.recv()
                assert x[0] == x[-1]
                del x
            elif mode == "loan":
                with c.recv_view() as view:
                    x = np.frombuffer(view, "f8")
                    assert x[0] == x[-1]
                    del x
            else:
                c.recv_bytes()
        c.send_bytes(b"done")
        c.close()
        os._exit(0)
    ch = lst.accept(timeout=5)
    arr = np.ones(nbytes // 8)
    start = 0.0
    for i in range(count):
        if i == WARM:
            start = time.perf_counter()
        if mode == "send":
            ch.send(arr)
        elif mode == "loan":
            with ch.loan(nbytes) as buf:
                np.frombuffer(buf, "f8")[:] = arr
        else:
            ch.send_bytes(arr)
    ch.recv_bytes()
    rate = nbytes * (count - WARM) / (time.perf_counter() - start) / 1e9
    stats = ch.statistics()
    os.waitpid(pid, 0)
    ch.close()
    lst.close()
    what = {
        "send": "send(arr) / recv() (one copy)",
        "loan": "loan filled from arr / recv_view (one copy: the fill)",
        "send_bytes": "send_bytes(arr) / recv_bytes() (a copy each side)",
    }[mode]
    return (
        f"64 MiB numpy through shm: channels, {what}: {rate:.1f} GB/s "
        f"(blocks created {stats.blocks_created}, reused {stats.blocks_reused})"
    )


def _channel_loan_only(count: int = 40) -> str:
    """The same, with nothing copied at all: the sender only touches the first and last
    element of the lent block, the reader reads them through ``recv_view`` (the cost
    of handing a 64 MiB message over by reference)."""
    nbytes = 64 << 20
    url = "shm:quick-bench-ref"
    lst = buzon.listen(url, max_frame=nbytes + 4096)
    pid = os.fork()
    if pid == 0:
        c = buzon.connect(url, timeout=5, max_frame=nbytes + 4096)
        for _ in range(count):
            with c.recv_view() as view:
                assert view[0] == view[-1]
        c.send_bytes(b"done")
        c.close()
        os._exit(0)
    ch = lst.accept(timeout=5)
    start = 0.0
    for i in range(count):
        if i == WARM:
            start = time.perf_counter()
        with ch.loan(nbytes) as buf:
            buf[0] = buf[-1] = i & 0xFF
    ch.recv_bytes()
    rate = nbytes * (count - WARM) / (time.perf_counter() - start) / 1e9
    os.waitpid(pid, 0)
    ch.close()
    lst.close()
    return f"64 MiB through shm: channels, loan / recv_view, no copy at all: {rate:.0f} GB/s"


def memcpy_64mib() -> str:
    """The yardstick: one 64 MiB copy into a warm block, in one process."""
    nbytes = 64 << 20
    name = shm.new_segment_name()
    block = _core.Block.create("/" + name, nbytes, b"{}")
    src = np.ones(nbytes // 8)
    times = []
    with memoryview(block) as dst:
        for _ in range(15):
            t = time.perf_counter()
            dst[:] = memoryview(src).cast("B")
            times.append(time.perf_counter() - t)
    block.close()
    shm.remove_segment(name)
    times.sort()
    return f"memcpy of 64 MiB into a warm block, one process: {nbytes / times[7] / 1e9:.1f} GB/s"


def main() -> None:
    os.environ.setdefault("BUZON_RUNTIME_DIR", tempfile.mkdtemp(prefix="bz-bench-"))
    print(ring_round_trip())
    n = 1_000_000
    print(f"64 B one way, Ring: {n / ring_one_way(64, n) / 1e6:.2f} M msg/s")
    k = 3000
    print(f"1 MiB one way, Ring: {k * (1 << 20) / ring_one_way(1 << 20, k) / 1e9:.1f} GB/s")
    print(loan_numpy())
    print(channel_round_trip())
    print(memcpy_64mib())
    for mode in ("send", "loan", "send_bytes"):
        print(_channel_numpy(mode))
    print(_channel_loan_only())


if __name__ == "__main__":
    main()
