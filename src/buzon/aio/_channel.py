"""The asyncio driver: :class:`Channel`, awaits over :class:`ChannelCore`.

Same core and same semantics as the blocking driver; only the waiting differs: the
event loop watches the transport's fds (``loop.add_reader``/``add_writer``), no
threads and no polling. Cancellation is safe by construction: a coroutine only
*waits* at an ``await``; taking a message out of the core happens after the wait,
synchronously, so a cancelled ``recv`` has taken nothing and the message stays for
the next ``recv``.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from typing import Any, TypeVar, overload

from .. import _reduction
from .._channel import ChannelCore, ChannelIdentity, Receipt, finish_view
from .._engine import (
    CREDIT,
    EXTEND,
    INPUT,
    LOCKED,
    SLEEP,
    SPIN,
    WRITE,
    Step,
    Steps,
    flush_steps,
    linger_steps,
    loan_steps,
    recv_steps,
    send_steps,
)
from .._ring_rv import rv_send_steps
from ..errors import ChannelClosed, Empty, EndOfChannel, Full, Timeout, UnsupportedOperation
from ..protocol.credit import RECEIPT_FLAG
from ..protocol.frames import Frame
from ..transport.base import Buffer

__all__ = ["Channel", "close_fds", "forget_fd", "wait_fd", "wait_io", "wait_ready", "watchers"]

T = TypeVar("T")
_SLEEP_FIRST = 16  # after a read found nothing, receives that wait before reading


def deadline_of(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("timeout must be >= 0 or None")
    return time.monotonic() + timeout


class _Watchers:
    """Several waiters on one fd in one loop.

    An event loop keeps one reader (and one writer) callback per fd: a second
    ``add_reader`` silently replaces the first. A task in ``recv`` and another in
    ``buzon.aio.wait`` over the same channel would then leave one of them asleep for
    ever. So every wait registers its future here, and one loop callback per fd and
    direction wakes them all.

    A channel's receive keeps its read fd registered after its wait (``keep``: the
    channel's core, held alive meanwhile so its fd cannot be closed by the collector):
    the next receive, a moment later, finds it registered, which saves two
    ``epoll_ctl`` calls per message (a nested epoll's, as a ``shm:`` end's is, are
    dear). An idle registration goes when its fd fires twice with nobody waiting (the
    first may be stale), and the channel drops it before it closes its fds
    (:meth:`forget`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._futs: dict[tuple[int, bool], set[asyncio.Future[None]]] = {}
        self._kept: dict[tuple[int, bool], object] = {}  # idle registrations: their holder
        self._fired: set[tuple[int, bool]] = set()  # idle ones that fired once already
        self._reused: set[tuple[int, bool]] = set()  # kept ones waited on again

    def add(
        self, loop: asyncio.AbstractEventLoop, fd: int, write: bool, fut: asyncio.Future[None]
    ) -> None:
        key = (fd, write)
        waiting = self._futs.get(key)
        if waiting is None:
            waiting = self._futs[key] = set()
            (loop.add_writer if write else loop.add_reader)(fd, self._wake, key)
        elif not waiting:
            self._kept.pop(key, None)  # an idle registration: in use again
            self._fired.discard(key)
            self._reused.add(key)
        waiting.add(fut)

    def remove(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        write: bool,
        fut: asyncio.Future[None],
        keep: Any = None,
    ) -> None:
        key = (fd, write)
        waiting = self._futs.get(key)
        if waiting is None or fut not in waiting:
            return  # (a close dropped it: the fd number may be another's now)
        waiting.discard(fut)
        if not waiting:
            if keep is not None and not write and not keep.closed:
                self._kept[key] = keep
                return
            self._drop(key)

    def forget(self, fd: int, holder: object) -> None:
        """``holder`` closes its fd ``fd``: drop its idle registration first."""
        key = (fd, False)
        if self._kept.get(key) is holder and not self._futs.get(key):
            self._drop(key)

    def fail(self, fd: int, why: str) -> None:
        """``fd``'s owner closes it: every wait on it (both directions) ends with
        :class:`ChannelClosed` (``why``) and the registrations go now, while the fd is
        still open."""
        for key in ((fd, False), (fd, True)):
            waiting = self._futs.get(key)
            if waiting is None:
                continue
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(ChannelClosed(why))
            self._drop(key)

    def _drop(self, key: tuple[int, bool]) -> None:
        del self._futs[key]
        self._kept.pop(key, None)
        self._fired.discard(key)
        self._reused.discard(key)
        loop = self._loop
        (loop.remove_writer if key[1] else loop.remove_reader)(key[0])

    def _wake(self, key: tuple[int, bool]) -> None:
        waiting = self._futs.get(key)
        if not waiting:
            # An idle registration fired. Once may be stale: the loop polled while the
            # task it had just woken had not yet read what woke it. Twice in a row, the
            # fd is ready with nobody waiting: let it go (no busy loop).
            if waiting is not None:
                if key in self._fired:
                    self._drop(key)
                else:
                    self._fired.add(key)
            return
        if key in self._reused:
            # The first wake-up after a kept registration was waited on again may come
            # from a poll made before the task read what the previous one announced
            # (a removed registration would have had it cancelled): look again.
            self._reused.discard(key)
            probe = select.poll()
            probe.register(key[0], select.POLLOUT if key[1] else select.POLLIN)
            if not probe.poll(0):
                return
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)


