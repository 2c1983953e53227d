"""Reliable datagram channels: :mod:`buzon.protocol.reliable` over one datagram socket.

``reliable=True`` on ``udp://`` and ``unixgram:`` addresses turns the datagram socket
into a connection-oriented, reliable, ordered message link (see ``docs/reliable.md``).
The protocol is sans-IO; this module is its I/O, and like every transport it never
waits.

Theory of operation
-------------------
An :class:`_Endpoint` owns one socket and the protocol state behind it: a
:class:`ReliableServer` (listening side) or one :class:`ReliableConnection` (connecting
side). A listener's endpoint is shared by the listener and every channel it accepted:
all peers talk to the one bound socket. Whoever needs progress *pumps* the endpoint
(:meth:`_Endpoint.pump`): read every datagram the socket holds and route it (a
datagram for another channel lands in that channel's protocol buffer), run the
protocol timers that are due, send what the protocol wants sent. A pump never waits.

The drivers only know how to wait on a read fd, so each channel's read fd is an
**epoll fd** over three things, and is readable exactly when a receive may progress:

* the shared socket (input for some channel of the endpoint: pump it);
* the endpoint's **timerfd**, armed at the protocol's next deadline (retransmissions,
  delayed acks, keepalives, handshake retries): the timers run in the next pump;
* the channel's own **eventfd**, set while messages (or the end, or a failure) wait
  in user space for this channel: another channel's pump may have routed them.

So a driver sleeping in ``poll``/``add_reader`` wakes for data, for timers and for
messages routed by someone else, with no protocol knowledge. What the drivers do
need is the :attr:`~buzon.transport.base.Transport.delivery_acks` contract: a sender
blocked by a full send buffer waits for *readability* (room comes back with acks),
``flush`` waits for :meth:`ReliableTransport.delivered`, ``close`` shuts down (FIN)
and lingers until delivered.

A dead peer needs nothing more from the drivers. Its deadline is a protocol timer
(the timerfd wakes every waiter); once the protocol declares the connection FAILED,
the channel's *send* eventfd stays set, so a driver waiting for room or delivery
wakes, and ``send_message`` and ``delivered`` raise the failure (``EndOfChannel`` for
a silent peer). ``delivered`` never says True while a message is unacknowledged, and
``counters()["dropped"]`` is the protocol's ``messages_lost``.

Threads: one endpoint may be used by channels in several threads (a thread per
client). Its state is guarded by a lock that is only ever *tried* (never waited for,
except for the few microseconds of ``close``): a channel that finds it taken reports
"would block" and pokes its own eventfd, so its driver retries at once, while the
holder's pump routes and signals whatever arrived.

One process, both ends: a single-threaded program may hold both ends of a link (tests
do). Nothing runs a protocol while its owner is not inside a buzon call, so when a
sender would otherwise wait for acks (send buffer full, ``flush``, ``close``) it first
pumps every reliable endpoint of the process (:func:`_pump_all`), which completes the
exchange at once when the peer lives in the same process.
"""

from __future__ import annotations

import _thread  # a lock that is only tried: see "Threads" above
import ctypes
import errno
import os
import secrets
import select
import socket
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from .._runtime import check_endpoint_path, runtime_dir
from ..address import Address
from ..errors import (
    BuzonError,
    ConnectionRefused,
    EndOfChannel,
    EndpointInUse,
    NoSuchEndpoint,
    Timeout,
    UnsupportedOperation,
    from_oserror,
)
from ..protocol.reliable import (
    ReliableConfig,
    ReliableConnection,
    ReliableServer,
    State,
)
from .base import (
    Buffer,
    Connector,
    LinkProperties,
    ListenerTransport,
    MessageTransport,
    PeerInfo,
    Transport,
    TransportOptions,
)
from .tcp import is_loopback, resolve
from .udp import bind_udp
from .unix import bind_unix_path, unlink_if_ours

__all__ = [
    "DEFAULT_CONFIG",
    "ReliableConnector",
    "ReliableListener",
    "ReliableTransport",
    "connect",
    "listen",
]

_monotonic = time.monotonic

