"""The channel contract, as bullets and as an executable suite.

Every transport, in both drivers, must pass every check here. The contract:

1. **Round trip.** An object sent arrives equal, with its type (dict, list, str, int,
   float, bool, None, bytes, nested), in both directions of a duplex link.
2. **Bytes.** ``send_bytes``/``recv_bytes`` carry empty, small and large payloads
   unchanged (large = 1 MiB on streams, the transport's ``max_message`` elsewhere).
3. **Order.** On a link whose properties say ``ordered``, messages arrive in the order
   sent; on any link what arrives is intact.
4. **Non-blocking.** ``recv_nowait`` on an empty channel raises ``Empty``;
   ``recv(timeout=t)`` raises ``Timeout`` (a ``TimeoutError``) after about ``t``.
5. **Backpressure.** ``send_nowait`` raises ``Full`` when the link cannot take more,
   and every message accepted before that arrives, whole and in order.
6. **End of channel.** On connection-oriented links, after the sender closes the
   receiver gets every message, then ``EndOfChannel``; iteration stops there.
7. **Closed.** Any operation on a closed channel raises ``ChannelClosed``; ``close``
   is idempotent.
8. **Too large.** A message over ``max_frame`` (or the transport's unit) raises
   ``MessageTooLarge`` before anything is written; the channel stays usable.
9. **Direction.** The receive end of a simplex link refuses to send
   (``UnsupportedOperation``).
10. **Readiness.** ``wait`` returns the channel when a message is ready and ``[]`` on
    timeout.
11. **Statistics.** Counters account for every message sent and received.
12. **Numpy.** Arrays round-trip (dtype, shape, values) out of band.
13. **Processes.** A message crosses a real ``fork``: parent to child and back.

The capacity contract (:data:`CAPACITY_CHECKS`, on every transport that offers
credits — :data:`CAPACITY_TRANSPORTS`):

14. **Rendezvous.** With ``capacity=0`` a ``send`` returns only after the receiver's
    ``recv`` began, in both directions; ``send_nowait`` with nobody waiting raises
    ``Full``; a ``send`` that times out delivered nothing.
15. **Bounded.** With ``capacity=N`` exactly N messages fit; the (N+1)th raises
    ``Full`` (``send_nowait``) or ``Timeout`` (``send(timeout=)``), and goes through
    as soon as the receiver takes one; many messages keep their order.
16. **Unbounded.** With ``capacity=None`` sends never wait, far beyond the kernel's
    buffer, until ``max_queue`` bytes are held (then ``Full`` naming it); everything
    accepted arrives.
17. **Receipts.** ``send_async`` receipts complete once the receiver took the message
    (``receiver`` set where the link knows the pid); a receipt whose channel closes
    before delivery fails with ``Undelivered``.

The establishment contract (:data:`ESTABLISHMENT_CHECKS`, each a function of the
transport and the driver, on :data:`ESTABLISHMENT_TRANSPORTS`):

18. **Connect retries (4h).** ``connect(url, timeout=T)`` to an endpoint that appears
    only later succeeds; ``retry=False`` to one that is not there raises
    ``NoSuchEndpoint`` or ``ConnectionRefused`` at once.
19. **Accept's timeout (4d).** ``accept(timeout=T)`` bounds the wait for a connection
    only: peers connecting while the server calls ``accept(timeout=0)`` in a loop are all
    established, none refused.
20. **Admission (4e).** Silent connections (stream sockets: connect and say nothing)
    beyond ``max_pending`` evict the oldest of them; a good client still gets through.

Run it with pytest (``tests/testing/test_conformance.py``,
``tests/testing/test_conformance_establish.py``) or call :func:`run_all`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .._schemes import SCHEMES, scheme_info
from ..errors import (
    ChannelClosed,
    Empty,
    EndOfChannel,
    Full,
    MessageTooLarge,
    Timeout,
    Undelivered,
    UnsupportedOperation,
)

__all__ = [
    "CAPACITY_CHECKS",
    "CAPACITY_TRANSPORTS",
    "CHECKS",
    "DRIVERS",
    "ESTABLISHMENT_CHECKS",
    "ESTABLISHMENT_TRANSPORTS",
    "TRANSPORTS",
    "Pair",
    "open_pair",
    "run_all",
]

TRANSPORTS = tuple(name for info in SCHEMES for name in info.conformance)
"""Every transport of the registry (``NAME-reliable``: the scheme with ``reliable=True``)."""
CAPACITY_TRANSPORTS = tuple(name for info in SCHEMES for name in info.capacity_conformance)
"""The transports that take every capacity (``pipe-simplex``: ``buzon.pipe(duplex=False)``)."""
DRIVERS = ("sync", "asyncio")
T = 5.0  # generous per-operation timeout: a failure, never a hang


class _AioFacade:
    """Blocking facade over an asyncio channel: each call runs in the pair's loop."""

    def __init__(self, ch: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.ch = ch
        self.loop = loop

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def send(self, obj: Any, timeout: float | None = None, **kw: Any) -> None:
        self._run(self.ch.send(obj, timeout, **kw))

    def recv(self, timeout: float | None = None, **kw: Any) -> Any:
        return self._run(self.ch.recv(timeout, **kw))

    def send_bytes(self, data: Any, timeout: float | None = None, **kw: Any) -> None:
        self._run(self.ch.send_bytes(data, timeout, **kw))

    def recv_bytes(self, timeout: float | None = None) -> bytes:
        result: bytes = self._run(self.ch.recv_bytes(timeout))
        return result

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield self.recv(T)
            except EndOfChannel:
                return

    def close(self) -> None:
        self._run(self.ch.aclose())

    def wait(self, objs: list[Any], timeout: float) -> list[Any]:
        from .. import aio

        inner = {id(o.ch): o for o in objs}
        got = self._run(aio.wait([o.ch for o in objs], timeout))
        return [inner[id(c)] for c in got]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ch, name)


