"""The floor of the shared broadcast ring (not a test, not the benchmark suite): 1
sender, 4 receiver processes, 64 B, backlog 1024, in the same run alternating:

- ``old``: the design before the shared ring, its minimum per message: one
  ``MailboxCore.bcast`` (the record put into each receiver's own ring) and
  ``MailboxCore.recv`` on each receiver's ring (``bcast_floor.py``'s ``c`` way);
- ``new``: the shared ring's minimum: one ``Bcast.send`` (the record written once) and
  ``Bcast.recv`` at each receiver's own cursor, nothing else in the loop;
- ``api``: ``box.send(b)`` / ``box.recv()``, what the bench row does (the design this
  tree has).

For each: msg/s delivered to the slowest receiver over its own window, and the CPU
(user + system, every process) per message delivered (to one receiver): on 2 CPUs, 4
receivers can never get more than ``2 s / (4 x CPU per delivery)`` each. The old way
needs a tree from before the shared ring (run this file with ``PYTHONPATH`` of such a
tree, e.g. a7ee4e5: it is skipped if ``MailboxCore.bcast`` is not there); the new way
needs ``buzon._bcast``.

Run: ``/work/iso.sh env PYTHONPATH=src python tests/mailbox/bcast_ring_floor.py [ROUNDS]``.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

from _mb_helpers import fork as _fork

MSG = b"\x5a" * 64
SECONDS = 1.5
END = b"end"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _new_ring() -> tuple[Any, Any, Any]:
    """A bare shared ring in a fresh segment: (make a mapping, its path, setup)."""
    from buzon import _bcast

    path = f"/dev/shm/bcfloor{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    _bcast.Bcast(fd, True, 1024, 1024, None, None, 900, 0).close()
    os.close(fd)

    def mapping() -> Any:
        fd = os.open(path, os.O_RDWR)
        try:
            return _bcast.Bcast(fd, False, 0, 0, None, None, 900, 0)
        finally:
            os.close(fd)

    return mapping, path, None


def run(way: str, receivers: int = 4) -> tuple[float, float, int]:
    """(slowest receiver's msg/s, CPU ns per message delivered, messages sent)."""
    import buzon
    from buzon.errors import Empty

    name = f"rfloor{os.getpid()}"
    box = path = mapping = None
    if way == "new":
        mapping, path, _ = _new_ring()
    else:
        box = buzon.mailbox(name, capacity=1024, policy="broadcast", create=True)
    ready_r, ready_w = os.pipe()
    out_r, out_w = os.pipe()

    def receiver(k: int) -> None:
        if way == "new":
            assert mapping is not None
            ring = mapping()
            ring.attach(k)
            recv: Any = lambda: ring.recv(k, None)  # noqa: E731
        else:
            rx = buzon.mailbox(name)
            try:
                rx.recv_nowait()  # attaches
            except Empty:
                pass
            if way == "api":
                recv = rx.recv
            else:
                core_recv = rx._core.recv
                mine = rx._rx()
                recv = lambda: core_recv(mine, None)  # noqa: E731
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

    def sender() -> None:
        send: Any
        if way == "new":
            assert mapping is not None
            send = mapping().send
        else:
            tx = buzon.mailbox(name)
            tx.send(b"x" * 64)  # reads the receiver table
            send = tx.send if way == "api" else tx._core.bcast
        perf = time.perf_counter_ns
        deadline = perf() + int(SECONDS * 1e9)
        sent = 0
        while perf() < deadline:
            for _ in range(64):
                send(MSG)
            sent += 64
        os.write(out_w, f"sent {sent}\n".encode())
        end = mapping().send if way == "new" else buzon.mailbox(name).send  # type: ignore[misc]
        for _ in range(100):  # the end mark (the overflow rule may drop one)
            end(END)
            time.sleep(0.01)

    cpu0 = _children_cpu()
    pids = [_fork(lambda k=k: receiver(k)) for k in range(receivers)]
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
    if box is not None:
        box.remove()
    if path is not None:
        os.unlink(path)
    rates, sent, delivered = [], 0, 0
    for line in lines.decode().splitlines():
        if line.startswith("sent "):
            sent = int(line.split()[1])
            continue
        count, first, last = map(int, line.split())
        delivered += count
        rates.append(count * 1e9 / max(1, last - first))
    return min(rates), cpu * 1e9 / max(1, delivered), sent


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    ways = sys.argv[2].split(",") if len(sys.argv) > 2 else ["old", "new", "api"]
    from buzon.protocol._frames import MailboxCore

    if not hasattr(MailboxCore, "bcast"):
        ways = [w for w in ways if w != "old"]
    for _ in range(rounds):
        for way in ways:
            rate, ns, sent = run(way)
            print(
                f"{way:4s}  slowest receiver {rate / 1e3:7.0f}k msg/s  sent {sent / 1e3:6.0f}k"
                f"  CPU {ns:5.0f} ns per delivery -> at most {2e3 / ns / 4:.2f}M msg/s per "
                "receiver on 2 CPUs",
                flush=True,
            )


if __name__ == "__main__":
    main()
