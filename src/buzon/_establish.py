"""Establishing channels, written once for both drivers: connect, handshake, admission.

Three pieces, none of which ever waits, written in the engine's vocabulary
(:class:`buzon._engine.Step`: READ/WRITE an fd, SLEEP a back-off), so the drivers run
them with the same step runner as every channel operation:

* :func:`connect_steps` opens a connector and drives it, yielding READ/WRITE steps for
  its fd or a SLEEP; it returns the transport. An endpoint that is not there yet
  (:class:`NoSuchEndpoint`, :class:`ConnectionRefused`: no socket file, nobody
  listening, a FIFO nobody reads) is tried again with a short back-off until the
  deadline, on every transport, unless ``retry=False``; the deadline then raises
  :class:`Timeout` naming the last cause.
* :func:`establish_steps` does the handshake's I/O on the channel core (each read or
  write non-blocking) and yields the READ/WRITE step it waits for when one cannot
  complete now (TLS: the direction the TLS layer asks for; reliable datagrams: until
  the peer acknowledged the handshake). The driver throws :class:`Timeout` in at the
  deadline. :class:`Establishing` runs the same steps for a listener's admission
  without waiting: :meth:`Establishing.advance` resumes them until one would wait and
  returns that :class:`Want` (an fd, a direction), or ``None`` once established.
* :class:`Admission` is a listener's accept engine: every accepted connection becomes a
  pending handshake that progresses whenever its fd is ready (one epoll fd watches
  them all and the listening socket), each with its own deadline (``handshake_timeout``
  from its arrival); finished ones queue for ``accept``. So ``accept(timeout=T)``
  bounds the wait for a connection only, a slow or silent peer delays nobody, and a
  pending handshake takes no handler slot. At most ``max_pending`` handshakes are
  pending: a new connection beyond that evicts the oldest peer that has not sent a
  whole frame yet (else the oldest), counted in :attr:`Admission.refusals`.

A refused peer is told why when its link speaks the buzon handshake (a
``WELCOME {ok: false, error, cause}``: capacity, credentials, authkey, handshake
timeout, pending eviction, a bad handshake; over TLS once the TLS handshake is done,
before that the TLS layer's own alert is all there is) and closed; a peer's handshake, however
large or malformed, never makes ``accept`` raise.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

from ._channel import DEFAULT_CAPACITY, ChannelCore
from ._engine import READ, SLEEP, WRITE, Step
from ._policy import Prepared
from .errors import (
    BuzonError,
    ConnectionRefused,
    EndOfChannel,
    FrameError,
    HandshakeError,
    NoSuchEndpoint,
    ProtocolError,
    Timeout,
)
from .protocol.frames import HANDSHAKE_MAX_FRAME
from .protocol.mpcompat import ClientAuth, ServerAuth
from .transport import open_connector
from .transport.base import ListenerTransport, PeerInfo, Transport

__all__ = [
    "DEFAULT_MAX_PENDING",
    "Admission",
    "Admit",
    "Establishing",
    "Steps",
    "Want",
    "connect_steps",
    "establish_steps",
]


def _log() -> Any:
    """The ``buzon.listener`` logger (``logging`` is imported when first needed)."""
    import logging

    return logging.getLogger("buzon.listener")


Steps = Generator[Step, None, None]
#: Asked when a server's handshake is about to succeed: a reason to refuse the peer
#: for capacity (``max_clients``), or None to let it in.
Admit = Callable[[], "str | None"]

#: Handshakes a listener keeps pending at once (``listen(max_pending=)``).
DEFAULT_MAX_PENDING = 64

_RETRY_BACKOFF = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
#: How long a refused peer's link stays open, its input read and dropped, so the
#: peer reads the refusal before the end (and a TCP close sends no reset).
_LINGER = 1.0
_NOT_THERE_YET = (NoSuchEndpoint, ConnectionRefused)


class Want(NamedTuple):
    """What a step waits for: ``fd`` readable (or writable with ``write``); -1: only time."""

    fd: int
    write: bool


# -- connecting ---------------------------------------------------------------------


def _retry_delay(
    attempt: int, deadline: float | None, address: object, cause: BaseException | None
) -> float:
    """A short back-off before trying again, never past the deadline (which raises)."""
    delay = _RETRY_BACKOFF[min(attempt, len(_RETRY_BACKOFF) - 1)]
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            why = f": {cause}" if cause is not None else " (no reader/listener yet)"
            raise Timeout(f"connecting to {address} timed out{why}") from cause
        delay = min(delay, remaining)
    return delay


def connect_steps(
    prep: Prepared, deadline: float | None, retry: bool
) -> Generator[Step, None, Transport]:
    """Open ``prep.address``'s connector and drive it to a transport (see the module
    docstring). The driver throws :class:`Timeout` in when a wait reaches
    ``deadline``."""
    address = prep.address
    attempt = 0
    cause: BuzonError | None = None
    while True:
        try:
            connector = open_connector(address, prep.transport)
        except _NOT_THERE_YET as exc:
            cause = exc
        else:
            try:
                while (transport := connector.step()) is None:
                    if connector.want == "retry":  # no fd tells when (a full backlog)
                        delay = _retry_delay(attempt, deadline, address, None)
                        yield Step(SLEEP, budget=delay, what="connect")
                        attempt += 1
                    else:
                        kind = WRITE if connector.want == "write" else READ
                        yield Step(kind, connector.fileno(), what="connect")
                return transport
            except _NOT_THERE_YET as exc:
                cause = exc
            except Timeout:
                why = f": {cause}" if cause is not None else ""
                raise Timeout(f"connecting to {address} timed out{why}") from cause
            finally:
                connector.close()
        assert cause is not None
        if not retry:
            raise cause
        yield Step(SLEEP, budget=_retry_delay(attempt, deadline, address, cause), what="connect")
        attempt += 1


# -- the handshake ------------------------------------------------------------------


def establish_steps(
    core: ChannelCore,
    prep: Prepared,
    role: str,
    admit: Admit | None = None,
    heard: Callable[[], None] | None = None,
) -> Steps:
    """All the I/O needed before ``core`` may carry messages (possibly none).

    ``admit`` (servers): asked just before the handshake succeeds; a reason it returns
    refuses the peer with cause ``capacity``. ``heard``: called when the peer's first
    whole frame (or bytes) arrived.
    """
    io = _HandshakeIO(core, heard)
    if core.transport.tls_pending:
        yield from _tls_handshake(core)
    if prep.compat == "multiprocessing":
        if prep.authkey is not None:
            yield from _mp_auth(core, prep, role, io)
    elif prep.handshake:
        yield from _buzon_handshake(core, prep, role, admit, io)
    if core.acked:
        # Reliable datagrams: stay until the peer has acknowledged our side of the
        # handshake. Only this process can retransmit it, and after returning it may
        # not call buzon again for a while (a server between accept and recv, or a
        # peer in this very process, blocked waiting for exactly that datagram).
        try:
            while not core.flush():  # acks make the write fd *readable*
                yield Step(READ, core.write_fileno(), what="handshake")
        except Timeout:
            raise HandshakeError(
                "the peer did not acknowledge the handshake in time (is it still there?)"
            ) from None
        except EndOfChannel as exc:  # the peer went silent for dead_peer_timeout
            raise HandshakeError(f"the peer never acknowledged the handshake: {exc}") from None


class _HandshakeIO:
    """The handshake's reads and writes on a core, as steps (never waiting)."""

    def __init__(self, core: ChannelCore, heard: Callable[[], None] | None) -> None:
        self.core = core
        self.heard = heard

    def write(self, data: bytes) -> Steps:
        core = self.core
        while not core.write_control(data):
            # (on reliable datagrams room comes with acks: the write fd is *readable*)
            yield Step(READ if core.acked else WRITE, core.write_fileno(), what="handshake")
        while core.pending and not core.flush():  # a partial write to finish
            yield Step(WRITE, core.write_fileno(), what="handshake")

    def frame(self) -> Generator[Step, None, Any]:
        core = self.core
        while (frame := core.poll_frame(control=True)) is None:
            yield Step(READ, core.read_fileno(), what="handshake")
        self._heard()
        return frame

    def data(self) -> Generator[Step, None, bytes]:
        core = self.core
        while (data := core.read_control()) is None:
            yield Step(READ, core.read_fileno(), what="handshake")
        self._heard()
        return data

    def _heard(self) -> None:
        if self.heard is not None:
            self.heard()
            self.heard = None


