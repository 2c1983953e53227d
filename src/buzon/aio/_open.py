"""Opening channels with the asyncio driver: ``pipe``, ``connect``, ``listen``, ``wait``."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, TypeVar

from .. import _reduction
from .._channel import DEFAULT_CAPACITY, ChannelCore
from .._establish import DEFAULT_MAX_PENDING, Admit, connect_steps, establish_steps
from .._listener import ListenerBase
from .._policy import Prepared, pipe_cores, prepare
from .._waitset import unready, waitables, wake_at
from ..address import Address, is_name
from ..errors import ChannelClosed, Timeout
from ..transport import open_listener
from ..transport.base import Transport
from ._channel import Channel, close_fds, deadline_of, run_steps, wait_fd, wait_ready

__all__ = ["Listener", "connect", "listen", "pipe", "wait"]

W = TypeVar("W")


def pipe(
    duplex: bool = True,
    *,
    codec: str | None = None,
    pickle: bool = False,
    raw: bool = False,
    max_frame: int | None = None,
    capacity: int | None = DEFAULT_CAPACITY,
    max_queue: int | None = None,
) -> tuple[Channel, Channel]:
    """Two connected asyncio channels over anonymous pipes (see :func:`buzon.pipe`)."""
    a, b = pipe_cores(
        duplex,
        codec=codec,
        pickle=pickle,
        raw=raw,
        max_frame=max_frame,
        capacity=capacity,
        max_queue=max_queue,
    )
    return Channel(a), Channel(b)


async def connect(
    url: str | Address, timeout: float | None = None, *, retry: bool = True, **options: Any
) -> Channel:
    """Connect to ``url`` (the awaitable twin of :func:`buzon.connect`: an endpoint not
    there yet is tried again until ``timeout`` unless ``retry=False``)."""
    prep = prepare(url, listening=False, **options)
    deadline = deadline_of(timeout)
    transport = await run_steps(connect_steps(prep, deadline, retry), deadline)
    return await establish(transport, prep, "client", deadline)


async def establish(
    transport: Transport,
    prep: Prepared,
    role: str,
    deadline: float | None,
    admit: Admit | None = None,
) -> Channel:
    """Wrap a fresh transport in a channel, running the handshake where there is one
    (``admit``: a server's check)."""
    core = ChannelCore(transport, prep.channel, address=prep.address)
    hs_deadline = time.monotonic() + prep.channel.handshake_timeout
    if deadline is not None:
        hs_deadline = min(hs_deadline, deadline)
    try:
        await run_steps(establish_steps(core, prep, role, admit), hs_deadline)
    except BaseException:
        core.close()
        raise
    return Channel(core)


class Listener(ListenerBase):
    """A bound endpoint for asyncio code; ``await accept()`` returns channels."""

    _label = "buzon.aio.Listener"

    def close(self) -> None:
        """Stop listening (see :meth:`buzon.Listener.close`); a task waiting in
        :meth:`accept` (or ``buzon.aio.wait``) on it wakes: ``accept`` raises
        :class:`ChannelClosed`, ``wait`` returns the listener as ready."""
        if not self._closed:
            close_fds((self.fileno(), self._lt.fileno()), "the listener is closed")
        super().close()

    async def accept(self, timeout: float | None = None) -> Channel:
        """The next peer's channel, handshake done (see :meth:`buzon.Listener.accept`:
        ``timeout`` bounds the wait for a connection only)."""
        deadline = deadline_of(timeout)
        while True:
            core = self._take()
            if core is not None:
                return Channel(core)
            await wait_ready((self.fileno(),), (), self._wake_at(deadline))

    async def accept_transport(self, timeout: float | None = None) -> Transport:
        """Wait for the next connection *before* its handshake (see
        :meth:`buzon.Listener.accept_transport`: admission applies as there)."""
        return await self._accept_transport(deadline_of(timeout))

    async def _accept_transport(self, deadline: float | None) -> Transport:
        while True:
            if self._closed:
                raise ChannelClosed("the listener is closed")
            transport = self._lt.accept()
            if transport is not None:
                if self._screen(transport):
                    return transport
                continue
            try:
                await wait_fd(self._lt.fileno(), False, deadline, "accept")
            except Timeout:
                raise Timeout(f"no peer arrived at {self.address} in time") from None

    async def establish(self, transport: Transport, timeout: float | None = None) -> Channel:
        """Run the server side of the handshake on an accepted transport (a refused
        peer is told why, and counted in :attr:`refusals`)."""
        try:
            deadline = deadline_of(timeout)
            return await establish(transport, self._prep, "server", deadline, self._admit)
        except BaseException as exc:
            self._refused(exc)
            raise

    def __enter__(self) -> Listener:
        return self

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def listen(
    url: str | Address,
    *,
    max_pending: int = DEFAULT_MAX_PENDING,
    name: str | None = None,
    **options: Any,
) -> Listener:
    """Bind ``url`` (binding never waits, so this is a plain call); the options of
    :func:`buzon.listen`, ``max_pending``, ``name`` and ``ring_size`` for ``shm:``
    included."""
    if name is not None or is_name(url):
        from ..names import bind, listen_address

        addr, reg = listen_address(url, name)
        listener = listen(addr, max_pending=max_pending, **options)
        return bind(listener, reg) if reg is not None else listener
    prep = prepare(url, listening=True, **options)
    return Listener(open_listener(prep.address, prep.transport), prep, max_pending)


async def wait(objects: Iterable[W], timeout: float | None = None) -> list[W]:
    """The asyncio twin of :func:`buzon.wait`: channels and listeners, any transports."""
    items, slices = waitables(objects, "buzon.aio.wait")
    deadline = deadline_of(timeout)
    while True:
        ready = [o for o in items if o._ready()]  # type: ignore[attr-defined]
        if ready:
            unready(items)
            return ready
        fds = {o.fileno() for o in items} - {-1}  # type: ignore[attr-defined]
        wake = wake_at(items, deadline, slices, time.monotonic())
        try:
            woken = await wait_ready(fds, (), wake)
        except ChannelClosed:  # one was closed (close_fds): it is ready now, look again
            continue
        if not woken and (deadline is not None and time.monotonic() >= deadline):
            unready(items)
            return []


_reduction.passable(Listener)  # pickling refused, saying why (_reduction.py)
