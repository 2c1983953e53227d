"""Opening channels with the asyncio driver: ``pipe``, ``connect``, ``listen``, ``wait``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .. import _reduction
from .._channel import DEFAULT_CAPACITY, ChannelCore
from .._establish import Steps, establish_steps, retry_delay
from .._listener import ListenerBase
from .._policy import Prepared, pipe_cores, prepare
from ..address import Address
from ..errors import BuzonError, ChannelClosed, ProtocolError, Timeout
from ..transport import open_connector, open_listener
from ..transport.base import Connector, Transport
from ._channel import Channel, deadline_of, wait_fd, wait_ready

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


async def connect(url: str | Address, timeout: float | None = None, **options: Any) -> Channel:
    """Connect to ``url`` (the awaitable twin of :func:`buzon.connect`)."""
    prep = prepare(url, listening=False, **options)
    deadline = deadline_of(timeout)
    connector = open_connector(prep.address, prep.transport)
    try:
        transport = await _drive_connector(connector, deadline, prep.address)
    finally:
        connector.close()
    return await establish(transport, prep, "client", deadline)


async def _drive_connector(
    connector: Connector, deadline: float | None, address: Address
) -> Transport:
    attempt = 0
    while True:
        transport = connector.step()
        if transport is not None:
            return transport
        if connector.want == "retry":
            await asyncio.sleep(retry_delay(attempt, deadline, address))
            attempt += 1
            continue
        try:
            await wait_fd(connector.fileno(), connector.want == "write", deadline, "connect")
        except Timeout:
            raise Timeout(f"connecting to {address} timed out") from None


async def establish(
    transport: Transport, prep: Prepared, role: str, deadline: float | None
) -> Channel:
    core = ChannelCore(transport, prep.channel, address=prep.address)
    hs_deadline = time.monotonic() + prep.channel.handshake_timeout
    if deadline is not None:
        hs_deadline = min(hs_deadline, deadline)
    try:
        await _run(establish_steps(core, prep, role), core, hs_deadline)
    except BaseException:
        core.close()
        raise
    return Channel(core)


async def _run(steps: Steps, core: ChannelCore, deadline: float) -> None:
    """Perform the I/O a handshake generator asks for (see :mod:`buzon._establish`)."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            op, data = steps.throw(error) if error is not None else steps.send(result)
        except StopIteration:
            return
        result = error = None
        try:
            if op == "write":
                assert data is not None
                await _write_all(core, data, deadline)
            elif op == "frame":
                result = await _read(core, deadline, lambda: core.poll_frame(control=True))
            elif op == "delivered":  # (acks make the write fd *readable*)
                while not core.flush():
                    await wait_fd(core.write_fileno(), False, deadline, "handshake delivery")
            elif op in ("wait-read", "wait-write"):
                await wait_fd(core.read_fileno(), op == "wait-write", deadline, "handshake")
            else:
                result = await _read(core, deadline, core.read_control)
        except BuzonError as exc:
            error = exc


async def _write_all(core: ChannelCore, data: bytes, deadline: float) -> None:
    # (on reliable datagrams room comes with acks: the write fd becomes *readable*)
    while not core.write_control(data):
        await wait_fd(core.write_fileno(), not core.acked, deadline, "handshake write")
    while core.pending:  # a partial write to finish (not: wait for acks)
        await wait_fd(core.write_fileno(), True, deadline, "handshake write")
        core.flush()


async def _read(core: ChannelCore, deadline: float, attempt: Callable[[], Any]) -> Any:
    while True:
        got = attempt()
        if got is not None:
            return got
        await wait_fd(core.read_fileno(), False, deadline, "handshake read")


class Listener(ListenerBase):
    """A bound endpoint for asyncio code; ``await accept()`` returns channels."""

    _label = "buzon.aio.Listener"

    async def accept(self, timeout: float | None = None) -> Channel:
        deadline = deadline_of(timeout)
        while True:
            transport = await self._accept_transport(deadline)
            try:
                ch = await establish(transport, self._prep, "server", deadline)
            except ProtocolError:
                self._rejected += 1
                continue
            self.accepted += 1
            return ch

    async def accept_transport(self, timeout: float | None = None) -> Transport:
        """Wait for the next connection *before* its handshake (see :meth:`establish`)."""
        return await self._accept_transport(deadline_of(timeout))

    async def _accept_transport(self, deadline: float | None) -> Transport:
        while True:
            if self._closed:
                raise ChannelClosed("the listener is closed")
            transport = self._lt.accept()
            if transport is not None:
                return transport
            try:
                await wait_fd(self._lt.fileno(), False, deadline, "accept")
            except Timeout:
                raise Timeout(f"no peer arrived at {self.address} in time") from None

    async def establish(self, transport: Transport, timeout: float | None = None) -> Channel:
        return await establish(transport, self._prep, "server", deadline_of(timeout))

    def __enter__(self) -> Listener:
        return self

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def listen(url: str | Address, **options: Any) -> Listener:
    """Bind ``url`` (binding never waits, so this is a plain call); the options of
    :func:`buzon.listen`, ``ring_size`` for ``shm:`` included."""
    prep = prepare(url, listening=True, **options)
    return Listener(open_listener(prep.address, prep.transport), prep)


async def wait(objects: Iterable[W], timeout: float | None = None) -> list[W]:
    """The asyncio twin of :func:`buzon.wait`: channels and listeners, any transports."""
    items = list(objects)
    for o in items:
        if not hasattr(o, "_ready"):
            raise TypeError(f"buzon.aio.wait cannot wait on {type(o).__name__}")
    deadline = deadline_of(timeout)
    while True:
        ready = [o for o in items if o._ready()]  # type: ignore[attr-defined]
        if ready:
            return ready
        fds = {o.fileno() for o in items} - {-1}  # type: ignore[attr-defined]
        if not await wait_ready(fds, (), deadline):
            return []


_reduction.passable(Listener)  # pickling refused, saying why (_reduction.py)
