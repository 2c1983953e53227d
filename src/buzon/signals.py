"""Signals as messages: the simplest IPC of the lectures, without signal handlers.

Sending is :func:`send`: ``kill(2)`` for a plain signal, ``sigqueue(3)`` when a C int
``value`` rides along (any signal may carry one; only real-time signals queue, see
below). Receiving is :func:`listen`, which returns a :class:`SignalChannel`::

    with buzon.signals.listen(signal.SIGUSR1, buzon.signals.SIGRTMIN + 1) as ch:
        msg = ch.recv(timeout=5)        # a SignalMessage: signo, name, pid, uid, value, code

Theory of operation. ``listen`` blocks the signals in the calling thread
(``pthread_sigmask``), so the kernel leaves them *pending* instead of interrupting
the program, and opens a ``signalfd(2)``: a file descriptor that becomes readable
while one of them is pending and from which ``read`` dequeues them, one 128-byte
record each. No handler runs, no user code runs in signal context, and no system call
of the program is interrupted by these signals, so ``EINTR`` cannot come from them;
reads of the descriptor are retried on ``EINTR`` anyway (another signal with a
handler may interrupt them). Because the channel is a readable fd it works with
:func:`buzon.wait`, ``select``/``poll`` and asyncio (:meth:`SignalChannel.arecv`).

The semantics the lectures point at:

* **Standard signals coalesce.** The kernel keeps one pending bit per standard signal:
  two ``SIGUSR1`` sent before the receiver reads arrive as one message, carrying the
  first sender's details. They say "it happened at least once", not "how many times".
* **Real-time signals queue.** ``SIGRTMIN`` .. ``SIGRTMAX`` are queued, each with its
  own sender and value, delivered lowest number first and, for one number, in the
  order sent. The queue is bounded by the receiving user's ``RLIMIT_SIGPENDING``;
  beyond it :func:`send` raises :class:`buzon.Full`.
* **A value on a standard signal** is accepted by the kernel and read back here, but
  if the signal is already pending the second one (and its value) is dropped.
* **Who gets a process-directed signal?** Any one thread that does not block it.
  Call ``listen`` in the main thread *before* starting other threads (threads inherit
  the mask of the thread that starts them), or block the signals in every thread
  yourself. Otherwise the kernel may deliver the signal to a thread that does not
  block it: then that signal's disposition applies there (a Python handler runs in the
  main thread, ``SIG_IGN`` drops it, and ``SIG_DFL`` of most signals, ``SIGUSR1`` and
  every real-time signal included, terminates the whole process), and the channel
  never sees it. Threads started by C libraries at import time (e.g. BLAS pools) count.
* **One channel per signal**: a signal already held by an open channel in this
  process cannot be listened to again (:class:`buzon.EndpointInUse`).
* **Closing** discards the signals still pending (counted in ``statistics()``), then
  unblocks the ones ``listen`` blocked (signals the program had blocked itself stay
  blocked). A pending signal is discarded rather than unblocked because unblocking
  delivers it at once with its old disposition, usually "terminate". Close the
  channel in the thread that opened it: a thread cannot change another's mask, so
  from elsewhere the descriptor is closed but the signals stay blocked.
* **fork and exec** keep the signal mask: a child starts with these signals blocked.
  A forked child that wants them delivered normally closes its copy of the channel.
* **The sender's identity**: for ``kill`` and ``tgkill`` the kernel fills in ``pid``
  and ``uid``; for ``sigqueue`` the sender's C library does, and the kernel does not
  check them, so treat them as a claim. Only processes the sender may signal (same
  real or effective uid, or privileged) can send at all.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from . import _signalfd
from ._signalfd import (
    SI_ASYNCIO,
    SI_KERNEL,
    SI_MESGQ,
    SI_QUEUE,
    SI_SIGIO,
    SI_TIMER,
    SI_TKILL,
    SI_USER,
    name_of,
)
from .errors import (
    BuzonError,
    ChannelClosed,
    Empty,
    EndpointInUse,
    Full,
    Timeout,
    from_oserror,
)
from .sync._channel import deadline_of, wait_fds

__all__ = [
    "SIGRTMAX",
    "SIGRTMIN",
    "SI_ASYNCIO",
    "SI_KERNEL",
    "SI_MESGQ",
    "SI_QUEUE",
    "SI_SIGIO",
    "SI_TIMER",
    "SI_TKILL",
    "SI_USER",
    "SignalChannel",
    "SignalMessage",
    "SignalStatistics",
    "listen",
    "send",
]

SIGRTMIN = signal.SIGRTMIN
"""The lowest real-time signal the C library leaves to programs (34 with glibc)."""
SIGRTMAX = signal.SIGRTMAX
"""The highest real-time signal (64 on Linux)."""

_BATCH = 64  # records taken per read(2): a storm is drained in few system calls
_CARRIES_VALUE = frozenset({SI_QUEUE, SI_TIMER, SI_MESGQ})
_UNBLOCKABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})


def _check_signal(sig: int, *, allow_zero: bool) -> int:
    if isinstance(sig, bool) or not isinstance(sig, int):
        raise TypeError(f"a signal is an int or signal.Signals, not {type(sig).__name__}")
    signo = int(sig)
    if not (0 if allow_zero else 1) <= signo < signal.NSIG:
        raise ValueError(f"no such signal: {signo} (valid: 1..{signal.NSIG - 1})")
    return signo


def _translate(exc: OSError, what: str) -> BuzonError:
    """The tree's translation, plus the two errnos only signals produce."""
    if exc.errno == errno.EAGAIN:  # sigqueue: the receiver's queue is at its limit
        err: BuzonError = Full(f"{what}: the receiver's queue of pending signals is full")
        err.errno = exc.errno  # type: ignore[attr-defined]
        return err
    return from_oserror(exc, what)