def _tls_handshake(core: ChannelCore) -> Steps:
    """Drive the TLS handshake: the transport says which way to wait."""
    transport: Any = core.transport
    try:
        while (want := transport.handshake_step()) is not None:
            kind = WRITE if want == "write" else READ
            yield Step(kind, core.read_fileno(), what="TLS handshake")
    except Timeout:
        raise HandshakeError("TLS handshake timed out") from None
    except EndOfChannel:
        raise HandshakeError("the peer closed the connection during the TLS handshake") from None
    core.peer = transport.peer


def _buzon_handshake(
    core: ChannelCore, prep: Prepared, role: str, admit: Admit | None, io: _HandshakeIO
) -> Steps:
    from .protocol.handshake import NONCE_SIZE, Handshake, agreed_capacity  # msgspec: lazily

    opts = prep.channel
    options: dict[str, Any] = {"codec": opts.codec, "pickle": opts.pickle}
    if opts.capacity != DEFAULT_CAPACITY:
        options["capacity"] = opts.capacity
    options.update(opts.hello)  # what the application announces (an RPC server's instance)
    hs = Handshake(
        role,
        pid=os.getpid(),
        options=options,
        authkey=prep.authkey,
        nonce=os.urandom(NONCE_SIZE) if prep.authkey is not None else b"",
    )
    decoder = core.decoder  # None on message links: each frame is one message there
    if decoder is not None:
        decoder.max_frame = HANDSHAKE_MAX_FRAME
    try:
        yield from io.write(hs.outgoing())
        while not hs.done:
            try:
                frame = yield from io.frame()
            except FrameError as exc:  # too large, or not a frame at all
                if role != "server":
                    raise
                refusal = hs.refuse(f"bad handshake frame: {exc}", "handshake")
                try:
                    yield from io.write(hs.outgoing())
                except BuzonError:
                    pass
                raise refusal from None
            try:
                hs.receive(frame)
                if hs.done and admit is not None and (reason := admit()) is not None:
                    raise hs.refuse(reason, "capacity")
            finally:
                out = hs.outgoing()
                if out:
                    try:
                        yield from io.write(out)
                    except BuzonError:
                        pass  # the peer is gone; the error already raised matters more
    except EndOfChannel:
        if role == "client":  # refused before the server read our HELLO: hear why
            try:
                frame = yield from io.frame()
            except BuzonError:
                frame = None
            if frame is not None:
                hs.receive(frame)  # a WELCOME {ok: false} raises the server's reason
        hint = "is an authkey required? " if prep.authkey is None else ""
        raise HandshakeError(
            f"the peer closed the connection during the handshake ({hint}is it a buzon endpoint?)"
        ) from None
    except Timeout:
        if role == "server":  # tell the peer, in case it is merely slow
            refusal = hs.refuse(
                f"handshake timed out after {opts.handshake_timeout:g} s", "timeout"
            )
            try:
                yield from io.write(hs.outgoing())
            except BuzonError:
                pass
            raise refusal from None
        raise HandshakeError(
            f"handshake timed out after {opts.handshake_timeout:g} s "
            "(is the peer a buzon endpoint?)"
        ) from None
    if decoder is not None:
        decoder.max_frame = opts.max_frame
    assert hs.peer is not None
    stated, capacity = agreed_capacity(options, hs.peer.opts)
    if stated and opts.capacity == DEFAULT_CAPACITY:
        core.set_capacity(capacity)  # the peer stated it; this end adopts it
    peer = core.peer
    core.peer = PeerInfo(
        pid=peer.pid if peer.pid is not None else hs.peer.pid,
        uid=peer.uid,
        gid=peer.gid,
        address=peer.address,
        extra={**peer.extra, "hello_pid": hs.peer.pid, "options": dict(hs.peer.opts)},
    )


