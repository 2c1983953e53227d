"""A channel dropped without ``close()`` is freed at once by reference counting, not
by the cyclic garbage collector some time later: its fds, socket files, FIFOs and
shared-memory segments are released when the last reference goes.

The blocking driver's C hot paths (``protocol/_take.c`` Take and Put,
``protocol/_stream.c`` SmallWriter, ``protocol/_credit.c`` ReceiptWriter,
``protocol/_dgram.c`` MessageSender) sit in the channel's and its core's ``__dict__``;
they hold their owners weakly, so no reference cycle keeps a dropped channel alive.
Run with the collector disabled: a cycle would show as a channel still alive.
"""

from __future__ import annotations

import gc
import inspect
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import buzon
from buzon.errors import ChannelClosed
from buzon.protocol import _stream
from buzon.testing.conformance._harness import url_for

TRANSPORTS = [
    "pipe",
    "pipe-simplex",
    "fifo",
    "mq",
    "unix",
    "unixgram",
    "unixgram-reliable",
    "seqpacket",
    "tcp",
    "udp",
    "udp-reliable",
    "shm",
]
CREDITS = ("unix", "pipe", "pipe-simplex", "fifo", "mq", "seqpacket", "tcp", "shm")


def _fds() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd listdir used
            continue
    return out


def _files(runtime: str, token: str) -> set[str]:
    """Everything in the test's own runtime dir, and this pair's shm segments and
    queues (their names carry the URL's unique token)."""
    found = set()
    for root, _, names in os.walk(runtime):
        found |= {os.path.join(root, n) for n in names}
    for d in ("/dev/shm", "/dev/mqueue"):
        if os.path.isdir(d):
            found |= {os.path.join(d, n) for n in os.listdir(d) if token and token in n}
    return found


def _pair(transport: str, **options: Any) -> tuple[Any, Any, str]:
    """Two connected blocking ends (the listener closed again), and the URL's token."""
    if transport.startswith("pipe"):
        b, a = buzon.pipe(not transport.endswith("-simplex"), **options)
        return a, b, ""
    if transport.endswith("-reliable"):
        options = {"reliable": True, **options}
    url = url_for(transport)
    with buzon.listen(url, **options) as lst:
        got: dict[str, Any] = {}

        def connect() -> None:
            got["a"] = buzon.connect(str(lst.address), timeout=10, **options)

        t = threading.Thread(target=connect)
        t.start()
        try:
            b = lst.accept(timeout=10)
        finally:
            t.join(15)
    token = url.split(":", 1)[1] if ":" in url and "//" not in url else ""
    return got["a"], b, token


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()


def _describe(obj: Any) -> str:
    """Who still refers to ``obj`` (the failure message)."""
    names = []
    for r in gc.get_referrers(obj):
        if isinstance(r, dict):
            holders = gc.get_referrers(r)
            owners = [type(o).__name__ for o in holders if getattr(o, "__dict__", None) is r]
            keys = [k for k, v in r.items() if v is obj]
            names.append(f"dict of {owners} at {keys}")
        elif inspect.ismethod(r):
            names.append(f"method {r.__func__.__qualname__}")
        elif not inspect.isframe(r):
            names.append(type(r).__name__)
    return f"{type(obj).__name__} still referred to by {names}"


def _exchange(a: Any, b: Any, capacity: int | None) -> None:
    """One message a -> b (a thread sends: capacity=0 hands over to a waiting receive)."""
    t = threading.Thread(target=a.send_bytes, args=(b"x" * 64,))
    t.start()
    try:
        assert b.recv_bytes(10) == b"x" * 64
    finally:
        t.join(15)


CASES = [(t, None) for t in TRANSPORTS] + [(t, c) for t in CREDITS for c in (0, 4)]


@pytest.mark.parametrize(("transport", "capacity"), CASES, ids=[f"{t}-{c}" for t, c in CASES])
def test_a_dropped_unclosed_channel_is_freed_at_once(
    transport: str, capacity: int | None, runtime_dir: str, no_gc: None
) -> None:
    fds0, files0 = _fds(), _files(runtime_dir, "")
    options = {} if capacity is None else {"capacity": capacity}
    a, b, token = _pair(transport, **options)
    _exchange(a, b, capacity)
    refs = [weakref.ref(x) for x in (a, a._core, b, b._core)]
    del a, b
    for ref in refs:
        if ref() is not None:
            pytest.fail(_describe(ref()))
    leaked = {fd: what for fd, what in _fds().items() if fds0.get(fd) != what}
    assert not leaked, f"fds left open by the dropped ends: {leaked}"
    left = _files(runtime_dir, token) - files0
    assert not left, f"files left by the dropped ends: {left}"


def test_a_method_taken_from_a_dropped_channel_raises_closed(no_gc: None) -> None:
    """``f = ch.send_bytes`` does not keep the channel alive (the C hot paths hold it
    weakly); calling it after the channel was dropped raises ChannelClosed."""
    b, a = buzon.pipe(spin=0)
    send, recv = a.send_bytes, b.recv_bytes
    del a, b
    with pytest.raises(ChannelClosed):
        send(b"x")
    with pytest.raises(ChannelClosed):
        recv()


def test_a_c_writer_whose_core_is_gone_raises_closed() -> None:
    """The core keeps its writer, the writer holds the core weakly: a writer kept past
    its core's end refuses with ChannelClosed (never a read of freed memory)."""

    class Core:
        def __init__(self) -> None:
            self.pending: list[bytes] = []
            self.credit_out = None
            self.closed = False
            self.sflow = None

    r, w = os.pipe()
    try:
        core = Core()
        write = _stream.SmallWriter(w, core, threading.Lock(), 100, lambda *a: 0)
        assert write(b"x") is True
        del core
        with pytest.raises(ChannelClosed, match="dropped"):
            write(b"y")
        assert os.read(r, 100) == bytes([1, 1, 0, 0, 1, 0, 0, 0]) + b"x"
    finally:
        os.close(r)
        os.close(w)
