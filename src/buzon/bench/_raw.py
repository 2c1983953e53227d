"""Baselines: each OS mechanism used directly, and ``multiprocessing.Pipe``.

The raw cases are what a careful Python programmer would write without buzon:
blocking descriptors, whole messages per call, the builtin called with its
arguments bound (no wrapper frame) wherever the mechanism allows, streams read
into one large preallocated buffer. Every link is created the way buzon creates
the same transport (named FIFOs, sockets bound to paths or loopback ports, queues
by name), so the comparison measures buzon's own cost.

====================  ==================================================================
transport             raw link
====================  ==================================================================
``pipe``              two ``os.pipe()`` (one per direction), made before the fork
``fifo``              two ``os.mkfifo`` FIFOs, each side opens them after the fork
``unix``              ``AF_UNIX``/``SOCK_STREAM``, listening on a path; child connects
``unixgram``          ``AF_UNIX``/``SOCK_DGRAM``, both bound to paths and connected
``tcp``               ``127.0.0.1``, ``TCP_NODELAY`` on both ends
``udp``               ``127.0.0.1``, both bound and connected
``mq``                two POSIX queues through :mod:`buzon._posixmq`, blocking
``Pipe`` (mp)         ``multiprocessing.Pipe()``: ``send_bytes``/``recv_bytes(_into)``
====================  ==================================================================
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import multiprocessing
import multiprocessing.connection
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Protocol, cast

from ._harness import (
    Case,
    Ctx,
    LinkMaker,
    NotApplicable,
    Opener,
    RecvWindow,
    SendWindow,
    Side,
    Skipped,
    Values,
    drain_into,
    drain_stream,
    drain_with,
    handshake_child,
    handshake_parent,
    oneway_case,
    round_trip_case,
)

__all__ = [
    "DATAGRAM",
    "RAW_TRANSPORTS",
    "cases_for",
    "mp_cases",
    "not_applicable",
    "posixmq",
    "raw_cases",
]

RAW_TRANSPORTS = ("pipe", "fifo", "unix", "unixgram", "tcp", "udp", "mq")
_PIPE_BUF = select.PIPE_BUF
_BIG = 1 << 16  # messages at least this large are received into a buffer


class _PosixMQ(Protocol):
    """What the bench uses of the C extension :mod:`buzon._posixmq`."""

    def open(
        self, name: str, flags: int, mode: int = 0o600, maxmsg: int = 0, msgsize: int = 0
    ) -> int: ...
    def send(self, mqd: int, data: bytes, priority: int = 0) -> bool: ...
    def receive(self, mqd: int, msgsize: int) -> tuple[bytes, int] | None: ...
    def close(self, mqd: int) -> None: ...
    def unlink(self, name: str) -> None: ...


def posixmq() -> _PosixMQ:
    """The POSIX queue extension, or :class:`Skipped` naming why it is unavailable."""
    try:
        module = importlib.import_module("buzon._posixmq")
    except ImportError as exc:
        raise Skipped(f"buzon._posixmq is not importable ({exc})") from None
    return cast(_PosixMQ, module)


# --- sides --------------------------------------------------------------------


def _blast_to(
    write: Callable[[int, bytes], object], target: int, msg: bytes, window: SendWindow
) -> int:
    """:meth:`Side.blast` for builtins that take the descriptor first (no partial)."""
    perf = time.perf_counter_ns
    batch = 64 if len(msg) <= 4096 else 1
    inner = range(batch)
    deadline = perf() + window.min_ns
    stopped = window.stopped
    sent = 0
    while True:
        for _ in inner:
            write(target, msg)
        sent += batch
        if perf() >= deadline and stopped():
            return sent


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _FdSide(Side):
    """A pipe or FIFO pair: bytes, EOF when the writer closes."""

    stream = True

    def __init__(self, ctx: Ctx, rfd: int, wfd: int):
        self._ctx = ctx
        self._r = rfd
        self._w = wfd

    def sender(self) -> Callable[[bytes], object]:
        return functools.partial(os.write, self._w)

    def receiver(self, size: int) -> Callable[[], bytes]:
        return functools.partial(os.read, self._r, size)

    def end_of_data(self) -> None:
        self._ctx.close_fd(self._w)

    def close(self) -> None:
        self._ctx.close_fd(self._r)
        self._ctx.close_fd(self._w)

    def blast(self, msg: bytes, window: SendWindow) -> int:
        write = os.write if len(msg) <= _PIPE_BUF else _write_all
        return _blast_to(write, self._w, msg, window)

    def drain(self, size: int, window: RecvWindow) -> tuple[float, int]:
        fd = self._r
        readv = os.readv
        return drain_stream(lambda buf: readv(fd, [buf]), size, window)


class _SockSide(Side):
    """A connected socket, stream or datagram."""

    def __init__(self, sock: socket.socket, *, lossy: bool = False):
        self._sock = sock
        self.stream = sock.type == socket.SOCK_STREAM
        self.lossy = lossy

    def sender(self) -> Callable[[bytes], object]:
        return self._sock.sendall if self.stream else self._sock.send

    def receiver(self, size: int) -> Callable[[], bytes]:
        return functools.partial(self._sock.recv, size)

    def end_of_data(self) -> None:
        if self.stream:
            self._sock.shutdown(socket.SHUT_WR)
        else:
            super().end_of_data()

    def close(self) -> None:
        self._sock.close()

    def drain(self, size: int, window: RecvWindow) -> tuple[float, int]:
        if self.stream:
            return drain_stream(self._sock.recv_into, size, window)
        return drain_into(self._sock.recv_into, size, window)


class _MqSide(Side):
    """Two POSIX queues, one per direction; blocking send and receive."""

    def __init__(self, mq: _PosixMQ, rq: int, rsize: int, wq: int):
        self._mq = mq
        self._rq = rq
        self._rsize = rsize
        self._wq = wq

    def sender(self) -> Callable[[bytes], object]:
        return functools.partial(self._mq.send, self._wq)

    def receiver(self, size: int) -> Callable[[], bytes]:
        receive = self._mq.receive
        rq = self._rq
        rsize = self._rsize

        def recv() -> bytes:
            got = receive(rq, rsize)
            assert got is not None  # blocking queues always return a message
            return got[0]

        return recv

    def blast(self, msg: bytes, window: SendWindow) -> int:
        return _blast_to(self._mq.send, self._wq, msg, window)

    def drain(self, size: int, window: RecvWindow) -> tuple[float, int]:
        receive = self._mq.receive
        rq = self._rq
        rsize = self._rsize

        def length() -> int:
            got = receive(rq, rsize)
            return -1 if got is None else len(got[0])

        def burst(n: int) -> tuple[int, bool]:
            # Blocking queues never return None; the index is inlined for speed.
            for i in range(n):
                if len(receive(rq, rsize)[0]) != size:  # type: ignore[index]
                    return i, True
            return n, False

        return drain_with(length, burst, size, window)


class ConnSide(Side):
    """A ``multiprocessing.connection.Connection``."""

    def __init__(self, conn: multiprocessing.connection.Connection):
        self._conn = conn

    def sender(self) -> Callable[[bytes], object]:
        return self._conn.send_bytes

    def receiver(self, size: int) -> Callable[[], bytes]:
        return self._conn.recv_bytes

    def close(self) -> None:
        self._conn.close()

    def drain(self, size: int, window: RecvWindow) -> tuple[float, int]:
        if size >= _BIG:
            return drain_into(self._conn.recv_bytes_into, size, window)
        return super().drain(size, window)


# --- links: built before the fork, one opener per side ------------------------


def _pipe_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    down_r, down_w = os.pipe()  # parent -> child
    up_r, up_w = os.pipe()  # child -> parent
    ctx.own_fd(down_r, down_w, up_r, up_w)

    def parent() -> Side:
        ctx.close_fd(down_r)
        ctx.close_fd(up_w)
        return handshake_parent(_FdSide(ctx, up_r, down_w))

    def child() -> Side:
        ctx.close_fd(down_w)  # so the parent's close is our EOF
        ctx.close_fd(up_r)
        return handshake_child(_FdSide(ctx, down_r, up_w))

    return parent, child


def _fifo_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    up = ctx.path("up.fifo")
    down = ctx.path("down.fifo")
    os.mkfifo(up, 0o600)
    os.mkfifo(down, 0o600)

    # Blocking opens rendezvous: each waits for the other side's matching open,
    # and the order (up first on both sides) cannot deadlock.
    def parent() -> Side:
        r = os.open(up, os.O_RDONLY)
        ctx.own_fd(r)
        w = os.open(down, os.O_WRONLY)
        ctx.own_fd(w)
        return handshake_parent(_FdSide(ctx, r, w))

    def child() -> Side:
        w = os.open(up, os.O_WRONLY)
        ctx.own_fd(w)
        r = os.open(down, os.O_RDONLY)
        ctx.own_fd(r)
        return handshake_child(_FdSide(ctx, r, w))

    return parent, child


def _stream_link(family: int) -> LinkMaker:
    def make(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
        lsock = socket.socket(family, socket.SOCK_STREAM)
        ctx.close_later(lsock)
        if family == socket.AF_UNIX:
            lsock.bind(ctx.path("stream.sock"))
        else:
            lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        address = lsock.getsockname()

        def tune(sock: socket.socket) -> socket.socket:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

        def parent() -> Side:
            conn, _ = lsock.accept()
            ctx.close_later(conn)
            lsock.close()
            return handshake_parent(_SockSide(tune(conn)))

        def child() -> Side:
            lsock.close()
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.connect(address)
            return handshake_child(_SockSide(tune(sock)))

        return parent, child

    return make


def _dgram_link(family: int) -> LinkMaker:
    lossy = family != socket.AF_UNIX

    def make(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
        psock = socket.socket(family, socket.SOCK_DGRAM)
        ctx.close_later(psock)
        if family == socket.AF_UNIX:
            psock.bind(ctx.path("parent.dgram"))
            child_address: str | tuple[str, int] = ctx.path("child.dgram")
        else:
            psock.bind(("127.0.0.1", 0))
            child_address = ("127.0.0.1", 0)
        address = psock.getsockname()

        def parent() -> Side:
            hello, peer = psock.recvfrom(16)
            if hello != b"H":
                raise RuntimeError(f"handshake: unexpected {hello!r}")
            psock.connect(peer)
            side = _SockSide(psock, lossy=lossy)
            side.send(b"G")
            return side

        def child() -> Side:
            psock.close()
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind(child_address)
            sock.connect(address)
            return handshake_child(_SockSide(sock, lossy=lossy))

        return parent, child

    return make


def _quiet(fn: Callable[[str], object], arg: str) -> None:
    with contextlib.suppress(OSError):
        fn(arg)


def _mq_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    mq = posixmq()
    base = f"/buzon-bench-{os.getpid()}-{ctx.seq}"
    up_name, down_name = base + "-up", base + "-down"
    up_size = max(size, 64)  # child -> parent carries the data
    down_size = 64  # parent -> child: round-trip echoes and control messages
    flags = os.O_CREAT | os.O_EXCL
    try:
        up = mq.open(up_name, flags | os.O_RDONLY, 0o600, 10, up_size)
    except OSError as exc:
        raise NotApplicable(f"a POSIX queue with msgsize {up_size} was refused: {exc}")
    ctx.stack.callback(_quiet, mq.unlink, up_name)
    ctx.stack.callback(mq.close, up)
    down = mq.open(down_name, flags | os.O_WRONLY, 0o600, 10, down_size)
    ctx.stack.callback(_quiet, mq.unlink, down_name)
    ctx.stack.callback(mq.close, down)

    def parent() -> Side:
        return handshake_parent(_MqSide(mq, up, up_size, down))

    def child() -> Side:
        w = mq.open(up_name, os.O_WRONLY)
        r = mq.open(down_name, os.O_RDONLY)
        return handshake_child(_MqSide(mq, r, down_size, w))

    return parent, child


def _mp_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    a, b = multiprocessing.Pipe()
    ctx.close_later(a)
    ctx.close_later(b)

    def parent() -> Side:
        b.close()
        return handshake_parent(ConnSide(a))

    def child() -> Side:
        a.close()
        return handshake_child(ConnSide(b))

    return parent, child


_LINKS: dict[str, LinkMaker] = {
    "pipe": _pipe_link,
    "fifo": _fifo_link,
    "unix": _stream_link(socket.AF_UNIX),
    "unixgram": _dgram_link(socket.AF_UNIX),
    "tcp": _stream_link(socket.AF_INET),
    "udp": _dgram_link(socket.AF_INET),
    "mq": _mq_link,
}
DATAGRAM = frozenset({"unixgram", "udp"})


def not_applicable(reason: str) -> Callable[[Ctx], Values]:
    """A case body that only reports ``n/a`` with ``reason``."""

    def run(ctx: Ctx) -> Values:
        raise NotApplicable(reason)

    return run


def cases_for(impl: str, transport: str, make: LinkMaker) -> list[Case]:
    """The three metrics of one implementation on one transport."""
    if transport in DATAGRAM:
        big = not_applicable("a 1 MiB message does not fit in one datagram")
    else:
        big = oneway_case(make, 1 << 20)
    return [
        Case(impl, transport, "rt64", round_trip_case(make, 64)),
        Case(impl, transport, "oneway64", oneway_case(make, 64)),
        Case(impl, transport, "oneway1m", big),
    ]


def raw_cases(transport: str) -> list[Case]:
    return cases_for("raw", transport, _LINKS[transport])


def mp_cases() -> list[Case]:
    return cases_for("mp", "Pipe", _mp_link)