#: The protocol's limits per scheme when ``reliable=True`` (pass a ReliableConfig as
#: ``reliable=`` to choose others). UDP keeps datagrams under a typical path MTU; Unix
#: datagrams never cross a network, so they carry 16 KiB (a socket buffer holds few,
#: larger datagrams: ``net.unix.max_dgram_qlen`` is 10).
#:
#: * A window of 256 segments bounds what is in flight (about 340 KiB over UDP: what
#:   socket buffers hold without overflowing), and so the largest message (320 KiB).
#: * No congestion control: flow control (that window) alone paces the sender. Loss
#:   on these links is noise (a lossy radio, a full buffer), and halving the window
#:   for every burst made a 3 % bursty loss cost 10x the throughput. On a shared
#:   network pass ``ReliableConfig(congestion_control=True)``.
#: * ``dead_peer_timeout`` is longer than the protocol's default because the protocol
#:   only runs while its process is inside a buzon call (there is no background thread).
#: * A first RTO of 50 ms (not 200) and a 10 s handshake (the channel's
#:   ``handshake_timeout``): bursty loss takes several handshake datagrams in a row,
#:   and hosts that share a LAN answer in well under 50 ms.
DEFAULT_CONFIG: dict[str, ReliableConfig] = {
    "udp": ReliableConfig(
        recv_window=256,
        max_message=320 * 1024,
        congestion_control=False,
        initial_rto=0.05,
        handshake_timeout=10.0,
        dead_peer_timeout=30.0,
    ),
    "unixgram": ReliableConfig(
        max_datagram=16384,
        recv_window=256,
        congestion_control=False,
        initial_rto=0.05,
        handshake_timeout=10.0,
        dead_peer_timeout=30.0,
    ),
}

_SOCKET_BUFFER = 4 << 20  # asked for; the kernel caps it at net.core.[rw]mem_max
_READ_BATCH = 256  # datagrams read per pump before the protocol answers
_HELD_MAX = 4096  # datagrams kept while the socket says EAGAIN (then dropped: resent)
_HELD_RETRY = 0.001  # seconds before retrying held datagrams
_FIN_GRACE = 0.25  # a close whose data is all acked waits this long for the FIN's ack

_live: weakref.WeakSet[_Endpoint] = weakref.WeakSet()


def _forking() -> None:
    # After a fork both processes hold every endpoint; whichever uses a channel pumps
    # its endpoint, but neither may pump the others behind its back (it would steal
    # datagrams meant for the other process, whose protocol state has diverged).
    for ep in list(_live):
        ep.forked = True


os.register_at_fork(before=_forking)


# -- timerfd (os.timerfd_create from Python 3.13; libc before) --------------------------

_CLOCK_MONOTONIC = 1  # time.monotonic() reads this clock on Linux
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc: Any = None


def _timerfd_create() -> int:
    create = getattr(os, "timerfd_create", None)
    if create is not None:  # pragma: no cover - Python 3.13+
        fd: int = create(_CLOCK_MONOTONIC, flags=os.O_NONBLOCK | os.O_CLOEXEC)
        return fd
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.c_void_p,
        ]
        _libc = libc
    fd = _libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise from_oserror(OSError(err, os.strerror(err)), "timerfd_create")
    return int(fd)


class _Timer:
    """A timerfd that becomes readable at the protocol's next deadline.

    Re-arming costs a system call, so it is only moved *earlier*: a later deadline
    leaves the earlier alarm in place, which then fires early, finds nothing due, and
    the pump re-arms it. At most one spurious wake-up per deadline moved.
    """

    def __init__(self) -> None:
        self.fd = _timerfd_create()
        self.armed: float | None = None
        self._settime = getattr(os, "timerfd_settime", None)

    def arm(self, deadline: float) -> None:
        if self.armed is not None and self.armed <= deadline:
            return
        self.armed = deadline
        deadline = max(deadline, 1e-6)  # 0 would disarm
        if self._settime is not None:  # pragma: no cover - Python 3.13+
            self._settime(self.fd, flags=_TFD_TIMER_ABSTIME, initial=deadline)
            return
        sec = int(deadline)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((deadline - sec) * 1e9)))
        if _libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
            err = ctypes.get_errno()
            raise from_oserror(OSError(err, os.strerror(err)), "timerfd_settime")

    def check(self, now: float) -> None:
        """Consume an expiry that is due (so the fd stops being readable)."""
        if self.armed is not None and now >= self.armed:
            self.armed = None
            try:
                os.read(self.fd, 8)
            except BlockingIOError:
                pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- readiness: one epoll fd per waiter --------------------------------------------------