@dataclass
class Pair:
    """``a`` sends to ``b``; on duplex links ``b`` can answer ``a``."""

    transport: str
    driver: str
    a: Any
    b: Any

    @property
    def duplex(self) -> bool:
        return bool(self.a.properties.direction == "duplex")

    def transfer(self, send: str, obj: Any, recv: str) -> Any:
        """``a.<send>(obj)`` while ``b.<recv>()`` runs concurrently; return what ``b`` got.

        A large message does not fit a kernel buffer (a pipe holds 64 KiB), so a
        blocking send needs the reader running at the same time.
        """
        if self.driver != "sync":
            fa: _AioFacade = self.a
            fb: _AioFacade = self.b

            async def both() -> Any:
                results = await asyncio.gather(
                    getattr(fa.ch, send)(obj, T), getattr(fb.ch, recv)(T)
                )
                return results[1]

            return fa.loop.run_until_complete(both())
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                getattr(self.a, send)(obj, T)
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        t = threading.Thread(target=sender)
        t.start()
        try:
            got = getattr(self.b, recv)(T)
        finally:
            t.join(T * 2)
        if errors:
            raise errors[0]
        return got

    def drain_flushing(self, count: int) -> list[Any]:
        """Receive ``count`` messages on ``b`` while ``a`` flushes what it accepted."""
        if self.driver != "sync":
            fa: _AioFacade = self.a
            fb: _AioFacade = self.b

            async def drain() -> list[Any]:
                return [await fb.ch.recv(T) for _ in range(count)]

            async def both() -> list[Any]:
                results = await asyncio.gather(fa.ch.flush(T), drain())
                out: list[Any] = results[1]
                return out

            return fa.loop.run_until_complete(both())
        t = threading.Thread(target=self.a.flush, args=(T,))
        t.start()
        try:
            return [self.b.recv(T) for _ in range(count)]
        finally:
            t.join(T * 2)

    def wait(self, objs: list[Any], timeout: float) -> list[Any]:
        if self.driver == "sync":
            from .. import wait

            return wait(objs, timeout)
        facade: _AioFacade = self.a
        return facade.wait(objs, timeout)


def _scheme(transport: str) -> str:
    """The scheme a conformance transport name stands for (``udp-reliable``: ``udp``)."""
    return transport.removesuffix("-reliable").removesuffix("-simplex")


