"""Direct communication: ``buzon.send_to(pid, obj)``, ``buzon.recv_from(pid)``, ``buzon.inbox()``.

Theory of operation
-------------------
Every process that calls :func:`inbox` (or :func:`recv_from`) gets its own mailbox
(:mod:`buzon._mailbox`, policy ``"any"``), named ``inbox-PID-START`` in buzon's private
runtime dir, where START is the process's start time (field 22 of ``/proc/PID/stat``,
in clock ticks since boot). A sender finds it from the pid alone: it reads the target's
start time and opens that name with ``create=False``. The start time is what tells a
recycled pid: a process that died and whose pid was given to a new process leaves
``inbox-PID-OLD``, and a sender looking for ``inbox-PID-NEW`` does not find it, so it
raises ``NoSuchEndpoint`` instead of filling a dead process's mailbox. A dead pid has no
``/proc`` entry: ``NoSuchEndpoint`` at once.

Lifetime. The inbox is removed when its process exits normally (``atexit``, and the
exit of a ``multiprocessing`` child, which skips ``atexit``); a forked child gets an
inbox of its own, never its parent's. A process killed by a signal leaves its inbox:
``buzon clean`` removes an ``inbox-PID-START`` whose process is gone (no such pid, or a
pid with another start time), with its messages (nobody can take them any more).

Selective receive. The mailbox ring is FIFO; :meth:`Inbox.recv_from` takes messages
from it until one comes from the wanted pid and keeps the others, in order, in a
per-process holding queue. Every receive of the inbox (``recv``, ``recv_message``,
``recv_from``) looks at the holding queue first, so each sender's messages keep their
order and no message is lost or seen twice. One thread at a time takes from the ring
(the *taker*); the others wait on a condition for what it holds back for them. The
holding queue is bounded (``Inbox.max_held``): a flood from other senders makes
``recv_from`` raise ``Full``, keeping every message, instead of growing without limit.
The hot path (:meth:`Inbox._take_from`: nothing held back, no other taker) takes each
message in one C call (``Mailbox._recv_from``), which returns the object itself when
the wanted pid sent it and the :class:`~buzon.Message` to hold back otherwise.

Sending waits for room in slices of ``_SLICE`` seconds and re-checks the target's
start time between them: a send to a full inbox whose process died raises
``NoSuchEndpoint`` within a second instead of waiting for ever. Liveness is a pidfd
per target process (``pidfd_open``, readable once it exits), polled before each send:
a ``/proc`` read costs tens of microseconds, a zero-timeout poll one or two.
"""

from __future__ import annotations

import atexit
import collections
import os
import re
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ._mailbox import _GENERAL, Mailbox, Message
from ._mailbox_fan import _PID
from .errors import (
    AddressError,
    ChannelClosed,
    Empty,
    EndOfChannel,
    Full,
    NoSuchEndpoint,
    Timeout,
)

__all__ = ["Inbox", "inbox", "inbox_owner_alive", "parse_inbox_name", "recv_from", "send_to"]