class _Wake:
    """An epoll fd over the endpoint's socket, its timer and an eventfd of our own.

    The eventfd is set while this waiter has a reason to run that the socket and the
    timer do not show (messages routed here by someone else's pump, room freed by acks
    someone else read); it is changed under the endpoint's lock, so no wake-up is lost.

    ``poked``: the endpoint was busy when the owner tried; it must retry at once, and
    nobody but the owner (on its next attempt) may clear that. ``waiting``: the owner
    sleeps until acks arrive for it (a full send buffer, flush, a lingering close).
    """

    def __init__(self, ep: _Endpoint) -> None:
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._signalled = False
        self.poked = False
        self.waiting = False
        try:
            self._epoll = select.epoll()
            for fd in (ep.fd, ep.timer.fd, self._efd):
                self._epoll.register(fd, select.EPOLLIN)
        except BaseException:
            os.close(self._efd)
            raise
        self.fd = self._epoll.fileno()

    def signal(self, on: bool) -> None:
        on = on or self.poked
        if on == self._signalled or self._efd < 0:
            return
        self._signalled = on
        if on:
            os.eventfd_write(self._efd, 1)
        else:
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
            if self.poked:  # a poke (lock-free, see below) raced with this clear
                self._signalled = True
                os.eventfd_write(self._efd, 1)

    def poke(self) -> None:
        """Wake the owner at once (the endpoint was busy: retry soon). Called without
        the lock: ``poked`` is set before the write, and a clear re-checks it after
        its read, so the wake-up survives any interleaving."""
        self.poked = True
        self._signalled = True
        if self._efd >= 0:
            os.eventfd_write(self._efd, 1)

    def close(self) -> None:
        if self._efd >= 0:
            self._epoll.close()
            os.close(self._efd)
            self._efd = -1
            self.fd = -1


# -- the endpoint: one socket and its protocol state -------------------------------------


