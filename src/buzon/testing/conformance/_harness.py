"""The driver-neutral harness: one check, written once, runs natively in both drivers.

A check is an ``async`` function of a :class:`Pair`. Every operation on an end is
awaited: in the ``asyncio`` driver it *is* the :mod:`buzon.aio` coroutine, run as a
task on the one event loop of the run (so ``asyncio.gather`` of two operations is two
real concurrent tasks, and cancellation and ``wait_for`` are the real thing); in the
``sync`` driver it is the blocking :mod:`buzon` call, run in a thread of the pair's
own pool (so two gathered operations are two real threads blocking at the same time).
Non-blocking calls (``send_nowait``, ``recv_nowait``, ``statistics``, ...) are made
directly in both drivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..._schemes import SCHEMES, scheme_info

TRANSPORTS = tuple(name for info in SCHEMES for name in info.conformance)
"""Every transport of the registry (``NAME-reliable``: the scheme with ``reliable=True``)."""
CAPACITY_TRANSPORTS = tuple(name for info in SCHEMES for name in info.capacity_conformance)
"""The transports that take every capacity (``pipe-simplex``: ``buzon.pipe(duplex=False)``)."""
DRIVERS = ("sync", "asyncio")
T = 5.0  # generous per-operation timeout: a failure, never a hang

Check = Callable[["Pair"], Awaitable[None]]


class NotApplicable(Exception):
    """A check does not apply to this transport (or driver); the message says why."""


def scheme_of(transport: str) -> str:
    """The scheme a conformance transport name stands for (``udp-reliable``: ``udp``)."""
    return transport.removesuffix("-reliable").removesuffix("-simplex")


def url_for(transport: str) -> str:
    """A fresh URL to listen on for ``transport`` (port 0 for the inet schemes)."""
    scheme = scheme_of(transport)
    if scheme_info(scheme).address == "inet":
        return f"{scheme}://127.0.0.1:0"
    return f"{scheme}:conf-{uuid.uuid4().hex[:10]}"


class Threads:
    """Runs blocking calls in threads of a pool of its own (sized for the checks:
    a few ends blocking at once, each in its own thread)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="conformance")

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in a thread of the pool, awaited."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class End:
    """One channel end, the same awaitable interface in both drivers."""

    def __init__(self, ch: Any, driver: str, threads: Threads) -> None:
        self.ch = ch  # the real buzon.Channel or buzon.aio.Channel
        self.driver = driver
        self.threads = threads

    @property
    def sync(self) -> bool:
        return self.driver == "sync"

    async def _op(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.ch, name)
        if self.sync:
            return await self.threads.call(method, *args, **kwargs)
        return await method(*args, **kwargs)

    # blocking operations: a thread (sync) or the coroutine itself (asyncio)
    async def send(self, obj: Any, timeout: float | None = None) -> None:
        await self._op("send", obj, timeout)

    async def recv(self, timeout: float | None = None) -> Any:
        return await self._op("recv", timeout)

    async def send_bytes(self, data: Any, timeout: float | None = None) -> None:
        await self._op("send_bytes", data, timeout)

    async def recv_bytes(self, timeout: float | None = None) -> bytes:
        got: bytes = await self._op("recv_bytes", timeout)
        return got

    async def flush(self, timeout: float | None = None) -> None:
        await self._op("flush", timeout)

    async def send_async(self, obj: Any) -> Any:
        """The :class:`~buzon.Receipt` of ``send_async(obj)``."""
        return await self._op("send_async", obj)

    async def receipt(self, receipt: Any, timeout: float) -> None:
        """Wait for ``receipt``: ``Receipt.wait`` in a thread, or ``await`` it in a task."""
        if self.sync:
            await self.threads.call(receipt.wait, timeout)
        else:

            async def done() -> None:
                await receipt

            await asyncio.wait_for(done(), timeout)

    async def drain(self) -> list[Any]:
        """Everything up to the end of the channel (``for`` / ``async for``)."""
        if self.sync:
            got: list[Any] = await self.threads.call(list, self.ch)
            return got
        return [x async for x in self.ch]

    async def close(self) -> None:
        """``close()`` (it may flush: in a thread) or ``await aclose()``."""
        if self.sync:
            await self.threads.call(self.ch.close)
        else:
            await self.ch.aclose()

    # never blocking: called directly in both drivers
    def send_nowait(self, obj: Any) -> None:
        self.ch.send_nowait(obj)

    def send_bytes_nowait(self, data: Any) -> None:
        self.ch.send_bytes_nowait(data)

    def recv_nowait(self) -> Any:
        return self.ch.recv_nowait()

    def statistics(self) -> Any:
        return self.ch.statistics()

    @property
    def properties(self) -> Any:
        return self.ch.properties

    @property
    def capacity(self) -> int | None:
        capacity: int | None = self.ch.capacity
        return capacity

    @property
    def peer(self) -> Any:
        return self.ch.peer