def _mp_auth(core: ChannelCore, prep: Prepared, role: str, io: _HandshakeIO) -> Steps:
    """The ``multiprocessing.connection`` challenge/response, both ways."""
    assert prep.authkey is not None
    auth: ServerAuth | ClientAuth = (ServerAuth if role == "server" else ClientAuth)(
        prep.authkey, os.urandom
    )
    try:
        while True:
            for msg in auth.outgoing():
                yield from io.write(msg)
            if auth.done:
                break
            data = yield from io.data()
            auth.receive_data(data)
    except ProtocolError:
        for msg in auth.outgoing():  # e.g. #FAILURE#, so the peer learns why
            try:
                yield from io.write(msg)
            except BuzonError:
                break
        raise
    except (EndOfChannel, Timeout) as exc:
        raise HandshakeError(f"multiprocessing authkey exchange failed: {exc}") from None
    if auth.unused_data:
        assert core.decoder is not None
        core.decoder.feed(auth.unused_data)


class Establishing:
    """One end's handshake (:func:`establish_steps`), run without ever waiting.

    :meth:`advance` resumes the steps until one would wait and returns what to wait
    for before calling it again, or ``None`` when the channel is established; it
    raises what the handshake raises. Once ``deadline`` has passed, a step that would
    wait gets :class:`Timeout` thrown in instead (the handshake turns it into its own
    error, after telling a server's peer).
    """

    def __init__(
        self,
        core: ChannelCore,
        prep: Prepared,
        role: str,
        deadline: float,
        admit: Admit | None = None,
    ) -> None:
        self.core = core
        self.deadline = deadline
        #: True once the peer sent a whole frame (a silent peer is evicted first)
        self.heard = False
        self._steps = establish_steps(core, prep, role, admit, self._heard)

    def _heard(self) -> None:
        self.heard = True

    def advance(self) -> Want | None:
        error: BaseException | None = None
        while True:
            try:
                step = self._steps.throw(error) if error is not None else next(self._steps)
            except StopIteration:
                return None
            error = None
            if time.monotonic() >= self.deadline:
                error = Timeout(f"{step.what} timed out")
                continue
            return Want(step.fd, step.kind == WRITE)


