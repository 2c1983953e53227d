"""The asyncio twin of :func:`buzon.mailbox`: ``box = buzon.aio.mailbox("jobs")``, then
``await box.send(obj)`` and ``await box.recv()``.

It wraps the blocking :class:`buzon._mailbox.Mailbox` (the same ring, the same
names, the same semantics) and never blocks the event loop: every operation is tried
without waiting, and when it must wait it waits on the mailbox's wake-up FIFO with
``loop.add_reader`` (a commit by any sender writes it once a waiter armed it; see
``Mailbox._ready``), in slices of at most ``_wait_slice`` seconds. Every other wait is
woken by the ring too, never by a timer:

- room (a full mailbox): ``Mailbox._room_ready`` fills the room FIFO and arms the
  ring's space notification; the next take by any receiver drains the FIFO, which
  wakes the sender (``add_writer``);
- an acknowledgement (a receipt, a rendezvous): ``Mailbox._acks_ready`` arms the
  sender's acknowledgement ring, which every receiver attaches with the wake-up FIFO
  as its notification;
- the holder of an exclusive mailbox: its close writes the wake-up FIFO, and its death
  makes a pidfd of its process readable (``Mailbox._holder_pidfd``).

The slice (``_wait_slice``, 0.1 s) is only the fallback for a wake-up another waiter
consumed (several waiters share one FIFO). A round-robin sender arms every receiver's
backlog ring, and a receiver that attaches drains the room FIFO too.

Cancellation is safe: a cancelled ``recv`` has taken nothing (it takes a message only
in a non-waiting call, never across an ``await``), a cancelled ``send`` has sent
nothing unless it was a rendezvous whose receiver took it first (then it returns:
see ``Mailbox._withdraw``).
"""

from __future__ import annotations

import asyncio
import os
import time
from types import EllipsisType, TracebackType
from typing import Any

from .._mailbox import (
    CLOSING_HOOKS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_INLINE,
    Mailbox,
    Message,
    Policy,
    _Withdrawn,
)
from .._mailbox import mailbox as _open_mailbox
from ..errors import Empty, Full, Timeout
from ..protocol.frames import DEFAULT_MAX_FRAME
from ..transport.base import PeerInfo
from ._channel import close_fds, deadline_of, wait_ready

__all__ = ["AioMailbox", "AioMailboxReceipt", "mailbox"]


async def _wake(box: Mailbox, reads: list[int], writes: list[int], deadline: float | None) -> None:
    """Wait until one of the fds is ready, the fallback slice passes or the deadline
    (the caller looks again and raises ``Timeout`` itself)."""
    until = time.monotonic() + box._wait_slice
    if deadline is not None:
        until = min(until, deadline)
    await wait_ready(reads, writes, until)


if close_fds not in CLOSING_HOOKS:
    CLOSING_HOOKS.append(close_fds)  # a mailbox's close ends the tasks waiting on it


