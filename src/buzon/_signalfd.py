"""The OS side of :mod:`buzon.signals`: ``sigqueue(3)`` and ``signalfd(2)`` through
ctypes, the ``struct signalfd_siginfo`` record, and who blocked which signal.

The standard library can send a plain signal (``os.kill``), block signals
(``signal.pthread_sigmask``) and take a pending one synchronously
(``signal.sigtimedwait``), but it cannot send a real-time signal *with a value* nor
turn signals into a readable file descriptor. Those two calls come from the C library,
loaded once (``dlopen(NULL)``: the interpreter is already linked against it) with
``use_errno=True``; every failure is raised as an ``OSError`` carrying the C ``errno``,
for :mod:`buzon.signals` to translate at its boundary.

``read(2)`` on a signalfd returns one 128-byte record per dequeued signal (Linux
``signalfd(2)``; native byte order, no implicit padding)::

    offset  size  field          meaning here
    ------  ----  -------------  ------------------------------------------------
         0     4  ssi_signo      signal number
         4     4  ssi_errno      (unused)
         8     4  ssi_code       si_code: SI_USER, SI_QUEUE, SI_TKILL, SI_KERNEL...
        12     4  ssi_pid        sender's pid
        16     4  ssi_uid        sender's real uid
        20     4  ssi_fd         (SIGIO)
        24     4  ssi_tid        (POSIX timers)
        28     4  ssi_band       (SIGIO)
        32     4  ssi_overrun    (POSIX timers)
        36     4  ssi_trapno     (hardware faults)
        40     4  ssi_status     (SIGCHLD)
        44     4  ssi_int        the int of sigqueue(3) / timers / mq_notify
        48     8  ssi_ptr        the same union read as a pointer
        56     8  ssi_utime      (SIGCHLD)
        64     8  ssi_stime      (SIGCHLD)
        72     8  ssi_addr       (hardware faults)
        80     2  ssi_addr_lsb   (SIGBUS)
        82     2  (padding)
        84     4  ssi_syscall    (SIGSYS)
        88     8  ssi_call_addr  (SIGSYS)
        96     4  ssi_arch       (SIGSYS)
       100    28  (padding to 128)
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
import struct
import threading
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = [
    "RECORD",
    "SI_ASYNCIO",
    "SI_KERNEL",
    "SI_MESGQ",
    "SI_QUEUE",
    "SI_SIGIO",
    "SI_TIMER",
    "SI_TKILL",
    "SI_USER",
    "INT_MAX",
    "INT_MIN",
    "MaskGrant",
    "block",
    "name_of",
    "open_signalfd",
    "records",
    "release",
    "sigqueue",
]

# si_code values that say who sent a signal (<asm-generic/siginfo.h>); positive codes
# are per-signal kernel reasons (e.g. CLD_EXITED for SIGCHLD).
SI_USER = 0  # kill(2), raise from another process
SI_KERNEL = 0x80  # sent by the kernel
SI_QUEUE = -1  # sigqueue(3)
SI_TIMER = -2  # a POSIX timer expired
SI_MESGQ = -3  # a POSIX message queue became non-empty (mq_notify)
SI_ASYNCIO = -4  # asynchronous I/O completed
SI_SIGIO = -5  # queued SIGIO
SI_TKILL = -6  # tkill(2) / tgkill(2): pthread_kill, signal.raise_signal

INT_MIN = -(2**31)
INT_MAX = 2**31 - 1

RECORD = struct.Struct("=IiiIIiIIIIiiQQQQHHiQI28x")
assert RECORD.size == 128

_SIGSET_BYTES = 128  # glibc's sigset_t (1024 bits); the kernel reads the first 8


class _SigVal(ctypes.Union):
    """``union sigval``: what sigqueue(3) carries; buzon only sends the int."""

    _fields_ = (("sival_int", ctypes.c_int), ("sival_ptr", ctypes.c_void_p))


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sigqueue.argtypes = (ctypes.c_int, ctypes.c_int, _SigVal)
    libc.sigqueue.restype = ctypes.c_int
    libc.signalfd.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    libc.signalfd.restype = ctypes.c_int
    libc.sigemptyset.argtypes = (ctypes.c_void_p,)
    libc.sigemptyset.restype = ctypes.c_int
    libc.sigaddset.argtypes = (ctypes.c_void_p, ctypes.c_int)
    libc.sigaddset.restype = ctypes.c_int
    return libc


def _raise_errno(call: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{call}: {os.strerror(err)}")


def sigqueue(pid: int, sig: int, value: int) -> None:
    """Queue ``sig`` with the C int ``value`` to process ``pid`` (``OSError`` on failure)."""
    if _libc().sigqueue(pid, sig, _SigVal(sival_int=value)) == -1:
        _raise_errno("sigqueue")  # sigqueue does not wait, so it never fails with EINTR


def open_signalfd(sigs: Iterable[int]) -> int:
    """A new non-blocking, close-on-exec signalfd for ``sigs``."""
    libc = _libc()
    mask = (ctypes.c_ubyte * _SIGSET_BYTES)()
    if libc.sigemptyset(mask) == -1:
        _raise_errno("sigemptyset")
    for sig in sigs:
        if libc.sigaddset(mask, sig) == -1:
            _raise_errno("sigaddset")
    # SFD_NONBLOCK and SFD_CLOEXEC are defined as O_NONBLOCK and O_CLOEXEC
    fd: int = libc.signalfd(-1, mask, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd == -1:
        _raise_errno("signalfd")
    return fd


def records(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(signo, code, pid, uid, int value) of each 128-byte record in ``data``."""
    for rec in RECORD.iter_unpack(data):
        yield rec[0], rec[2], rec[3], rec[4], rec[11]


