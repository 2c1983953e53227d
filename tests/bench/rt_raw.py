"""A measuring script, not a test: the spin=0 64 B round trip of a buzon channel against
the raw link, both built as ``buzon bench`` builds its ``raw`` and ``buzon-spin0`` rows
(the parent's listener made before the fork, the child connecting or accepting), between
the same two pinned processes, in alternating blocks (so a loaded machine hits both
alike).

    python tests/bench/rt_raw.py TRANSPORT [BLOCKS]     # fifo, unixgram, udp, mq

Prints each link's p50 and buzon's ratio to raw (docs/benchmarks.md, issue 9 (a)).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable

import buzon
from buzon import _posixmq

Link = tuple[int, Callable[[bytes], object], Callable[[], bytes], Callable[[], object]]
T = sys.argv[1] if len(sys.argv) > 1 else "unixgram"
BLOCKS = int(sys.argv[2]) if len(sys.argv) > 2 else 40
BLOCK = 200
TMP = tempfile.mkdtemp(prefix="rt-raw-")


def pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def echo(recv: Callable[[], bytes], send: Callable[[bytes], object]) -> None:
    pin(1)
    while True:
        data = recv()
        if len(data) != 64:
            os._exit(0)
        send(data)


def raw_link() -> Link:
    if T == "fifo":
        os.mkfifo(TMP + "/up")
        os.mkfifo(TMP + "/down")
        pid = os.fork()
        if pid == 0:
            w = os.open(TMP + "/up", os.O_WRONLY)
            r = os.open(TMP + "/down", os.O_RDONLY)
            echo(functools.partial(os.read, r, 64), functools.partial(os.write, w))
        r = os.open(TMP + "/up", os.O_RDONLY)
        w = os.open(TMP + "/down", os.O_WRONLY)
        return (
            pid,
            functools.partial(os.write, w),
            functools.partial(os.read, r, 64),
            lambda: os.write(w, b"x"),
        )
    if T == "mq":
        base = f"/rt-raw-{os.getpid()}"
        flags = os.O_CREAT | os.O_EXCL
        up = _posixmq.open(base + "-up", flags | os.O_RDONLY, 0o600, 10, 64)
        down = _posixmq.open(base + "-down", flags | os.O_WRONLY, 0o600, 10, 64)
        atexit.register(_posixmq.unlink, base + "-up")
        atexit.register(_posixmq.unlink, base + "-down")
        pid = os.fork()
        if pid == 0:
            w = _posixmq.open(base + "-up", os.O_WRONLY)
            r = _posixmq.open(base + "-down", os.O_RDONLY)
            echo(lambda: _posixmq.receive(r, 64)[0], functools.partial(_posixmq.send, w))  # type: ignore[index]
        return (
            pid,
            functools.partial(_posixmq.send, down),
            lambda: _posixmq.receive(up, 64)[0],  # type: ignore[index]
            lambda: _posixmq.send(down, b"x"),
        )
    family = socket.AF_UNIX if T == "unixgram" else socket.AF_INET
    parent = socket.socket(family, socket.SOCK_DGRAM)
    parent.bind(TMP + "/p" if family == socket.AF_UNIX else ("127.0.0.1", 0))
    address = parent.getsockname()
    pid = os.fork()
    if pid == 0:
        child = socket.socket(family, socket.SOCK_DGRAM)
        child.bind(TMP + "/c" if family == socket.AF_UNIX else ("127.0.0.1", 0))
        child.connect(address)
        child.send(b"H")
        echo(functools.partial(child.recv, 64), child.send)
    _hello, peer = parent.recvfrom(16)
    parent.connect(peer)
    return pid, parent.send, functools.partial(parent.recv, 64), lambda: parent.send(b"x")


def buzon_link() -> Link:
    if T in ("fifo", "mq"):
        name = f"{TMP}/b" if T == "fifo" else f"rt-raw-{os.getpid()}"
        up = buzon.listen(f"{T}:{name}-up", spin=0)
        down = buzon.listen(f"{T}:{name}-down", spin=0)
        atexit.register(up.close)
        atexit.register(down.close)
        pid = os.fork()
        if pid == 0:
            w = buzon.connect(str(up.address), spin=0, timeout=10)
            r = down.accept(timeout=10)
            echo(r.recv_bytes, w.send_bytes)
        r = up.accept(timeout=10)
        w = buzon.connect(str(down.address), spin=0, timeout=10)
        return pid, w.send_bytes, r.recv_bytes, lambda: w.send_bytes(b"x")
    lst = buzon.listen(f"unixgram:{TMP}/bz" if T == "unixgram" else "udp://127.0.0.1:0", spin=0)
    pid = os.fork()
    if pid == 0:
        ch = buzon.connect(str(lst.address), spin=0, timeout=10)
        ch.send_bytes(b"hello")
        echo(ch.recv_bytes, ch.send_bytes)
    ch = lst.accept(timeout=10)
    assert ch.recv_bytes() == b"hello"
    return pid, ch.send_bytes, ch.recv_bytes, lambda: ch.send_bytes(b"x")


def main() -> None:
    pin(0)
    links: dict[str, Link] = {}
    try:
        links["raw"] = raw_link()
        links["buzon"] = buzon_link()
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
        for pid, _, _, end in links.values():
            end()
            os.waitpid(pid, 0)
    except BaseException:
        for pid, *_ in links.values():
            os.kill(pid, 9)
        raise
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    p50 = {}
    for k, v in lat.items():
        kept = sorted(v[len(v) // 10 :])  # the first tenth is the warm-up
        p50[k] = kept[len(kept) // 2] / 1000
    raw, bz = p50["raw"], p50["buzon"]
    print(f"{T}: raw {raw:.2f} us, buzon {bz:.2f} us ({bz / raw:.3f})")


if __name__ == "__main__":
    main()