class _Endpoint:
    """One datagram socket with a :class:`ReliableServer` or one client connection.

    Reference-counted: the listener and each channel hold it; the socket (and a Unix
    socket's file) goes when the last one lets go.
    """

    def __init__(
        self,
        sock: socket.socket,
        config: ReliableConfig,
        *,
        server: ReliableServer | None = None,
        client: ReliableConnection | None = None,
        connected: bool,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
            except OSError:  # pragma: no cover - some kernels refuse
                pass
        self.sock = sock
        self.fd = sock.fileno()
        self.config = config
        self.server = server
        self.client = client  # one of the two, set before _live sees us (other threads pump)
        self.connected = connected
        self.timer = _Timer()
        self.lock = _thread.allocate_lock()
        self.users = 1
        self.closed = False
        self.refused = False  # a connected UDP socket got ICMP port unreachable
        self.send_errors = 0
        self.held: deque[tuple[bytes, Hashable]] = deque()
        self.channels: dict[int, ReliableTransport] = {}  # server: conn id -> channel
        self.listener: ReliableListener | None = None
        self.deadline: float | None = None
        self.moved = 0  # datagrams read or sent, ever (progress, for _pump_all)
        self.forked = False  # shared with another process: only its own channels pump it
        self._buf = bytearray(config.max_datagram + 1)
        self._on_release = on_release
        _live.add(self)

    # -- reference counting ----------------------------------------------------------

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users > 0 or self.closed:
            return
        self.closed = True
        _live.discard(self)
        self.sock.close()
        self.timer.close()
        if self._on_release is not None:
            self._on_release()

    # -- the pump (caller holds self.lock) ---------------------------------------------

    def pump(self, now: float, caller: object = None) -> None:
        """Read and route every datagram ready, run due timers, send what is due."""
        if self.closed:
            return
        self.timer.check(now)
        touched = self._read(now)
        due = self.deadline is not None and now >= self.deadline
        self.transmit(now, None if due else touched)
        if due:  # timers may have changed any connection: refresh every waiter
            touched = self._all_conns()
        self._notify(touched, caller)

    def _all_conns(self) -> set[ReliableConnection]:
        if self.server is not None:
            return set(self.server.connections())
        return {self.client} if self.client is not None else set()

    def _read(self, now: float) -> set[ReliableConnection]:
        touched: set[ReliableConnection] = set()
        sock = self.sock
        buf = self._buf
        server = self.server
        client = self.client
        for _ in range(_READ_BATCH):
            try:
                n, addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                self.refused = True  # ICMP for an earlier datagram: nobody there (yet)
                continue
            except OSError as exc:
                raise from_oserror(exc, "reliable datagram receive") from exc
            self.moved += 1
            data = bytes(buf[:n])
            if server is not None:
                conn = server.receive_datagram(data, addr, now)
                if conn is not None:
                    touched.add(conn)
            elif client is not None:
                client.receive_datagram(data, now)
                touched.add(client)
        return touched

    def transmit(self, now: float, only: Iterable[ReliableConnection] | None) -> None:
        """Send what the protocol has for ``only`` (None: everyone, timers included)."""
        out: list[tuple[bytes, Hashable]]
        # the connections whose timers run here: one may fail (its peer is dead), and a
        # server forgets it at once, so keep them to wake that channel's waiters below
        asked: list[ReliableConnection] = []
        for _ in range(8):  # a server's deadline is -inf while it has replies queued
            asked.extend(self._all_conns() if only is None else only)
            if self.server is not None:
                out = self.server.datagrams_to_send(now, only)
                self.deadline = self.server.next_deadline()
                if self.listener is None:
                    self._refuse_unaccepted()
            else:
                assert self.client is not None
                out = [(d, None) for d in self.client.datagrams_to_send(now)]
                self.deadline = self.client.next_deadline()
            if out or self.held:
                self._send_all(out)
            if self.deadline is None or self.deadline > now:
                break
            only = None
        if self.held:
            retry = now + _HELD_RETRY
            if self.deadline is None or retry < self.deadline:
                self.deadline = retry
        if self.deadline is not None:
            self.timer.arm(self.deadline)
        failed = [conn for conn in asked if conn.state is State.FAILED]
        if failed:
            self._notify(failed, None)  # wake all its waiters: each of them raises

    def _refuse_unaccepted(self) -> None:
        """The listener is closed: peers that still complete a handshake are reset."""
        assert self.server is not None
        while (conn := self.server.accept()) is not None:
            conn.abort("the listener is closed")

    def _send_all(self, out: list[tuple[bytes, Hashable]]) -> None:
        held = self.held
        blocked: set[Hashable] = set()
        if held:
            retry = list(held)
            held.clear()
            out = retry + out
        sock = self.sock
        for data, addr in out:
            if addr in blocked:
                held.append((data, addr))
                continue
            try:
                if self.connected:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)  # type: ignore[call-overload]
                self.moved += 1
            except (BlockingIOError, InterruptedError):
                blocked.add(addr)
                held.append((data, addr))
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    blocked.add(addr)
                    held.append((data, addr))
                elif exc.errno == errno.ECONNREFUSED:
                    self.refused = True
                else:  # the peer's socket is gone (ENOENT...): the protocol times out
                    self.send_errors += 1
        while len(held) > _HELD_MAX:
            held.popleft()  # lost like on a network: the protocol retransmits
            self.send_errors += 1

    def _notify(self, touched: Iterable[ReliableConnection], caller: object) -> None:
        """Refresh the eventfds of the waiters this pump may have given work to (the
        caller's too: another thread may wait on its other side)."""
        if self.server is not None:
            channels = self.channels
            for conn in touched:
                ch = channels.get(conn.local_id)
                if ch is not None and ch._conn is conn:
                    ch.refresh()
            listener = self.listener
            if listener is not None:
                listener.wake.signal(self.server.acceptable > 0)
        else:
            for ch in self.channels.values():
                ch.refresh()

    def try_pump(self) -> None:
        if self.closed or not self.lock.acquire(False):
            return
        try:
            self.pump(_monotonic())
        finally:
            self.lock.release()

    def damaged(self, conn: ReliableConnection) -> int:
        if self.server is not None:
            return self.server.statistics().corrupt_dropped
        return conn.statistics().corrupt_dropped


def _pump_all() -> int:
    """Pump every reliable endpoint of this process (see "One process, both ends"),
    again while datagrams move (bounded); return how many moved."""
    total = 0
    for _ in range(64):
        endpoints = list(_live)
        before = sum(ep.moved for ep in endpoints)
        for ep in endpoints:
            if not ep.forked:
                ep.try_pump()
        moved = sum(ep.moved for ep in endpoints) - before
        if not moved:
            break
        total += moved
    return total