# -- who blocked what -----------------------------------------------------------------
#
# One signal has at most one open SignalChannel in the process, so "who receives it"
# has one answer. A channel unblocks, when it closes, only the signals that were not
# blocked before it opened: signals the program had blocked itself stay blocked.

_DRAIN_LIMIT = 1 << 20
_lock = threading.Lock()
_taken: set[int] = set()


class MaskGrant:
    """What :func:`block` did, for :func:`release` to undo."""

    __slots__ = ("added", "sigs", "thread")

    def __init__(self, sigs: frozenset[int], added: frozenset[int], thread: int) -> None:
        self.sigs = sigs
        self.added = added
        self.thread = thread


def block(sigs: frozenset[int]) -> MaskGrant:
    """Reserve ``sigs`` for one channel and block them in the calling thread.

    Raises ``FileExistsError`` (``EEXIST``) naming the signals another open channel
    already holds.
    """
    with _lock:
        busy = sigs & _taken
        if busy:
            names = ", ".join(sorted(name_of(s) for s in busy))
            raise FileExistsError(
                errno.EEXIST, f"already listened to by an open SignalChannel: {names}"
            )
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        _taken.update(sigs)
        added = frozenset(s for s in sigs if s not in old)
        return MaskGrant(sigs, added, threading.get_ident())


def release(grant: MaskGrant) -> int:
    """Give the signals back: take (discard) what is still pending of the ones this
    channel blocked, then unblock them. Returns how many were discarded.

    A thread can only change its own mask: called from another thread, the signals are
    freed for other channels but stay blocked in the thread that listened.
    """
    with _lock:
        _taken.difference_update(grant.sigs)
        if threading.get_ident() != grant.thread or not grant.added:
            return 0
        # Unblocking a pending signal would deliver it at once with its old disposition,
        # which for most signals is "terminate the process": take it here instead.
        discarded = 0
        for _ in range(_DRAIN_LIMIT):  # bounded even if a sender never stops
            if signal.sigtimedwait(grant.added, 0) is None:
                break
            discarded += 1
        signal.pthread_sigmask(signal.SIG_UNBLOCK, grant.added)
        return discarded


def name_of(signo: int) -> str:
    """``"SIGUSR1"``, ``"SIGRTMIN+3"``; ``"SIG32"`` for numbers with no name."""
    try:
        return signal.Signals(signo).name
    except ValueError:
        pass
    if signal.SIGRTMIN < signo < signal.SIGRTMAX:
        return f"SIGRTMIN+{signo - signal.SIGRTMIN}"
    return f"SIG{signo}"
