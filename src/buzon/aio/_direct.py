"""The asyncio twin of direct communication: ``await buzon.aio.send_to(pid, obj)``,
``await buzon.aio.recv_from(pid)``, ``buzon.aio.inbox()``.

It wraps the blocking :mod:`buzon._direct` (the same inbox, the same holding queue for
selective receive, shared with the threads of the process) and never blocks the event
loop: each receive is tried without waiting (which takes what is in the mailbox into
the holding queue, up to a match), and when nothing matches it waits on the mailbox's
wake-up FIFO with ``loop.add_reader``, in slices of at most the mailbox's
``_wait_slice`` (a message another thread holds back for this task is found at the
next look). ``send_to`` to a full inbox waits on the inbox's room FIFO (a take by the
owner drains it, see ``Mailbox._room_ready``) and on the target's pidfd (readable when
it exits), with the same fallback slice. A cancelled receive has taken nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .._direct import Inbox, _any, _pid, _target
from .._direct import inbox as _sync_inbox
from .._direct import send_to as _sync_send_to
from .._mailbox import Message
from ..errors import ChannelClosed, Empty, Full, Timeout
from ._channel import deadline_of, wait_ready

__all__ = ["AioInbox", "inbox", "recv_from", "send_to"]


class AioInbox:
    """This process's inbox for asyncio tasks (:func:`buzon.aio.inbox`); ``.sync`` is
    the blocking :class:`buzon.Inbox` (the same messages, the same holding queue)."""

    def __init__(self, box: Inbox) -> None:
        self.sync = box
        self.pid = box.pid
        self.name = box.name

    async def _take(self, match: Callable[[Message], bool], timeout: float | None) -> Message:
        box = self.sync
        deadline = deadline_of(timeout)
        while True:
            try:
                return box._take(match, 0.0)
            except Empty:
                pass
            if box.mailbox._ready():
                continue
            until = time.monotonic() + box.mailbox._wait_slice
            if deadline is not None:
                if deadline <= time.monotonic():
                    raise Timeout(f"no message within {timeout} s")
                until = min(until, deadline)
            await wait_ready([box.mailbox.fileno()], (), until)

    async def recv_message(self, timeout: float | None = None) -> Message:
        """:meth:`buzon.Inbox.recv_message`, awaited."""
        return await self._take(_any, timeout)

    async def recv(self, timeout: float | None = None) -> Any:
        """:meth:`buzon.Inbox.recv`, awaited."""
        return (await self._take(_any, timeout)).body

    def recv_nowait(self) -> Any:
        """:meth:`buzon.Inbox.recv_nowait` (never waits)."""
        return self.sync.recv_nowait()

    async def recv_message_from(self, pid: int, timeout: float | None = None) -> Message:
        """:meth:`buzon.Inbox.recv_message_from`, awaited."""
        pid = _pid(pid)
        return await self._take(lambda m: m.sender.pid == pid, timeout)

    async def recv_from(self, pid: int, timeout: float | None = None) -> Any:
        """:meth:`buzon.Inbox.recv_from`, awaited."""
        return (await self.recv_message_from(pid, timeout)).body

    def fileno(self) -> int:
        """The wake-up fd (``buzon.aio.wait`` takes an inbox)."""
        return self.sync.fileno()

    def _ready(self) -> bool:
        return self.sync._ready()

    @property
    def _wait_slice(self) -> float:
        return self.sync._wait_slice

    def qsize(self) -> int:
        """Messages waiting (held back plus in the mailbox)."""
        return self.sync.qsize()

    def remove(self) -> None:
        """:meth:`buzon.Inbox.remove`."""
        self.sync.remove()

    def __repr__(self) -> str:
        return "<aio " + repr(self.sync)[1:]


def inbox() -> AioInbox:
    """This process's inbox (:func:`buzon.inbox`), for asyncio tasks."""
    return AioInbox(_sync_inbox())


async def send_to(pid: int, obj: Any, timeout: float | None = None) -> None:
    """:func:`buzon.send_to`, awaited: waits while the inbox is full (woken by its
    owner's next take); ``NoSuchEndpoint`` if ``pid`` is not running, has no inbox, or
    dies meanwhile."""
    deadline = deadline_of(timeout)
    while True:
        try:
            _sync_send_to(pid, obj, 0)
            return
        except Full:
            pass
        target = _target(pid)  # (NoSuchEndpoint if it died)
        box = target.box
        try:
            if box._room_ready():
                continue
        except ChannelClosed:  # another thread evicted it from the cache just now
            continue
        if deadline is not None and time.monotonic() >= deadline:
            raise Timeout(f"the inbox of process {pid} stayed full for {timeout} s")
        until = time.monotonic() + box._wait_slice
        await wait_ready(
            [target.pidfd], [box._room_fd], until if deadline is None else min(until, deadline)
        )


async def recv_from(pid: int, timeout: float | None = None) -> Any:
    """:func:`buzon.recv_from`, awaited (selective: other senders' messages stay
    queued, in order)."""
    return await inbox().recv_from(pid, timeout)