# -- the channel's transport -------------------------------------------------------------


def _properties(scheme: str, local: bool, config: ReliableConfig) -> LinkProperties:
    return LinkProperties(
        transport=scheme,
        direction="duplex",
        boundaries="message",
        connection_oriented=True,
        reliable=True,
        ordered=True,
        local=local,
        max_message=config.max_message,
        notes=(
            "reliable=True: acknowledged, retransmitted, ordered, CRC32C-checked "
            "datagrams; messages span datagrams; one channel per peer"
        ),
    )


class ReliableTransport(MessageTransport):
    """One reliable connection as a message transport (a channel's end)."""

    delivery_acks = True

    def __init__(
        self,
        ep: _Endpoint,
        conn: ReliableConnection,
        scheme: str,
        properties: LinkProperties,
        peer: PeerInfo,
    ) -> None:
        self._rwake = _Wake(ep)  # receivers wait on this one
        try:
            self._swake = _Wake(ep)  # senders, flush and close on this one
        except BaseException:
            self._rwake.close()
            raise
        self._ep = ep
        self._conn = conn
        self.scheme = scheme
        self.properties = properties
        self.peer = peer
        self.max_message = properties.max_message or ep.config.max_message
        self._inbox: deque[bytes] = deque()
        self._shut = False
        self._shut_at = 0.0
        self._sends = 0
        self.connecting = False  # a connector waits on read_fileno for the handshake
        self._corked = False
        self._held_bytes = 0  # queued while corked, not yet handed to the socket
        self._cork_limit = 16 * max(1, ep.config.payload_size(ep.config.max_datagram))

    def read_fileno(self) -> int:
        return self._rwake.fd

    def current_peer_address(self) -> Any:
        return self._conn.peer_addr  # moves with the peer (protocol/reliable/server.py)

    def write_fileno(self) -> int:
        return self._swake.fd  # *readable* when a send may progress (delivery_acks)

    @property
    def can_send(self) -> bool:
        return not self.closed

    @property
    def can_recv(self) -> bool:
        return not self.closed

    # -- under the endpoint's lock ---------------------------------------------------

    def has_buffered(self) -> bool:
        conn = self._conn
        return bool(
            self._inbox
            or conn.pending_messages
            or conn.peer_finished
            or conn.state is State.FAILED
            or (self.connecting and conn.state is not State.CONNECTING)
        )

    def refresh(self) -> None:
        self._rwake.signal(self.has_buffered())
        # a failed connection wakes its senders too: send, flush and close then raise
        self._swake.signal(self._swake.waiting or self._conn.state is State.FAILED)

    def _take(self, now: float) -> None:
        conn = self._conn
        if conn.pending_messages:
            self._inbox.extend(conn.messages())
            self._ep.transmit(now, (conn,))  # the window may have reopened: say so

    # -- receiving ---------------------------------------------------------------------

    def recv_message(self) -> bytes | None:
        inbox = self._inbox
        if inbox:
            return inbox.popleft()  # the eventfd is cleared under the lock only
        ep = self._ep
        wake = self._rwake
        for attempt in range(2):
            if not ep.lock.acquire(False):
                wake.poke()
                return None
            try:
                wake.poked = False
                now = _monotonic()
                ep.pump(now, self)
                self._take(now)
                msg = inbox.popleft() if inbox else None
                wake.signal(self.has_buffered())
            finally:
                ep.lock.release()
            if msg is not None:
                return msg
            self._raise_end()
            if attempt or not _pump_all():  # before the driver sleeps: a sender in this
                break  # process moves on (and a peer in this thread answers at once)
        return None

    def _raise_end(self) -> None:
        conn = self._conn
        _raise_if_failed(conn)
        if conn.peer_finished:
            raise EndOfChannel("the peer closed the channel")

    # -- sending -----------------------------------------------------------------------

    def send_message(self, bufs: Sequence[Buffer], priority: int = 0) -> bool:
        data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
        ep = self._ep
        wake = self._swake
        if not ep.lock.acquire(False):
            wake.poke()
            return False
        conn = self._conn
        try:
            wake.poked = False
            now = _monotonic()
            if conn.send_space() < _nbytes(data) and not self._make_room(now, data):
                wake.waiting = True  # woken by the acks that free room (or the failure)
                wake.signal(False)
                return False
            if wake.waiting:
                wake.waiting = False
                wake.signal(False)
            conn.send(data)
            self._sends += 1
            deadline = ep.deadline
            if deadline is not None and now >= deadline:
                ep.pump(now, self)  # acks first, then the timers (no false retransmission)
            elif conn.snd_nxt >= conn.peer_edge:
                # The peer's window is used up: messages queue in the protocol. Read the
                # acks that reopen it every 16 sends only, so what queued meanwhile goes
                # out bundled (fewer, fuller datagrams, for both sides) rather than one
                # datagram per message as the window reopens ack by ack.
                if self._sends & 15:
                    return True
                ep.pump(now, self)
            if self._corked:  # send_many: let messages gather into bundles
                self._held_bytes += _nbytes(data)
                if self._held_bytes < self._cork_limit:
                    return True
                self._held_bytes = 0
            ep.transmit(now, (conn,))
            return True
        finally:
            ep.lock.release()

    def _make_room(self, now: float, data: Buffer) -> bool:
        conn = self._conn
        _raise_if_failed(conn)
        if self._shut:
            conn.send(data)  # raises ChannelClosed
        if _nbytes(data) > conn.max_message:
            conn.send(data)  # raises MessageTooLarge before anything is queued
        self._held_bytes = 0
        self._ep.pump(now, self)  # acks free room; the timers may declare the peer dead
        self._ep.transmit(now, (conn,))  # what a cork held back
        _raise_if_failed(conn)
        if conn.send_space() >= _nbytes(data):
            return True
        self._ep.lock.release()
        try:
            _pump_all()  # the peer may be ours, in this very thread
        finally:
            self._ep.lock.acquire()  # re-taken for the caller's finally (microseconds)
        _raise_if_failed(conn)
        return conn.send_space() >= _nbytes(data)

    def cork(self, on: bool) -> None:
        self._corked = on
        if on or self.closed or not self._held_bytes:
            return
        self._held_bytes = 0
        ep = self._ep
        with ep.lock:  # held by others for microseconds only
            if not ep.closed:
                ep.transmit(_monotonic(), (self._conn,))

    def shutdown(self) -> None:
        if not self._shut:
            self._shut = True  # the FIN is queued by delivered(), under the lock
            self._shut_at = _monotonic()

    def delivered(self) -> bool:
        if self.closed:
            return True
        wake = self._swake
        for attempt in range(2):
            ep = self._ep
            if not ep.lock.acquire(False):
                wake.poke()
                return False
            try:
                wake.poked = False
                now = _monotonic()
                conn = self._conn
                if self._shut:
                    conn.close()
                ep.pump(now, self)
                if not self._done(now):
                    conn.request_ack()  # the peer's delayed ack would only cost time
                ep.transmit(now, (conn,))  # the FIN, once the window lets it go
                done = self._done(now)
                wake.waiting = not done  # woken by the acks that bring it closer
                wake.signal(conn.state is State.FAILED)  # others' sends must see it
            finally:
                ep.lock.release()
            if done or attempt:
                return done
            _pump_all()  # a peer in this process answers at once
        return False  # pragma: no cover - the loop returns

    def _done(self, now: float) -> bool:
        conn = self._conn
        if conn.state is State.FAILED:
            lost = conn.statistics().messages_lost
            if lost:  # never "delivered" while anything accepted was not acknowledged
                raise _failure(conn, f"{lost} message(s) sent were not acknowledged")
            return True  # the peer acknowledged everything before the connection ended
        if conn.state is State.CLOSED:
            return True
        if self._shut:
            # Our FIN acked. Or every message acked and only the FIN's ack missing, and
            # either the peer closed too (it may be gone already) or _FIN_GRACE passed:
            # the peer has everything, and close() then ends it with a RESET at once
            # rather than make the caller wait out close_timeout for a peer that is
            # not reading (a process busy elsewhere, or one that forked it away).
            return conn.fin_acked or (
                conn.data_acked and (conn.peer_finished or now >= self._shut_at + _FIN_GRACE)
            )
        return conn.send_buffered == 0 and conn.snd_una == conn.snd_nxt

    def counters(self) -> dict[str, int]:
        st = self._conn.statistics()
        return {
            "retransmits": st.retransmitted,
            "damaged": self._ep.damaged(self._conn),
            "dropped": st.messages_lost,
        }

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        ep = self._ep
        with ep.lock:  # held by others for microseconds only
            conn = self._conn
            if not ep.closed:
                if self._shut and not (
                    conn.fin_acked
                    or conn.state in (State.FAILED, State.CLOSED)
                    or (conn.peer_finished and conn.data_acked)
                ):  # the peer may not know the end yet: tell it now, in one datagram
                    conn.abort("closed before the peer acknowledged the end")
                else:
                    conn.close()
                ep.transmit(_monotonic(), (conn,))
            if ep.channels.get(conn.local_id) is self:
                del ep.channels[conn.local_id]
            self._rwake.close()
            self._swake.close()
            ep.release()