_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchers] = (
    weakref.WeakKeyDictionary()
)


def watchers(loop: asyncio.AbstractEventLoop) -> _Watchers:
    w = _watchers.get(loop)
    if w is None:
        w = _watchers[loop] = _Watchers(loop)
    return w


def forget_fd(fd: int, holder: object) -> None:
    """Drop ``holder``'s idle registrations of ``fd`` in every loop (it closes ``fd``);
    in a loop running in another thread, through that loop (selectors are not
    thread-safe)."""
    if fd < 0:
        return
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, w in list(_watchers.items()):
        if loop.is_closed():
            continue
        if loop is running or not loop.is_running():
            w.forget(fd, holder)
        else:
            loop.call_soon_threadsafe(w.forget, fd, holder)


def close_fds(fds: Iterable[int], why: str) -> None:
    """The owner of ``fds`` closes them (a channel's ``close``/``aclose``, a mailbox's
    ``close``): every task waiting on one of them, in every loop, is woken with
    :class:`ChannelClosed` (``why``), and the loops drop the registrations before the
    fds go, so no selector keeps a closed (or reused) fd number. In a loop running in
    another thread it happens through that loop (selectors are not thread-safe)."""
    fds = [fd for fd in set(fds) if fd >= 0]
    if not fds or not _watchers:
        return
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, w in list(_watchers.items()):
        if loop.is_closed():
            continue
        for fd in fds:
            if loop is running or not loop.is_running():
                w.fail(fd, why)
            else:
                loop.call_soon_threadsafe(w.fail, fd, why)