def _url(transport: str) -> str:
    scheme = _scheme(transport)
    if scheme_info(scheme).address == "inet":
        return f"{scheme}://127.0.0.1:0"
    return f"{scheme}:conf-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def open_pair(
    transport: str,
    driver: str = "sync",
    listen_options: dict[str, Any] | None = None,
    **options: Any,
) -> Iterator[Pair]:
    """A connected pair over ``transport``; everything is closed and removed after.

    ``NAME-reliable`` is the ``NAME`` scheme opened with ``reliable=True``.
    ``listen_options`` go to the listener only (``ring_size`` of ``shm:``).
    """
    if transport.endswith("-reliable"):
        options = {**options, "reliable": True}
    extra = listen_options or {}
    if driver == "sync":
        with _sync_pair(transport, options, extra) as pair:
            yield pair
    else:
        loop = asyncio.new_event_loop()
        try:
            with _aio_pair(transport, options, loop, extra) as pair:
                yield pair
        finally:
            loop.close()


@contextlib.contextmanager
def _sync_pair(
    transport: str, options: dict[str, Any], extra: dict[str, Any] | None = None
) -> Iterator[Pair]:
    import buzon

    if not scheme_info(_scheme(transport)).has_url:  # buzon.pipe()
        b, a = buzon.pipe(not transport.endswith("-simplex"), **options)
        try:
            yield Pair(transport, "sync", a, b)
        finally:
            a.close()
            b.close()
        return
    with buzon.listen(_url(transport), **options, **(extra or {})) as lst:
        box: list[Any] = []
        errors: list[BaseException] = []

        def accept() -> None:
            try:
                box.append(lst.accept(timeout=T))
            except BaseException as exc:  # reported below
                errors.append(exc)

        t = threading.Thread(target=accept)
        t.start()
        try:
            a = buzon.connect(str(lst.address), timeout=T, **options)
        finally:
            t.join(T * 2)
        if errors:
            raise errors[0]
        b = box[0]
        try:
            if b.properties.direction == "duplex" and b.properties.connection_oriented is False:
                # datagram endpoints reply to the last sender: introduce a first
                a.send_bytes(b"hello")
                assert b.recv_bytes(timeout=T) == b"hello"
            yield Pair(transport, "sync", a, b)
        finally:
            a.close()
            b.close()


@contextlib.contextmanager
def _aio_pair(
    transport: str,
    options: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
    extra: dict[str, Any] | None = None,
) -> Iterator[Pair]:
    from .. import aio

    if not scheme_info(_scheme(transport)).has_url:  # buzon.pipe()
        rb, ra = aio.pipe(not transport.endswith("-simplex"), **options)
        a, b = _AioFacade(ra, loop), _AioFacade(rb, loop)
        try:
            yield Pair(transport, "asyncio", a, b)
        finally:
            a.close()
            b.close()
        return
    lst = aio.listen(_url(transport), **options, **(extra or {}))
    try:

        async def both() -> tuple[Any, Any]:
            acc = asyncio.ensure_future(lst.accept(timeout=T))
            con = await aio.connect(str(lst.address), timeout=T, **options)
            return con, await acc

        ra, rb = loop.run_until_complete(both())
        a, b = _AioFacade(ra, loop), _AioFacade(rb, loop)
        try:
            if b.properties.direction == "duplex" and not b.properties.connection_oriented:
                a.send_bytes(b"hello")
                assert b.recv_bytes(timeout=T) == b"hello"
            yield Pair(transport, "asyncio", a, b)
        finally:
            a.close()
            b.close()
    finally:
        lst.close()


# -- the checks ----------------------------------------------------------------------

SAMPLES: list[Any] = [
    {"frame": 1, "name": "ñandú", "ok": True, "none": None, "f": 1.5},
    [1, [2, [3, [4]]], "x" * 1000],
    "text",
    12345678901234,
    -1,
    0.25,
    None,
    True,
    b"\x00\x01binary\xff",
    b"y" * 5000,
    {"nested": {"list": [b"z" * 2000, {"deep": [None, 1.0]}]}},
]


def check_roundtrip(p: Pair) -> None:
    for obj in SAMPLES:
        p.a.send(obj, T)
        got = p.b.recv(T)
        assert got == obj and type(got) is type(obj), (obj, got)
        if p.duplex:
            p.b.send(obj, T)
            back = p.a.recv(T)
            assert back == obj and type(back) is type(obj)


