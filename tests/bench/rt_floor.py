"""A measuring script, not a test: the spin=0 64 B round trip of a buzon channel against
the raw link and against the floor of buzon's design, between the same two pinned
processes, in alternating blocks (so a loaded machine hits all three alike).

    python tests/bench/rt_floor.py TRANSPORT [BLOCKS]     # pipe, fifo, unixgram, udp

raw: what ``buzon bench``'s raw rows do (blocking fds, connected datagram sockets).
floor: the raw loop plus only what the design must do: 8 more bytes (the frame
header), a ``poll`` on the fd and an eventfd before each read (a ``close()`` in another
thread must end a wait), and on datagrams the bound end's ``sendto`` its peer and
``recvfrom`` (it answers whoever sent last). Prints each link's p50 and its ratio to
raw (docs/benchmarks.md, issue 9 (a) on pipe, fifo, unixgram, udp).

    python tests/bench/rt_floor.py rv-pipe|rv-unix|rv-tcp [BLOCKS]   # issue 9 (e)

The rendezvous (``capacity=0``) round trip against the plain one, at the default spin
as ``buzon bench`` runs them (``plain``, ``rv``), and three raw loops of the writes each
protocol must make (non-blocking fds read in a spin, exact byte counts; each process
one write per frame run): ``raw`` the plain protocol (one 72-byte frame each way),
``rv2`` the rendezvous with each take's CREDIT deferred to the taker's next write (an
offer CREDIT and the message in one 96-byte write each way, what protocol/_rv.c does
now) and ``rv4`` the rendezvous as it was (each take's CREDIT written at once: a
24-byte write more each way, four writes per round trip). Prints each p50 and the
ratios rv/plain, rv2/raw and rv4/raw.
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable

import buzon

Link = tuple[int, Callable[[bytes], object], Callable[[], bytes], Callable[[], object]]
T = sys.argv[1] if len(sys.argv) > 1 else "pipe"
BLOCKS = int(sys.argv[2]) if len(sys.argv) > 2 else 50
BLOCK = 200
TMP = tempfile.mkdtemp(prefix="rt-floor-")


def pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def echo(recv: Callable[[], bytes], send: Callable[[bytes], object], size: int) -> None:
    pin(1)
    while True:
        data = recv()
        if len(data) != size:
            os._exit(0)
        send(data)


def raw_link() -> Link:
    if T in ("pipe", "fifo"):
        if T == "pipe":
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
        else:
            os.mkfifo(TMP + "/up")
            os.mkfifo(TMP + "/down")
        pid = os.fork()
        if pid == 0:
            if T == "fifo":
                w2 = os.open(TMP + "/up", os.O_WRONLY)
                r1 = os.open(TMP + "/down", os.O_RDONLY)
            echo(functools.partial(os.read, r1, 64), functools.partial(os.write, w2), 64)
        if T == "fifo":
            r2 = os.open(TMP + "/up", os.O_RDONLY)
            w1 = os.open(TMP + "/down", os.O_WRONLY)
        return (
            pid,
            functools.partial(os.write, w1),
            functools.partial(os.read, r2, 64),
            (lambda: os.write(w1, b"x")),
        )
    fam = socket.AF_UNIX if T == "unixgram" else socket.AF_INET
    a = socket.socket(fam, socket.SOCK_DGRAM)
    b = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_UNIX:
        a.bind(TMP + "/a")
        b.bind(TMP + "/b")
    else:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    pid = os.fork()
    if pid == 0:
        echo(functools.partial(b.recv, 64), b.send, 64)
    return pid, a.send, functools.partial(a.recv, 64), lambda: a.send(b"x")


def floor_link() -> Link:
    wake = os.eventfd(0)
    if T in ("pipe", "fifo"):
        if T == "pipe":
            r1, w1 = os.pipe()
            r2, w2 = os.pipe()
        else:
            os.mkfifo(TMP + "/fup")
            os.mkfifo(TMP + "/fdown")
        pid = os.fork()
        if pid == 0:
            if T == "fifo":
                w2 = os.open(TMP + "/fup", os.O_WRONLY)
                r1 = os.open(TMP + "/fdown", os.O_RDONLY)
            p = select.poll()
            p.register(r1, select.POLLIN)
            p.register(os.eventfd(0), select.POLLIN)

            def child_recv() -> bytes:
                p.poll()
                return os.read(r1, 200)

            echo(child_recv, functools.partial(os.write, w2), 72)
        if T == "fifo":
            r2 = os.open(TMP + "/fup", os.O_RDONLY)
            w1 = os.open(TMP + "/fdown", os.O_WRONLY)
        p = select.poll()
        p.register(r2, select.POLLIN)
        p.register(wake, select.POLLIN)

        def recv() -> bytes:
            p.poll()
            return os.read(r2, 200)[8:]

        return pid, lambda m: os.write(w1, bytes(8) + m), recv, lambda: os.write(w1, b"x")
    fam = socket.AF_UNIX if T == "unixgram" else socket.AF_INET
    a = socket.socket(fam, socket.SOCK_DGRAM)  # the bound end: not connected
    b = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_UNIX:
        a.bind(TMP + "/fa")
        b.bind(TMP + "/fb")
    else:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
    b.connect(a.getsockname())
    peer = b.getsockname()
    pid = os.fork()
    if pid == 0:
        p = select.poll()
        p.register(b.fileno(), select.POLLIN)
        p.register(os.eventfd(0), select.POLLIN)

        def child_recv() -> bytes:
            p.poll()
            return b.recv(200)

        echo(child_recv, b.send, 72)
    p = select.poll()
    p.register(a.fileno(), select.POLLIN)
    p.register(wake, select.POLLIN)

    def recv() -> bytes:
        p.poll()
        return a.recvfrom(200)[0][8:]

    return pid, lambda m: a.sendto(bytes(8) + m, peer), recv, lambda: a.sendto(b"x", peer)


def buzon_link() -> Link:
    if T == "pipe":
        a, b = buzon.pipe(spin=0)
        pid = os.fork()
        if pid == 0:
            echo(b.recv_bytes, b.send_bytes, 64)
        return pid, a.send_bytes, a.recv_bytes, lambda: a.send_bytes(b"x")
    if T == "fifo":
        up = buzon.listen(f"fifo:{TMP}/bup", spin=0)
        down = buzon.listen(f"fifo:{TMP}/bdown", spin=0)
        pid = os.fork()
        if pid == 0:
            w = buzon.connect(str(up.address), spin=0, timeout=10)
            r = down.accept(timeout=10)
            echo(r.recv_bytes, w.send_bytes, 64)
        r = up.accept(timeout=10)
        w = buzon.connect(str(down.address), spin=0, timeout=10)
        return pid, w.send_bytes, r.recv_bytes, lambda: w.send_bytes(b"x")
    lst = buzon.listen(f"unixgram:{TMP}/bz" if T == "unixgram" else "udp://127.0.0.1:0", spin=0)
    pid = os.fork()
    if pid == 0:
        ch = buzon.connect(str(lst.address), spin=0, timeout=10)
        ch.send_bytes(b"hello")
        echo(ch.recv_bytes, ch.send_bytes, 64)
    ch = lst.accept(timeout=10)
    assert ch.recv_bytes() == b"hello"
    return pid, ch.send_bytes, ch.recv_bytes, lambda: ch.send_bytes(b"x")


def _stream_pair() -> tuple[tuple[int, int], tuple[int, int]]:
    """(parent's read fd, write fd), (child's): two pipes, a socketpair or TCP loopback."""
    kind = T[3:]
    if kind == "pipe":
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        return (r2, w1), (r1, w2)
    if kind == "unix":
        a, b = socket.socketpair()
    else:
        lst = socket.create_server(("127.0.0.1", 0))
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
        lst.close()
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fa, fb = a.detach(), b.detach()
    return (fa, fa), (fb, fb)


def _read_exact(fd: int, n: int) -> bytes:
    """``n`` bytes, spinning on a non-blocking fd (as buzon's default ``spin`` does)."""
    got = b""
    while len(got) < n:
        try:
            more = os.read(fd, n - len(got))
        except BlockingIOError:
            continue
        if not more:
            return got
        got += more
    return got


def rv_floor_link(writes: int) -> Link:
    """The raw loop of a protocol that writes ``writes`` frame runs per round trip: 2
    (plain: 72 B each way; or, ``size`` 96, the deferred rendezvous) or 4."""
    (r, w), (cr, cw) = _stream_pair()
    size = 72 if writes == 1 else 96
    credit = bytes(24)
    pid = os.fork()
    if pid == 0:
        for fd in {r, w}:
            os.close(fd)  # the parent's ends: its close is the end of the loop
        os.set_blocking(cr, False)
        pin(1)
        first = True
        while True:
            want = size if writes != 4 or first else size + 24
            data = _read_exact(cr, want)
            if len(data) != want:
                os._exit(0)
            first = False
            if writes == 4:
                os.write(cw, credit)  # the take's CREDIT, at once
            os.write(cw, data[-size:])
    for fd in {cr, cw}:
        os.close(fd)
    os.set_blocking(r, False)
    state = {"first": True}

    def send(m: bytes) -> None:
        if writes == 4 and not state["first"]:
            os.write(w, credit)
        state["first"] = False
        os.write(w, bytes(size - 64) + m)

    def recv() -> bytes:
        return _read_exact(r, size + 24 if writes == 4 else size)[-64:]

    return pid, send, recv, lambda: os.close(w)  # the child reads the end


def rv_buzon_link(capacity: int | None) -> Link:
    kind = T[3:]
    if kind == "pipe":
        a, b = buzon.pipe(capacity=capacity)
        pid = os.fork()
        if pid == 0:
            echo(b.recv_bytes, b.send_bytes, 64)
        b.close()  # the child's: its exit ends a rendezvous send of the last message
        return pid, a.send_bytes, a.recv_bytes, lambda: a.send_bytes(b"x")
    url = f"unix:{TMP}/rv{capacity}" if kind == "unix" else "tcp://127.0.0.1:0"
    lst = buzon.listen(url, capacity=capacity)
    pid = os.fork()
    if pid == 0:
        ch = buzon.connect(str(lst.address), capacity=capacity, timeout=10)
        echo(ch.recv_bytes, ch.send_bytes, 64)
    ch = lst.accept(timeout=10)
    return pid, ch.send_bytes, ch.recv_bytes, lambda: ch.send_bytes(b"x")


def main() -> None:
    pin(0)
    if T.startswith("rv-"):
        rv_main()
        return
    run({"raw": raw_link(), "buzon": buzon_link(), "floor": floor_link()})


def rv_main() -> None:
    p50 = run(
        {
            "plain": rv_buzon_link(None),
            "rv": rv_buzon_link(0),
            "raw": rv_floor_link(1),
            "rv2": rv_floor_link(2),
            "rv4": rv_floor_link(4),
        },
        show=False,
    )
    print(
        T
        + ": "
        + "  ".join(f"{k} {v:.2f} us" for k, v in p50.items())
        + f"  | rv/plain {p50['rv'] / p50['plain']:.3f}  rv2/raw {p50['rv2'] / p50['raw']:.3f}"
        + f"  rv4/raw {p50['rv4'] / p50['raw']:.3f}"
    )


def run(links: dict[str, Link], show: bool = True) -> dict[str, float]:
    msg = bytes(64)
    perf = time.perf_counter_ns
    lat: dict[str, list[int]] = {k: [] for k in links}
    for _ in range(BLOCKS):
        for k, (_, send, recv, _) in links.items():
            rec = lat[k].append
            for _ in range(BLOCK):
                t0 = perf()
                send(msg)
                recv()
                rec(perf() - t0)
    for _, _, _, end in links.values():  # every end first: later children hold
        try:  # copies of earlier links' fds
            end()
        except buzon.EndOfChannel:  # a rendezvous echo ends with our last message taken
            pass
    for pid, _, _, _ in links.values():
        os.waitpid(pid, 0)
    p50 = {}
    for k, v in lat.items():
        kept = sorted(v[len(v) // 10 :])  # the first tenth is the warm-up
        p50[k] = kept[len(kept) // 2] / 1000
    if show:
        print(
            T + ": " + "  ".join(f"{k} {v:.2f} us ({v / p50['raw']:.3f})" for k, v in p50.items())
        )
    shutil.rmtree(TMP, ignore_errors=True)
    return p50


if __name__ == "__main__":
    main()