@dataclass
class Pair:
    """``a`` sends to ``b``; on duplex links ``b`` can answer ``a``.

    ``listener`` is the listener ``b`` was accepted from (None for ``buzon.pipe()``),
    still open while the check runs; ``url`` its address; ``options`` what both ends
    were opened with.
    """

    transport: str
    driver: str
    a: End
    b: End
    threads: Threads
    listener: Any = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def sync(self) -> bool:
        return self.driver == "sync"

    @property
    def duplex(self) -> bool:
        return bool(self.a.properties.direction == "duplex")

    async def wait(self, ends: list[End], timeout: float) -> list[End]:
        """``buzon.wait`` (in a thread) or ``buzon.aio.wait`` over these ends."""
        inner = {id(e.ch): e for e in ends}
        if self.sync:
            from ... import wait

            got = await self.threads.call(wait, [e.ch for e in ends], timeout)
        else:
            from ... import aio

            got = await aio.wait([e.ch for e in ends], timeout)
        return [inner[id(c)] for c in got]

    async def connect(self, url: str, **options: Any) -> End:
        """Another client of ``url`` in this pair's driver."""
        return End(
            await _connect(self.driver, self.threads, url, options), self.driver, self.threads
        )


class Server:
    """A listener, the same awaitable interface in both drivers (``lst`` is the real
    one: its counters, address, ...)."""

    def __init__(self, lst: Any, driver: str, threads: Threads) -> None:
        self.lst = lst
        self.driver = driver
        self.threads = threads

    async def accept(self, timeout: float | None) -> End:
        """``accept(timeout)``: in a thread, or the coroutine itself."""
        if self.driver == "sync":
            ch = await self.threads.call(self.lst.accept, timeout=timeout)
        else:
            ch = await self.lst.accept(timeout=timeout)
        return End(ch, self.driver, self.threads)

    def close(self) -> None:
        self.lst.close()


class Side:
    """Listening and connecting in one driver, awaitable in both (the establishment
    checks run on it): the driver under test plays both roles."""

    def __init__(self, driver: str, threads: Threads) -> None:
        self.driver = driver
        self.threads = threads

    def listen(self, url: str, **options: Any) -> Server:
        """``listen(url)`` (it never blocks: called directly)."""
        import buzon

        from ... import aio

        make = buzon.listen if self.driver == "sync" else aio.listen
        return Server(make(url, **options), self.driver, self.threads)

    async def connect(self, url: str, timeout: float | None = T, **options: Any) -> End:
        """``connect(url, timeout)``: in a thread, or the coroutine itself."""
        opts = {"timeout": timeout, **options}
        if self.driver == "sync":
            import buzon

            ch = await self.threads.call(buzon.connect, url, **opts)
        else:
            from ... import aio

            ch = await aio.connect(url, **opts)
        return End(ch, self.driver, self.threads)