def _timed_out(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class AioMailboxReceipt:
    """``send_async``'s receipt in asyncio: ``await receipt.wait(timeout)`` returns the
    receiver's ``PeerInfo``; ``done()`` and ``receiver`` never wait."""

    def __init__(self, box: Mailbox, message_id: int, expected: int = 1) -> None:
        from .._mailbox import MailboxReceipt

        self._sync = MailboxReceipt(box, message_id, expected)
        self.id = message_id

    @property
    def receiver(self) -> PeerInfo | None:
        """The process that took the message, or None while nobody has."""
        return self._sync.receiver

    @property
    def receivers(self) -> list[PeerInfo]:
        """Every process that took the message so far (broadcast: one per receiver)."""
        return self._sync.receivers

    def done(self) -> bool:
        """True once a receiver (broadcast: every one) took the message (never waits)."""
        return self._sync.done()

    async def wait(self, timeout: float | None = None) -> PeerInfo:
        """Wait until a receiver took the message; return who did."""
        deadline = deadline_of(timeout)
        box = self._sync._box
        if self._sync.expected == 0:
            self._sync.wait(0)  # Undelivered: it went to no receiver
        while not self._sync.done():
            if not box._ring_exists():
                self._sync.wait(0)  # Undelivered: the mailbox was removed
            if box._acks_ready():
                continue
            if _timed_out(deadline):
                raise Timeout(f"receipt of message {self.id} timed out")
            await _wake(box, [box.fileno()], [], deadline)
        if self._sync.receiver is None:  # broadcast: every copy was lost
            self._sync.wait(0)  # Undelivered
        assert self._sync.receiver is not None
        return self._sync.receiver

    def __await__(self) -> Any:
        return self.wait().__await__()


class AioMailbox:
    """A mailbox for asyncio tasks (made by :func:`buzon.aio.mailbox`); the blocking
    object is ``.sync``, and everything not awaited here (``qsize``, ``statistics``,
    ``exists``, ``close``, ``remove``, ``name``, ``policy``, ``capacity``, ``created``)
    is the same as there."""

    def __init__(self, box: Mailbox) -> None:
        self.sync = box

    def __getattr__(self, name: str) -> Any:
        if name in _SHARED:
            return getattr(self.sync, name)
        raise AttributeError(name)

    def __len__(self) -> int:
        return len(self.sync)

    # -- sending -------------------------------------------------------------------------

    async def _send(self, obj: Any, timeout: float | None, receipt: bool) -> int:
        box = self.sync
        deadline = deadline_of(timeout)
        rendezvous = box.capacity == 0
        offer = rendezvous and not receipt
        need = 1  # round_robin, capacity=None: room for this record (reckoned once)
        armed = False  # the last look armed the space notification and found room
        while True:
            try:
                message_id = box._send(obj, 0, True, receipt, offer)
                break
            except Full:
                if box.capacity is None:
                    if box._fan is None or box.policy != "round_robin":
                        raise  # one ring up to its byte cap: the error says so
                    if need == 1:  # as _put_round_robin: a backlog with room for a
                        need = self._record_size(obj, receipt)  # smaller one has none
            if box._room_ready(need) and not armed:
                armed = need > 1  # room came meanwhile: look again (once, for a size)
                continue
            if _timed_out(deadline):
                raise Timeout(f"send to mailbox {box.name!r} timed out")
            await _wake(box, [], [box._room_fd], deadline)
            armed = False
        if offer:
            try:
                while box._ack_of(message_id, 0.0) is None:
                    if box._acks_ready():
                        continue
                    if _timed_out(deadline):
                        if not box._withdraw(message_id):
                            break  # a receiver took it first: the send succeeded
                        raise Timeout(
                            f"no receiver took the message within {timeout} s (capacity=0: "
                            "it was withdrawn, no receiver will see it)"
                        )
                    await _wake(box, [box.fileno()], [], deadline)
            except asyncio.CancelledError:
                if box._withdraw(message_id):
                    raise
                # a receiver took it first: the send succeeded (the cancellation came
                # too late, as for channels), so the caller must not send it again
        return message_id

    def _record_size(self, obj: Any, receipt: bool) -> int:
        """The bytes of ``obj``'s ring record (at most ``max_inline``: a larger message
        goes out of line, its record a reference to the block)."""
        box = self.sync
        reply_to = box._ack_ring().name if receipt else None
        size = sum(memoryview(p).nbytes for p in box._encode(obj, 0, reply_to))
        return max(1, min(size, box._inline))

    async def send(self, obj: Any, timeout: float | None = None) -> None:
        """:meth:`buzon.Mailbox.send`, awaited."""
        await self._send(obj, timeout, False)

    def send_nowait(self, obj: Any) -> None:
        """:meth:`buzon.Mailbox.send_nowait` (never waits)."""
        self.sync.send_nowait(obj)

    async def send_many(self, objs: Any, timeout: float | None = None) -> int:
        """Send each object in turn; returns how many."""
        n = 0
        for obj in objs:
            await self._send(obj, timeout, False)
            n += 1
        return n

    async def send_async(self, obj: Any, timeout: float | None = None) -> AioMailboxReceipt:
        """Send ``obj`` (waiting for room, never for a receiver); a receipt naming who
        takes it."""
        box = self.sync
        if box.policy == "broadcast":
            return AioMailboxReceipt(box, *box._send_broadcast(obj, next(box._ids), True))
        return AioMailboxReceipt(box, await self._send(obj, timeout, True))

    # -- receiving -----------------------------------------------------------------------

    async def _take(self, timeout: float | None) -> bytes:
        box = self.sync
        deadline = deadline_of(timeout)
        while True:
            try:
                return box._take(0.0)
            except Empty:
                pass
            except Timeout:  # exclusive: another receiver holds the mailbox
                await self._wait_hold(deadline)
                continue
            if box._ready():
                continue
            until = time.monotonic() + box._wait_slice
            if deadline is not None:
                if deadline <= time.monotonic():
                    raise Timeout(f"recv from mailbox {box.name!r} timed out")
                until = min(until, deadline)
            await wait_ready([box.fileno()], (), until)

    async def _next(self, timeout: float | None) -> tuple[Any, int, int, int, int]:
        """The next message decoded, skipping those their senders withdrew."""
        deadline = deadline_of(timeout)
        while True:
            try:
                return self.sync._decode(await self._take(timeout))
            except _Withdrawn:
                if deadline is not None:
                    timeout = max(1e-6, deadline - time.monotonic())
            finally:
                if self.sync._bc is not None:  # past it: acknowledged (_bc_general)
                    self.sync._bc.ring.commit()

    async def _wait_hold(self, deadline: float | None) -> None:
        """Wait until the holder of an exclusive mailbox may have let go: its close
        writes the wake-up FIFO, its death makes a pidfd of it readable."""
        box = self.sync
        if _timed_out(deadline):
            raise Timeout(f"recv from mailbox {box.name!r} timed out (held by another)")
        box._drain_wake()  # (a stale wake-up would make this a busy loop)
        try:
            box._hold(time.monotonic())  # let go meanwhile?
            return
        except Timeout:
            pass
        pidfd = box._holder_pidfd()
        try:
            await _wake(box, [box.fileno()] + ([pidfd] if pidfd >= 0 else []), [], deadline)
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    async def recv_message(self, timeout: float | None = None) -> Message:
        """:meth:`buzon.Mailbox.recv_message`, awaited."""
        if self.sync._raw:
            self.sync._no_fields("recv_message")
        body, message_id, pid, uid, ns = await self._next(timeout)
        return Message(body, message_id, PeerInfo(pid=pid, uid=uid), ns / 1e9)

    async def recv(self, timeout: float | None = None) -> Any:
        """:meth:`buzon.Mailbox.recv`, awaited."""
        return (await self._next(timeout))[0]

    def recv_nowait(self) -> Any:
        """:meth:`buzon.Mailbox.recv_nowait` (never waits)."""
        return self.sync.recv_nowait()

    # -- readiness (buzon.aio.wait) and the rest ----------------------------------------------

    def fileno(self) -> int:
        """The wake-up fd (see :meth:`buzon.Mailbox.fileno`)."""
        return self.sync.fileno()

    def _ready(self) -> bool:
        return self.sync._ready()

    @property
    def _wait_slice(self) -> float:
        return self.sync._wait_slice

    async def __aenter__(self) -> AioMailbox:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.sync.close()

    def __repr__(self) -> str:
        return "<aio " + repr(self.sync)[1:]


_SHARED = frozenset(
    {
        "name",
        "policy",
        "capacity",
        "created",
        "qsize",
        "statistics",
        "exists",
        "close",
        "remove",
        "holding",
        "max_inline",
        "max_message",
    }
)


def mailbox(
    name: str,
    capacity: int | EllipsisType | None = ...,
    policy: Policy | EllipsisType = ...,
    create: bool | None = None,
    *,
    max_inline: int = DEFAULT_MAX_INLINE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_message: int = DEFAULT_MAX_FRAME,
) -> AioMailbox:
    """The asyncio twin of :func:`buzon.mailbox` (same arguments, ``name:NAME``
    included; opening does not wait, so it is a plain call)."""
    return AioMailbox(
        _open_mailbox(
            name,
            capacity,
            policy,
            create,
            max_inline=max_inline,
            max_bytes=max_bytes,
            max_message=max_message,
        )
    )