def _failure(conn: ReliableConnection, detail: str = "") -> BuzonError:
    """What a failed connection raises on the channel. A peer that went silent (killed,
    or the path cut) ends the channel like a closed one, with the reason: a ``Timeout``
    would read as "your timeout passed", which it is not."""
    err = conn.error
    assert err is not None
    text = f"{err}; {detail}" if detail else str(err)
    if isinstance(err, Timeout):
        return EndOfChannel(text)
    return type(err)(text)


def _raise_if_failed(conn: ReliableConnection) -> None:
    if conn.state is State.FAILED:
        raise _failure(conn)


def _nbytes(data: Buffer) -> int:
    return len(data) if isinstance(data, bytes) else memoryview(data).nbytes


# -- listening ---------------------------------------------------------------------------


class ReliableListener(ListenerTransport):
    """The bound socket: ``accept`` returns one channel per peer, all sharing it."""

    def __init__(
        self, address: Address, ep: _Endpoint, scheme: str, properties: LinkProperties
    ) -> None:
        self.wake = _Wake(ep)
        self.address = address
        self._ep = ep
        self._scheme = scheme
        self._properties = properties
        self._closed = False
        ep.listener = self

    def fileno(self) -> int:
        return self.wake.fd

    def close_in_child(self) -> None:
        raise UnsupportedOperation(
            "a reliable listener shares its one socket with every channel it accepted, and "
            "the protocol state lives in this process: serve peers with threads or asyncio"
        )

    @property
    def rejected(self) -> int:
        st = self._ep.server.statistics() if self._ep.server is not None else None
        return 0 if st is None else st.refused + st.cookies_rejected

    def accept(self) -> Transport | None:
        ep = self._ep
        if self._closed:
            return None
        if not ep.lock.acquire(False):
            self.wake.poke()
            return None
        try:
            self.wake.poked = False
            now = _monotonic()
            ep.pump(now, self)
            server = ep.server
            assert server is not None
            transport = None
            while (conn := server.accept()) is not None:
                if conn.state is State.FAILED:
                    continue
                transport = ReliableTransport(
                    ep, conn, self._scheme, self._properties, PeerInfo(address=conn.peer_addr)
                )
                ep.channels[conn.local_id] = transport
                ep.acquire()
                transport.refresh()
                break
            self.wake.signal(server.acceptable > 0)
            return transport
        finally:
            ep.lock.release()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ep = self._ep
        with ep.lock:
            ep.listener = None
            if ep.server is not None and not ep.closed:
                ep.transmit(_monotonic(), ())  # refuses peers nobody will accept
            self.wake.close()
            ep.release()