async def wait_ready(
    reads: Iterable[int], writes: Iterable[int], deadline: float | None, keep: Any = None
) -> bool:
    """Wait until one of ``reads`` is readable or one of ``writes`` writable; False if
    the deadline passed first. Other waiters on the same fds are not disturbed.
    ``keep``: the channel core whose read fds stay registered afterwards (see
    :class:`_Watchers`)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    w = watchers(loop)
    watched = [(fd, False) for fd in reads] + [(fd, True) for fd in writes]
    for fd, write in watched:
        w.add(loop, fd, write, fut)
    try:
        if deadline is None:
            await fut
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(fut, remaining)
        except TimeoutError:
            return False
        return True
    finally:
        for fd, write in watched:
            w.remove(loop, fd, write, fut, keep)


async def wait_io(rfd: int, wfd: int, deadline: float | None, what: str, keep: Any = None) -> None:
    """Wait until ``rfd`` is readable or ``wfd`` writable (-1: not wanted).

    Raises :class:`Timeout` at the deadline and :class:`ChannelClosed` if neither fd
    exists (the end was closed or cannot do what is asked).
    """
    if rfd < 0 and wfd < 0:
        raise ChannelClosed(f"cannot {what}: the channel has no fd for it")
    reads = [rfd] if rfd >= 0 else []
    writes = [wfd] if wfd >= 0 else []
    if not await wait_ready(reads, writes, deadline, keep):
        raise Timeout(f"{what} timed out")


def wait_fd(fd: int, write: bool, deadline: float | None, what: str) -> Any:
    """Wait for one fd in one direction (see :func:`wait_io`)."""
    return wait_io(-1, fd, deadline, what) if write else wait_io(fd, -1, deadline, what)


async def run_steps(steps: Generator[Step, None, T], deadline: float | None) -> T:
    """Run an engine operation that needs no channel yet (connect, a handshake: see
    :mod:`buzon._establish`), awaiting each READ/WRITE step's fd and each SLEEP by the
    deadline; :class:`Timeout` is thrown in when it passes (the blocking driver's
    ``run_steps``, awaiting)."""
    try:
        step = next(steps)
        while True:
            try:
                kind = step.kind
                if kind == SLEEP:
                    pause = step.budget or 0.0
                    if deadline is not None:
                        pause = min(pause, max(0.0, deadline - time.monotonic()))
                    await asyncio.sleep(pause)
                elif kind == EXTEND:
                    deadline = deadline_of(step.budget)
                else:
                    fds = (step.fd,) if step.fd >= 0 else ()
                    write = kind == WRITE
                    if not await wait_ready(() if write else fds, fds if write else (), deadline):
                        raise Timeout(f"{step.what} timed out")
            except BaseException as exc:
                step = steps.throw(exc)
                continue
            step = steps.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


#: background closes (``Channel.close`` with bytes still owed) until they are done
_lingering: set[asyncio.Task[None]] = set()


class Channel(ChannelIdentity):
    """A message channel (asyncio API): the awaitable twin of :class:`buzon.Channel`."""

    _label = "buzon.aio.Channel"

    def __init__(self, core: ChannelCore) -> None:
        self._core = core
        self._rlock = asyncio.Lock()
        self._wlock = asyncio.Lock()
        self._rendezvous = core.capacity == 0
        self._flow = core.taking or core.rv_ring is not None  # receives announce waits
        self._closing: asyncio.Task[None] | None = None  # close() writing what is owed
        self._spin = core.options.spin  # a shm ring's receive spins this long at most
        self._asked = False  # sent since the last receive: an answer may be on its way
        self._sleep_first = 0  # receives left that wait before reading (_poll_first)
        self._ended = False  # a close began: its waits were ended (_end_waits)

    @property
    def capacity(self) -> int | None:
        """0 (rendezvous), N (bounded), None (unbounded), or -1 (the transport's own
        buffer, the default)."""
        return self._core.capacity

    # -- sending ----------------------------------------------------------------------

    async def send(self, obj: Any, timeout: float | None = None, *, priority: int = 0) -> None:
        core = self._core
        self._asked = True
        bufs = core.encode(obj)
        fast = core.fast_send  # a shared-memory ring: one C call (see ChannelCore)
        if fast is not None and not priority and len(bufs) == 1 and not self._wlock.locked():
            frame = bufs[0]
            if type(frame) is bytes and len(frame) <= core.fast_limit and fast(frame, -1):
                return
        async with self._wlock:
            await self._send(bufs, deadline_of(timeout), priority)

    def send_nowait(self, obj: Any, *, priority: int = 0) -> None:
        self._asked = True
        if self._wlock.locked():
            raise Full("another task is sending")
        self._send_now(self._core.encode(obj), priority)

    def _send_now(self, bufs: list[Buffer], priority: int) -> None:
        core = self._core
        rv = core.rv_ring
        if rv is not None and not rv.receiver_waiting():  # capacity=0 on shm:
            raise Full("capacity=0: no receiver is waiting")
        if self._rendezvous and core.tokens is None:
            self._receipt_poll()  # an offer may have been withdrawn: read that first
        if core.try_send(bufs, priority, whole=True):
            return
        if core.credit_blocked:  # a CREDIT may be waiting unread: read it, try again
            self._receipt_poll()
            if core.try_send(bufs, priority, whole=True):
                return
        raise Full(self._core.full_reason())

    async def send_bytes(
        self, data: Buffer, timeout: float | None = None, *, priority: int = 0
    ) -> None:
        core = self._core
        self._asked = True
        if (
            type(data) is bytes
            and len(data) <= core.small_limit
            and not priority
            and not self._wlock.locked()
            and core.send_small(data)  # a quiet stream: header and payload in one write
        ):
            if not core.pending:
                return
            async with self._wlock:  # the kernel took part of it: the engine finishes it
                steps = send_steps(core, [], accepted=True, serial=core.serial)
                await self._run(steps, deadline_of(timeout))
            return
        fast = core.fast_send
        if (
            fast is not None
            and type(data) is bytes
            and not priority
            and len(data) <= core.fast_bytes_limit
            and not self._wlock.locked()
            and fast(data, 0)
        ):
            return
        async with self._wlock:
            await self._send(core.encode_bytes(data), deadline_of(timeout), priority)

    def send_bytes_nowait(self, data: Buffer, *, priority: int = 0) -> None:
        self._asked = True
        if self._wlock.locked():
            raise Full("another task is sending")
        self._send_now(self._core.encode_bytes(data), priority)

    async def send_async(
        self, obj: Any, timeout: float | None = None, *, priority: int = 0
    ) -> Receipt:
        """Send ``obj`` and return a :class:`Receipt` (``await receipt`` until the
        receiver took it). Waits only for room (``capacity``, ``timeout``)."""
        return await self._send_receipt(self._core.encode(obj, receipt=True), timeout, priority)

    async def send_bytes_async(
        self, data: Buffer, timeout: float | None = None, *, priority: int = 0
    ) -> Receipt:
        core = self._core
        flow = core.sflow  # made by the first receipt: then small payloads go in one write
        if (
            flow is not None
            and type(data) is bytes
            and len(data) <= core.small_limit
            and not priority
            and not self._wlock.locked()
            and core.send_small(data, RECEIPT_FLAG)
        ):
            number = flow.sent
            if core.pending:  # the kernel took part of it: the engine finishes it
                async with self._wlock:
                    steps = send_steps(core, [], accepted=True, number=number, serial=core.serial)
                    await self._run(steps, deadline_of(timeout))
            if not number & 63:
                self._receipt_poll()  # reap acknowledgements now and then
            return Receipt(self, flow, number)
        return await self._send_receipt(core.encode_bytes(data, receipt=True), timeout, priority)

    async def _send_receipt(
        self, bufs: list[Buffer], timeout: float | None, priority: int
    ) -> Receipt:
        core = self._core
        self._asked = True
        flow = core.receipt_flow()
        deadline = deadline_of(timeout)
        async with self._wlock:
            if core.try_send(bufs, priority):
                number = flow.sent
                if core.pending:  # finish a partial write (not: wait for acks, see flush)
                    steps = send_steps(core, [], accepted=True, number=number, serial=core.serial)
                    await self._run(steps, deadline)
            else:
                number = await self._run(send_steps(core, bufs, priority), deadline)
        if not number & 63:
            self._receipt_poll()  # reap acknowledgements now and then: a stream stays bounded
        return Receipt(self, flow, number)

    async def send_many(self, objs: Iterable[Any], timeout: float | None = None) -> int:
        """Send several objects with as few system calls as possible (see the blocking
        :meth:`buzon.Channel.send_many`). Returns the number sent."""
        return await self._send_batch(objs, timeout, as_bytes=False)

    async def send_bytes_many(self, items: Iterable[Buffer], timeout: float | None = None) -> int:
        return await self._send_batch(items, timeout, as_bytes=True)

    async def _send_batch(self, items: Iterable[Any], timeout: float | None, as_bytes: bool) -> int:
        core = self._core
        self._asked = True
        deadline = deadline_of(timeout)
        async with self._wlock:
            fast = core.fast_send_frames
            if fast is not None:  # a shared-memory ring: as many as fit in one C call
                batch, codec = core.fast_batch(items, as_bytes)
                i = fast(batch, codec, 0)
                while i < len(batch):  # no room, out of line, or several buffers
                    item = batch[i]
                    if as_bytes:
                        bufs = core.encode_bytes(item)
                    else:
                        bufs = item if type(item) is list else [item]
                    await self._send(bufs, deadline, 0)
                    i = fast(batch, codec, i + 1)
                return len(batch)
            if core.batches:  # the transport takes whole batches (fifo:): few writes
                encode = core.encode_bytes if as_bytes else core.encode
                batch = [encode(item) for item in items]
                i = core.try_send_messages(batch, 0)
                while i < len(batch):  # no room, or a large message: the usual way
                    await self._send(batch[i], deadline, 0)
                    i = core.try_send_messages(batch, i + 1)
                return len(batch)
            if core.message_oriented or core.raw or core.sflow is not None or core.unbounded:
                count = 0
                core.transport.cork(True)  # a transport may send them in fewer datagrams
                try:
                    for item in items:
                        bufs = core.encode_bytes(item) if as_bytes else core.encode(item)
                        await self._send(bufs, deadline, 0)
                        count += 1
                finally:
                    core.transport.cork(False)
                return count
            bufs, count = core.encode_batch(items, as_bytes)
            if count:
                await self._run(send_steps(core, bufs, count=count), deadline)
            return count

    async def _send(self, bufs: list[Buffer], deadline: float | None, priority: int) -> None:
        core = self._core
        if core.rv_ring is not None:  # capacity=0 kept by the rings (shm:): buzon._ring_rv
            await self._run(rv_send_steps(core, bufs, priority), deadline)
            return
        rendezvous = self._rendezvous
        if rendezvous:
            core.offer_with_send()  # a blocked rendezvous sender receives next
        if core.try_send(bufs, priority):
            if not (core.pending or rendezvous):
                return
            flow = core.sflow
            steps = send_steps(
                core,
                bufs,
                priority,
                accepted=True,
                number=flow.sent if flow is not None else 0,
                serial=core.serial,
                rendezvous=rendezvous,
            )
        else:
            steps = send_steps(core, bufs, priority, rendezvous=rendezvous)
        await self._run(steps, deadline)

    async def _run(self, steps: Steps, deadline: float | None) -> Any:
        """Run an engine operation (the blocking driver's ``_run``, awaiting): wait
        for each of its steps, throw a passed deadline or a cancellation into it."""
        try:
            step = next(steps)
            while True:
                try:
                    kind = step.kind
                    if kind == INPUT:
                        await self._input(step, deadline)
                    elif kind == EXTEND:
                        deadline = deadline_of(step.budget)
                    elif kind == LOCKED:
                        step.call()
                    elif kind == CREDIT:
                        await self._pump_until(step.done, deadline, step.what)
                    elif kind == SPIN:
                        await asyncio.sleep(0)  # no spinning here: let the loop run once
                    else:
                        await wait_fd(step.fd, kind == WRITE, deadline, step.what)
                except BaseException as exc:
                    step = steps.throw(exc)
                    continue
                step = steps.send(None)
        except StopIteration as stop:
            return stop.value

    async def _pump_until(
        self, done: Callable[[], bool], deadline: float | None, what: str
    ) -> None:
        """Wait until ``done()`` — a condition on CREDITs — reading what arrives (the
        messages met on the way stay for ``recv``; a task in ``recv`` is woken by the
        same readiness and finds them)."""
        core = self._core
        while not done():
            core.check_open()
            await self._wait_io_owed(deadline, what)
            if core.owed:
                core.flush()
            core.pump()

    def _receipt_poll(self) -> None:
        self._core.pump_quietly()  # the receipt's own state tells; recv reports errors

    # engine operations run for others (a Receipt): now, blocking, or awaited ----------

    def _run_now(self, steps: Steps) -> Any:
        """An operation that never waits (LOCKED steps only)."""
        try:
            for step in steps:
                if step.kind != LOCKED:
                    raise UnsupportedOperation("this operation would wait")
                step.call()
        except StopIteration as stop:  # pragma: no cover - for loops end quietly
            return stop.value
        return None

    def _run_op(self, steps: Steps, timeout: float | None) -> Any:
        steps.close()
        raise UnsupportedOperation("a receipt of an asyncio channel is awaited: await receipt")

    async def _arun_op(self, steps: Steps) -> Any:
        return await self._run(steps, None)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every accepted message (and CREDIT owed) has reached the kernel
        (on a reliable link: until the peer acknowledged it)."""
        async with self._wlock:
            await self._run(flush_steps(self._core), deadline_of(timeout))

    # -- receiving --------------------------------------------------------------------

    @overload
    async def recv(self, timeout: float | None = None) -> Any: ...
    @overload
    async def recv(self, timeout: float | None = None, *, type: type[T]) -> T: ...

    async def recv(self, timeout: float | None = None, *, type: Any = Any) -> Any:
        async with self._rlock:
            core = self._core
            item = self._poll_first(timeout)
            if item is None:
                item = await self._wait_item(deadline_of(timeout))
            return core.item_object(item, type)

    async def _recv_fields(self, timeout: float | None) -> tuple[Any, dict[int, bytes] | None]:
        """``recv`` that also gives the message's header fields (None: it had none)."""
        async with self._rlock:
            core = self._core
            item = self._fast_poll() if core.fast_recv is not None else core.poll()
            if item is None:
                item = await self._wait_item(deadline_of(timeout))
            fields = None if item.__class__ is tuple else item.fields  # type: ignore[union-attr]
            return core.item_object(item), fields

    async def _send_encoded(self, bufs: list[Buffer], timeout: float | None) -> None:
        """``send`` of an encoded frame (RPC frames with header fields)."""
        async with self._wlock:
            await self._send(bufs, deadline_of(timeout), 0)

    def recv_nowait(self, *, type: Any = Any) -> Any:
        if self._rlock.locked():
            raise Empty("another task is receiving")
        return self._core.item_object(self._poll_nowait(), type)

    def _poll_nowait(self) -> Frame | tuple[int, bytes]:
        core = self._core
        item = core.poll()
        if item is None:
            if self._flow:
                core.before_wait(offer=False)  # credit and receipts owed, not an offer
            raise Empty("no message is ready")
        return item

    async def recv_bytes(self, timeout: float | None = None) -> bytes:
        async with self._rlock:
            core = self._core
            item = self._poll_first(timeout)
            if item is None:
                item = await self._wait_item(deadline_of(timeout))
            return core.item_bytes(item)

    def _spin_now(self, timeout: float | None) -> float:
        """How long a receive on a shm ring may spin: ``spin`` (bounded by the timeout)
        when this channel sent something since its last receive, so an answer may be
        on its way; else 0 (a stream only received, or a loop serving many channels,
        waits in the loop at once: the spin would only hold up the other tasks)."""
        if not self._asked:
            return 0.0
        self._asked = False
        return self._spin if timeout is None else min(self._spin, timeout)

    def _poll_first(self, timeout: float | None) -> Frame | tuple[int, bytes] | None:
        """A receive's first read. On a shm ring: one C call, spinning on the ring for
        a moment if this channel just sent (:meth:`_spin_now`). Elsewhere as the
        blocking driver's ``spin=0`` does it (this driver never spins on a stream):
        read first while messages stream in; once a read found nothing (a peer that
        answers), the next ``_SLEEP_FIRST`` receives wait before they read (``None``:
        wait), or until a stream's read brings several."""
        core = self._core
        if core.fast_recv is not None:
            return self._fast_poll(self._spin_now(timeout))
        if self._sleep_first and timeout != 0:
            item = core.buffered()  # what an earlier read brought (no system call)
            if item is None:
                self._sleep_first -= 1
            return item
        item = core.poll()
        if item is None and core.plain_readiness and not self._flow:
            self._sleep_first = _SLEEP_FIRST
        return item

    def _fast_poll(self, spin: float = 0.0) -> Frame | tuple[int, bytes] | None:
        """A shared-memory ring's receive in one C call; if the ring is empty, spin on it
        for at most ``spin`` seconds (GIL released, nothing armed, no system call: the
        peer's answer to what this task just sent usually comes within a few
        microseconds, far sooner than a trip through the event loop). ``None``: wait
        the usual way, which arms the ring's eventfd."""
        core = self._core
        recv = core.fast_recv
        if recv is None or core.inbox:
            return core.poll()
        got = recv(core.max_frame)
        if got is None:
            wait = core.fast_spin
            if spin <= 0.0 or wait is None or not wait(spin):
                return None
            got = recv(core.max_frame)
            if got is None:
                return None
        if got[0] >= 0:
            return got
        return core.fast_other(got)

    def recv_bytes_nowait(self) -> bytes:
        if self._rlock.locked():
            raise Empty("another task is receiving")
        return self._core.item_bytes(self._poll_nowait())

    async def recv_bytes_into(self, buffer: Buffer, timeout: float | None = None) -> int:
        """:meth:`buzon.Channel.recv_bytes_into`, awaited: one message into ``buffer``,
        its size returned (:class:`MessageTooLarge` holding the message in ``.message``
        when it does not fit)."""
        async with self._rlock:
            core = self._core
            if core.raw:
                raise UnsupportedOperation("recv_bytes_into needs message framing (raw=False)")
            core.set_sink(buffer)
            try:
                item = core.poll()
                if item is None:
                    item = await self._wait_item(deadline_of(timeout))
            finally:
                core.set_sink(None)
            return core.item_into(item, buffer)

    # -- loans and views (shm: channels) --------------------------------------------------

    @contextlib.asynccontextmanager
    async def loan(self, nbytes: int, timeout: float | None = None) -> AsyncIterator[memoryview]:
        """``async with ch.loan(nbytes) as buf``: see :meth:`buzon.Channel.loan`."""
        core = self._core
        deadline = deadline_of(timeout)
        async with self._wlock:
            lent = await self._run(loan_steps(core, nbytes), deadline)
        ok = False
        try:
            yield lent.buffer
            ok = True
        finally:
            core.loan_end(lent, ok)

    @contextlib.asynccontextmanager
    async def recv_view(self, timeout: float | None = None) -> AsyncIterator[memoryview]:
        """``async with ch.recv_view() as view``: see :meth:`buzon.Channel.recv_view`."""
        async with self._rlock:
            core = self._core
            got = core.poll_view()
            if got is None:
                got = await self._wait_view(deadline_of(timeout))
        lent, view = got
        try:
            yield view
        finally:
            finish_view(lent, view)

    async def _wait_view(self, deadline: float | None) -> tuple[Any, memoryview]:
        core = self._core
        if deadline is None and core.options.idle_timeout is not None:
            deadline = deadline_of(core.options.idle_timeout)
        got: tuple[Any, memoryview] = await self._run(
            recv_steps(core, self._flow, core.poll_view), deadline
        )
        return got

    async def _wait_item(self, deadline: float | None) -> Frame | tuple[int, bytes]:
        core = self._core
        if deadline is None and core.options.idle_timeout is not None:
            deadline = deadline_of(core.options.idle_timeout)
        # recv polled just now: wait first (as this driver always did; a shm ring's
        # round trip is 23 us this way, 78 us with a general poll before the wait)
        polled = not self._flow
        steps = recv_steps(core, self._flow, polled=polled)
        item: Frame | tuple[int, bytes] = await self._run(steps, deadline)
        if self._sleep_first and core.more_buffered():
            self._sleep_first = 0  # a stream: read first again
        return item

    async def _input(self, step: Step, deadline: float | None) -> None:
        """An INPUT step (the blocking driver's ``_input``, awaiting; no spinning: the
        loop has other tasks to run)."""
        core = self._core
        limit, mid_frame = deadline, False
        if step.stall is not None:
            stall_at = time.monotonic() + step.stall
            if limit is None or stall_at < limit:
                limit, mid_frame = stall_at, True
        try:
            await self._wait_readable(limit)
        except Timeout:
            if mid_frame:
                raise core.stalled() from None
            raise

    async def _wait_readable(self, deadline: float | None) -> None:
        """Wait for input, finishing an earlier partial write meanwhile (else both ends
        could wait for each other)."""
        core = self._core
        core.check_open()
        await self._wait_io_owed(deadline, "recv")
        if core.owed:
            core.flush()

    async def _wait_io_owed(self, deadline: float | None, what: str) -> None:
        """Wait for input, or for room to write what is owed (on reliable datagrams room
        makes the write fd *readable*)."""
        core = self._core
        wfd = core.write_fileno() if core.owed else -1
        if core.acked and wfd >= 0:
            if not await wait_ready([core.read_fileno(), wfd], [], deadline):
                raise Timeout(f"{what} timed out")
            return
        await wait_io(core.read_fileno(), wfd, deadline, what, core)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.recv()
            except EndOfChannel:
                return

    # -- closing ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Flush what was accepted (bounded by ``close_timeout``), then close."""
        core = self._core
        if self._closing is not None:  # close() began it: wait for it
            await asyncio.shield(self._closing)
            return
        if core.closed:
            self._release()
            return
        with contextlib.suppress(Exception):  # takes whose receipts are not reported yet
            core.report_receipts()
        self._end_waits()
        deadline = deadline_of(core.options.close_timeout)
        if core.owed or core.acked:  # acked: linger until the peer has it all
            try:
                core.shutdown()
                await self._run(flush_steps(core, "close"), deadline)
            except Exception:
                pass  # the peer is gone: nothing more can be delivered
        if core.lingers():  # TCP: no reset while the kernel still holds our bytes
            try:
                await run_steps(linger_steps(core), deadline)
            except Exception:
                pass
        self._release()

    def _release(self) -> None:
        """Close the core, dropping first the event loops' idle registrations of its read
        fd (see ``_Watchers``): a closed fd must not stay in a loop's selector."""
        core = self._core
        self._end_waits()
        forget_fd(core.read_fileno(), core)
        if self._rendezvous:  # a send waiting for its take wakes to a closed core
            with contextlib.suppress(Exception):
                core.withdraw_at_close()
        core.close()

    def _end_waits(self) -> None:
        """A close began: the tasks waiting in this channel's operations (a ``recv``,
        a ``send`` waiting for room or credit, ``buzon.aio.wait``) wake with
        :class:`ChannelClosed` (the blocking driver's wake fd, here the loop's own
        registrations of the channel's fds)."""
        core = self._core
        self._ended = True
        if core.released:
            return  # its fds are gone (a datagram end still names its old fd number)
        fds = [core.read_fileno(), core.write_fileno()]
        tokens = core.tokens  # a simplex send waits on its pool too (room, the take's ack)
        if tokens is not None:
            fds += (tokens.credit_fd, tokens.ack_fd)
        close_fds(fds, "the channel was closed")

    def close(self) -> None:
        """Close the channel: every later operation raises :class:`ChannelClosed` at
        once. What it accepted but has not written yet (the tail of a message a send
        returned for, messages queued with ``capacity=None``) is still delivered: with
        an event loop running it is written in the background, bounded by
        ``close_timeout``, before the fds are released, as asyncio's own transports
        do (``await aclose()`` waits for that instead); without one, those bytes go to
        the interpreter's exit hook like a blocking channel's."""
        core = self._core
        with contextlib.suppress(Exception):  # takes whose receipts are not reported yet
            core.report_receipts()
        if core.closed or not (core.owed or core.lingers()):
            self._release()
            return
        self._end_waits()
        forget_fd(core.read_fileno(), core)
        if self._rendezvous:  # written by the linger below, before the fds go
            with contextlib.suppress(Exception):
                core.withdraw_at_close()
        core.begin_close()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the exit hook writes what is owed, then the fds go
        task = self._closing = loop.create_task(self._linger())
        _lingering.add(task)  # a reference until it is done (the loop keeps weak ones)
        task.add_done_callback(_lingering.discard)

    async def _linger(self) -> None:
        """The background half of :meth:`close`: write what is owed, then release."""
        core = self._core
        deadline = deadline_of(core.options.close_timeout)
        try:
            await self._run(flush_steps(core, "close"), deadline)
            await run_steps(linger_steps(core), deadline)
        except Exception:  # the peer is gone, or time ran out: nothing more goes
            pass
        finally:
            self._release()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _ready(self) -> bool:
        if self._ended or self._core.closed:
            return True  # closed, or a close began: its calls raise ChannelClosed
        if self._rlock.locked():
            return False
        if self._core.ready():
            return True
        if self._flow:
            self._core.before_wait()  # buzon.aio.wait waits to receive: offer (capacity=0)
        return False

    def _wait_over(self) -> None:
        """``buzon.aio.wait`` returned: withdraw the rendezvous offer it made."""
        if self._rendezvous and not self._rlock.locked():
            self._core.wait_ended()


_reduction.passable(Channel)  # pickling refused, saying why (_reduction.py)
