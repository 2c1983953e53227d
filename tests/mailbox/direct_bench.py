"""Ad-hoc direct-communication numbers (not a test, not the benchmark suite).

Run: ``PYTHONPATH=src python tests/mailbox/direct_bench.py [N] [ROUNDS]`` under a
private ``BUZON_RUNTIME_DIR`` (e.g. ``/work/iso.sh env BUZON_RUNTIME_DIR=$(mktemp -d)
...``). Each round, in turn: the mean 64 B round trip with ``buzon.send_to`` +
``buzon.recv_from`` against a forked echo process, then the same through a ``shm:``
channel (``send`` + ``recv``), and the same through two plain mailboxes
(``send`` + ``recv_message``), with the ratios (issue 10's target: direct/shm <= 2).
"""

from __future__ import annotations

import os
import sys
import time

import buzon

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
MSG = b"x" * 64
WARM = 100


def direct_round_trip() -> float:
    parent = os.getpid()
    buzon.inbox()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        mine = buzon.inbox()
        os.write(w, b"1")
        for _ in range(N + WARM):
            buzon.send_to(parent, mine.recv())
        mine.remove()
        os._exit(0)
    os.read(r, 1)
    os.close(r)
    os.close(w)
    for _ in range(WARM):
        buzon.send_to(pid, MSG)
        buzon.recv_from(pid)
    t = time.perf_counter()
    for _ in range(N):
        buzon.send_to(pid, MSG)
        buzon.recv_from(pid)
    dt = time.perf_counter() - t
    os.waitpid(pid, 0)
    return dt / N * 1e6


def mailbox_round_trip() -> float:
    """The same through two plain mailboxes (what direct communication is built on)."""
    tag = os.getpid()
    a, b = buzon.mailbox(f"rt-a-{tag}"), buzon.mailbox(f"rt-b-{tag}")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        for _ in range(N + WARM):
            b.send(a.recv_message().body)
        os._exit(0)
    for _ in range(WARM):
        a.send(MSG)
        b.recv_message()
    t = time.perf_counter()
    for _ in range(N):
        a.send(MSG)
        b.recv_message()
    dt = time.perf_counter() - t
    os.waitpid(pid, 0)
    a.remove()
    b.remove()
    return dt / N * 1e6


def shm_round_trip() -> float:
    name = f"shm:rt{os.getpid()}"
    lst = buzon.listen(name)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        lst.close()
        ch = buzon.connect(name, timeout=5)
        for _ in range(N + WARM):
            ch.send(ch.recv())
        ch.close()
        os._exit(0)
    ch = lst.accept(timeout=5)
    for _ in range(WARM):
        ch.send(MSG)
        ch.recv()
    t = time.perf_counter()
    for _ in range(N):
        ch.send(MSG)
        ch.recv()
    dt = time.perf_counter() - t
    os.waitpid(pid, 0)
    ch.close()
    lst.close()
    return dt / N * 1e6


def main() -> None:
    for i in range(ROUNDS):
        d = direct_round_trip()
        m = mailbox_round_trip()
        s = shm_round_trip()
        print(
            f"round {i}: send_to/recv_from {d:.1f} us, mailboxes {m:.1f} us, shm: {s:.1f} us;"
            f" direct/shm {d / s:.2f}, direct/mailboxes {d / m:.2f}"
        )


if __name__ == "__main__":
    main()