def _explain_in_use(addr: Address, exc: EndpointInUse) -> None:
    """The port may be held by a closed listener of this very process: say so."""
    for ep in list(_live):
        if ep.server is None or ep.listener is not None or ep.closed or ep.forked:
            continue
        try:
            port = ep.sock.getsockname()[1]
        except OSError:
            continue
        if port == addr.port:
            raise EndpointInUse(
                f"{exc}: a closed reliable listener of this process still has "
                f"{len(ep.channels)} accepted channel(s) open on it; they talk through its "
                "one socket, which goes with the last of them (close them first)"
            ) from exc


def _config(scheme: str, opts: TransportOptions) -> ReliableConfig:
    if isinstance(opts.reliable, ReliableConfig):
        return opts.reliable
    return DEFAULT_CONFIG[scheme]


def listen(addr: Address, opts: TransportOptions) -> ReliableListener:
    config = _config(addr.scheme, opts)
    on_release: Callable[[], None] | None = None
    if addr.scheme == "udp":
        try:
            sock, bound = bind_udp(addr)
        except EndpointInUse as exc:
            _explain_in_use(addr, exc)
            raise
        local = is_loopback(addr)
    else:
        path = addr.fs_path(opts.runtime_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            st = bind_unix_path(sock, addr, path)
        except BaseException:
            sock.close()
            raise
        bound = addr
        local = True

        def on_release() -> None:
            unlink_if_ours(path, st)

    try:
        server = ReliableServer(os.urandom, config)
        ep = _Endpoint(sock, config, server=server, connected=False, on_release=on_release)
    except BaseException:
        sock.close()
        if on_release is not None:
            on_release()
        raise
    try:
        return ReliableListener(bound, ep, addr.scheme, _properties(addr.scheme, local, config))
    except BaseException:
        ep.release()
        raise


# -- connecting --------------------------------------------------------------------------


class ReliableConnector(Connector):
    """The client handshake (SYN, cookie, SYN_ACK), driven without waiting: ``want``
    is "read" on a fd that wakes for the server's answers and for retransmissions."""

    want = "write"

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.opts = opts
        self.config = _config(addr.scheme, opts)
        self._transport: ReliableTransport | None = None

    def fileno(self) -> int:
        return self._transport.read_fileno() if self._transport is not None else -1

    def _open(self) -> ReliableTransport:
        addr = self.address
        on_release: Callable[[], None] | None = None
        if addr.scheme == "udp":
            family, sockaddr = resolve(addr, socket.SOCK_DGRAM, passive=False)
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                raise from_oserror(exc, f"connect {addr}") from exc
            local = is_loopback(addr)
        else:
            path = addr.fs_path(self.opts.runtime_dir)
            check_endpoint_path(path, must_exist=True)
            if not os.path.lexists(path):
                raise NoSuchEndpoint(f"{addr}: nothing is bound at {path!r}")
            rdir = self.opts.runtime_dir or runtime_dir()
            own = os.path.join(rdir, f"c-{os.getpid()}-{secrets.token_hex(6)}.dgram")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            st = None
            try:
                st = bind_unix_path(sock, Address("unixgram", path=own), own)
                sock.connect(path)
            except BaseException as exc:
                sock.close()
                unlink_if_ours(own, st)
                if isinstance(exc, BuzonError) or not isinstance(exc, OSError):
                    raise
                if isinstance(exc, ConnectionRefusedError):
                    raise ConnectionRefused(f"{addr}: nothing is bound at {path!r}") from exc
                raise from_oserror(exc, f"connect {addr}") from exc
            bound_st = st
            local = True

            def on_release() -> None:
                unlink_if_ours(own, bound_st)

        try:
            peer = sock.getpeername()
            conn = ReliableConnection.client(_monotonic(), os.urandom, self.config, peer_addr=peer)
            ep = _Endpoint(sock, self.config, client=conn, connected=True, on_release=on_release)
        except BaseException:
            sock.close()
            if on_release is not None:
                on_release()
            raise
        try:
            props = _properties(addr.scheme, local, self.config)
            transport = ReliableTransport(ep, conn, addr.scheme, props, PeerInfo(address=peer))
        except BaseException:
            ep.release()
            raise
        ep.channels[conn.local_id] = transport
        transport.connecting = True
        return transport

    def step(self) -> Transport | None:
        transport = self._transport
        if transport is None:
            transport = self._transport = self._open()
            self.want = "read"
        ep = transport._ep
        if not ep.lock.acquire(False):  # another thread's _pump_all: retry at once
            transport._rwake.poke()
            return None
        try:
            transport._rwake.poked = False
            now = _monotonic()
            ep.pump(now, transport)
            transport.refresh()
            conn = transport._conn
            state = conn.state
        finally:
            ep.lock.release()
        if state is State.FAILED:
            err = conn.error
            assert err is not None
            raise err
        if state is State.CONNECTING:
            if ep.refused:
                raise ConnectionRefused(f"{self.address}: nothing is listening there")
            return None
        with ep.lock:
            transport.connecting = False
            transport.refresh()
        self._transport = None  # handed over: close() no longer owns it
        return transport

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()


def connect(addr: Address, opts: TransportOptions) -> ReliableConnector:
    return ReliableConnector(addr, opts)