# -- admission ------------------------------------------------------------------------


class _Pending:
    __slots__ = ("est", "events", "fd", "overdue")

    def __init__(self, est: Establishing) -> None:
        self.est = est
        self.fd = -1
        self.events = 0
        self.overdue = False  # its deadline passed: whatever it fails with, a timeout


class Admission:
    """A listener's pending handshakes, progressed together without waiting.

    :meth:`fileno` (an epoll fd) is readable when :meth:`progress` may get further: a
    connection to accept or a pending handshake's fd ready. :meth:`next_wake` is the
    earliest per-peer deadline (progress then refuses that peer). Established channels
    queue in :attr:`ready`. ``admit`` (set by a server) may refuse a peer whose
    handshake is about to succeed.
    """

    def __init__(self, lt: ListenerTransport, prep: Prepared, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.max_pending = max_pending
        self.admit: Admit | None = None
        self.ready: deque[ChannelCore] = deque()
        #: peers turned away, by cause (see ``buzon.protocol.handshake.CAUSES``)
        self.refusals: dict[str, int] = {}
        self._lt = lt
        self._prep = prep
        self._tell = prep.handshake  # speaks WELCOME (over TLS once its handshake is done)
        self._pending: dict[int, _Pending] = {}  # by id, in arrival (= deadline) order
        self._by_fd: dict[int, _Pending] = {}
        # refused peers being told: fd -> (core, when to close), in deadline order
        self._closing: dict[int, tuple[ChannelCore, float]] = {}
        self._ep = select.epoll()
        self._lfd = lt.fileno()
        if self._lfd >= 0:
            self._ep.register(self._lfd, select.EPOLLIN)

    @property
    def pending(self) -> int:
        """Handshakes in progress."""
        return len(self._pending)

    def fileno(self) -> int:
        return self._ep.fileno()

    def next_wake(self) -> float | None:
        """When the oldest pending handshake runs out of time, or a refused peer's
        link is to be closed (None: neither)."""
        wakes = [p.est.deadline for p in self._pending.values()][:1]
        wakes += [until for _, until in self._closing.values()][:1]
        return min(wakes, default=None)

    def progress(self) -> None:
        """Do what can be done now: step the handshakes whose fds are ready, accept
        new connections (each starts its handshake at once), refuse the overdue."""
        for fd, _ in self._ep.poll(0):
            p = self._by_fd.get(fd)
            if p is not None:
                self._advance(p)
            elif fd in self._closing:
                self._drain(fd)
        for _ in range(self.max_pending):  # a bounded batch: latency for the rest
            transport = self._lt.accept()
            if transport is None:
                break
            self._start(transport)
        now = time.monotonic()
        for p in list(self._pending.values()):
            if p.est.deadline > now:
                break
            p.overdue = True
            self._advance(p)  # past its deadline, a step that would wait times out
            if id(p) in self._pending:
                self._refuse(p, _refusal("handshake timed out", "timeout"))
        for fd, (_, until) in list(self._closing.items()):
            if until > now:
                break
            self._finish(fd)

    def screen(self, transport: Transport) -> bool:
        """A connection the listener turned away the moment it came (a peer of another
        user) is refused here, told why and counted: False. True: it may go on."""
        if not transport.refused:
            return True
        core = ChannelCore(transport, self._prep.channel, address=self._prep.address)
        self._count("credentials")
        _log().info("peer refused: %s", transport.refused)
        self._close(core, transport.refused, "credentials", linger=True)
        return False

    def count_refusal(self, exc: BaseException) -> None:
        """A handshake run outside this engine (``Listener.establish``) refused its
        peer with ``exc``: count it by cause, as this engine's own refusals are."""
        from .protocol.handshake import cause_of

        cause = cause_of(exc)
        self._count(cause)
        _log().info("peer refused (%s): %s", cause, exc)

    def _start(self, transport: Transport) -> None:
        if not self.screen(transport):
            return
        core = ChannelCore(transport, self._prep.channel, address=self._prep.address)
        if len(self._pending) >= self.max_pending:
            self._evict()
        deadline = time.monotonic() + self._prep.channel.handshake_timeout
        p = _Pending(Establishing(core, self._prep, "server", deadline, self.admit))
        self._pending[id(p)] = p
        self._advance(p)

    def _evict(self) -> None:
        """Make room: the oldest peer that has not sent a whole frame, else the oldest."""
        victim = next((p for p in self._pending.values() if not p.est.heard), None)
        if victim is None:
            victim = next(iter(self._pending.values()))
        why = (
            f"too many handshakes pending (max_pending={self.max_pending}): "
            "the oldest silent peer is turned away"
        )
        self._refuse(victim, _refusal(why, "pending"), tell=True)

    def _advance(self, p: _Pending) -> None:
        try:
            want = p.est.advance()
        except Exception as exc:  # a peer's handshake never makes accept raise
            if not isinstance(exc, BuzonError):
                _log().warning("unexpected error in a handshake", exc_info=exc)
            self._refuse(p, exc)
            return
        if want is not None:
            self._watch(p, want)
            return
        self._forget(p)
        core = p.est.core
        if (
            not self._prep.handshake
            and self.admit is not None
            and (reason := self.admit()) is not None
        ):
            self._count("capacity")  # a link without the buzon handshake: just close
            _log().info("peer refused: %s", reason)
            self._close(core)
            return
        self.ready.append(core)

    def _watch(self, p: _Pending, want: Want) -> None:
        events = select.EPOLLOUT if want.write else select.EPOLLIN
        if want.fd == p.fd:
            if events != p.events:
                self._ep.modify(p.fd, events)
                p.events = events
            return
        self._unwatch(p)
        if want.fd >= 0 and want.fd not in self._by_fd:
            self._ep.register(want.fd, events)
            self._by_fd[want.fd] = p
            p.fd, p.events = want.fd, events

    def _unwatch(self, p: _Pending) -> None:
        if p.fd >= 0:
            del self._by_fd[p.fd]
            try:
                self._ep.unregister(p.fd)
            except OSError:
                pass  # already closed
            p.fd = -1

    def _forget(self, p: _Pending) -> None:
        self._unwatch(p)
        self._pending.pop(id(p), None)

    def _refuse(self, p: _Pending, exc: BaseException, tell: bool = False) -> None:
        """Turn ``p`` away: count the cause, tell the peer if not told yet, close."""
        self._forget(p)
        from .protocol.handshake import cause_of

        cause = "timeout" if p.overdue else cause_of(exc)
        self._count(cause)
        _log().info("peer refused (%s): %s", cause, exc)
        self._close(p.est.core, str(exc) if tell else "", cause)

    def _count(self, cause: str) -> None:
        self.refusals[cause] = self.refusals.get(cause, 0) + 1

    def _close(
        self, core: ChannelCore, why: str = "", cause: str = "", linger: bool = False
    ) -> None:
        """Close a refused peer's link: say ``why`` first (best effort, never waiting)
        where the link speaks the buzon handshake, and read what it already sent (so a
        TCP close does not reset the connection before the peer reads the refusal).

        ``linger`` (a peer refused the moment it connected, before it could send its
        HELLO): keep reading and dropping its input while the listener is driven, up
        to ``_LINGER`` s or its EOF, so it reads the refusal even if it is still
        writing (a write to a closed Unix socket fails, and the client would not read).
        """
        try:
            from .protocol.handshake import refusal_frame

            tell = why and self._tell and not core.transport.tls_pending
            if tell and core.write_control(refusal_frame(why, cause)):
                core.flush()
            fd = -1 if core.message_oriented else core.read_fileno()
            if not linger and fd >= 0:
                for _ in range(16):
                    if core.read_control() is None:
                        break
                fd = -1
            if fd < 0 or fd in self._by_fd or fd in self._closing:
                core.close()
                return
            while len(self._closing) >= self.max_pending:  # bounded: the oldest go first
                self._finish(next(iter(self._closing)))
            self._ep.register(fd, select.EPOLLIN)
        except (BuzonError, OSError):
            core.close()
            return
        self._closing[fd] = (core, time.monotonic() + _LINGER)
        self._drain(fd)

    def _drain(self, fd: int) -> None:
        """Read and drop what a refused peer sent; close at its EOF."""
        core, _ = self._closing[fd]
        try:
            for _ in range(16):
                if core.read_control() is None:
                    return
        except (BuzonError, OSError):
            pass  # EOF (the peer read the refusal and left) or an error: done
        self._finish(fd)

    def _finish(self, fd: int) -> None:
        core, _ = self._closing.pop(fd)
        try:
            self._ep.unregister(fd)
        except OSError:
            pass
        core.close()

    def close(self, *, in_child: bool = False) -> None:
        """Drop every pending and unclaimed peer (in a forked child: only this
        process's copies, leaving the parent's links alone) and the epoll fd."""
        cores = [p.est.core for p in self._pending.values()] + list(self.ready)
        cores += [core for core, _ in self._closing.values()]
        self._pending.clear()
        self._by_fd.clear()
        self._closing.clear()
        self.ready.clear()
        for core in cores:
            if in_child:
                core.transport.close_in_parent()  # (the parent keeps them)
            else:
                core.close()
        self._ep.close()


def _refusal(why: str, cause: str) -> Any:
    """A :class:`~buzon.protocol.handshake.Refusal` (imported when first needed:
    msgspec is not loaded by ``import buzon``)."""
    from .protocol.handshake import Refusal

    return Refusal(why, cause)
