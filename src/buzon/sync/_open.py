"""Opening channels with the blocking driver: ``pipe``, ``connect``, ``listen``, ``wait``."""

from __future__ import annotations

import select
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
from ..transport.base import Transport
from ._channel import Channel, deadline_of, wait_fds, wait_room

__all__ = ["Listener", "connect", "listen", "pipe", "wait"]

W = TypeVar("W")


def pipe(
    duplex: bool = True,
    *,
    codec: str | None = None,
    pickle: bool = False,
    raw: bool = False,
    spin: float | None = None,
    max_frame: int | None = None,
    capacity: int | None = DEFAULT_CAPACITY,
    max_queue: int | None = None,
) -> tuple[Channel, Channel]:
    """Two connected channels over anonymous pipes (share them with ``fork``).

    ``duplex=False`` gives (receive end, send end), like ``multiprocessing.Pipe``.
    ``codec``: "msgpack" (the default), "json", or "pickle", which ``pickle=True`` alone
    selects: both ends are this program's, so there is no stranger to refuse pickle from
    (``codec="msgpack", pickle=True`` sends msgpack and accepts pickle).
    ``capacity``: 0 (rendezvous), N (bounded) or None (unbounded); see
    ``docs/semantics.md``. Without it, the pipe's own kernel buffer bounds a send.
    """
    a, b = pipe_cores(
        duplex,
        codec=codec,
        pickle=pickle,
        raw=raw,
        spin=spin,
        max_frame=max_frame,
        capacity=capacity,
        max_queue=max_queue,
    )
    return Channel(a), Channel(b)


def connect(url: str | Address, timeout: float | None = None, **options: Any) -> Channel:
    """Connect to the endpoint at ``url`` and return a :class:`Channel`.

    ``timeout`` bounds the whole connection, handshake included. Keyword options:
    ``codec``, ``pickle``, ``raw``, ``authkey``, ``compat``, ``spin``, ``max_frame``,
    ``handshake_timeout``, ``allow_uids``, ``capacity`` (0, N or None; both ends must
    agree if both state it), ``max_queue``, ``reliable`` (udp/unixgram: docs/reliable.md).
    """
    prep = prepare(url, listening=False, **options)
    deadline = deadline_of(timeout)
    connector = open_connector(prep.address, prep.transport)
    try:
        transport = _drive_connector(connector, deadline, prep.address)
    finally:
        connector.close()
    return establish(transport, prep, "client", deadline)


def _drive_connector(connector: Any, deadline: float | None, address: Address) -> Transport:
    attempt = 0
    while True:
        transport: Transport | None = connector.step()
        if transport is not None:
            return transport
        if connector.want == "retry":
            time.sleep(retry_delay(attempt, deadline, address))
            attempt += 1
            continue
        fd = connector.fileno()
        readable, writable = wait_fds(
            fd, fd, connector.want == "read", connector.want == "write", deadline
        )
        if not readable and not writable:
            raise Timeout(f"connecting to {address} timed out")


def establish(transport: Transport, prep: Prepared, role: str, deadline: float | None) -> Channel:
    """Wrap a fresh transport in a channel, running the handshake where there is one."""
    core = ChannelCore(transport, prep.channel, address=prep.address)
    hs_deadline = time.monotonic() + prep.channel.handshake_timeout
    if deadline is not None:
        hs_deadline = min(hs_deadline, deadline)
    try:
        _run(establish_steps(core, prep, role), core, hs_deadline)
    except BaseException:
        core.close()
        raise
    return Channel(core)


def _run(steps: Steps, core: ChannelCore, deadline: float) -> None:
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
                _write_all(core, data, deadline)
            elif op == "frame":
                result = _read(core, deadline, lambda: core.poll_frame(control=True))
            elif op == "delivered":
                while not core.flush():
                    if not wait_room(core, deadline) and time.monotonic() >= deadline:
                        raise Timeout("handshake delivery timed out")
            elif op in ("wait-read", "wait-write"):
                fd = core.read_fileno()
                readable, writable = wait_fds(
                    fd, fd, op == "wait-read", op == "wait-write", deadline
                )
                if not readable and not writable:
                    raise Timeout("handshake timed out")
            else:
                result = _read(core, deadline, core.read_control)
        except BuzonError as exc:
            error = exc