def _large(p: Pair) -> int:
    props = p.a.properties
    if props.max_message is not None:
        return int(props.max_message) - 64  # room for the frame header
    return 1 << 20


def check_bytes(p: Pair) -> None:
    big = os.urandom(_large(p))
    for payload in (b"", b"x", os.urandom(100), big):
        got = p.transfer("send_bytes", payload, "recv_bytes")
        assert got == payload, (len(got), len(payload))


def check_order(p: Pair) -> None:
    n, batch = 200, 8  # a POSIX queue and a Unix datagram socket hold 10 by default
    got: list[int] = []
    for start in range(0, n, batch):
        for i in range(start, start + batch):
            p.a.send({"i": i, "pad": "p" * (i % 7)}, T)
        got.extend(p.b.recv(T)["i"] for _ in range(batch))
    if p.a.properties.ordered:
        assert got == list(range(n))
    else:
        assert sorted(got) == sorted(set(got)) and set(got) <= set(range(n))


def check_nonblocking(p: Pair) -> None:
    try:
        p.b.recv_nowait()
    except Empty:
        pass
    else:
        raise AssertionError("recv_nowait on an empty channel did not raise Empty")
    start = time.monotonic()
    try:
        p.b.recv(0.05)
    except Timeout as exc:
        assert isinstance(exc, TimeoutError)
    else:
        raise AssertionError("recv(timeout) on an empty channel did not raise Timeout")
    assert time.monotonic() - start >= 0.04


def check_backpressure(p: Pair) -> None:
    if not p.a.properties.reliable:
        return  # a lossy link may drop instead of pushing back
    payload = b"q" * 1000
    sent = 0
    try:
        while sent < 200_000:
            p.a.send_nowait({"n": sent, "p": payload})
            sent += 1
    except Full:
        pass
    else:
        raise AssertionError("200000 KiB-sized messages never filled the link")
    # a message accepted by send_nowait may still be partly in the sender's buffer;
    # the sender's next operation (here: flush) completes it
    for i, msg in enumerate(p.drain_flushing(sent)):
        assert msg["n"] == i and msg["p"] == payload
    try:
        p.b.recv_nowait()
    except Empty:
        pass
    else:
        raise AssertionError("a message arrived that was never accepted")


def check_end_of_channel(p: Pair) -> None:
    if not p.a.properties.connection_oriented:
        return
    for i in range(5):
        p.a.send(i, T)
    p.a.close()
    assert list(p.b) == [0, 1, 2, 3, 4]
    try:
        p.b.recv(T)
    except EndOfChannel:
        pass
    else:
        raise AssertionError("recv after the end did not raise EndOfChannel")


def check_closed(p: Pair) -> None:
    p.b.close()
    p.b.close()
    ops: list[Callable[[], Any]] = [lambda: p.b.recv(T), lambda: p.b.recv_nowait()]
    for op in ops:
        try:
            op()
        except ChannelClosed:
            pass
        else:
            raise AssertionError("an operation on a closed channel did not raise ChannelClosed")
    if p.duplex:
        try:
            p.b.send(1, T)
        except ChannelClosed:
            pass
        else:
            raise AssertionError("send on a closed channel did not raise ChannelClosed")


def check_too_large(p: Pair) -> None:
    limit = p.a.properties.max_message
    size = (limit + 1) if limit is not None else (2 << 20)
    with _expect(MessageTooLarge):
        # streams hit the frame cap (the pair has max_frame just over 1 MiB),
        # message transports their own unit
        p.a.send_bytes(b"x" * size, T)
    p.a.send("still usable", T)
    assert p.b.recv(T) == "still usable"


def check_direction(p: Pair) -> None:
    if p.duplex:
        return
    with _expect(UnsupportedOperation):
        p.b.send("nope", T)


def check_wait(p: Pair) -> None:
    assert p.wait([p.b], 0.05) == []
    p.a.send("ready", T)
    assert p.wait([p.b], T) == [p.b]
    assert p.b.recv_nowait() == "ready"