_PREFIX = "inbox-"
_NAME_RE = re.compile(r"^inbox-(\d+)-(\d+)$")
_FRESH = 0.25  # send_to: how long a target seen alive counts as alive (the hot path)
_SLICE = 0.25  # send_to: longest wait for room before the target's liveness is re-checked
_MAX_OPEN = 32  # target inboxes a sending process keeps attached
_MAX_HELD = 65536  # messages recv_from may hold back before it raises Full


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot); None if there is no
    such process or it has died (a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    # "pid (comm) state ppid ..." : comm may hold spaces and ')': split after the last ')'
    fields = raw.rpartition(b")")[2].split()
    if fields[:1] in ([b"Z"], [b"X"]):  # a zombie has died: it can receive nothing
        return None
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def inbox_name(pid: int, start: int) -> str:
    """The mailbox name of the inbox of process ``pid`` started at ``start``."""
    return f"{_PREFIX}{pid}-{start}"


def parse_inbox_name(name: str) -> tuple[int, int] | None:
    """(pid, start time) of an inbox mailbox's name, None if it is not one."""
    m = _NAME_RE.match(name)
    return (int(m[1]), int(m[2])) if m else None


def inbox_owner_alive(name: str) -> bool | None:
    """True if the process an inbox name is for still runs (same pid, same start time),
    False if it is gone, None if ``name`` is not an inbox's."""
    parsed = parse_inbox_name(name)
    if parsed is None:
        return None
    return start_time(parsed[0]) == parsed[1]


def _pid(pid: Any) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise AddressError(f"a pid must be a positive int, not {pid!r}")
    return pid


class Inbox:
    """This process's own mailbox, as :func:`buzon.inbox` returns it.

    ``recv``/``recv_message``/``recv_nowait`` take the next message from any sender
    (``recv_message`` names it: ``.sender.pid``); :meth:`recv_from` takes the next one
    from one pid and leaves the others queued, in order. Thread-safe. ``.mailbox`` is
    the :class:`~buzon.Mailbox` underneath (``inbox-PID-START``), ``.pid`` its owner.
    """

    def __init__(self, box: Mailbox) -> None:
        self.mailbox = box
        self.pid = os.getpid()
        self.name = box.name
        self._held: collections.deque[Message] = collections.deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # waits: a thread not the taker
        self._waiting = 0  # threads waiting on _cond
        self._taking = False
        self._removed = False
        self.max_held = _MAX_HELD
        """How many messages of other senders ``recv_from`` may hold back; it raises
        ``Full`` (keeping them all) rather than hold more."""

    def _take(self, match: Callable[[Message], bool], timeout: float | None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:  # the plain lock: the Condition's wrapper costs a microsecond
            while True:
                if self._held:
                    for i, m in enumerate(self._held):
                        if match(m):
                            del self._held[i]
                            return m
                if not self._taking:
                    self._taking = True
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise (Empty if timeout == 0 else Timeout)(self._none(timeout))
                self._waiting += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting -= 1
        try:  # the taker: from the ring until one matches; the others are held back
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    m = self.mailbox.recv_message(left)
                except Empty:
                    raise (Empty if timeout == 0 else Timeout)(self._none(timeout)) from None
                if match(m):
                    return m
                with self._lock:
                    self._held.append(m)
                    if self._waiting:
                        self._cond.notify_all()
                    if len(self._held) >= self.max_held:
                        raise Full(
                            f"{len(self._held)} messages of other senders are held back "
                            f"in the inbox (max_held={self.max_held}); take them with "
                            "recv() or recv_from(their pid)"
                        )
        finally:
            with self._lock:
                self._taking = False
                if self._waiting:
                    self._cond.notify_all()

    @staticmethod
    def _none(timeout: float | None) -> str:
        return "no message in the inbox" if not timeout else f"no message within {timeout} s"

    def recv_message(self, timeout: float | None = None) -> Message:
        """The next message from any sender (held-back ones first, in order), with
        ``.sender`` (``PeerInfo``: ``.pid``, ``.uid``), ``.id`` and ``.sent_at``."""
        return self._take(_any, timeout)

    def recv(self, timeout: float | None = None) -> Any:
        """The next message's object from any sender (``Timeout`` after ``timeout``)."""
        return self._take(_any, timeout).body

    def recv_nowait(self) -> Any:
        """The next message's object, or ``Empty``."""
        return self._take(_any, 0.0).body

    def recv_message_from(self, pid: int, timeout: float | None = None) -> Message:
        """The next message sent by process ``pid``, as a :class:`~buzon.Message`;
        other senders' messages stay queued, in order."""
        pid = _pid(pid)
        return self._take(lambda m: m.sender.pid == pid, timeout)

    def recv_from(self, pid: int, timeout: float | None = None) -> Any:
        """The next object sent by process ``pid``; other senders' messages stay
        queued, in order (``Timeout`` after ``timeout``)."""
        if type(pid) is int and pid > 0 and not self._held and (timeout is None or timeout > 0):
            start = 0.0 if timeout is None else time.monotonic()
            got = self._take_from(pid, timeout)
            if got is not _GENERAL:
                return got
            if timeout is not None:  # the rest of the time for the general way
                timeout = max(1e-9, timeout - (time.monotonic() - start))
        return self.recv_message_from(pid, timeout).body

    def _take_from(self, pid: int, timeout: float | None) -> Any:
        """recv_from's hot path: nothing held back and no other taker, one C call
        takes the next message (Mailbox._recv_from); its object if ``pid`` sent it,
        else it is held back and ``_GENERAL`` says: the general way from here."""
        lock = self._lock
        with lock:
            if self._held or self._taking:
                return _GENERAL
            self._taking = True
        try:
            got = self.mailbox._recv_from(pid, timeout)
            if type(got) is not Message:
                return got  # pid's object, or _GENERAL
            if got.sender.pid == pid:
                return got.body
            with lock:
                self._held.append(got)
                if len(self._held) >= self.max_held:
                    raise Full(
                        f"{len(self._held)} messages of other senders are held back "
                        f"in the inbox (max_held={self.max_held}); take them with "
                        "recv() or recv_from(their pid)"
                    )
            return _GENERAL
        finally:
            with lock:
                self._taking = False
                if self._waiting:
                    self._cond.notify_all()

    # ---- readiness: buzon.wait and buzon.aio.wait ------------------------------------------

    def fileno(self) -> int:
        """The mailbox's wake-up fd (see :meth:`buzon.Mailbox.fileno`)."""
        return self.mailbox.fileno()

    def _ready(self) -> bool:
        """True if a message is held back or in the mailbox; else arm the wake-up."""
        return bool(self._held) or self.mailbox._ready()

    @property
    def _wait_slice(self) -> float:
        return self.mailbox._wait_slice

    def qsize(self) -> int:
        """Messages waiting: held back by ``recv_from`` plus those in the mailbox."""
        return len(self._held) + self.mailbox.qsize()

    def __len__(self) -> int:
        return self.qsize()

    def remove(self) -> None:
        """Destroy this inbox now (it is otherwise removed when the process exits);
        a later :func:`buzon.inbox` makes a new, empty one."""
        global _mine
        with _lock:
            if _mine is self:
                _mine = None
        self._removed = True
        self._held.clear()
        self.mailbox.remove()

    def __repr__(self) -> str:
        return f"<Inbox of pid {self.pid} ({self.name!r})>"


def _any(_m: Message) -> bool:
    return True


_lock = threading.Lock()
_mine: Inbox | None = None
_exit_hooked = 0  # the pid that registered the exit hooks
_targets: collections.OrderedDict[int, _Target] = collections.OrderedDict()
_targets_pid = 0


def inbox() -> Inbox:
    """This process's own mailbox, created on first use (``inbox-PID-START`` in the
    runtime dir, 0600) and removed when the process exits normally. Other processes of
    the same user reach it with :func:`send_to` and this pid."""
    global _mine, _exit_hooked
    box = _mine
    if box is not None and box.pid == _PID[0]:  # _PID: getpid without a system call
        return box
    pid = os.getpid()
    with _lock:
        if _mine is not None and _mine.pid == pid:
            return _mine
        start = start_time(pid)
        if start is None:
            raise NoSuchEndpoint(f"cannot read /proc/{pid}/stat: direct communication needs it")
        name = inbox_name(pid, start)
        _mine = Inbox(Mailbox(name))  # created here (inherited ones are not ours)
        if _exit_hooked != pid:
            _exit_hooked = pid
            atexit.register(_remove_at_exit)
            mp_util = sys.modules.get("multiprocessing.util")
            if mp_util is not None:  # a multiprocessing child exits without atexit
                mp_util.Finalize(None, _remove_at_exit, exitpriority=0)
        return _mine


def _remove_at_exit() -> None:
    box = _mine
    if box is not None and box.pid == os.getpid() and not box._removed:
        try:
            box.remove()
        except Exception:  # exiting: nothing left to report it to
            pass


class _Target:
    """A process this one sends to: its inbox, and a pidfd that becomes readable when
    that process exits (the liveness check of every send: no ``/proc`` read, and a
    pidfd cannot be fooled by a recycled pid)."""

    __slots__ = ("_poll", "box", "fresh_until", "pid", "pidfd")

    def __init__(self, box: Mailbox, pid: int, pidfd: int) -> None:
        self.box = box
        self.pid = pid
        self.pidfd = pidfd
        self.fresh_until = 0.0  # _target: seen alive this recently (monotonic)
        self._poll = select.poll()
        self._poll.register(pidfd, select.POLLIN)

    def alive(self) -> bool:
        return self.pidfd >= 0 and not self._poll.poll(0)

    def close(self) -> None:
        self.box.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _target(pid: int) -> _Target:
    """The inbox of process ``pid`` (cached while that process lives)."""
    global _targets_pid
    if _targets_pid == _PID[0]:  # the common case, without the lock: a dict lookup
        target = _targets.get(pid)
        if target is not None:
            # seen alive less than _FRESH ago is alive enough: NoSuchEndpoint still comes
            # within 1 s of a death, with one poll per _FRESH instead of one per send
            now = time.monotonic()
            if now < target.fresh_until:
                return target
            if target.alive():
                target.fresh_until = now + _FRESH
                return target
    with _lock:
        if _targets_pid != os.getpid():  # forked: the parent's targets are not ours
            for inherited in _targets.values():
                inherited.close()
            _targets.clear()
            _targets_pid = os.getpid()
        target = _targets.get(pid)
        if target is not None:
            if target.alive():
                _targets.move_to_end(pid)
                return target
            del _targets[pid]
            target.close()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NoSuchEndpoint(f"no process with pid {pid}") from None
    try:
        # the pidfd holds on to this process; its start time names its inbox (a pid
        # recycled before pidfd_open has another start time than the inbox left behind)
        start = start_time(pid)
        if start is None or select.select([pidfd], [], [], 0)[0]:
            raise NoSuchEndpoint(f"no process with pid {pid} (it has exited)")
        try:
            box = Mailbox(inbox_name(pid, start), create=False)
        except NoSuchEndpoint:
            raise NoSuchEndpoint(
                f"process {pid} has no inbox (it never called buzon.inbox() or buzon.recv_from)"
            ) from None
    except BaseException:
        os.close(pidfd)
        raise
    target = _Target(box, pid, pidfd)
    with _lock:
        old = _targets.get(pid)
        if old is not None and old.alive():
            target.close()
            return old
        if old is not None:
            old.close()
        _targets[pid] = target
        while len(_targets) > _MAX_OPEN:
            _targets.popitem(last=False)[1].close()
    return target


def _forget(target: _Target) -> None:
    with _lock:
        if _targets.get(target.pid) is target:
            del _targets[target.pid]
    target.close()


def send_to(pid: int, obj: Any, timeout: float | None = None) -> None:
    """Put ``obj`` into the inbox of process ``pid`` (same user, this host).

    Waits while that inbox is full (``Timeout`` after ``timeout``). Raises
    ``NoSuchEndpoint`` if ``pid`` is not running, has no inbox, or dies (or removes its
    inbox) while this waits; the check is made before each send and at least every
    quarter second while waiting.
    The receiver sees this process's pid as the message's ``.sender.pid``.
    """
    if timeout is None and _targets_pid == _PID[0] and type(pid) is int:
        # the hot path: a target seen alive less than _FRESH ago, a small message, one C
        # call (Mailbox.send's own); anything else (no room within a slice, a removed or
        # closed inbox) is not sent here and goes the general way below
        target = _targets.get(pid)
        if target is not None and time.monotonic() < target.fresh_until:
            box = target.box
            if box._plain and not box._closed:
                try:
                    if box._core.send(obj, _SLICE):
                        return
                except (Timeout, Full, EndOfChannel, ChannelClosed):
                    pass
    pid = _pid(pid)
    deadline = None if timeout is None else time.monotonic() + timeout
    target = _target(pid)
    box = target.box
    while True:
        left = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
        try:
            if left <= 0:
                box.send_nowait(obj)
            else:
                box.send(obj, left)
            return
        except NoSuchEndpoint:
            _forget(target)
            raise NoSuchEndpoint(f"process {pid} removed its inbox (it exited)") from None
        except ChannelClosed:  # another thread evicted it from the cache just now
            target = _target(pid)
            box = target.box
            continue
        except Timeout:
            pass
        except Full:
            if timeout is not None and timeout <= 0:
                raise
        if timeout is not None and timeout <= 0:
            raise Full(f"the inbox of process {pid} is full")
        if not target.alive():
            _forget(target)
            raise NoSuchEndpoint(f"process {pid} died while its inbox was full")
        if deadline is not None and time.monotonic() >= deadline:
            raise Timeout(f"the inbox of process {pid} stayed full for {timeout} s")


def recv_from(pid: int, timeout: float | None = None) -> Any:
    """The next object process ``pid`` sent to this process's inbox (selective: other
    senders' messages stay queued, in order, for later receives). ``Timeout`` after
    ``timeout`` seconds. Creates this process's inbox if it has none yet."""
    box = _mine
    if box is None or box.pid != _PID[0]:  # _PID: getpid without a system call
        box = inbox()
    return box.recv_from(pid, timeout)


# ---- forensics: buzon ls / buzon clean ------------------------------------------------


def owner_state(name: str) -> str | None:
    """``buzon ls``: "inbox of pid N" (and whether it is gone) for an inbox mailbox's
    name, None for any other name."""
    alive = inbox_owner_alive(name)
    if alive is None:
        return None
    pid = name.split("-")[1]
    return f"inbox of pid {pid}" + ("" if alive else " (gone: buzon clean removes it)")


def clean_inboxes(rdir: str, now: float, grace: float, dry_run: bool) -> list[tuple[str, str]]:
    """``buzon clean``: remove every inbox of ``rdir`` whose process is gone (no such
    pid, or a pid with another start time: a recycled pid), messages and all; return
    (path, why) of each. Names younger than ``grace`` seconds are left alone."""
    from .shm._names import lookup, unpublish

    removed = []
    for entry in sorted(os.listdir(rdir)):
        stem, _, suffix = entry.partition(".")
        if suffix != "mbox" or inbox_owner_alive(stem) is not False:
            continue
        path = os.path.join(rdir, entry)
        try:
            if now - os.lstat(path).st_mtime < grace:
                continue
            segment = lookup(path)
        except OSError:
            continue
        why = f"inbox of pid {stem.split('-')[1]}, which is gone (its messages with it)"
        removed.append((path, why))
        if dry_run:
            continue
        try:
            if segment is None:
                raise NoSuchEndpoint(path)
            Mailbox._attach_segment(stem, path, segment).remove()
        except (NoSuchEndpoint, OSError):  # its segment is gone: the name and FIFO go
            if segment is not None:
                unpublish(path, segment)
            for leftover in (path + ".wake", path + ".room"):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
    return removed