def _write_all(core: ChannelCore, data: bytes, deadline: float) -> None:
    while not core.write_control(data):
        # (on reliable datagrams room comes with acks: the write fd becomes *readable*)
        wfd = core.write_fileno()
        readable, writable = wait_fds(wfd, wfd, core.acked, not core.acked, deadline)
        if not readable and not writable:
            raise Timeout("handshake write timed out")
    while core.pending:
        _, writable = wait_fds(-1, core.write_fileno(), False, True, deadline)
        if not writable:
            raise Timeout("handshake write timed out")
        core.flush()


def _read(core: ChannelCore, deadline: float, attempt: Callable[[], Any]) -> Any:
    while True:
        got = attempt()
        if got is not None:
            return got
        readable, _ = wait_fds(core.read_fileno(), -1, True, False, deadline)
        if not readable:
            raise Timeout("handshake read timed out")


class Listener(ListenerBase):
    """A bound endpoint. ``accept`` returns one :class:`Channel` per connecting peer
    (for FIFOs, queues and datagram sockets: the endpoint's single channel, once)."""

    def accept(self, timeout: float | None = None) -> Channel:
        """Wait for the next peer and return its channel (handshake done)."""
        deadline = deadline_of(timeout)
        while True:
            transport = self._accept_transport(deadline)
            try:
                ch = establish(transport, self._prep, "server", deadline)
            except ProtocolError:
                self._rejected += 1
                continue  # a peer that fails the handshake does not stop the listener
            self.accepted += 1
            return ch

    def accept_transport(self, timeout: float | None = None) -> Transport:
        """Wait for the next connection *before* its handshake; finish it with
        :meth:`establish` (in a worker), so a slow peer cannot delay the others."""
        return self._accept_transport(deadline_of(timeout))

    def _accept_transport(self, deadline: float | None) -> Transport:
        if self._closed:
            raise ChannelClosed("the listener is closed")
        while True:
            transport = self._lt.accept()
            if transport is not None:
                return transport
            readable, _ = wait_fds(self._lt.fileno(), -1, True, False, deadline)
            if self._closed:
                raise ChannelClosed("the listener is closed")
            if not readable:
                raise Timeout(f"no peer arrived at {self.address} in time")

    def establish(self, transport: Transport, timeout: float | None = None) -> Channel:
        """Run the server side of the handshake on an accepted transport."""
        return establish(transport, self._prep, "server", deadline_of(timeout))

    def __enter__(self) -> Listener:
        return self


def listen(url: str | Address, **options: Any) -> Listener:
    """Bind ``url`` and return a :class:`Listener` (a context manager).

    Keyword options as for :func:`connect`, plus ``backlog``, ``insecure``,
    ``mq_maxmsg`` and ``mq_msgsize``, and for ``shm:`` ``ring_size``: the bytes of each
    of the two rings every accepted peer gets (a power of two from 4 KiB to 1 GiB;
    default :data:`buzon.transport.shm.CAPACITY`, 4 MiB). It is a listener option only
    (the listener creates the rings); ``connect`` and other transports refuse it.
    """
    prep = prepare(url, listening=True, **options)
    return Listener(open_listener(prep.address, prep.transport), prep)


def wait(objects: Iterable[W], timeout: float | None = None) -> list[W]:
    """Wait until some of ``objects`` (channels, listeners, any mix of transports)
    are ready and return those: a channel whose ``recv_nowait`` would not raise
    :class:`Empty` (it may raise ``EndOfChannel``), a listener whose ``accept`` has a
    peer waiting. An empty list means the timeout passed.
    """
    items = list(objects)
    for o in items:
        if not hasattr(o, "_ready"):
            raise TypeError(f"buzon.wait cannot wait on {type(o).__name__}")
    deadline = deadline_of(timeout)
    while True:
        ready = [o for o in items if o._ready()]  # type: ignore[attr-defined]
        if ready:
            return ready
        poller = select.poll()
        for fd in {o.fileno() for o in items}:  # type: ignore[attr-defined]
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        if deadline is None:
            poller.poll()
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            poller.poll(max(1, int(remaining * 1000 + 0.999)))


_reduction.passable(Listener)  # passes to child processes (_reduction.py)