def run_side(check: Callable[[Side], Awaitable[None]], driver: str) -> None:
    """Run ``check`` with a :class:`Side` of ``driver``, in an event loop of its own."""

    async def main() -> None:
        threads = Threads()
        try:
            await check(Side(driver, threads))
        finally:
            threads.close()

    asyncio.run(main())


async def _connect(driver: str, threads: Threads, url: str, options: dict[str, Any]) -> Any:
    if driver == "sync":
        import buzon

        return await threads.call(buzon.connect, url, timeout=T, **options)
    from ... import aio

    return await aio.connect(url, timeout=T, **options)


async def gather(*aws: Awaitable[Any]) -> list[Any]:
    """Run these at the same time (tasks, or operations in threads); all results, in
    order. If one fails, the others are still waited for (each has its own timeout), so
    nothing is left running when the pair closes."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)


@contextlib.asynccontextmanager
async def open_pair(
    transport: str,
    driver: str = "sync",
    listen_options: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[Pair]:
    """A connected pair over ``transport`` in ``driver``; everything is closed and
    removed after. Run it inside an event loop (see :func:`run_check`).

    ``NAME-reliable`` is the ``NAME`` scheme opened with ``reliable=True`` (or the
    ``reliable=`` given); ``NAME-simplex`` is ``buzon.pipe(duplex=False)``.
    ``listen_options`` go to the listener only (``ring_size`` of ``shm:``).
    """
    if transport.endswith("-reliable"):
        options = {"reliable": True, **options}
    threads = Threads()
    try:
        async with _ends(transport, driver, threads, options, listen_options or {}) as (lst, a, b):
            ends = End(a, driver, threads), End(b, driver, threads)
            pair = Pair(transport, driver, *ends, threads, lst, options)
            try:
                if pair.duplex and b.properties.connection_oriented is False:
                    # datagram endpoints reply to the last sender: introduce a first
                    await pair.a.send_bytes(b"hello", T)
                    assert await pair.b.recv_bytes(T) == b"hello"
                yield pair
            finally:
                for end in (pair.a, pair.b):
                    await end.close()
    finally:
        threads.close()


@contextlib.asynccontextmanager
async def _ends(
    transport: str,
    driver: str,
    threads: Threads,
    options: dict[str, Any],
    listen_options: dict[str, Any],
) -> AsyncIterator[tuple[Any, Any, Any]]:
    import buzon

    from ... import aio

    duplex = not transport.endswith("-simplex")
    if not scheme_info(scheme_of(transport)).has_url:  # buzon.pipe()
        b, a = buzon.pipe(duplex, **options) if driver == "sync" else aio.pipe(duplex, **options)
        yield None, a, b
        return
    make = buzon.listen if driver == "sync" else aio.listen
    lst: Any = make(url_for(transport), **options, **listen_options)
    try:
        accepting: Awaitable[Any]
        if driver == "sync":
            accepting = threads.call(lst.accept, timeout=T)
        else:
            accepting = lst.accept(timeout=T)
        a, b = await gather(_connect(driver, threads, str(lst.address), options), accepting)
        yield lst, a, b
    finally:
        lst.close()


def run_check(
    check: Check,
    transport: str,
    driver: str = "sync",
    listen_options: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Open a pair over ``transport`` in ``driver`` and run ``check`` on it, in an
    event loop of its own (raises :class:`NotApplicable` if it does not apply)."""

    async def main() -> None:
        async with open_pair(transport, driver, listen_options, **options) as pair:
            await check(pair)

    asyncio.run(main())


@contextlib.contextmanager
def expect(exc_type: type[BaseException] | tuple[type[BaseException], ...]) -> Any:
    """The block must raise ``exc_type``; the exception is in ``.value`` after."""

    class Box:
        value: BaseException | None = None

    box = Box()
    try:
        yield box
    except exc_type as exc:
        box.value = exc
        return
    names = exc_type.__name__ if isinstance(exc_type, type) else [e.__name__ for e in exc_type]
    raise AssertionError(f"{names} was not raised")
