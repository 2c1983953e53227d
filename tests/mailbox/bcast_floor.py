"""The floor of the broadcast row (not a test, not the benchmark suite): 1 sender, 4
receiver processes of a ``"broadcast"`` mailbox (backlog 1024 each), 64 B, as
``buzon/mailbox/bcast4`` runs it, three ways:

- ``api``: ``box.send(b)`` / ``box.recv()``, what the bench row does;
- ``c``: the minimum a Python process can do per message with this design: the sender
  calls ``MailboxCore.bcast`` (one C call: the record put into the 4 rings, the
  overflow rule) and each receiver ``MailboxCore.recv`` on its own ring (one C call),
  nothing else in the loop;
- ``ring``: less than a mailbox does: ``Ring.try_send`` of the bare 64 bytes into each
  of the 4 rings (no frame, no header, no overflow rule) and ``Ring.try_recv`` /
  ``Ring.recv``.

For each: msg/s delivered to the slowest receiver over its own window, and the CPU
(user + system, every process, from ``getrusage``) per message sent: on 2 CPUs the
row can never exceed ``2 s / (CPU per message)`` whatever the scheduling.

Run: ``/work/iso.sh env PYTHONPATH=src python tests/mailbox/bcast_floor.py [ROUNDS]``.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

import buzon
from buzon.errors import Empty

MSG = b"\x5a" * 64
SECONDS = 1.5


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _fork(fn: Any) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def run(way: str, receivers: int = 4) -> tuple[float, float, int]:
    """(slowest receiver's msg/s, CPU ns per message sent, messages sent)."""
    name = f"floor{os.getpid()}"
    box = buzon.mailbox(name, capacity=1024, policy="broadcast", create=True)
    ready_r, ready_w = os.pipe()
    out_r, out_w = os.pipe()

    def receiver() -> None:
        rx = buzon.mailbox(name)
        try:
            rx.recv_nowait()  # attaches
        except Empty:
            pass
        ring = rx._rx()
        if way == "api":
            recv: Any = rx.recv
        elif way == "c":
            core_recv = rx._core.recv
            recv = lambda: core_recv(ring, None)  # noqa: E731
        else:
            recv = lambda: ring.recv(None)  # noqa: E731
        os.write(ready_w, b"r")
        perf = time.perf_counter_ns
        recv()
        first = last = perf()
        count = 1
        while True:
            if len(recv()) != len(MSG):
                break
            count += 1
            if count & 31 == 0:
                last = perf()
        os.write(out_w, f"{count} {first} {last}\n".encode())
        rx.close()

    def sender() -> None:
        tx = buzon.mailbox(name)
        tx.send(b"x" * 64)  # reads the receiver table (the hot path from here)
        send: Any
        if way == "api":
            send = tx.send
        elif way == "c":
            send = tx._core.bcast
        else:
            assert tx._fan is not None
            rings = tx._fan.fanout[1]

            def send(m: bytes) -> None:
                for r in rings:
                    r.try_send(m)

        perf = time.perf_counter_ns
        deadline = perf() + int(SECONDS * 1e9)
        sent = 0
        while perf() < deadline:
            for _ in range(64):
                send(MSG)
            sent += 64
        os.write(out_w, f"sent {sent}\n".encode())
        for _ in range(100):  # the end mark (the overflow rule may drop one)
            tx.send(b"end")
            time.sleep(0.01)
        tx.close()

    cpu0 = _children_cpu()
    pids = [_fork(receiver) for _ in range(receivers)]
    seen = 0
    while seen < receivers:
        seen += len(os.read(ready_r, receivers - seen))
    pids.append(_fork(sender))
    for pid in pids:
        os.waitpid(pid, 0)
    cpu = _children_cpu() - cpu0
    os.close(out_w)
    lines = b""
    while chunk := os.read(out_r, 65536):
        lines += chunk
    os.close(out_r)
    for fd in (ready_r, ready_w):
        os.close(fd)
    box.remove()
    rates, sent = [], 0
    for line in lines.decode().splitlines():
        if line.startswith("sent "):
            sent = int(line.split()[1])
            continue
        count, first, last = map(int, line.split())
        rates.append(count * 1e9 / max(1, last - first))
    return min(rates), cpu * 1e9 / max(1, sent), sent


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for _ in range(rounds):
        for way in ("api", "c", "ring"):
            rate, ns, sent = run(way)
            print(
                f"{way:4s}  slowest receiver {rate / 1e3:7.0f}k msg/s  sent {sent / 1e3:6.0f}k"
                f"  CPU {ns:6.0f} ns per message sent -> at most {2e3 / ns:.2f}M msg/s "
                "on 2 CPUs",
                flush=True,
            )


if __name__ == "__main__":
    main()
