"""A measuring script, not a test: the spin=0 64 B round trip of a buzon channel on a
stream (``tcp``, ``unix``, ``pipe``) against the raw link ``buzon bench`` measures
(a blocking socket with ``sendall``/``recv``, TCP_NODELAY on both ends; two pipes),
between the same two pinned processes, in alternating blocks, so a loaded machine hits
both alike (the bench's rows run seconds apart). ``--floor`` adds a third link: a buzon
channel driven by the bare C calls of its frames (``protocol._stream.send_frame`` and
``wait_frame``, no channel logic), the least a framed exchange costs from Python.

    python tests/bench/rt_stream.py TRANSPORT [BLOCKS] [--floor]

Prints each link's p50, buzon's ratio to raw and the median of the per-block ratios
(docs/benchmarks.md, issue 9 (a)).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable

import buzon
from buzon.protocol._stream import send_frame, wait_frame

Link = tuple[int, Callable[[bytes], object], Callable[[], bytes], Callable[[], object]]
ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
T = ARGS[0] if ARGS else "tcp"
BLOCKS = int(ARGS[1]) if len(ARGS) > 1 else 40
FLOOR = "--floor" in sys.argv
BLOCK = 200
TMP = tempfile.mkdtemp(prefix="rt-stream-")
_KEEP: list[buzon.Channel] = []  # the floor's channels (dropped, they would close)


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
    if T == "pipe":
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            echo(functools.partial(os.read, r1, 64), functools.partial(os.write, w2))
        return (
            pid,
            functools.partial(os.write, w1),
            functools.partial(os.read, r2, 64),
            lambda: os.write(w1, b"x"),
        )
    family = socket.AF_UNIX if T == "unix" else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.bind(TMP + "/raw" if family == socket.AF_UNIX else ("127.0.0.1", 0))
    lsock.listen(1)

    def tune(sock: socket.socket) -> socket.socket:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    pid = os.fork()
    if pid == 0:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.connect(lsock.getsockname())
        tune(sock)
        echo(functools.partial(sock.recv, 64), sock.sendall)
    conn, _ = lsock.accept()
    lsock.close()
    tune(conn)
    return pid, conn.sendall, functools.partial(conn.recv, 64), lambda: conn.sendall(b"x")


def _pair_link(
    ends: Callable[[buzon.Channel], tuple[Callable[[], bytes], Callable[[bytes], object]]],
) -> Link:
    """A buzon channel pair (parent, child), each end driven by ``ends(channel)``."""
    if T == "pipe":
        a, b = buzon.pipe(spin=0)
        pid = os.fork()
        if pid == 0:
            echo(*ends(b))
        recv, send = ends(a)
        return pid, send, recv, lambda: send(b"x")
    lst = buzon.listen(f"unix:{TMP}/bz{len(_KEEP)}" if T == "unix" else "tcp://127.0.0.1:0", spin=0)
    _KEEP.append(lst)  # type: ignore[arg-type]
    pid = os.fork()
    if pid == 0:
        echo(*ends(buzon.connect(str(lst.address), spin=0, timeout=10)))
    recv, send = ends(lst.accept(timeout=10))
    return pid, send, recv, lambda: send(b"x")


def _api(ch: buzon.Channel) -> tuple[Callable[[], bytes], Callable[[bytes], object]]:
    _KEEP.append(ch)
    return ch.recv_bytes, ch.send_bytes


def _bare(ch: buzon.Channel) -> tuple[Callable[[], bytes], Callable[[bytes], object]]:
    """The frames' bare C calls on the channel's fds (what a framed exchange must do)."""
    _KEEP.append(ch)
    stream = ch._core._stream  # type: ignore[attr-defined]
    rfd, wfd = stream.read_fileno(), stream.write_fileno()
    sock = T != "pipe"
    buf = bytearray(1 << 17)
    wait = functools.partial(wait_frame, rfd, buf, None, 0.0, 1 << 16, -1, 3 if sock else 0)
    put = functools.partial(send_frame if sock else _write_frame, wfd, 0)

    def recv() -> bytes:
        while True:
            got = wait()
            if got.__class__ is tuple:
                return got[1]  # type: ignore[index, no-any-return]

    return recv, put


def _write_frame(fd: int, flags: int, data: bytes) -> int:
    from buzon.protocol._stream import write_frame

    while True:
        try:
            return write_frame(fd, flags, data)  # type: ignore[no-any-return]
        except BlockingIOError:
            time.sleep(0)


def main() -> None:
    pin(0)
    links: dict[str, Link] = {}
    try:
        links["raw"] = raw_link()
        links["buzon"] = _pair_link(_api)
        if FLOOR:
            links["floor"] = _pair_link(_bare)
        msg = bytes(64)
        perf = time.perf_counter_ns
        lat: dict[str, list[int]] = {k: [] for k in links}
        ratios: list[float] = []
        for _ in range(BLOCKS):
            p50: dict[str, int] = {}
            for k, (_, send, recv, _) in links.items():
                block: list[int] = []
                rec = block.append
                for _ in range(BLOCK):
                    t0 = perf()
                    send(msg)
                    recv()
                    rec(perf() - t0)
                lat[k].extend(block)
                block.sort()
                p50[k] = block[len(block) // 2]
            ratios.append(p50["buzon"] / p50["raw"])
        for pid, _, _, end in links.values():
            end()
            os.waitpid(pid, 0)
    except BaseException:
        for pid, *_ in links.values():
            os.kill(pid, 9)
        raise
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    med = {}
    for k, v in lat.items():
        kept = sorted(v[len(v) // 10 :])  # the first tenth is the warm-up
        med[k] = kept[len(kept) // 2] / 1000
    kept_ratios = sorted(ratios[len(ratios) // 10 :])
    line = (
        f"{T}: raw {med['raw']:.2f} us, buzon {med['buzon']:.2f} us "
        f"({med['buzon'] / med['raw']:.3f}; blocks {kept_ratios[len(kept_ratios) // 2]:.3f})"
    )
    if "floor" in med:
        line += f", floor {med['floor']:.2f} us ({med['floor'] / med['raw']:.3f})"
    print(line)


if __name__ == "__main__":
    main()
