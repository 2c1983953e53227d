"""Opening channels with the blocking driver: ``pipe``, ``connect``, ``listen``, ``wait``."""

from __future__ import annotations

import os
import select
import threading
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
from ._channel import Channel, deadline_of, run_steps, wait_fds

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


def connect(
    url: str | Address, timeout: float | None = None, *, retry: bool = True, **options: Any
) -> Channel:
    """Connect to the endpoint at ``url`` and return a :class:`Channel`.

    ``timeout`` bounds the whole connection, handshake included. An endpoint that is
    not there yet (no socket file or queue, nobody listening, a FIFO nobody reads) is
    tried again until ``timeout`` (for ever with None), on every transport; the
    deadline raises :class:`Timeout` naming the cause. ``retry=False`` raises the cause
    (:class:`NoSuchEndpoint`, :class:`ConnectionRefused`) at once. Keyword options:
    ``url`` may be ``name:NAME``, the address registered under NAME (:mod:`buzon.names`).
    ``codec``, ``pickle``, ``raw``, ``authkey``, ``compat``, ``spin``, ``max_frame``,
    ``handshake_timeout``, ``allow_uids``, ``capacity`` (0, N or None; both ends must
    agree if both state it), ``max_queue``, ``reliable`` (udp/unixgram: docs/reliable.md).
    """
    prep = prepare(url, listening=False, **options)
    deadline = deadline_of(timeout)
    transport = run_steps(connect_steps(prep, deadline, retry), deadline)
    return establish(transport, prep, "client", deadline)


def establish(
    transport: Transport,
    prep: Prepared,
    role: str,
    deadline: float | None,
    admit: Admit | None = None,
) -> Channel:
    """Wrap a fresh transport in a channel, running the handshake where there is one
    (bounded by ``handshake_timeout`` and ``deadline``; ``admit``: a server's check)."""
    core = ChannelCore(transport, prep.channel, address=prep.address)
    hs_deadline = time.monotonic() + prep.channel.handshake_timeout
    if deadline is not None:
        hs_deadline = min(hs_deadline, deadline)
    try:
        run_steps(establish_steps(core, prep, role, admit), hs_deadline)
    except BaseException:
        core.close()
        raise
    return Channel(core)


_LWAKE_LOCK = threading.Lock()  # listeners' wake fds and sleeper counts (never held long)


def _new_lock_in_child() -> None:
    global _LWAKE_LOCK
    _LWAKE_LOCK = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_new_lock_in_child)


class Listener(ListenerBase):
    """A bound endpoint. ``accept`` returns one :class:`Channel` per connecting peer
    (for FIFOs, queues and datagram sockets: the endpoint's single channel, once)."""

    def accept(self, timeout: float | None = None) -> Channel:
        """The next peer's channel, handshake done. ``timeout`` bounds the wait for a
        connection only: handshakes run concurrently, each bounded by its own
        ``handshake_timeout``, and one still running when ``timeout`` passes is
        returned by a later ``accept``. A peer that fails its handshake is refused
        (told why, counted in :attr:`refusals`) and never makes ``accept`` raise."""
        deadline = deadline_of(timeout)
        while True:
            core = self._take()
            if core is not None:
                return Channel(core)
            self._sleep(self.fileno(), self._wake_at(deadline))

    # close() from another thread ends a blocked accept (as a channel's, see
    # Channel._enter_wait): a wake eventfd made at the first sleep, polled with the fd
    _wake = -1
    _wake_pid = 0
    _closing = False
    _sleepers = 0

    def _sleep(self, fd: int, deadline: float | None) -> bool:
        """Wait until ``fd`` is readable (True) or ``deadline`` (False); a close() in
        another thread ends the wait with ChannelClosed."""
        wake = self._wait_enter()
        try:
            readable, _ = wait_fds(fd, -1, True, False, deadline, wake)
        finally:
            self._wait_leave()
        if self._closing:
            raise ChannelClosed("the listener is closed")
        return readable

    def _wait_enter(self) -> int:
        """This thread is about to sleep on the listener's fd (``accept``,
        ``buzon.wait``): count it in and return the wake fd to poll along with it;
        ChannelClosed if a close() began. Pair with :meth:`_wait_leave`."""
        with _LWAKE_LOCK:
            if self._closing:
                raise ChannelClosed("the listener is closed")
            if self._wake < 0 or self._wake_pid != os.getpid():  # none yet, or a fork's
                if self._wake >= 0:  # the parent's copy: its sleepers are not ours
                    os.close(self._wake)
                    self._sleepers = 0
                self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._wake_pid = os.getpid()
            self._sleepers += 1
            return self._wake

    def _wait_leave(self) -> None:
        with _LWAKE_LOCK:
            self._sleepers -= 1
        if self._closing:
            self._drop_wake()

    def _drop_wake(self) -> None:
        with _LWAKE_LOCK:
            wake = self._wake
            if wake < 0 or self._sleepers or self._wake_pid != os.getpid():
                return
            self._wake = -1
        os.close(wake)

    def close(self) -> None:
        """Stop listening (see :meth:`ListenerBase.close`); a thread blocked in
        :meth:`accept` wakes and raises :class:`ChannelClosed`, and the listening fd is
        released after it left (bounded: 1 s)."""
        with _LWAKE_LOCK:
            self._closing = True
            wake = self._wake if self._wake_pid == os.getpid() else -1
        if wake >= 0:
            os.eventfd_write(wake, 1)
            end = time.monotonic() + 1.0
            while self._sleepers and time.monotonic() < end:
                time.sleep(0.0002)
        super().close()
        self._drop_wake()

    def accept_transport(self, timeout: float | None = None) -> Transport:
        """Wait for the next connection *before* its handshake; finish it with
        :meth:`establish` (a fork-per-client server's two halves). Admission applies
        as in :meth:`accept`: a peer the listener turns away at once (another user) is
        refused and told here, and ``establish`` counts its refusals; what the caller
        runs itself is not bounded by ``max_pending`` (:meth:`accept` runs handshakes
        concurrently: prefer it)."""
        return self._accept_transport(deadline_of(timeout))

    def _accept_transport(self, deadline: float | None) -> Transport:
        if self._closed:
            raise ChannelClosed("the listener is closed")
        while True:
            transport = self._lt.accept()
            if transport is not None:
                if self._screen(transport):
                    return transport
                continue
            readable = self._sleep(self._lt.fileno(), deadline)
            if self._closed:
                raise ChannelClosed("the listener is closed")
            if not readable:
                raise Timeout(f"no peer arrived at {self.address} in time")

    def establish(self, transport: Transport, timeout: float | None = None) -> Channel:
        """Run the server side of the handshake on an accepted transport (a refused
        peer is told why, and counted in :attr:`refusals`)."""
        try:
            return establish(transport, self._prep, "server", deadline_of(timeout), self._admit)
        except BaseException as exc:
            self._refused(exc)
            raise

    def __enter__(self) -> Listener:
        return self


