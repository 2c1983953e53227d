"""The blocking driver: :class:`Channel`, a thin layer of waits over :class:`ChannelCore`.

Every blocking call is its ``*_nowait`` twin plus a wait on the transport's fds with
``select.poll``. A receiver first spins for ``spin`` seconds (default 50 µs) retrying
the non-blocking read, because waking a sleeping process on another CPU costs tens of
microseconds; after that it sleeps in ``poll``. While waiting for anything, pending
bytes of an earlier partial write are flushed, so no operation can starve another.

Thread safety: one lock serialises senders and another receivers, so one thread may
send while another receives; ``close`` may be called from any thread.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar, overload

from .._channel import ChannelCore, ChannelIdentity
from ..errors import Empty, EndOfChannel, Full, Timeout, UnsupportedOperation
from ..protocol.frames import Frame
from ..transport.base import Buffer

__all__ = ["Channel"]

T = TypeVar("T")
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_monotonic = time.monotonic
_perf = time.perf_counter


def wait_fds(
    rfd: int, wfd: int, want_read: bool, want_write: bool, deadline: float | None
) -> tuple[bool, bool]:
    """Block until ``rfd`` is readable / ``wfd`` writable (as wanted) or the deadline.

    Returns (readable, writable); both False means the deadline passed.
    """
    poller = select.poll()
    if want_read and rfd >= 0:
        poller.register(rfd, _POLLIN)
    if want_write and wfd >= 0:
        if wfd == rfd and want_read:
            poller.modify(rfd, _POLLIN | _POLLOUT)
        else:
            poller.register(wfd, _POLLOUT)
    if deadline is None:
        events = poller.poll()
    else:
        remaining = deadline - _monotonic()
        if remaining <= 0:
            return False, False
        events = poller.poll(max(1, int(remaining * 1000 + 0.999)))
    readable = writable = False
    for fd, ev in events:
        if fd == rfd and ev & (_POLLIN | select.POLLHUP | select.POLLERR):
            readable = True
        if fd == wfd and ev & (_POLLOUT | select.POLLHUP | select.POLLERR):
            writable = True
    return readable, writable


def wait_room(core: ChannelCore, deadline: float | None) -> bool:
    """Wait until a blocked send or flush may progress; False if the deadline passed.

    Usually that is the write fd draining; on a transport with ``delivery_acks``
    (reliable datagrams) room and delivery come with acks: its write fd becomes
    *readable* then.
    """
    if core.acked:
        readable, _ = wait_fds(core.write_fileno(), -1, True, False, deadline)
        return readable
    _, writable = wait_fds(-1, core.write_fileno(), False, True, deadline)
    return writable


def deadline_of(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("timeout must be >= 0 or None")
    return _monotonic() + timeout


class Channel(ChannelIdentity):
    """A message channel (blocking API). Made by ``pipe``, ``connect`` and ``accept``.

    ``send``/``recv`` move objects through the channel's codec; ``send_bytes``/
    ``recv_bytes`` move bytes with no codec. All four take ``timeout`` (None waits
    forever) and raise :class:`Timeout`; the ``*_nowait`` forms raise :class:`Full` /
    :class:`Empty` instead of waiting. At the end of the stream ``recv`` raises
    :class:`EndOfChannel`, which also ends iteration (``for msg in channel``).
    """

    def __init__(self, core: ChannelCore) -> None:
        self._core = core
        self._spin = core.options.spin
        self._rlock = threading.Lock()
        self._wlock = threading.Lock()
        self._rpoll: select.poll | None = None  # readiness of the read fd, made once

    # -- identity ---------------------------------------------------------------------

    # -- sending ----------------------------------------------------------------------

    def send(self, obj: Any, timeout: float | None = None, *, priority: int = 0) -> None:
        """Encode ``obj`` and send it, waiting up to ``timeout`` for room."""
        with self._wlock:
            core = self._core
            bufs = core.encode(obj)
            accepted = core.try_send(bufs, priority)
            if not accepted or core.pending:
                self._send_slow(bufs, timeout, priority, accepted)

    def send_nowait(self, obj: Any, *, priority: int = 0) -> None:
        """Send ``obj`` now or raise :class:`Full`."""
        with self._wlock:
            if not self._core.try_send(self._core.encode(obj), priority):
                raise Full("the channel cannot take the message without waiting")

    def send_bytes(self, data: Buffer, timeout: float | None = None, *, priority: int = 0) -> None:
        """Send ``data`` as one message, without a codec (a raw channel: as is)."""
        with self._wlock:
            core = self._core
            bufs = core.encode_bytes(data)
            accepted = core.try_send(bufs, priority)
            if not accepted or core.pending:
                self._send_slow(bufs, timeout, priority, accepted)

    def send_bytes_nowait(self, data: Buffer, *, priority: int = 0) -> None:
        with self._wlock:
            if not self._core.try_send(self._core.encode_bytes(data), priority):
                raise Full("the channel cannot take the message without waiting")

    def send_many(self, objs: Iterable[Any], timeout: float | None = None) -> int:
        """Send several objects, in order, with as few system calls as possible.

        On stream transports the frames are joined into one vectored write, which is
        how small messages reach millions per second; message transports send them one
        by one. Returns the number sent. ``timeout`` bounds the whole batch.
        """
        return self._send_batch(objs, timeout, as_bytes=False)

    def send_bytes_many(self, items: Iterable[Buffer], timeout: float | None = None) -> int:
        """Like :meth:`send_many` for byte payloads (no codec)."""
        return self._send_batch(items, timeout, as_bytes=True)

    def _send_batch(self, items: Iterable[Any], timeout: float | None, as_bytes: bool) -> int:
        core = self._core
        if core.message_oriented or core.raw:
            deadline = deadline_of(timeout)
            count = 0
            core.transport.cork(True)  # a transport may send the batch in fewer datagrams
            try:
                for item in items:
                    remaining = None if deadline is None else max(0.0, deadline - _monotonic())
                    if as_bytes:
                        self.send_bytes(item, remaining)
                    else:
                        self.send(item, remaining)
                    count += 1
            finally:
                core.transport.cork(False)
            return count
        with self._wlock:
            bufs, count = core.encode_batch(items, as_bytes)
            if not count:
                return 0
            accepted = core.try_send(bufs)
            if not accepted or core.pending:
                self._send_slow(bufs, timeout, 0, accepted)
            core.stats.messages_sent += count - 1
            return count

    def _send_slow(
        self, bufs: list[Buffer], timeout: float | None, priority: int, accepted: bool
    ) -> None:
        """The first attempt did not complete: wait for room, then finish the write."""
        core = self._core
        deadline = deadline_of(timeout)
        while not accepted:
            if not core.acked:
                self._wait(False, deadline, "send")
            elif not wait_room(core, deadline):  # room comes with acks
                raise Timeout("send timed out")
            accepted = core.try_send(bufs, priority)
        while core.pending:
            # The message is accepted; finish writing it unless the caller's time is up
            # (then later operations and close() complete it).
            if deadline is not None and _monotonic() >= deadline:
                return
            _, writable = wait_fds(-1, core.write_fileno(), False, True, deadline)
            if writable:
                core.flush()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until bytes of partially written messages have all reached the kernel."""
        deadline = deadline_of(timeout)
        with self._wlock:
            while not self._core.flush():
                progress = wait_room(self._core, deadline)
                if not progress and deadline is not None and _monotonic() >= deadline:
                    raise Timeout("flush timed out")

    # -- receiving --------------------------------------------------------------------

    @overload
    def recv(self, timeout: float | None = None) -> Any: ...
    @overload
    def recv(self, timeout: float | None = None, *, type: type[T]) -> T: ...

    def recv(self, timeout: float | None = None, *, type: Any = Any) -> Any:
        """Receive and decode one message; ``type=`` validates it (msgspec types)."""
        with self._rlock:
            core = self._core
            item = core.buffered()
            if item is None:
                item = self._receive(timeout)
            return core.item_object(item, type)

    def recv_nowait(self, *, type: Any = Any) -> Any:
        """Receive one message now or raise :class:`Empty`."""
        with self._rlock:
            item = self._core.poll()
            if item is None:
                raise Empty("no message is ready")
            return self._core.item_object(item, type)

    def recv_bytes(self, timeout: float | None = None) -> bytes:
        """Receive one message as bytes (raw stream channels: the bytes available)."""
        with self._rlock:
            core = self._core
            item = core.buffered()
            if item is None:
                item = self._receive(timeout)
            return core.item_bytes(item)

    def recv_bytes_nowait(self) -> bytes:
        with self._rlock:
            item = self._core.poll()
            if item is None:
                raise Empty("no message is ready")
            return self._core.item_bytes(item)

    def recv_bytes_into(self, buffer: Buffer, timeout: float | None = None) -> int:
        """Receive one message into ``buffer``; return its size (MessageTooLarge if it
        does not fit — the message is then lost, as with multiprocessing)."""
        with self._rlock:
            core = self._core
            if core.raw:
                raise UnsupportedOperation("recv_bytes_into needs message framing (raw=False)")
            core.set_sink(buffer)
            try:
                item = core.buffered()
                if item is None:
                    item = self._receive(timeout)
            finally:
                core.set_sink(None)
            return core.item_into(item, buffer)

    def _receive(self, timeout: float | None) -> Frame | tuple[int, bytes]:
        """Read a message: at once if the fd is readable, else after spinning for
        ``spin`` seconds (checking readiness with ``poll(0)``, which costs less than a
        failed read), else after sleeping in ``poll``."""
        core = self._core
        ready = self._rpoll
        if ready is None:
            core.check_open()
            rfd = core.read_fileno()
            if rfd < 0:
                raise UnsupportedOperation(
                    f"this end of the {core.transport.scheme} channel only sends"
                )
            ready = self._rpoll = select.poll()
            ready.register(rfd, _POLLIN)
        if ready.poll(0):
            item = core.poll()
            if item is not None:
                return item
        spin = self._spin
        if spin > 0.0 and timeout != 0:
            end = _perf() + spin
            poll0 = ready.poll
            while _perf() < end:
                if poll0(0):
                    item = core.poll()
                    if item is not None:
                        return item
        deadline = deadline_of(timeout if timeout is not None else core.options.idle_timeout)
        return self._wait_item(deadline)

    def _wait_item(self, deadline: float | None) -> Frame | tuple[int, bytes]:
        """Sleep in poll until a message arrives (or the deadline, or a stalled frame)."""
        core = self._core
        while True:
            limit, mid_frame = core.wait_limit(deadline, _monotonic())
            try:
                if core.pending or self._rpoll is None:
                    self._wait(True, limit, "recv")  # also finishes an earlier write
                elif limit is None:
                    self._rpoll.poll()
                else:
                    remaining = limit - _monotonic()
                    woke = remaining > 0 and self._rpoll.poll(int(remaining * 1000 + 0.999))
                    if not woke and _monotonic() >= limit:
                        raise Timeout("recv timed out")
            except Timeout:
                if mid_frame:
                    raise core.stalled() from None
                raise
            item = core.poll()
            if item is not None:
                return item

    def _wait(self, read: bool, deadline: float | None, what: str) -> None:
        """Wait for the direction wanted, flushing pending output meanwhile."""
        core = self._core
        core.check_open()
        while True:
            want_write = bool(core.pending) or not read
            readable, writable = wait_fds(
                core.read_fileno(), core.write_fileno(), read, want_write, deadline
            )
            if writable and core.pending:
                core.flush()
                if not read and not core.pending:
                    return
            if (read and readable) or (not read and writable):
                return
            if not readable and not writable:
                raise Timeout(f"{what} timed out")

    def __iter__(self) -> Iterator[Any]:
        """Yield messages until the peer closes (``EndOfChannel``)."""
        while True:
            try:
                yield self.recv()
            except EndOfChannel:
                return

    # -- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Flush what was accepted (bounded by ``close_timeout``) and release the fds."""
        core = self._core
        if core.closed:
            return
        if core.pending or core.acked:  # acked: linger until the peer has it all
            deadline = deadline_of(core.options.close_timeout)
            try:
                core.shutdown()
                while not core.flush():
                    progress = wait_room(core, deadline)
                    if not progress and deadline is not None and _monotonic() >= deadline:
                        break
            except Exception:  # the peer is gone: nothing more can be delivered
                pass
        core.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # used by buzon.wait ------------------------------------------------------------

    def _ready(self) -> bool:
        """True if recv_nowait would not raise Empty (it may raise EndOfChannel)."""
        if not self._rlock.acquire(blocking=False):
            return False  # another thread is receiving; it will take what arrives
        try:
            return self._core.ready()
        finally:
            self._rlock.release()
