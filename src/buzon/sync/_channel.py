"""The blocking driver: :class:`Channel`, a thin layer of waits over :class:`ChannelCore`.

Every blocking call is its ``*_nowait`` twin plus a wait on the transport's fds with
``select.poll``. A receiver first spins for ``spin`` seconds (default 50 µs) retrying
the non-blocking read, because waking a sleeping process on another CPU costs tens of
microseconds; after that it sleeps in ``poll``. While waiting for anything, pending
bytes of an earlier partial write are flushed, so no operation can starve another.

Thread safety: a write lock is held only while bytes are handed to the kernel (never
while waiting), a read lock serialises receivers, so one thread may send while another
receives; ``close`` may be called from any thread.

Capacity (credits, :mod:`buzon.protocol.credit`): a sender without credit waits for
the *read* side, where CREDIT frames arrive. If no other thread is receiving it reads
them itself (messages it meets stay for ``recv``); if one is, that thread applies
them and wakes it through a condition variable. No thread is ever started.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .. import _reduction
from .._channel import (
    OWING,
    RECEIPT_LINGER,
    ChannelCore,
    ChannelIdentity,
    Receipt,
    finish_view,
    weak_method,
)
from .._engine import (
    CREDIT,
    EXTEND,
    INPUT,
    LOCKED,
    READ,
    SLEEP,
    SPIN,
    Step,
    Steps,
    flush_steps,
    linger_steps,
    loan_steps,
    recv_steps,
    send_steps,
)
from .._ring_rv import rv_send_steps, settle
from ..errors import ChannelClosed, Empty, EndOfChannel, Full, Timeout, UnsupportedOperation
from ..protocol.credit import RECEIPT_FLAG
from ..protocol.frames import Frame, Kind, encode_frame, wait_frame
from ..transport.base import WAIT_BLOCK as _WAIT_BLOCK
from ..transport.base import Buffer

try:
    from ..protocol._take import Put as _Put
    from ..protocol._take import RingTake as _RingTake
    from ..protocol._take import Take as _Take
except ImportError:  # pragma: no cover - the C extension is not built
    _Put = _Take = _RingTake = None  # type: ignore[assignment, misc]
try:
    from ..protocol._rv import RvCall as _RvCall
except ImportError:  # pragma: no cover - the C extension is not built
    _RvCall = None  # type: ignore[assignment, misc]
try:  # recv_bytes with a message in hand, receipts counted, in C (protocol/_pop.c)
    from ..protocol._pop import Head as _Head
except ImportError:  # pragma: no cover - the C extension is not built
    _Head = None  # type: ignore[assignment, misc]

if TYPE_CHECKING:  # annotations only
    from ..protocol._dgram import Receiver
    from ..protocol._rv import RvStream
    from ..transport.fifo import FifoWaiter

__all__ = ["Channel"]

T = TypeVar("T")
#: a :meth:`Channel._recv_parsed` hook: ``parse(data, max_frame, n)`` -> result or None
Parse = Callable[[Buffer, int, int], Any]
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_monotonic = time.monotonic
_perf = time.perf_counter
_SLEEP_FIRST = 16  # spin=0: after a read found nothing, receives that sleep before reading
_get_ident = threading.get_ident
_WAKE_LOCK = threading.Lock()  # makes and drops channels' wake fds (rare)
_CLOSE_WAIT = 1.0  # close(): how long blocked waiters get to leave before the fds go


def wait_fds(
    rfd: int,
    wfd: int,
    want_read: bool,
    want_write: bool,
    deadline: float | None,
    wake: int = -1,
) -> tuple[bool, bool]:
    """Block until ``rfd`` is readable / ``wfd`` writable (as wanted) or the deadline,
    or ``wake`` (an fd, -1: none) is readable.

    Returns (readable, writable); both False means the deadline passed (or the wake).
    """
    poller = select.poll()
    if wake >= 0:
        poller.register(wake, _POLLIN)
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


def _wait_both_in(rfd: int, wfd: int, deadline: float | None, wake: int = -1) -> tuple[bool, bool]:
    """Like :func:`wait_fds`, with both fds waited on for *readability* (-1: skip)."""
    poller = select.poll()
    for fd in {rfd, wfd, wake} - {-1}:
        poller.register(fd, _POLLIN)
    if deadline is None:
        events = poller.poll()
    else:
        remaining = deadline - _monotonic()
        if remaining <= 0:
            return False, False
        events = poller.poll(max(1, int(remaining * 1000 + 0.999)))
    ready = {fd for fd, _ in events}
    return rfd in ready, wfd in ready


def flush_at_exit(cores: Iterable[ChannelCore], budget: float) -> int:
    """Write what open channels still hold in user space (the tail of a message whose
    send returned, an abort marker, queued messages), for at most ``budget`` seconds
    in all; channels whose peer is gone are skipped. Returns the number of bytes that
    could not be written (reported on stderr by the exit hook)."""
    deadline = _monotonic() + budget
    lost = 0
    for core in list(cores):
        try:
            while not core.released and core.owed and not core.flush():
                _, writable = wait_fds(-1, core.write_fileno(), False, True, deadline)
                if not writable:
                    break
        except Exception:
            pass  # the peer is gone: nothing more can be delivered
        if not core.released and core.owed:
            lost += sum(v.nbytes for v in core.pending) + sum(
                len(b) for bufs, _ in core.backlog for b in bufs
            )
    return lost


@atexit.register
def _exit_flush() -> None:
    """A normal interpreter exit without ``close()`` still delivers what sends returned
    for (bounded by the channels' ``close_timeout``, 5 s by default); what cannot be
    written is reported, never dropped silently."""
    cores = [c for c in OWING if not c.released and c.owed]
    if not cores:
        return
    budget = max(c.options.close_timeout for c in cores)
    lost = flush_at_exit(cores, budget)
    if lost:
        sys.stderr.write(
            f"buzon: {lost} bytes of accepted messages could not be written before exit "
            "(the peer did not read them in time); close() channels to be told sooner\n"
        )


try:  # deferred rendezvous takes (protocol/_rv.c): confirmed before a fork (a child
    from ..protocol._rv import at_exit as _rv_at_exit  # inherits none) and at exit
    from ..protocol._rv import confirm_all as _rv_confirm_all
except ImportError:  # pragma: no cover - the C extension is not built
    pass
else:
    atexit.register(_rv_at_exit)
    os.register_at_fork(before=_rv_confirm_all)


def run_steps(steps: Generator[Step, None, T], deadline: float | None) -> T:
    """Run an engine operation that needs no channel yet (connect, a handshake: see
    :mod:`buzon._establish`): wait for each READ/WRITE step's fd and each SLEEP by
    the deadline, and throw :class:`Timeout` in when it passes, as :meth:`Channel._run`
    does for the channel's operations."""
    try:
        step = next(steps)
        while True:
            try:
                kind = step.kind
                if kind == SLEEP:
                    pause = step.budget or 0.0
                    if deadline is not None:
                        pause = min(pause, max(0.0, deadline - _monotonic()))
                    time.sleep(pause)
                elif kind == EXTEND:
                    deadline = deadline_of(step.budget)
                else:
                    read = kind == READ
                    got = wait_fds(step.fd, step.fd, read, not read, deadline)
                    woke = got[0] or got[1]
                    if not woke and deadline is not None and _monotonic() >= deadline:
                        raise Timeout(f"{step.what} timed out")
            except BaseException as exc:
                step = steps.throw(exc)
                continue
            step = steps.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _resolve(fut: Any) -> None:
    if not fut.done():
        fut.set_result(None)


# channels holding a wake fd: a forked child drops its copies (the parent's close()
# must not wake the child's waits, nor the child's the parent's)
_WAKEABLE: weakref.WeakSet[Channel] = weakref.WeakSet()


def _forget_wakes_in_child() -> None:
    global _WAKE_LOCK
    _WAKE_LOCK = threading.Lock()  # another thread may have held it at the fork
    for ch in list(_WAKEABLE):
        wake, ch._wake, ch._waiters = ch._wake, -1, []
        if ch._rpoll is not None:
            with contextlib.suppress(KeyError):
                ch._rpoll.unregister(wake)
        with contextlib.suppress(OSError):
            os.close(wake)
    _WAKEABLE.clear()


os.register_at_fork(after_in_child=_forget_wakes_in_child)


# what protocol/_rv.c RvStream's calls return (see there)
_RV_DONE, _RV_TIMEOUT, _RV_WOKEN, _RV_HANDOVER, _RV_REPLY, _RV_FAILED = 1, 4, 5, 6, 7, -1


def _resumed(steps: Steps, failed: BaseException | None) -> Steps:
    """``steps`` from its first step on, with ``failed`` (None: nothing) thrown in there:
    a send the C rendezvous call began goes on from its wait for the take."""
    try:
        step = next(steps)
        if failed is not None:
            step = steps.throw(failed)
    except StopIteration as stop:
        return stop.value
    while True:
        try:
            yield step
        except BaseException as exc:
            try:
                step = steps.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            step = steps.send(None)
        except StopIteration as stop:
            return stop.value


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
        self._wlock = threading.Lock()  # held only around non-blocking writes
        # operations run for a Receipt (no write lock) resume their steps under this
        self._step_lock = threading.Lock()
        self._rpoll: select.poll | None = None  # readiness of the read fd, made once
        # close() from another thread wakes blocked waits through an eventfd made the
        # first time a thread is about to sleep (_enter_wait); the idents of the
        # threads in a wait, so that close() releases the fds only after they left
        self._wake = -1
        self._closing = False
        self._blocking_reader = False  # a receive asleep in recv itself (_wait_take)
        # recv_bytes' shortcut to the C wait: spin=0, no idle_timeout, a plain socket
        # wait that sleeps in recv (_receive's spin=0 branch, without its checks)
        self._blocking_recv = (
            self._spin <= 0.0
            and core.wait_blocks
            and core.plain_readiness
            and core.fast_recv is None
            and core.options.idle_timeout is None
        )
        self._waiters: list[int] = []
        self._sleep_first = 0  # spin=0: receives left that wait before reading (_receive)
        self._rendezvous = core.capacity == 0
        self._flow = core.taking or core.rv_ring is not None  # receives announce waits
        # threads waiting for CREDITs another thread may read (see _pump_until)
        self._cv = threading.Condition(threading.Lock())
        self._pumpers = 0
        self._gen = 0
        self._awaiters: list[tuple[Any, Any]] = []  # (loop, future): see _arun_op
        ops = core.transport.ring_ops  # a shared-memory ring: spins watch the ring itself
        self._ring_spin: Callable[[float], bool] | None = None if ops is None else ops.spin
        self._watched: dict[Any, int] = {}  # loop -> receipts awaited there reading
        core.use_write_lock(self._wlock)
        # receipts on a busy stream: a receiver that caught up watches its read fd a
        # little before it answers (ChannelCore._more_coming); never with spin=0
        self._watch_for = min(self._spin, RECEIPT_LINGER)
        self._watch_poll: select.poll | None = None
        if self._watch_for > 0.0 and core.wait_fd is not None:
            core.receipt_watch = weak_method(self._receipt_watch)
        core.on_credit = weak_method(self._credit_arrived)  # no cycle (weak_method)
        writer = core.receipt_writer(
            self, self._receipt_poll, self._send_bytes_async, self._finish_receipt
        )
        if writer is not None:  # send_bytes_async in C (protocol/_credit.c): it shadows
            self.send_bytes_async = writer  # type: ignore[method-assign]  # the method
        # capacity=0 on a framed stream: the rendezvous send and receive in C
        self._rv_stream = core.rv_stream() if self._rendezvous else None
        take = self._take = self._make_take()
        if take is not None:  # recv_bytes in C (protocol/_take.c): it shadows the method
            core.recv_counts = weak_method(self._take_counts)
            if _Head is not None and core.decoder is not None and core.fast_recv is None:
                # a message in hand (a read brought several) is taken by the Head, in C
                # too: the Take, whose checks would send it to the Python method, only
                # runs when a wait is due
                self.recv_bytes = _Head(self, core, self._rlock, take, bound=True)  # type: ignore[method-assign]
            else:
                self.recv_bytes = take  # type: ignore[method-assign]
        elif _Head is not None and core.decoder is not None and core.fast_recv is None:
            # a stream's recv_bytes with a message in hand (the stream's read brought
            # several): in C (protocol/_pop.c Head), receipts counted there too
            self.recv_bytes = _Head(self, core, self._rlock, Channel.recv_bytes)  # type: ignore[method-assign]
        elif _RingTake is not None and core.fast_recv is not None:
            # a shared-memory ring: recv_bytes takes a record with one C call
            ring_take = _RingTake(self, core, Channel.recv_bytes, weak_method(self._ring_rest))
            self.recv_bytes = ring_take  # type: ignore[method-assign]
        # send_bytes' C head: a quiet stream's small frames, or a ring's records
        if _Put is not None and (core.small_send is not None or core.fast_send is not None):
            self.send_bytes = _Put(self, core, Channel.send_bytes, weak_method(self._put_rest))  # type: ignore[method-assign]
        rv = self._rv_stream
        if rv is not None:
            core.rv_counts = weak_method(self._rv_counts)
        if (
            rv is not None
            and _RvCall is not None
            and core.options.idle_timeout is None
            and core.small_send is None  # (never set for capacity=0: send_bytes' first try)
        ):
            # send_bytes/recv_bytes of a rendezvous stream, one C call each (protocol/_rv.c
            # RvCall): they shadow the methods, which stay the reference (and fallback)
            spin = self._spin
            send = _RvCall(self, rv, Channel.send_bytes, Channel._rv_sent, spin, False)
            recv = _RvCall(self, rv, Channel.recv_bytes, Channel._rv_received, spin, True)
            self.send_bytes = send  # type: ignore[method-assign]
            self.recv_bytes = recv  # type: ignore[method-assign]

    @property
    def capacity(self) -> int | None:
        """0 (rendezvous), N (bounded), None (unbounded), or -1: the transport's own
        buffer (the default, when no end stated one)."""
        return self._core.capacity

    # -- sending ----------------------------------------------------------------------

    def send(self, obj: Any, timeout: float | None = None, *, priority: int = 0) -> None:
        """Encode ``obj`` and send it, waiting up to ``timeout`` for room (and, with
        ``capacity=0``, until the receiver has taken it)."""
        core = self._core
        bufs = core.encode(obj)
        fast = core.fast_send
        if fast is not None and not priority and len(bufs) == 1:
            frame = bufs[0]  # the ring is multi-producer safe and counts: no lock needed
            if type(frame) is bytes and len(frame) <= core.fast_limit and fast(frame, -1):
                return
        if core.rv_ring is not None:  # capacity=0 kept by the rings (shm:)
            frame = bufs[0]
            if len(bufs) == 1 and type(frame) is bytes and len(frame) <= core.rv_frame_limit:
                return self._send_rv(frame, -1, timeout, priority)
            return self._send_rv(bufs, None, timeout, priority)
        if self._rendezvous:
            rv = self._rv_stream  # a framed stream: the common case in one C call
            if (
                rv is not None
                and not priority
                and len(bufs) == 1
                and self._send_rv_stream(rv, bufs[0], True, timeout)  # type: ignore[arg-type]
            ):
                return
            core.offer_with_send()  # a blocked rendezvous sender receives next
        with self._wlock:
            accepted = core.try_send(bufs, priority)
            if accepted and not core.pending and not self._rendezvous:
                return
            number = core.sflow.sent if accepted and core.sflow is not None else 0
            serial = core.serial
        self._send_slow(bufs, timeout, priority, number if accepted else -1, serial)

    def _send_rv_stream(
        self, rv: RvStream, data: bytes, whole: bool, timeout: float | None
    ) -> bool:
        """A rendezvous send on a framed stream in one C call (``protocol/_rv.c``): this
        end's offer and the message in one write, the wait for its take, the reply's
        spin. False: it does not apply now (nothing was done: the general way). What the
        call hands back (a deadline, a close, a read it does not handle, an interrupt)
        the engine's :func:`send_steps` finishes from where the call stopped
        (:meth:`_rv_sent`), so every way out (a withdrawal above all) is the engine's.
        ``send_bytes`` in C (``RvCall``) does this same head itself."""
        if type(data) is not bytes or not self._rlock.acquire(False):
            return False
        failed: BaseException | None = None
        code = 0
        handed = False  # the read lock goes to _rv_sent
        try:
            deadline = None if timeout is None else deadline_of(timeout)
            wake = self._wake  # _enter_wait and _leave_wait, inlined (every send)
            if wake < 0:
                try:
                    wake = self._make_wake()
                except ChannelClosed:
                    return False  # the general way reports it
            waiters = self._waiters
            me = _get_ident()
            waiters.append(me)
            try:
                if not self._closing:
                    code = rv.send(data, whole, deadline, self._spin, wake)
            except BaseException as exc:  # a signal handler's, during a wait
                if rv.number <= 0:
                    raise
                code, failed = _RV_FAILED, exc
            finally:
                waiters.remove(me)
                if self._closing:
                    self._drop_wake()
            handed = True
        finally:
            if not handed:
                self._rlock.release()
        return self._rv_sent(rv, code, failed, deadline)

    def _rv_sent(
        self, rv: RvStream, code: int, failed: BaseException | None, deadline: float | None
    ) -> bool:
        """The end of a rendezvous send the C call began (:meth:`_send_rv_stream`, or
        ``send_bytes`` in C: ``protocol/_rv.c`` RvCall), with what it returned (``code``;
        ``failed``: what it raised once the message was written), the read lock held
        (released here) and the wait left. False: nothing was done (code 0)."""
        core = self._core
        try:
            if code == _RV_DONE:
                return True
            if code == 0:
                return False
            if code == _RV_REPLY:  # the reply's read: the engine's finish_with_reply
                try:
                    core.rv_read(rv.n, rv.err)
                    core.finish_with_reply()
                except Exception:
                    core.send_finished()  # a broken link is the next operation's
                return True
            if code == _RV_TIMEOUT:
                failed = Timeout("send timed out")
            elif code == _RV_WOKEN:
                failed = ChannelClosed("the channel was closed by another thread")
            elif code == _RV_HANDOVER:
                try:
                    core.rv_read(rv.n, rv.err)
                except BaseException as exc:
                    failed = exc
        finally:
            self._rlock.release()
        steps = send_steps(
            core, [], accepted=True, number=rv.number, serial=rv.serial, rendezvous=True
        )
        try:
            self._run(_resumed(steps, failed), deadline)
        finally:
            core.rv_over = rv.serial  # this C send is over: close() leaves its message
        return True

    def _recv_rv_stream(self, rv: RvStream, timeout: float | None) -> Frame | tuple[int, bytes]:
        """A rendezvous receive on a framed stream in one C call (``protocol/_rv.c``),
        under the read lock: a message in hand taken, or the offer, the wait, the read
        and the take; what the call hands back the general way finishes
        (:meth:`_rv_got`)."""
        core = self._core
        limit = timeout if timeout is not None else core.options.idle_timeout
        deadline = None if limit is None else deadline_of(limit)
        wake = self._enter_wait()
        got: object
        try:
            got = rv.recv(deadline, self._spin if timeout != 0 else 0.0, wake)
        except BaseException as exc:  # a signal handler's, during the wait
            got = exc
        return self._rv_got(rv, got, timeout, deadline)

    def _rv_got(
        self, rv: RvStream, got: object, timeout: float | None, deadline: float | None
    ) -> Frame | tuple[int, bytes]:
        """What the C rendezvous receive returned (a message, a code, or the exception it
        raised), under the read lock, the wait entered (left here): the rest the general
        way finishes (the offer withdrawn if the receive ends without a message, as the
        engine's)."""
        core = self._core
        try:
            if type(got) is tuple:
                return got
            if isinstance(got, BaseException):
                raise got
            if got == _RV_TIMEOUT:
                raise Timeout("recv timed out")
            if got == _RV_WOKEN:
                raise ChannelClosed("the channel was closed by another thread")
            if got == _RV_HANDOVER:
                core.rv_read(rv.n, rv.err)
        except BaseException:
            core.wait_ended()
            raise
        finally:
            self._leave_wait()
        item = core.buffered()
        if item is None:
            left = None if deadline is None else max(0.0, deadline - _monotonic())
            item = self._receive(left if timeout is not None or left is not None else None)
        return item

    def _rv_received(
        self, rv: RvStream, got: object, timeout: float | None, deadline: float | None
    ) -> bytes:
        """``recv_bytes`` in C (``protocol/_rv.c`` RvCall) handed back what its receive
        returned (:meth:`_rv_got`), the read lock held (released here)."""
        try:
            item = self._rv_got(rv, got, timeout, deadline)
        finally:
            self._rlock.release()
        if self._pumpers:
            self._wake_pumpers()
        return item[1] if item.__class__ is tuple else self._core.item_bytes(item)

    def _send_rv(self, item: Any, codec: int | None, timeout: float | None, priority: int) -> None:
        """A rendezvous send on rings that keep it (``buzon._ring_rv``): put the message
        (``codec`` -1: ``item`` is a whole frame, 0: a body, None: a list of buffers, the
        general way), then wait in one C call until the receiver took it; a send that
        gives up withdraws it (:func:`settle`)."""
        core = self._core
        rv = core.rv_ring
        ticket = -1
        with self._wlock:
            if codec is None:
                if core.try_send(item, priority):
                    ticket = rv.ticket()
            elif not priority and rv.send_frame(item, codec):
                ticket = rv.ticket()
        if ticket < 0:  # no room now (or a priority): the engine's way, from the start
            if codec is not None:
                item = core.encode_bytes(item) if codec == 0 else [item]
            self._run(rv_send_steps(core, item, priority), deadline_of(timeout))
            return
        try:
            wake = self._enter_wait()
        except BaseException as exc:  # closed meanwhile
            settle(core, rv, ticket, exc)
            return
        try:  # settled inside the wait: a close() in another thread waits for us
            got = rv.wait(ticket, timeout, self._spin, wake)
            if got == 1:
                return
            if got == 0:
                raise Timeout("")  # settle() says what became of the message
            self._woken()
            raise EndOfChannel(f"the peer of {core.address} closed the channel")
        except BaseException as exc:
            settle(core, rv, ticket, exc)
        finally:
            self._leave_wait()

    def _send_encoded(self, bufs: list[Buffer], timeout: float | None) -> None:
        """``send`` of an encoded frame (no priority, no rendezvous: the fast path's)."""
        core = self._core
        if core.rv_ring is not None:  # capacity=0 kept by the rings (shm:)
            self._send_rv(bufs, None, timeout, 0)
            return
        with self._wlock:
            accepted = core.try_send(bufs)
            if accepted and not core.pending:
                return
            serial = core.serial
        self._send_slow(bufs, timeout, 0, 0 if accepted else -1, serial)

    def _send_frame(self, frame: bytes, timeout: float | None) -> None:
        """Send one whole encoded DATA frame (a protocol's frame made elsewhere, e.g.
        ``protocol._rpc.request``), waiting up to ``timeout``, as :meth:`send` sends
        its own: in one C call where the channel is quiet (a ring's put, or one
        write on a stream: ``small_send``), else the general way."""
        core = self._core
        fast = core.fast_send
        if fast is not None:
            if len(frame) <= core.fast_limit and fast(frame, -1):
                return
        elif core.small_limit >= 0:  # a stream's SmallWriter (never with capacity=0)
            small = core.small_send
            if small is not None:
                done = small(frame, True)  # type: ignore[call-arg]
                if done is True:
                    return
                if done is not False:  # the kernel took part of it: the engine finishes it
                    self._send_slow([], timeout, 0, 0, done)
                    return
        self._send_encoded([frame], timeout)

    def _send_fields(self, obj: Any, fields: dict[int, bytes], timeout: float | None) -> None:
        """``send`` with header fields (``frames.Field``: RPC call ids, deadlines)."""
        core = self._core
        codec, body, buffers = core.codec.encode(obj)
        bufs = encode_frame(
            Kind.DATA, codec, body, buffers, fields=fields, max_frame=core.max_frame
        )
        self._send_encoded(bufs, timeout)

    def _recv_fields(self, timeout: float | None) -> tuple[Any, dict[int, bytes] | None]:
        """``recv`` that also gives the message's header fields (None: it had none)."""
        with self._rlock:
            core = self._core
            item = core.buffered()
            if item is None:
                item = self._receive(timeout)
        if self._pumpers:
            self._wake_pumpers()
        fields = None if item.__class__ is tuple else item.fields  # type: ignore[union-attr]
        return core.item_object(item), fields

    def send_nowait(self, obj: Any, *, priority: int = 0) -> None:
        """Send ``obj`` now or raise :class:`Full` (``capacity=0``: only if a receiver
        is waiting; it does not wait for the receiver to take it)."""
        self._send_now(self._core.encode(obj), priority)

    def _send_now(self, bufs: list[Buffer], priority: int) -> None:
        core = self._core
        rv = core.rv_ring
        if rv is not None and not rv.receiver_waiting():  # capacity=0 on shm:
            raise Full("capacity=0: no receiver is waiting")
        if self._rendezvous and core.tokens is None:
            self._receipt_poll()  # an offer may have been withdrawn: read that first
        with self._wlock:
            if core.try_send(bufs, priority, whole=True):
                return
        if core.credit_blocked:  # a CREDIT may be waiting unread: read it, try again
            self._receipt_poll()
            with self._wlock:
                if core.try_send(bufs, priority, whole=True):
                    return
        raise Full(self._core.full_reason())

    def send_bytes(self, data: Buffer, timeout: float | None = None, *, priority: int = 0) -> None:
        """Send ``data`` as one message, without a codec (a raw channel: as is)."""
        core = self._core
        small = core.small_send
        if small is not None and not priority:  # small bytes on a quiet stream: C writes
            done = small(data)  # type: ignore[arg-type]
            if done is True:
                return
            if done is not False:  # the kernel took part of it: the engine finishes it
                self._send_slow([], timeout, 0, 0, done)
                return
        rv = self._rv_stream  # capacity=0 on a framed stream: the common case in C
        if rv is not None and not priority and self._send_rv_stream(rv, data, False, timeout):  # type: ignore[arg-type]
            return
        if type(data) is bytes and len(data) <= core.small_limit and not priority:
            with self._wlock:  # a quiet stream: header and payload in one write
                sent = core.send_small(data)
                if sent and not core.pending:
                    return
                serial = core.serial
            if sent:  # the kernel took part of it: the engine finishes it
                self._send_slow([], timeout, 0, 0, serial)
                return
        fast = core.fast_send
        if (
            fast is not None
            and type(data) is bytes
            and not priority
            and len(data) <= core.fast_bytes_limit
            and fast(data, 0)  # the ring is multi-producer safe and counts: no lock needed
        ):
            return
        if core.rv_ring is not None:  # capacity=0 kept by the rings (shm:)
            if type(data) is bytes and len(data) <= core.rv_body_limit:
                return self._send_rv(data, 0, timeout, priority)
            return self._send_rv(core.encode_bytes(data), None, timeout, priority)
        bufs = core.encode_bytes(data)
        if self._rendezvous:
            core.offer_with_send()  # a blocked rendezvous sender receives next
        with self._wlock:
            accepted = core.try_send(bufs, priority)
            if accepted and not core.pending and not self._rendezvous:
                return
            number = core.sflow.sent if accepted and core.sflow is not None else 0
            serial = core.serial
        self._send_slow(bufs, timeout, priority, number if accepted else -1, serial)

    def send_bytes_nowait(self, data: Buffer, *, priority: int = 0) -> None:
        self._send_now(self._core.encode_bytes(data), priority)

    def send_async(self, obj: Any, timeout: float | None = None, *, priority: int = 0) -> Receipt:
        """Send ``obj`` and return at once with a :class:`Receipt` that completes when
        the receiver has taken it. Waits only for room (``capacity``, ``timeout``)."""
        return self._send_receipt(self._core.encode(obj, receipt=True), timeout, priority)

    def send_bytes_async(
        self, data: Buffer, timeout: float | None = None, *, priority: int = 0
    ) -> Receipt:
        """:meth:`send_async` for bytes (no codec)."""
        # (on a quiet stream this channel's own C writer shadows this method: __init__)
        return self._send_bytes_async(data, timeout, priority=priority)

    def _send_bytes_async(
        self, data: Buffer, timeout: float | None = None, *, priority: int = 0
    ) -> Receipt:
        """:meth:`send_bytes_async`'s general way (what its C writer cannot do)."""
        core = self._core
        flow = core.sflow  # made by the first receipt: then small payloads go in one write
        if flow is not None and type(data) is bytes and len(data) <= core.small_limit:
            with self._wlock:
                sent = not priority and core.send_small(data, RECEIPT_FLAG)
                number = flow.sent  # read under the lock: another thread may send next
                if sent and core.pending:
                    serial = core.serial
                    sent = False
                    pending = True
                else:
                    pending = False
            if sent:
                if not number & 255:
                    self._receipt_poll()  # reap acknowledgements now and then
                return Receipt(self, flow, number)
            if pending:  # a partial write to finish
                return self._send_receipt_slow([], number, serial, timeout, 0)
        return self._send_receipt(core.encode_bytes(data, receipt=True), timeout, priority)

    def _finish_receipt(self, number: int, serial: int) -> Receipt:
        """The C writer's message ``number`` was written in part: finish it."""
        return self._send_receipt_slow([], number, serial, None, 0)

    def _send_receipt(self, bufs: list[Buffer], timeout: float | None, priority: int) -> Receipt:
        core = self._core
        flow = core.sflow or core.receipt_flow()
        number = serial = 0
        with self._wlock:
            if core.try_send(bufs, priority):
                number = flow.sent  # read under the lock: another thread may send next
                if number & 255 and not core.pending:
                    return Receipt(self, flow, number)
                bufs = []
                serial = core.serial
        return self._send_receipt_slow(bufs, number, serial, timeout, priority)

    def _send_receipt_slow(
        self, bufs: list[Buffer], number: int, serial: int, timeout: float | None, priority: int
    ) -> Receipt:
        """Wait for room (``bufs`` not sent yet) or finish a partial write, and now and
        then reap acknowledgements so a long stream of receipts stays bounded."""
        core = self._core
        flow = core.receipt_flow()
        steps = send_steps(core, bufs, priority, accepted=not bufs, number=number, serial=serial)
        number = self._run(steps, deadline_of(timeout))
        if not number & 255:
            self._receipt_poll()
        return Receipt(self, flow, number)

    def send_many(self, objs: Iterable[Any], timeout: float | None = None) -> int:
        """Send several objects, in order, with as few system calls as possible.

        On stream transports the frames are joined into one vectored write, which is
        how small messages reach millions per second; message transports (and channels
        with a capacity) send them one by one. Returns the number sent. ``timeout``
        bounds the whole batch.
        """
        return self._send_batch(objs, timeout, as_bytes=False)

    def send_bytes_many(self, items: Iterable[Buffer], timeout: float | None = None) -> int:
        """Like :meth:`send_many` for byte payloads (no codec)."""
        return self._send_batch(items, timeout, as_bytes=True)

    def _send_batch(self, items: Iterable[Any], timeout: float | None, as_bytes: bool) -> int:
        core = self._core
        fast = core.fast_send_frames
        if fast is not None:  # a shared-memory ring: as many as fit in one C call
            batch, codec = core.fast_batch(items, as_bytes)
            deadline = deadline_of(timeout)
            i = fast(batch, codec, 0)
            while i < len(batch):  # no room, out of line, or several buffers: the usual way
                remaining = None if deadline is None else max(0.0, deadline - _monotonic())
                item = batch[i]
                if as_bytes:
                    self.send_bytes(item, remaining)
                else:
                    self._send_encoded(item if type(item) is list else [item], remaining)
                i = fast(batch, codec, i + 1)
            return len(batch)
        if core.batches:  # the transport takes whole batches (fifo:): few writes
            encode = core.encode_bytes if as_bytes else core.encode
            batch = [encode(item) for item in items]
            deadline = deadline_of(timeout)
            with self._wlock:
                i = core.try_send_messages(batch, 0)
            while i < len(batch):  # no room, or a large message: the usual way
                remaining = None if deadline is None else max(0.0, deadline - _monotonic())
                self._send_encoded(batch[i], remaining)
                with self._wlock:
                    i = core.try_send_messages(batch, i + 1)
            return len(batch)
        if core.message_oriented or core.raw or core.sflow is not None or core.unbounded:
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
        bufs, count = core.encode_batch(items, as_bytes)
        if not count:
            return 0
        with self._wlock:
            accepted = core.try_send(bufs, single=False)
            if accepted:
                core.stats.messages_sent += count - 1
                if not core.pending:
                    return count
        self._send_slow(bufs, timeout, 0, 0 if accepted else -1, 0, count)
        return count

    def _send_slow(
        self,
        bufs: list[Buffer],
        timeout: float | None,
        priority: int,
        number: int,
        serial: int,
        count: int = 1,
    ) -> None:
        """The first attempt did not complete (``number`` -1: not accepted yet): the
        engine's :func:`send_steps` does the rest. ``serial`` names the frame written;
        ``count`` > 1: a batch of that many joined frames."""
        steps = send_steps(
            self._core,
            bufs,
            priority,
            accepted=number >= 0,
            number=max(number, 0),
            serial=serial,
            count=count,
            rendezvous=self._rendezvous,
        )
        self._run(steps, deadline_of(timeout))

    def _run_receive(self, steps: Steps, deadline: float | None) -> Any:
        """Run a receive (:func:`recv_steps`, whose steps are all INPUT) under the read
        lock the caller holds: :meth:`_run` without the write lock and the dispatch,
        since this is every blocking ``recv``'s path."""
        try:
            step = next(steps)
            while True:
                try:
                    self._input(step, deadline)
                except BaseException as exc:
                    step = steps.throw(exc)
                    continue
                step = steps.send(None)
        except StopIteration as stop:
            return stop.value

    def _run(self, steps: Steps, deadline: float | None, locked: bool = True) -> Any:
        """Run an engine operation: resume it (under the write lock if ``locked``: a
        send; others take their own locks), wait for each of its steps outside the
        lock, throw a passed deadline (or an interrupt) into it."""
        lock = self._wlock if locked else self._step_lock
        try:
            with lock:
                step = next(steps)
            while True:
                try:
                    kind = step.kind
                    if kind == INPUT:
                        self._input(step, deadline)
                    elif kind == EXTEND:
                        deadline = deadline_of(step.budget)
                    elif kind == LOCKED:
                        if self._rlock.acquire(blocking=False):
                            try:
                                step.call()
                            finally:
                                self._rlock.release()
                    elif kind == CREDIT:
                        self._pump_until(step.done, deadline, step.what)
                    elif kind == SPIN:
                        self._spin_input()
                    else:
                        read = kind == READ
                        wake = self._enter_wait()
                        try:
                            got = wait_fds(step.fd, step.fd, read, not read, deadline, wake)
                        finally:
                            self._leave_wait()
                        self._woken()
                        woke = got[0] or got[1]
                        if not woke and deadline is not None and _monotonic() >= deadline:
                            raise Timeout(f"{step.what} timed out")
                except BaseException as exc:
                    with lock:
                        step = steps.throw(exc)
                    continue
                with lock:
                    step = steps.send(None)
        except StopIteration as stop:
            return stop.value

    def _pump_until(self, done: Callable[[], bool], deadline: float | None, what: str) -> None:
        """Wait until ``done()`` — a condition on CREDITs — reading them ourselves when
        no other thread receives, else woken by the thread that does. Only a thread
        that waits for another to read counts in ``_pumpers`` (one that reads applies
        the CREDITs itself: waking it would be a lock and a notify per CREDIT)."""
        core = self._core
        rlock = self._rlock
        while not done():
            if rlock.acquire(blocking=False):
                try:
                    if done():
                        return
                    if not self._spin_pump(done):
                        self._wait(True, deadline, what)
                        core.pump()
                finally:
                    rlock.release()
                continue
            cv = self._cv
            with cv:
                self._pumpers += 1
                gen = self._gen
            try:
                # counted first, then tried again: a receiver that released the read
                # lock after our first try sees us counted and wakes us
                if rlock.acquire(blocking=False):
                    rlock.release()
                    continue
                with cv:
                    while self._gen == gen:
                        remaining = None if deadline is None else deadline - _monotonic()
                        if remaining is not None and remaining <= 0:
                            raise Timeout(f"{what} timed out")
                        cv.wait(remaining)
            finally:
                with cv:
                    self._pumpers -= 1

    def _spin_pump(self, done: Callable[[], bool]) -> bool:
        """Like a receive, spin ``spin`` seconds before sleeping: a CREDIT from a busy
        peer is usually microseconds away (the rendezvous acknowledgement). On a
        shared-memory ring the spin watches the ring itself (no system call, the GIL
        released)."""
        spin = self._spin
        if spin <= 0.0:
            return False
        core = self._core
        if core.owed:
            with self._wlock:
                core.flush()
        end = _perf() + spin
        ring_spin = self._ring_spin
        if ring_spin is not None:
            while True:
                left = end - _perf()
                if left <= 0.0 or not ring_spin(left):
                    return False
                core.pump()
                if done():
                    return True
        ready = self._rpoll
        if ready is None:
            rfd = core.read_fileno()
            if rfd < 0:
                return False
            ready = self._new_rpoll(rfd)
        poll0 = ready.poll
        while _perf() < end:
            if poll0(0):
                core.pump()
                if done():
                    return True
        return False

    def _spin_input(self) -> None:
        """A SPIN step: poll the read fd (a ring: watch the ring) for up to ``spin``
        seconds, never sleeping."""
        ring_spin = self._ring_spin
        if ring_spin is not None:
            ring_spin(self._spin)
            return
        ready = self._rpoll
        if ready is None:
            rfd = self._core.read_fileno()
            if rfd < 0:
                return
            ready = self._new_rpoll(rfd)
        end = _perf() + self._spin
        poll0 = ready.poll
        while _perf() < end:
            if poll0(0):
                return

    # -- waits that close() ends ------------------------------------------------------

    def _new_rpoll(self, rfd: int) -> select.poll:
        """The read fd's readiness poller (made once), with the wake fd if there is one."""
        ready = select.poll()
        ready.register(rfd, _POLLIN)
        with _WAKE_LOCK:
            if self._wake >= 0:
                ready.register(self._wake, _POLLIN)
            self._rpoll = ready
        return ready

    def _enter_wait(self) -> int:
        """This thread is about to sleep in a wait that a ``close()`` in another thread
        must end: count it in and return the wake fd to poll along with the channel's
        fds (made now, at the channel's first sleep: a channel that never sleeps has
        none). Raises ChannelClosed if a close() began. Pair with :meth:`_leave_wait`."""
        wake = self._wake
        if wake < 0:
            wake = self._make_wake()
        self._waiters.append(_get_ident())  # counted first, then "closing?": see close()
        if self._closing:
            self._leave_wait()
            raise ChannelClosed("the channel was closed")
        return wake

    def _leave_wait(self) -> None:
        self._waiters.remove(_get_ident())
        if self._closing:
            self._drop_wake()  # the last waiter out of a closed channel frees the fd

    def _woken(self) -> None:
        """After a wait: a close() in another thread woke it."""
        if self._closing:
            raise ChannelClosed("the channel was closed by another thread")

    def _make_wake(self) -> int:
        with _WAKE_LOCK:
            if self._closing:
                raise ChannelClosed("the channel was closed")
            if self._wake < 0:
                wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                if self._rpoll is not None:
                    self._rpoll.register(wake, _POLLIN)
                self._wake = wake
                _WAKEABLE.add(self)
            return self._wake

    def _drop_wake(self) -> None:
        """Close the wake fd once no thread polls it any more."""
        with _WAKE_LOCK:
            wake = self._wake
            if wake < 0 or self._waiters:
                return
            self._wake = -1
            if self._rpoll is not None:
                with contextlib.suppress(KeyError):
                    self._rpoll.unregister(wake)
            _WAKEABLE.discard(self)
        os.close(wake)

    def __del__(self) -> None:
        """Dropped without ``close()``: the wake fd goes (the core releases the rest).
        No thread waits here (a waiting thread holds the channel); no lock is taken (a
        collection may run this inside any code, _drop_wake's lock held included)."""
        wake = getattr(self, "_wake", -1)
        if wake >= 0:
            self._wake = -1
            with contextlib.suppress(OSError):
                os.close(wake)

    def _credit_arrived(self) -> None:
        if self._pumpers:
            self._wake_pumpers()

    def _wake_pumpers(self) -> None:
        with self._cv:
            self._gen += 1
            self._cv.notify_all()
            for loop, fut in self._awaiters:  # receipts awaited from asyncio code
                loop.call_soon_threadsafe(_resolve, fut)

    def _receipt_poll(self) -> None:
        if self._rlock.acquire(blocking=False):
            try:
                self._core.pump_quietly()  # the receipt's own state tells
            finally:
                self._rlock.release()

    # engine operations run for others (a Receipt): now, blocking, or awaited ----------

    def _run_now(self, steps: Steps) -> Any:
        """An operation that never waits (LOCKED steps only)."""
        return self._run(steps, None, locked=False)

    def _run_op(self, steps: Steps, timeout: float | None) -> Any:
        return self._run(steps, deadline_of(timeout), locked=False)

    async def _arun_op(self, steps: Steps) -> Any:
        """Run an operation from asyncio code without blocking the loop and without a
        thread: CREDIT steps read the read side when no thread receives (waiting on
        the loop for readability), else are woken by the thread that receives."""
        try:
            step = next(steps)
            while True:
                try:
                    if step.kind == CREDIT:
                        await self._apump_until(step.done)
                    elif step.kind == LOCKED:
                        if self._rlock.acquire(blocking=False):
                            try:
                                step.call()
                            finally:
                                self._rlock.release()
                    else:
                        raise UnsupportedOperation("this operation cannot be awaited")
                except BaseException as exc:
                    step = steps.throw(exc)
                    continue
                step = steps.send(None)
        except StopIteration as stop:
            return stop.value

    async def _apump_until(self, done: Callable[[], bool]) -> None:
        import asyncio

        core = self._core
        loop = asyncio.get_running_loop()
        while not done():
            rfd = -1
            if self._rlock.acquire(blocking=False):
                try:
                    if core.owed:
                        with self._wlock:
                            core.flush()
                    core.pump()
                    if done():
                        return
                    rfd = core.read_fileno()  # no thread receives: wait to read ourselves
                finally:
                    self._rlock.release()
            fut: asyncio.Future[None] = loop.create_future()
            waiter = (loop, fut)
            with self._cv:
                self._awaiters.append(waiter)
                self._pumpers += 1
            watching = rfd >= 0 and self._watch(loop, rfd)
            try:
                if not done():
                    await fut  # readable, or the receiving thread applied CREDITs
            finally:
                if watching:
                    self._unwatch(loop, rfd)
                with self._cv:
                    self._awaiters.remove(waiter)
                    self._pumpers -= 1

    def _watch(self, loop: Any, rfd: int) -> bool:
        """One reader callback per event loop wakes every receipt awaited there."""
        count = self._watched.get(loop, 0)
        if not count:
            loop.add_reader(rfd, self._readable, loop)
        self._watched[loop] = count + 1
        return True

    def _unwatch(self, loop: Any, rfd: int) -> None:
        count = self._watched[loop] - 1
        if count:
            self._watched[loop] = count
            return
        del self._watched[loop]
        loop.remove_reader(rfd)

    def _readable(self, loop: Any) -> None:
        with self._cv:
            for where, fut in self._awaiters:
                if where is loop:
                    _resolve(fut)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every accepted message (and CREDIT owed) has reached the kernel."""
        self._run(flush_steps(self._core), deadline_of(timeout))

    # -- receiving --------------------------------------------------------------------

    @overload
    def recv(self, timeout: float | None = None) -> Any: ...
    @overload
    def recv(self, timeout: float | None = None, *, type: type[T]) -> T: ...

    def recv(self, timeout: float | None = None, *, type: Any = Any) -> Any:
        """Receive and decode one message; ``type=`` validates it (msgspec types)."""
        core = self._core
        recv = core.fast_recv
        if recv is not None and not core.inbox:  # a ring: multi-consumer safe, no lock
            got = recv(core.max_frame)
            if got is not None:
                taken = got if got[0] >= 0 else self._after_fast(got, timeout)
                return core.item_object(taken, type)
        with self._rlock:
            core = self._core
            rv = self._rv_stream  # capacity=0 on a framed stream: in C
            if rv is not None:  # a message in hand (a reply our send read) at once
                item: Frame | tuple[int, bytes] | None = rv.take() or self._recv_rv_stream(
                    rv, timeout
                )
            else:
                item = core.buffered()
            if item is None:
                item = self._receive(timeout)
        if self._pumpers:
            self._wake_pumpers()  # a sender waiting for CREDITs may read them now
        return core.item_object(item, type)

    def _recv_parsed(self, parse: Parse, timeout: float | None) -> Frame | tuple[int, Any]:
        """Receive one message as :meth:`recv` does (waiting up to ``timeout``,
        raising as it does), not decoded: a message that arrives as one whole frame
        (a shared-memory ring's record, or a stream read that brought exactly one
        frame) is first offered to ``parse(data, max_frame, n)`` (``data[:n]``: the
        frame), which returns None to decline it; a result comes back as ``(-1,
        result)``, the frame counted as taken. Anything else comes as the channel's
        item: ``(codec, body)`` or a :class:`Frame` (``core.item_object`` decodes
        it). The hook for protocols that take their common message apart in C
        (``buzon.rpc``: ``protocol._rpc.parse``), without the decoder's steps."""
        core = self._core
        recv = core.fast_recv
        spun = False
        if recv is not None and not core.inbox:  # a ring: multi-consumer safe, no lock
            got = self._ring_take(recv, timeout)  # try, then spin on the ring
            if got is not None:
                code = got[0]
                if code >= 0:
                    return got
                if code == -1:  # a whole record: self._parse_record, inline
                    msg = got[1]
                    parsed = parse(msg, core.max_frame, len(msg))
                    if parsed is not None:  # counted as took_whole counts (no takes are
                        stats = core.stats  # numbered while the ring calls are on)
                        stats.bytes_received += len(msg)
                        stats.messages_received += 1
                        core.taken += 1
                        return (-1, parsed)
                return self._after_fast(got, timeout)
            spun = True  # the general way below sleeps without spinning again
        with self._rlock:
            core = self._core
            item = core.buffered()
            if item is None:
                item = self._receive(timeout, parse, spun)
        if self._pumpers:
            self._wake_pumpers()  # a sender waiting for CREDITs may read them now
        return item

    def _parse_record(self, parse: Parse, got: tuple[int, bytes]) -> tuple[int, Any] | None:
        """A ring's whole record (code -1) offered to ``parse``: ``(-1, result)``, or
        None (not a whole record, or declined)."""
        if got[0] != -1:
            return None
        core = self._core
        msg = got[1]
        parsed = parse(msg, core.max_frame, len(msg))
        if parsed is None:
            return None
        core.took_whole(len(msg))
        return (-1, parsed)

    def _after_fast(
        self, got: tuple[int, bytes], timeout: float | None
    ) -> Frame | tuple[int, bytes]:
        """A record the ring call returned whole: through the channel's state, under
        the read lock (a CREDIT is applied, and the next message waited for)."""
        with self._rlock:
            item = self._core.fast_other(got)
            return item if item is not None else self._receive(timeout)

    def recv_nowait(self, *, type: Any = Any) -> Any:
        """Receive one message now or raise :class:`Empty`."""
        with self._rlock:
            item = self._poll_nowait()
        if self._pumpers:
            self._wake_pumpers()
        return self._core.item_object(item, type)

    def recv_bytes(self, timeout: float | None = None) -> bytes:
        """Receive one message as bytes (raw stream channels: the bytes available)."""
        core = self._core
        recv = core.fast_recv
        if recv is not None and not core.inbox:  # a ring: multi-consumer safe, no lock
            got = recv(core.max_frame)
            if got is not None:
                return got[1] if got[0] >= 0 else core.item_bytes(self._after_fast(got, timeout))
        with self._rlock:
            core = self._core
            rv = self._rv_stream  # capacity=0 on a framed stream: in C
            if rv is not None:  # a message in hand (a reply our send read) at once
                item: Frame | tuple[int, bytes] | None = rv.take() or self._recv_rv_stream(
                    rv, timeout
                )
            else:
                item = core.buffered()
            if item is None:
                # spin=0, no deadline, a socket that sleeps in recv: straight to the C
                # wait (what _receive would do after its checks)
                if timeout is None and self._blocking_recv and not self._flow:
                    item = self._wait_take(None, 0.0)
                if item is None:
                    item = self._receive(timeout)
        if self._pumpers:
            self._wake_pumpers()
        return item[1] if item.__class__ is tuple else core.item_bytes(item)

    def _ring_rest(self, got: tuple[int, bytes], timeout: float | None) -> bytes:
        """The C ``recv_bytes`` of a ring (``protocol._take.RingTake``) took a record
        that is not a plain frame: finish it as the method does."""
        return self._core.item_bytes(self._after_fast(got, timeout))

    def _rv_counts(self) -> tuple[int, int, int, int, int, int, int]:
        """What the rendezvous calls in C counted (``core.rv_counts``)."""
        rv = self._rv_stream
        return (0,) * 7 if rv is None else rv.counts()

    def _receipt_watch(self) -> bool:
        """``core.receipt_watch``: watch the read fd up to ``_watch_for`` seconds with
        polls that never sleep (as the receive's spin does); True once it is readable."""
        ready = self._watch_poll
        if ready is None:
            fd = self._core.wait_fd
            if fd is None:
                return False
            ready = self._watch_poll = select.poll()
            ready.register(fd, select.POLLIN)
        poll = ready.poll
        end = _perf() + self._watch_for
        while True:
            if poll(0):
                return True
            if _perf() >= end:
                return False

    def _put_rest(self, serial: int) -> None:
        """The C ``send_bytes`` head (``protocol._take.Put``): the kernel took part of
        the frame ``small_send`` wrote; the engine finishes it (as ``send_bytes``)."""
        self._send_slow([], None, 0, 0, serial)

    def _make_take(self, fallback: Callable[..., bytes] | None = None) -> Any:
        """``recv_bytes`` in one C call (``protocol._take.Take``) where a receive with no
        deadline is one C wait and nothing else: ``spin=0``, no ``idle_timeout``, no
        takes to announce, a plain-readiness link whose receive is ``wait_frame`` on a
        pipe-like fd (mode 0) or on a stream socket that sleeps in recv (kind 2: each
        wait's mode is the transport's ``wait_mode()``, as in ``wait_read``), or a message
        transport's or fifo's C receiver. None: the method stays.
        ``fallback``: what the C call runs when it does not apply (the method; tests
        pass a spy)."""
        core = self._core
        if (
            _Take is None
            or self._spin > 0.0
            or self._flow
            or core.fast_recv is not None
            or not core.plain_readiness
            or core.options.idle_timeout is not None
        ):
            return None
        stream = core._stream
        wait: Any
        if core.wait_fd is not None and stream is not None and not stream.dontwait:
            kind, wait = 0, (wait_frame, core.wait_fd, 0)
        elif core.wait_fd is not None and stream is not None and core.wait_blocks:
            kind, wait = 2, (wait_frame, core.wait_fd, stream.wait_mode)
        elif core.wait_receiver is not None:
            kind, wait = 1, core.wait_receiver.wait
        else:
            return None
        return _Take(
            self,
            core,
            self._rlock,
            kind,
            wait,
            Channel.recv_bytes if fallback is None else fallback,
            weak_method(self._take_rest),
            weak_method(self._take_failed),
            core.max_frame,
        )

    def _take_counts(self) -> tuple[int, int]:
        """What the C ``recv_bytes`` took (``core.recv_counts``: held weakly)."""
        take: Any = self._take  # the C Take (recv_bytes, or the Head's fallback)
        counts: tuple[int, int] = take.counts()
        return counts

    def _take_rest(self, got: tuple[int, bytes] | bytes | int | None, room: int) -> bytes:
        """The C ``recv_bytes`` (:meth:`_make_take`) waited and got something other than
        a lone plain frame: finish as ``_wait_take`` and ``_receive`` do (the read lock
        is held). A close() in another thread that woke the wait (its nudge, on a FIFO,
        is input too) ends the receive here, before anything reads again: the waiter has
        left ``_waiters``, so the fds may be released at any moment."""
        self._woken()
        core = self._core
        if got is None:
            raise Timeout("recv timed out")
        if core.wait_receiver is not None:
            item = core.after_message(got)
        else:
            item = core.after_wait(got, room)  # type: ignore[arg-type]
        if item is None:
            item = self._run_receive(recv_steps(core, False, spin=False), None)
        if core.more_buffered():
            self._sleep_first = 0
        return item[1] if item.__class__ is tuple else core.item_bytes(item)

    def _take_failed(self, exc: OSError) -> None:
        """The C ``recv_bytes``'s wait failed: raise the typed error, as ``_wait_take``
        (ChannelClosed if a close() in another thread released the fds under it)."""
        self._woken()
        core = self._core
        if core.wait_receiver is not None:
            raise core.message_error(exc) from exc
        raise core.read_error(exc) from exc

    def recv_bytes_nowait(self) -> bytes:
        with self._rlock:
            item = self._poll_nowait()
        if self._pumpers:
            self._wake_pumpers()
        return self._core.item_bytes(item)

    def _poll_nowait(self) -> Frame | tuple[int, bytes]:
        core = self._core
        item = core.poll()
        if item is None:
            if self._flow:
                core.before_wait(offer=False)  # credit and receipts owed, not an offer
            raise Empty("no message is ready")
        return item

    def recv_bytes_into(self, buffer: Buffer, timeout: float | None = None) -> int:
        """Receive one message into ``buffer``; return its size. A message that does
        not fit raises :class:`MessageTooLarge` whose ``.message`` holds it (bytes):
        nothing is lost, as with multiprocessing's ``BufferTooShort``."""
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
            n = core.item_into(item, buffer)
        if self._pumpers:
            self._wake_pumpers()
        return n

    # -- loans and views (shm: channels) --------------------------------------------------

    @contextlib.contextmanager
    def loan(self, nbytes: int, timeout: float | None = None) -> Iterator[memoryview]:
        """Lend the space of one ``nbytes`` message in shared memory, to fill in place::

            with ch.loan(arr.nbytes) as buf:
                np.frombuffer(buf, arr.dtype).reshape(arr.shape)[:] = arr

        The writable ``buf`` is sent as one message (``recv_bytes`` takes it like a
        ``send_bytes`` one) when the block ends normally, and dropped unsent if it
        raises. Waits up to ``timeout`` for room or credit like ``send``. Views made
        of ``buf`` (numpy arrays) must be gone when the block ends (``BufferError``
        otherwise: the message is not sent). ``shm:`` channels only
        (:class:`UnsupportedOperation` elsewhere, and with ``capacity=0``).
        """
        core = self._core
        lent = self._run(loan_steps(core, nbytes), deadline_of(timeout))
        ok = False
        try:
            yield lent.buffer
            ok = True
        finally:
            with self._wlock:
                core.loan_end(lent, ok)

    @contextlib.contextmanager
    def recv_view(self, timeout: float | None = None) -> Iterator[memoryview]:
        """Receive one message as a read-only view of the shared memory it arrived in
        (the ring, or an out-of-line block), valid until the block ends::

            with ch.recv_view() as view:
                total = np.frombuffer(view, "f8").sum()

        Takes any message (a ``send_bytes`` one: its bytes; a ``send`` one: its
        encoded body, as ``recv_bytes``). The view is released when the block ends;
        using it afterwards raises ``ValueError``. An array made from it keeps it (and
        the ring space or block under it) until the array is deleted. ``shm:``
        channels only (:class:`UnsupportedOperation` elsewhere).
        """
        with self._rlock:
            lent, view = self._receive_view(timeout)
        if self._pumpers:
            self._wake_pumpers()
        try:
            yield view
        finally:
            finish_view(lent, view)

    def _receive_view(self, timeout: float | None) -> tuple[Any, memoryview]:
        core = self._core
        got = core.poll_view()
        if got is not None:
            return got
        limit = timeout if timeout is not None else core.options.idle_timeout
        steps = recv_steps(core, self._flow, core.poll_view, spin=False)
        view: tuple[Any, memoryview] = self._run_receive(steps, deadline_of(limit))
        return view

    def _receive(
        self, timeout: float | None, parse: Parse | None = None, spun: bool = False
    ) -> Frame | tuple[int, Any]:
        """Read a message: at once if the fd is readable, else after spinning for
        ``spin`` seconds (checking readiness with ``poll(0)``, which costs less than a
        failed read), else after sleeping in ``poll``. ``parse``: see
        :meth:`_recv_parsed`; ``spun``: the caller tried and spun on the ring already."""
        core = self._core
        spin = self._spin
        recv = core.fast_recv
        if recv is not None:
            if not spun:
                item = self._fast_receive(recv, timeout, parse)
                if item is not None:
                    return item
            spin = 0.0  # spun already, on the ring itself
        ready = self._rpoll
        if ready is None:
            core.check_open()
            rfd = core.read_fileno()
            if rfd < 0:
                raise UnsupportedOperation(
                    f"this end of the {core.transport.scheme} channel only sends"
                )
            ready = self._new_rpoll(rfd)
        if spin <= 0.0 and timeout != 0 and core.plain_readiness and not self._flow:
            # no spin: one system call when a message is there, two when it is not.
            # A read first while messages stream in; once a read found nothing (a
            # peer that answers, as in a round trip), sleep at once, the wait telling
            # readiness, for the next _SLEEP_FIRST receives, or until a stream's read
            # brings several messages. A socket's wait with no deadline sleeps in recv
            # itself (WAIT_BLOCK), which reads at once what is there: no read first
            limit = timeout if timeout is not None else core.options.idle_timeout
            deadline = None if limit is None else deadline_of(limit)
            receiver = core.wait_receiver
            if deadline is None and (
                core.wait_blocks or (receiver is not None and receiver.blocks)
            ):
                pass
            elif self._sleep_first:
                self._sleep_first -= 1
            else:
                item = core.poll()
                if item is not None:
                    return item
                self._sleep_first = _SLEEP_FIRST
            got = self._wait_take(deadline, 0.0, parse)  # the engine's INPUT step + take, in C
            if got is None:
                got = self._run_receive(recv_steps(core, False, spin=False), deadline)
            if core.more_buffered():
                self._sleep_first = 0
            return got
        # a receive that expects to wait (a parse hook: an RPC reply or request, whose
        # peer is still working) skips this look: the C wait's spin looks first anyway
        if (parse is None or timeout == 0) and ready.poll(0):
            item = core.poll()
            if item is not None:
                return item
        if self._flow:
            limit = timeout if timeout is not None else core.options.idle_timeout
            steps = recv_steps(core, True, spin=timeout != 0)
            taken: Frame | tuple[int, bytes] = self._run_receive(steps, deadline_of(limit))
            return taken
        deadline = deadline_of(timeout if timeout is not None else core.options.idle_timeout)
        if timeout != 0 and (core.wait_fd is not None or core.wait_receiver is not None):
            # spin, then sleep, then read: the engine's plain INPUT step and take, in C
            got = self._wait_take(deadline, spin, parse)
            if got is not None:
                return got
            spin = 0.0  # spun (or part of a frame is in: the engine's loop goes on)
        if spin > 0.0 and timeout != 0:
            end = _perf() + spin
            poll0 = ready.poll
            while _perf() < end:
                if poll0(0):
                    item = core.poll()
                    if item is not None:
                        return item
        waited: Frame | tuple[int, bytes] = self._run_receive(
            recv_steps(core, False, spin=False, polled=core.plain_readiness), deadline
        )
        return waited

    def _wait_take(
        self, deadline: float | None, spin: float, parse: Parse | None = None
    ) -> Frame | tuple[int, Any] | None:
        """A plain receive's INPUT step (spin ``spin`` seconds, sleep until the read fd
        is readable or ``deadline``) and the take's read, in one C call that releases
        the GIL while it waits (``protocol._stream.wait_frame``; where it applies:
        ``ChannelCore.wait_read``). Raises Timeout when the deadline passes with
        nothing read, and what a signal handler raised meanwhile. None: the call does
        not apply, or the read brought only part of a frame; the engine's loop
        (``recv_steps``) goes on."""
        core = self._core
        if core.wait_receiver is not None:  # a message transport's (or fifo's) C receive
            receiver = core.wait_message()
            return None if receiver is None else self._wait_message(receiver, deadline, spin)
        target = core.wait_read()
        if target is None:
            return None
        fd, buf, limit, mode = target
        wake = self._wake  # _enter_wait and _leave_wait, inlined: every recv that sleeps
        if wake < 0:
            wake = self._make_wake()
        waiters = self._waiters
        me = _get_ident()
        waiters.append(me)
        # a wait with no deadline may sleep in recv itself (mode WAIT_BLOCK), which only
        # a shutdown of the reading side ends: close() looks at this before it wakes us
        self._blocking_reader = mode >= _WAIT_BLOCK and deadline is None  # modes 0, 1, 3
        if self._closing:
            waiters.remove(me)
            self._blocking_reader = False
            self._drop_wake()
            raise ChannelClosed("the channel was closed")
        try:
            got = wait_frame(fd, buf, deadline, spin, limit, wake, mode)
        except OSError as exc:
            raise core.read_error(exc) from exc
        finally:
            self._blocking_reader = False
            waiters.remove(me)
            if self._closing:
                self._drop_wake()
        if got is None:
            self._woken()
            raise Timeout("recv timed out")
        return core.after_wait(got, len(buf), parse)

    def _wait_message(
        self, receiver: Receiver | FifoWaiter, deadline: float | None, spin: float
    ) -> Frame | tuple[int, bytes] | None:
        """:meth:`_wait_take` on a message transport: the INPUT step and the take's
        receive in one C call of its ``Receiver`` (``protocol/_dgram.c``; where it
        applies: ``ChannelCore.wait_message``), the same contract."""
        core = self._core
        wake = self._wake
        if wake < 0:
            wake = self._make_wake()
        waiters = self._waiters
        me = _get_ident()
        waiters.append(me)
        if self._closing:
            waiters.remove(me)
            self._drop_wake()
            raise ChannelClosed("the channel was closed")
        try:
            got = receiver.wait(deadline, spin, core.max_frame, wake)
        except OSError as exc:
            raise core.message_error(exc) from exc
        finally:
            waiters.remove(me)
            if self._closing:
                self._drop_wake()
        if got is None:
            self._woken()
            raise Timeout("recv timed out")
        return core.after_message(got)

    def _fast_receive(
        self,
        recv: Callable[[int], tuple[int, bytes] | None],
        timeout: float | None,
        parse: Parse | None = None,
    ) -> Frame | tuple[int, Any] | None:
        """A shared-memory ring's receive: one C call; if the ring is empty, spin on it
        (GIL released, nothing armed, no system call) for ``spin`` seconds. ``None``:
        nothing came, go the general way (which arms the ring's eventfd and sleeps)."""
        core = self._core
        got = self._ring_take(recv, timeout)
        if got is None:
            return None
        if got[0] >= 0:
            return got
        if parse is not None:
            parsed = self._parse_record(parse, got)
            if parsed is not None:
                return parsed
        return core.fast_other(got)

    def _ring_take(
        self, recv: Callable[[int], tuple[int, bytes] | None], timeout: float | None
    ) -> tuple[int, bytes] | None:
        """The ring call ``recv``, then (the ring empty) a spin on the ring for ``spin``
        seconds: what it returned, or None (nothing came)."""
        core = self._core
        limit = core.max_frame
        got = recv(limit)
        if got is None:
            spin = self._spin
            if spin <= 0.0 or timeout == 0:
                return None
            wait = core.fast_spin
            assert wait is not None
            end = _perf() + spin
            while got is None:
                left = end - _perf()
                if left <= 0.0 or not wait(left):
                    return None
                got = recv(limit)
        return got

    def _input(self, step: Step, deadline: float | None) -> None:
        """An INPUT step: spin (if the step allows and time is left), then sleep until
        the read fd is readable, writing what the channel owes meanwhile; a stall
        limit shorter than the deadline names the peer's stall when it passes."""
        core = self._core
        ready = self._rpoll
        if step.spin and self._spin > 0.0 and self._ring_spin is not None:
            if (deadline is None or deadline > _monotonic()) and self._ring_spin(self._spin):
                return  # a record is in the ring (the fd is armed only after a read)
        elif step.spin and self._spin > 0.0 and ready is not None:
            end = _perf() + self._spin
            if deadline is None or deadline > _monotonic():
                poll0 = ready.poll
                while _perf() < end:
                    if poll0(0):
                        return
        limit, mid_frame = deadline, False
        if step.stall is not None:
            stall_at = _monotonic() + step.stall
            if limit is None or stall_at < limit:
                limit, mid_frame = stall_at, True
        self._enter_wait()  # registered in ready (_make_wake, _new_rpoll)
        try:
            if core.owed or ready is None:
                self._wait(True, limit, "recv")  # also finishes an earlier write
            elif limit is None:
                ready.poll()
            else:
                remaining = limit - _monotonic()
                woke = remaining > 0 and ready.poll(int(remaining * 1000 + 0.999))
                if not woke and _monotonic() >= limit:
                    raise Timeout("recv timed out")
            self._woken()
        except Timeout:
            if mid_frame:
                raise core.stalled() from None
            raise
        finally:
            self._leave_wait()

    def _wait(self, read: bool, deadline: float | None, what: str) -> None:
        """Wait for the direction wanted, flushing pending output meanwhile."""
        core = self._core
        core.check_open()
        wake = self._enter_wait()
        try:
            self._wait_loop(read, deadline, what, wake)
        finally:
            self._leave_wait()

    def _wait_loop(self, read: bool, deadline: float | None, what: str, wake: int) -> None:
        core = self._core
        while True:
            want_write = core.owed or not read
            if core.acked:  # reliable datagrams: room and delivery make the write fd readable
                readable, writable = _wait_both_in(
                    core.read_fileno() if read else -1,
                    core.write_fileno() if want_write else -1,
                    deadline,
                    wake,
                )
            else:
                readable, writable = wait_fds(
                    core.read_fileno(), core.write_fileno(), read, want_write, deadline, wake
                )
            self._woken()
            if writable and core.owed:
                with self._wlock:
                    core.flush()
                if not read and not core.owed:
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
        rv = self._rv_stream
        if rv is not None:  # a deferred rendezvous take's CREDIT goes first (_rv.c)
            with contextlib.suppress(Exception):
                rv.confirm()
        with contextlib.suppress(Exception):  # takes whose receipts are not reported yet
            core.report_receipts()
        deadline = deadline_of(core.options.close_timeout)
        if core.owed or core.acked:  # acked: linger until the peer has it all
            try:
                core.shutdown()
                self._run(flush_steps(core, "close"), deadline)
            except Exception:  # the peer is gone, or time ran out: nothing more goes
                pass
        if core.lingers():  # TCP: no reset while the kernel still holds our bytes
            try:
                run_steps(linger_steps(core), deadline)
            except Exception:
                pass
        # threads asleep in this channel's waits (a recv, a send waiting for room) wake
        # and raise ChannelClosed; the fds they poll are released only after they left
        # (bounded: a signal handler in a waiting thread may be the one closing)
        self._closing = True
        wake = self._wake
        if wake >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(wake, 1)
            me = _get_ident()
            # asleep in recv itself (a socket stream's, a datagram socket's receiver):
            # a shutdown or a kick ends it; again every 10 ms (another process sharing
            # the socket may take a kick)
            kick = self._blocking_reader or core.wait_receiver is not None
            if kick and any(t != me for t in self._waiters):
                core.interrupt_reads()
            end = _monotonic() + _CLOSE_WAIT
            again = _monotonic() + 0.01
            while any(t != me for t in self._waiters) and _monotonic() < end:
                time.sleep(0.0002)
                if kick and _monotonic() >= again:
                    core.interrupt_reads()
                    again = _monotonic() + 0.01
        # no other thread's write is between its "closed?" check and the fd (bounded: a
        # signal handler closing the channel may interrupt this thread's own write)
        held = self._wlock.acquire(timeout=1.0)
        try:
            if held and self._rendezvous:
                # a rendezvous send woken above withdraws its message under this lock:
                # if it has not yet, this does, before the fds go
                with contextlib.suppress(Exception):
                    core.withdraw_at_close(self._rv_stream)
            core.close()
        finally:
            if held:
                self._wlock.release()
        self._drop_wake()
        if self._pumpers:
            self._wake_pumpers()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # used by buzon.wait ------------------------------------------------------------

    def _ready(self) -> bool:
        """True if recv_nowait would not raise Empty (it may raise EndOfChannel, or
        ChannelClosed: a closed channel, or one another thread is closing, is ready)."""
        if self._closing or self._core.closed:
            return True
        if not self._rlock.acquire(blocking=False):
            return False  # another thread is receiving; it will take what arrives
        try:
            if self._core.ready():
                return True
            if self._flow:
                self._core.before_wait()  # buzon.wait waits to receive: offer (capacity=0)
            return False
        finally:
            self._rlock.release()

    def _wait_enter(self) -> int:
        """``buzon.wait`` is about to sleep on this channel: a close() in another
        thread wakes it, and releases the fds only after it left (:meth:`_enter_wait`)."""
        return self._enter_wait()

    def _wait_leave(self) -> None:
        self._leave_wait()

    def _wait_over(self) -> None:
        """``buzon.wait`` returned: withdraw the rendezvous offer it made."""
        if self._rendezvous and self._rlock.acquire(blocking=False):
            try:
                self._core.wait_ended()
            finally:
                self._rlock.release()


_reduction.passable(Channel)  # passes to child processes (_reduction.py)
