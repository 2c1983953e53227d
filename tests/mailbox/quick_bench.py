"""Ad-hoc mailbox numbers (not a test, not the benchmark suite): 64 B ``bytes``.

Run: ``PYTHONPATH=src python tests/mailbox/quick_bench.py [ROUNDS]`` under a private
``BUZON_RUNTIME_DIR`` (e.g. ``/work/iso.sh env BUZON_RUNTIME_DIR=$(mktemp -d) ...``).
Each round, in turn: the mean round trip through two mailboxes (an echo process),
one-way msg/s (one sender, one receiver), and 4 producers x 4 consumers msg/s, for a
``buzon.mailbox``, ``multiprocessing.Queue`` and ``faster_fifo.Queue`` (if installed),
and ``BoundedBuffer`` for 4x4. Processes are forked; environment knobs: ``NRT``
(round trips, default 5000), ``NOW`` (one-way and 4x4 messages, default 100000),
``PAYLOAD=dict`` (a dict of three fields instead of 64 B; no BoundedBuffer row).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import buzon

N_RT = int(os.environ.get("NRT", "5000"))
N_OW = int(os.environ.get("NOW", "100000"))
PAY: object = b"x" * 64
if os.environ.get("PAYLOAD") == "dict":  # a small object (each peer's default serializer)
    PAY = {"id": 12345, "name": "sensor-7", "value": 3.25}


class _Link:
    """put/get over one of the compared mechanisms; ``flush`` before a child exits."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.obj: Any
        if kind == "mailbox":
            self.obj = buzon.mailbox(name, capacity=1024)
            self.put, self.get = self.obj.send, self.obj.recv
        elif kind == "bbuf":
            self.obj = buzon.BoundedBuffer(name, slots=1024, item_size=64)
            self.put, self.get = self.obj.put, self.obj.get
        elif kind == "faster-fifo":
            from faster_fifo import Queue  # type: ignore[import-not-found]

            self.obj = Queue(1 << 20)
            self.put = lambda x: self.obj.put(x, timeout=3600)
            self.get = lambda: self.obj.get(timeout=3600)
        else:
            self.obj = multiprocessing.Queue()
            self.put, self.get = self.obj.put, self.obj.get

    def flush(self) -> None:
        if self.kind == "mp.Queue":
            self.obj.close()
            self.obj.join_thread()

    def done(self) -> None:
        if self.kind == "bbuf":
            self.obj.close()
        if self.kind in ("mailbox", "bbuf"):
            self.obj.remove()


def _child(fn: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def round_trip_us(kind: str) -> float:
    a, b = _Link(kind, "rt-a"), _Link(kind, "rt-b")

    def echo() -> None:
        for _ in range(N_RT + 100):
            b.put(a.get())
        b.flush()

    pid = _child(echo)
    for _ in range(100):
        a.put(PAY)
        b.get()
    t = time.perf_counter()
    for _ in range(N_RT):
        a.put(PAY)
        b.get()
    dt = time.perf_counter() - t
    os.waitpid(pid, 0)
    a.done()
    b.done()
    return dt / N_RT * 1e6


def one_way(kind: str) -> float:
    a = _Link(kind, "ow")

    def drain() -> None:
        for _ in range(N_OW):
            a.get()

    pid = _child(drain)
    t = time.perf_counter()
    for _ in range(N_OW):
        a.put(PAY)
    a.flush()
    os.waitpid(pid, 0)
    dt = time.perf_counter() - t
    a.done()
    return N_OW / dt


def four_by_four(kind: str) -> float:
    a = _Link(kind, "pc")
    n = N_OW // 4

    def produce() -> None:
        for _ in range(n):
            a.put(PAY)
        a.flush()

    def consume() -> None:
        for _ in range(n):
            a.get()

    t = time.perf_counter()
    pids = [_child(consume) for _ in range(4)] + [_child(produce) for _ in range(4)]
    for pid in pids:
        os.waitpid(pid, 0)
    dt = time.perf_counter() - t
    a.done()
    return 4 * n / dt


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    kinds = ["mailbox", "mp.Queue"]
    try:
        import faster_fifo  # type: ignore[import-not-found]  # noqa: F401

        kinds.append("faster-fifo")
    except ImportError:
        pass
    for r in range(rounds):
        rt = " ".join(f"{k}={round_trip_us(k):.1f}" for k in kinds)
        print(f"round {r} round-trip us: {rt}", flush=True)
        ow = " ".join(f"{k}={one_way(k):.0f}" for k in kinds)
        print(f"round {r} one-way msg/s: {ow}", flush=True)
        with_bbuf = [*kinds, "bbuf"] if isinstance(PAY, bytes) else kinds
        pc = " ".join(f"{k}={four_by_four(k):.0f}" for k in with_bbuf)
        print(f"round {r} 4p4c msg/s: {pc}", flush=True)


if __name__ == "__main__":
    main()