def send(pid: int, sig: int | signal.Signals, value: int | None = None) -> None:
    """Send signal ``sig`` to process ``pid``; with ``value``, queue it with that int.

    * ``value is None``: ``kill(2)``. The receiver sees ``code == SI_USER`` and
      ``value is None``. ``sig == 0`` sends nothing and only checks that ``pid``
      exists and may be signalled.
    * ``value`` given: ``sigqueue(3)`` with that C int (``-2**31 .. 2**31-1``, else
      ``ValueError``). The receiver sees ``code == SI_QUEUE`` and the value. Any
      signal may carry a value; only real-time ones queue (a standard signal already
      pending is dropped with its value).

    ``pid`` must name one process (``> 0``): process groups and "every process I may
    signal" (``pid <= 0`` for ``kill``) are refused with ``ValueError``; use
    ``os.killpg`` for groups.

    Raises :class:`buzon.NoSuchEndpoint` if no such process exists (also a zombie's
    pid once reaped), :class:`buzon.PermissionDenied` if it belongs to another user,
    and :class:`buzon.Full` if a queued signal does not fit the receiver's
    ``RLIMIT_SIGPENDING``.
    """
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise TypeError(f"pid must be an int, not {type(pid).__name__}")
    if pid <= 0:
        raise ValueError(f"pid must name one process (> 0), not {pid}")
    signo = _check_signal(sig, allow_zero=True)
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"value must be an int, not {type(value).__name__}")
        if not _signalfd.INT_MIN <= value <= _signalfd.INT_MAX:
            raise ValueError(f"value {value} does not fit a C int (32 bits, signed)")
    what = f"sending {name_of(signo) if signo else 'signal 0'} to pid {pid}"
    try:
        if value is None:
            os.kill(pid, signo)
        else:
            _signalfd.sigqueue(pid, signo, value)
    except OSError as exc:
        raise _translate(exc, what) from exc


@dataclass(frozen=True, slots=True)
class SignalMessage:
    """One received signal.

    ``value`` is the int sent with it (``sigqueue``, a POSIX timer, ``mq_notify``:
    ``code`` is ``SI_QUEUE``, ``SI_TIMER`` or ``SI_MESGQ``) and ``None`` for signals
    that carry none (``kill``: ``SI_USER``; ``pthread_kill``: ``SI_TKILL``; the
    kernel: ``SI_KERNEL`` or a positive, signal-specific reason). ``pid``/``uid`` name
    the sender (for SIGCHLD the child; 0 for other signals the kernel sends).
    """

    signo: int
    name: str
    pid: int
    uid: int
    value: int | None
    code: int


@dataclass(frozen=True, slots=True)
class SignalStatistics:
    """Counters of one :class:`SignalChannel` (``statistics()`` returns a copy)."""

    received: int = 0
    """Messages returned by ``recv``/``recv_nowait``/``arecv``."""
    buffered: int = 0
    """Read from the kernel, not yet returned (``buzon.wait`` and batching read ahead)."""
    discarded: int = 0
    """Pending or buffered at ``close`` and dropped (see the module docstring)."""