def check_statistics(p: Pair) -> None:
    before_a = p.a.statistics().messages_sent
    before_b = p.b.statistics().messages_received
    for i in range(10):
        p.a.send(i, T)
    for _ in range(10):
        p.b.recv(T)
    assert p.a.statistics().messages_sent - before_a == 10
    assert p.b.statistics().messages_received - before_b == 10


def check_numpy(p: Pair) -> None:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return
    limit = p.a.properties.max_message
    n = 1000 if limit is not None else 300_000
    arrays: list[Any] = [
        np.arange(n, dtype=np.float64).reshape(-1, 10),
        np.zeros((3, 4, 5), dtype=np.int16),
        np.array([1, 2, 3], dtype=np.uint8),
        np.ones(7, dtype=np.complex64)[::2],  # not contiguous
    ]
    for arr in arrays:
        got = p.transfer("send", {"a": arr}, "recv")["a"]
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert (got == arr).all()


def check_processes(p: Pair) -> None:
    if p.driver != "sync":
        return  # the transports are the same; forking an event loop is not
    pid = os.fork()
    if pid == 0:  # child: receive, answer (or echo back over a fresh send)
        code = 1
        try:
            msg = p.b.recv(T)
            if p.duplex:
                p.b.send({"child": os.getpid(), "got": msg}, T)
            code = 0 if msg == {"from": "parent"} else 2
        finally:
            os._exit(code)
    try:
        p.a.send({"from": "parent"}, T)
        if p.duplex:
            reply = p.a.recv(T)
            assert reply == {"child": pid, "got": {"from": "parent"}}
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@contextlib.contextmanager
def _expect(exc_type: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except exc_type:
        return
    raise AssertionError(f"{exc_type.__name__} was not raised")


CHECKS: dict[str, Callable[[Pair], None]] = {
    "roundtrip": check_roundtrip,
    "bytes": check_bytes,
    "order": check_order,
    "nonblocking": check_nonblocking,
    "backpressure": check_backpressure,
    "end_of_channel": check_end_of_channel,
    "closed": check_closed,
    "too_large": check_too_large,
    "direction": check_direction,
    "wait": check_wait,
    "statistics": check_statistics,
    "numpy": check_numpy,
    "processes": check_processes,
}

PAIR_OPTIONS: dict[str, dict[str, Any]] = {
    # streams get a frame cap just above 1 MiB so "too large" is cheap to provoke
    "too_large": {"max_frame": (1 << 20) + 4096},
}


# -- capacity and receipts ------------------------------------------------------------


def _both(p: Pair, on_a: Callable[[Any], Any], on_b: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Run ``on_a(a)`` and ``on_b(b)`` at the same time (threads, or one event loop:
    then each returns a coroutine); return both results."""
    if p.driver != "sync":
        fa: _AioFacade = p.a

        async def gather() -> tuple[Any, Any]:
            x, y = await asyncio.gather(on_a(p.a.ch), on_b(p.b.ch))
            return x, y

        return fa.loop.run_until_complete(gather())
    box: dict[str, Any] = {}

    def run_b() -> None:
        try:
            box["b"] = on_b(p.b)
        except BaseException as exc:  # re-raised below
            box["error"] = exc

    t = threading.Thread(target=run_b)
    t.start()
    try:
        x = on_a(p.a)
    finally:
        t.join(T * 4)
    if "error" in box:
        raise box["error"]
    return x, box.get("b")


def _pause(p: Pair) -> Any:
    return asyncio.sleep(0.05) if p.driver != "sync" else time.sleep(0.05)


def _rendezvous_one_way(p: Pair, sender: str, receiver: str) -> None:
    events: list[str] = []
    aio = p.driver != "sync"

    def send(ch: Any) -> Any:
        if aio:

            async def go() -> None:
                await ch.send("ping", T)
                events.append("send-returned")

            return go()
        ch.send("ping", T)
        events.append("send-returned")
        return None

    def recv(ch: Any) -> Any:
        if aio:

            async def go() -> Any:
                await asyncio.sleep(0.05)  # the sender is blocked by now
                events.append("recv-began")
                return await ch.recv(T)

            return go()
        time.sleep(0.05)
        events.append("recv-began")
        return ch.recv(T)

    if sender == "a":
        _, got = _both(p, send, recv)
    else:
        got, _ = _both(p, recv, send)
    assert got == "ping"
    assert events.index("recv-began") < events.index("send-returned"), events


def check_rendezvous(p: Pair) -> None:
    _rendezvous_one_way(p, "a", "b")
    if p.duplex:
        _rendezvous_one_way(p, "b", "a")
    with _expect(Full):
        p.a.send_nowait("nobody waits")
    with _expect(Timeout):
        p.a.send("nobody takes", timeout=0.05)
    with _expect(Timeout):  # the timed-out send delivered nothing
        p.b.recv(timeout=0.05)
    # a stream of rendezvous sends keeps order
    n = 100

    def send_all(ch: Any) -> Any:
        if p.driver != "sync":

            async def go() -> None:
                for i in range(n):
                    await ch.send(i, T)

            return go()
        for i in range(n):
            ch.send(i, T)
        return None

    def recv_all(ch: Any) -> Any:
        if p.driver != "sync":

            async def go() -> list[Any]:
                return [await ch.recv(T) for _ in range(n)]

            return go()
        return [ch.recv(T) for _ in range(n)]

    _, got = _both(p, send_all, recv_all)
    assert got == list(range(n))


def check_bounded(p: Pair) -> None:
    n = p.a.capacity
    assert n == 4 and p.a.properties.capacity == 4 and p.b.properties.capacity == 4, n
    for i in range(n):
        p.a.send_nowait(i)
    with _expect(Full):
        p.a.send_nowait(n)
    with _expect(Timeout):
        p.a.send(n, timeout=0.05)
    assert p.b.recv(T) == 0
    p.a.send(n, timeout=T)  # one was taken: room for exactly one more
    with _expect(Full):
        p.a.send_nowait(n + 1)
    assert [p.b.recv(T) for _ in range(n)] == list(range(1, n + 1))
    # a blocked send goes through as soon as the receiver takes one
    for i in range(n):
        p.a.send_nowait(i)

    def blocked_send(ch: Any) -> Any:
        return ch.send("late", T)

    def take_later(ch: Any) -> Any:
        if p.driver != "sync":

            async def go() -> Any:
                await asyncio.sleep(0.05)
                return await ch.recv(T)

            return go()
        time.sleep(0.05)
        return ch.recv(T)

    _, first = _both(p, blocked_send, take_later)
    assert first == 0
    assert [p.b.recv(T) for _ in range(n)] == [1, 2, 3, "late"]
    # many messages through a small window keep their order
    count = 300

    def send_all(ch: Any) -> Any:
        if p.driver != "sync":

            async def go() -> None:
                for i in range(count):
                    await ch.send(i, T)

            return go()
        for i in range(count):
            ch.send(i, T)
        return None

    def recv_all(ch: Any) -> Any:
        if p.driver != "sync":

            async def go() -> list[Any]:
                return [await ch.recv(T) for _ in range(count)]

            return go()
        return [ch.recv(T) for _ in range(count)]

    _, got = _both(p, send_all, recv_all)
    assert got == list(range(count))


def check_unbounded(p: Pair) -> None:
    assert p.a.capacity is None and p.a.properties.capacity is None
    unit = p.a.properties.max_message
    chunk = b"u" * (65536 if unit is None else min(65536, unit - 16))
    sent = 0
    # beyond the kernel's buffer (64 KiB pipes, a few MiB for loopback TCP): never waits
    while p.a.statistics().queued_bytes == 0:
        assert sent < 2000, "128 MiB taken by the kernel and nothing queued?"
        p.a.send_bytes_nowait(chunk)
        sent += 1
    with _expect(Full):
        for _ in range(100_000):  # max_queue is 4 MiB: this passes it
            p.a.send_bytes_nowait(chunk)
            sent += 1
    got = p.drain_flushing(sent)
    assert all(x == chunk for x in got) and len(got) == sent
    assert p.a.statistics().queued_bytes == 0


def check_receipts(p: Pair) -> None:
    aio = p.driver != "sync"
    run = p.a.loop.run_until_complete if aio else None
    if not p.duplex:  # no way back for acknowledgements: refused, with the reason
        with _expect(UnsupportedOperation):
            run(p.a.ch.send_async(1)) if run else p.a.send_async(1)
        return
    receipts = []
    for i in range(50):
        r = run(p.a.ch.send_async(i)) if run else p.a.send_async(i)
        receipts.append(r)
    assert [r.number for r in receipts] == list(range(1, 51))
    assert [p.b.recv(T) for _ in range(50)] == list(range(50))
    for r in receipts:
        if run:
            run(asyncio.wait_for(_await(r), T))
        else:
            r.wait(T)
        assert r.done() and not r.failed
    peer_pid = p.a.peer.pid
    assert receipts[-1].receiver == peer_pid
    # a receipt whose channel closes before delivery fails, it never hangs
    lost = run(p.a.ch.send_async("never taken")) if run else p.a.send_async("never taken")
    p.b.close()
    with _expect(Undelivered):
        if run:
            run(asyncio.wait_for(_await(lost), T))
        else:
            lost.wait(T)


async def _await(receipt: Any) -> None:
    await receipt


CAPACITY_CHECKS: dict[str, tuple[Callable[[Pair], None], dict[str, Any]]] = {
    "rendezvous": (check_rendezvous, {"capacity": 0}),
    "bounded": (check_bounded, {"capacity": 4}),
    "unbounded": (check_unbounded, {"capacity": None, "max_queue": 4 * 1024 * 1024}),
    "receipts": (check_receipts, {}),
}


def run_all(transports: tuple[str, ...] = TRANSPORTS, drivers: tuple[str, ...] = DRIVERS) -> None:
    """Run every check on every transport and driver; raise on the first failure."""
    for transport in transports:
        for driver in drivers:
            for name, check in CHECKS.items():
                with open_pair(transport, driver, **PAIR_OPTIONS.get(name, {})) as pair:
                    check(pair)
            if transport in CAPACITY_TRANSPORTS:
                for check, options in CAPACITY_CHECKS.values():
                    with open_pair(transport, driver, **options) as pair:
                        check(pair)
            if transport in ESTABLISHMENT_TRANSPORTS:
                for establish_check in ESTABLISHMENT_CHECKS.values():
                    establish_check(transport, driver)


# -- the establishment contract (4d, 4e, 4h) -----------------------------------------


def _establishes(transport: str) -> bool:
    """Has an address to connect to, and a peer that answers (not plain inet datagrams,
    which no one acknowledges)."""
    info = scheme_info(_scheme(transport))
    lossy = info.address == "inet" and not info.connection_oriented
    return info.has_url and (transport.endswith("-reliable") or not lossy)


ESTABLISHMENT_TRANSPORTS = tuple(t for t in TRANSPORTS if _establishes(t))
_HANDSHAKE_TRANSPORTS = tuple(
    t for t in TRANSPORTS if t.endswith("-reliable") or scheme_info(_scheme(t)).handshake
)
_LATE = 0.2  # the listener appears this long after the client started connecting


def _establish_url(transport: str) -> tuple[str, dict[str, Any]]:
    """A URL nobody listens on yet (for tcp/udp a port just found free) and options."""
    import socket

    options: dict[str, Any] = {"reliable": True} if transport.endswith("-reliable") else {}
    scheme = transport.removesuffix("-reliable")
    info = scheme_info(scheme)
    if info.address == "inet":
        kind = socket.SOCK_STREAM if info.connection_oriented else socket.SOCK_DGRAM
        probe = socket.socket(socket.AF_INET, kind)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        return f"{scheme}://127.0.0.1:{port}", options
    return _url(transport), options


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its result or exception lands in the returned box."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # reported by the caller
            box.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, box


def _connect_and_send(url: str, driver: str, message: str, **options: Any) -> None:
    """A client in ``driver`` that connects (retrying until T), sends one message, flushes."""
    import buzon

    from .. import aio

    if driver == "sync":
        with buzon.connect(url, timeout=T, **options) as ch:
            ch.send(message, T)
            ch.flush(T)
        return

    async def main() -> None:
        ch = await aio.connect(url, timeout=T, **options)
        try:
            await ch.send(message, T)
            await ch.flush(T)
        finally:
            await ch.aclose()

    asyncio.run(main())


def check_connect_retry(transport: str, driver: str) -> None:
    """(18) connect waits for a late endpoint; retry=False fails at once."""
    import buzon

    from .. import aio
    from ..errors import ConnectError

    url, options = _establish_url(transport)
    t, box = _in_thread(lambda: _connect_and_send(url, driver, "late", **options))
    try:
        time.sleep(_LATE)
        with buzon.listen(url, **options) as lst, lst.accept(timeout=T) as ch:
            assert ch.recv(timeout=T) == "late"
    finally:
        t.join(T * 2)
    assert box == [None], f"connect did not wait for the late endpoint: {box}"
    if transport == "udp-reliable":
        return  # a port nobody binds may answer nothing at all: only the deadline tells
    url, options = _establish_url(transport)
    with _expect(ConnectError):
        if driver == "sync":
            buzon.connect(url, timeout=T, retry=False, **options).close()
        else:
            asyncio.run(aio.connect(url, timeout=T, retry=False, **options)).close()


def check_accept_timeout(transport: str, driver: str) -> None:
    """(19) accept(timeout=0) in a loop establishes every connecting peer."""
    import buzon

    from .. import aio

    if transport not in _HANDSHAKE_TRANSPORTS:
        return  # one channel per endpoint, no handshake: nothing can straddle
    url, options = _establish_url(transport)
    n = 8
    listener: Any = buzon.listen(url, **options) if driver == "sync" else aio.listen(url, **options)
    with listener as lst:
        clients = [
            _in_thread(
                functools.partial(_connect_and_send, str(lst.address), "sync", f"m{i}", **options)
            )
            for i in range(n)
        ]
        got: list[Any] = []

        async def take() -> Any:
            while True:
                try:
                    return await lst.accept(timeout=0)
                except Timeout:
                    continue

        deadline = time.monotonic() + T * 2
        while len(got) < n and time.monotonic() < deadline:
            if driver == "sync":
                try:
                    ch = lst.accept(timeout=0)
                except Timeout:
                    continue
                with ch:
                    got.append(ch.recv(timeout=T))
            else:

                async def one() -> Any:
                    ch = await asyncio.wait_for(take(), T)
                    try:
                        return await ch.recv(timeout=T)
                    finally:
                        await ch.aclose()

                got.append(asyncio.run(one()))
        for t, _ in clients:
            t.join(T * 2)
        assert sorted(got) == sorted(f"m{i}" for i in range(n)), got
        assert all(box == [None] for _, box in clients), [box for _, box in clients]
        assert lst.rejected == 0


def check_admission(transport: str, driver: str) -> None:
    """(20) silent connections beyond max_pending evict the oldest; good clients pass."""
    import socket

    import buzon

    from .. import aio

    info = scheme_info(_scheme(transport))
    if transport.endswith("-reliable") or info.message_boundaries or not info.connection_oriented:
        return  # raw silent connections need a stream socket
    url, options = _establish_url(transport)
    cap, silent = 4, 12
    listener: Any = (
        buzon.listen(url, max_pending=cap, **options)
        if driver == "sync"
        else aio.listen(url, max_pending=cap, **options)
    )
    socks: list[socket.socket] = []
    with listener as lst:
        try:
            addr = lst.address
            for _ in range(silent):
                family = socket.AF_UNIX if transport == "unix" else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)
                sock.connect(addr.fs_path() if transport == "unix" else (addr.host, addr.port))
            t, box = _in_thread(lambda: _connect_and_send(str(addr), "sync", "good", **options))
            try:
                if driver == "sync":
                    with lst.accept(timeout=T) as ch:
                        assert ch.recv(timeout=T) == "good"
                else:

                    async def one() -> Any:
                        ch = await lst.accept(timeout=T)
                        try:
                            return await ch.recv(timeout=T)
                        finally:
                            await ch.aclose()

                    assert asyncio.run(one()) == "good"
            finally:
                t.join(T * 2)
            assert box == [None], box
            assert lst.pending <= cap
            assert lst.evicted >= silent - cap, lst.refusals
        finally:
            for sock in socks:
                sock.close()


ESTABLISHMENT_CHECKS: dict[str, Callable[[str, str], None]] = {
    "connect_retry": check_connect_retry,
    "accept_timeout": check_accept_timeout,
    "admission": check_admission,
}