def listen(
    url: str | Address,
    *,
    max_pending: int = DEFAULT_MAX_PENDING,
    name: str | None = None,
    **options: Any,
) -> Listener:
    """Bind ``url`` and return a :class:`Listener` (a context manager).

    ``max_pending``: handshakes in progress at once; a connection beyond that evicts
    the oldest peer that has sent nothing yet (see ``docs/semantics.md``).
    Keyword options as for :func:`connect`, plus ``backlog``, ``insecure``,
    ``mq_maxmsg`` and ``mq_msgsize``, and for ``shm:`` ``ring_size``: the bytes of each
    of the two rings every accepted peer gets (a power of two from 4 KiB to 1 GiB;
    default :data:`buzon.transport.shm.CAPACITY`, 4 MiB). It is a listener option only
    (the listener creates the rings); ``connect`` and other transports refuse it.
    ``name``: also register the real address under this name (:mod:`buzon.names`;
    ``EndpointInUse`` if a live process holds it); the name goes with :meth:`close`.
    ``url`` may be ``name:NAME``: binds ``unix:NAME`` and registers NAME.
    """
    if name is not None or is_name(url):
        from ..names import bind, listen_address

        addr, reg = listen_address(url, name)
        listener = listen(addr, max_pending=max_pending, **options)
        return bind(listener, reg) if reg is not None else listener
    prep = prepare(url, listening=True, **options)
    return Listener(open_listener(prep.address, prep.transport), prep, max_pending)


def wait(objects: Iterable[W], timeout: float | None = None) -> list[W]:
    """Wait until some of ``objects`` (channels, listeners, any mix of transports)
    are ready and return those: a channel whose ``recv_nowait`` would not raise
    :class:`Empty` (it may raise ``EndOfChannel``), a listener whose ``accept`` has a
    peer waiting. An empty list means the timeout passed.
    """
    items, slices = waitables(objects, "buzon.wait")
    deadline = deadline_of(timeout)
    # objects another thread may close under the wait (channels, listeners): counted in
    # as sleepers, their wake fds polled too (see Channel._enter_wait)
    closable = list({id(o): o for o in items if hasattr(o, "_wait_enter")}.values())
    while True:
        ready = [o for o in items if o._ready()]  # type: ignore[attr-defined]
        if ready:
            unready(items)
            return ready
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            unready(items)
            return []
        fds = {o.fileno() for o in items}  # type: ignore[attr-defined]
        entered: list[Any] = []
        closed: list[Any] = []
        try:
            for o in closable:
                try:
                    fds.add(o._wait_enter())
                except ChannelClosed:  # a close() began: it is ready (its calls raise)
                    closed.append(o)
                    continue
                entered.append(o)
            if closed:
                unready(items)
                return [o for o in items if any(o is c for c in closed)]
            poller = select.poll()
            for fd in fds:
                if fd >= 0:
                    poller.register(fd, select.POLLIN)
            wake = wake_at(items, deadline, slices, now)
            if wake is None:
                poller.poll()
            else:
                poller.poll(max(0, int((wake - now) * 1000 + 0.999)))
        finally:
            for o in entered:
                o._wait_leave()


_reduction.passable(Listener)  # passes to child processes (_reduction.py)