class SignalChannel:
    """Signals arriving at this process, received as :class:`SignalMessage` objects.

    Made by :func:`listen`; a context manager. ``recv(timeout)`` blocks (``Timeout``),
    ``recv_nowait()`` raises :class:`buzon.Empty`, ``await arecv(timeout)`` is the
    asyncio form, and ``for msg in channel`` receives until the channel is closed.
    ``fileno()`` is readable while a signal waits, so the channel works with
    :func:`buzon.wait` and :func:`buzon.aio.wait`. Read-ahead (batched reads, and
    ``buzon.wait`` checking readiness) keeps what it read for the next receive.

    Several threads may receive from one channel. ``close`` in the thread that called
    ``listen``, and not while another thread is blocked in ``recv`` on it.
    """

    def __init__(self, grant: _signalfd.MaskGrant, fd: int) -> None:
        self._grant = grant
        self._fd = fd
        self._buf: deque[SignalMessage] = deque()
        self._lock = threading.Lock()
        self._received = 0
        self._discarded = 0

    # -- identity -----------------------------------------------------------------------

    @property
    def signals(self) -> frozenset[int]:
        """The signal numbers this channel receives."""
        return self._grant.sigs

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The signalfd (readable while a signal is pending); -1 once closed."""
        return self._fd

    def statistics(self) -> SignalStatistics:
        return SignalStatistics(self._received, len(self._buf), self._discarded)

    def __repr__(self) -> str:
        names = ", ".join(name_of(s) for s in sorted(self.signals))
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<buzon.signals.SignalChannel {names} {state}>"

    # -- receiving ----------------------------------------------------------------------

    def _fill(self) -> bool:
        """Read what the kernel has into the buffer (lock held); True if non-empty."""
        if self._buf:
            return True
        if self._fd < 0:
            raise ChannelClosed("the signal channel is closed")
        while True:
            try:
                data = os.read(self._fd, _signalfd.RECORD.size * _BATCH)
            except BlockingIOError:
                return False
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            except OSError as exc:
                raise from_oserror(exc, "reading the signalfd") from exc
            break
        for signo, code, pid, uid, value in _signalfd.records(data):
            self._buf.append(
                SignalMessage(
                    signo,
                    name_of(signo),
                    pid,
                    uid,
                    value if code in _CARRIES_VALUE else None,
                    code,
                )
            )
        return bool(self._buf)

    def _take(self) -> SignalMessage | None:
        with self._lock:
            if not self._fill():
                return None
            self._received += 1
            return self._buf.popleft()

    def recv_nowait(self) -> SignalMessage:
        """The next signal, or :class:`buzon.Empty` if none is pending."""
        msg = self._take()
        if msg is None:
            raise Empty("no signal is pending")
        return msg

    def recv(self, timeout: float | None = None) -> SignalMessage:
        """The next signal, waiting up to ``timeout`` seconds (None: forever)."""
        deadline = deadline_of(timeout)
        while True:
            msg = self._take()
            if msg is not None:
                return msg
            fd = self._fd
            if fd < 0:
                raise ChannelClosed("the signal channel is closed")
            readable, _ = wait_fds(fd, -1, True, False, deadline)
            if not readable:
                raise Timeout("no signal arrived in time")

    async def arecv(self, timeout: float | None = None) -> SignalMessage:
        """The asyncio form of :meth:`recv` (``loop.add_reader`` on the signalfd).

        Cancel-safe: a signal is taken from the channel only in the same step that
        returns it, so a cancelled ``arecv`` leaves every signal for the next receive.
        """
        from .aio._channel import wait_io  # here: importing buzon.signals needs no asyncio

        deadline = deadline_of(timeout)
        while True:
            msg = self._take()
            if msg is not None:
                return msg
            await wait_io(self._fd, -1, deadline, "receiving a signal")  # -1: ChannelClosed

    def __iter__(self) -> Iterator[SignalMessage]:
        """Receive forever; ends when the channel is closed (e.g. in the loop body)."""
        while True:
            try:
                yield self.recv()
            except ChannelClosed:
                return

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the descriptor and unblock the signals ``listen`` blocked (idempotent).

        Signals still pending or buffered are discarded and counted.
        """
        with self._lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
            self._discarded += len(self._buf)
            self._buf.clear()
            try:
                self._discarded += _signalfd.release(self._grant)
            finally:
                os.close(fd)

    def __enter__(self) -> SignalChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- used by buzon.wait and buzon.aio.wait ----------------------------------------

    def _ready(self) -> bool:
        """True if ``recv_nowait`` would not raise Empty (it may raise ChannelClosed)."""
        if self._fd < 0:
            return True
        if not self._lock.acquire(blocking=False):
            return False  # another thread is taking a signal right now
        try:
            return self._fill()  # reads ahead: what it read is kept for the next receive
        finally:
            self._lock.release()


def listen(*sigs: int | signal.Signals) -> SignalChannel:
    """Receive ``sigs`` as messages: block them in the calling thread and open a
    non-blocking, close-on-exec signalfd for them.

    Call it in the main thread before starting other threads (see the module
    docstring for what happens otherwise). ``SIGKILL`` and ``SIGSTOP`` cannot be
    received this way, nor the two signals glibc keeps for itself (32 and 33): they
    raise ``ValueError``, as does an empty list. A signal already held by another open
    channel raises :class:`buzon.EndpointInUse`.
    """
    if not sigs:
        raise ValueError("listen needs at least one signal")
    wanted = frozenset(_check_signal(s, allow_zero=False) for s in sigs)
    for s in wanted:
        if s in _UNBLOCKABLE:
            raise ValueError(f"{name_of(s)} cannot be blocked, so it cannot be received")
        if 32 <= s < SIGRTMIN:
            raise ValueError(f"signal {s} is reserved by the C library")
    try:
        grant = _signalfd.block(wanted)
    except FileExistsError as exc:
        raise EndpointInUse(str(exc.strerror)) from exc
    try:
        fd = _signalfd.open_signalfd(wanted)
    except OSError as exc:
        _signalfd.release(grant)
        raise from_oserror(exc, "opening a signalfd") from exc
    return SignalChannel(grant, fd)
