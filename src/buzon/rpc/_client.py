"""The RPC client: a thread-safe proxy with many calls in flight on one connection.

No reader thread is needed for blocking calls: the thread that waits for a reply reads
the connection itself ("leader/followers"). While it reads, it hands every reply it
finds to the call it answers (by the CORRELATION field), so replies may come in any
order; other waiting threads sleep on a condition until their reply is in or the
reading role is free. ``call_async`` futures get a reader thread, started with the
first of them, that reads only while such futures are outstanding.

A call's deadline is the nearest of ``buzon.rpc.deadline`` blocks in force and the
client's ``timeout``; it goes on the wire as milliseconds left (the DEADLINE field).
When it passes, or the waiting thread is interrupted, the call raises and a cancel
message tells the server, whose handler sees ``context().cancelled``.
"""

from __future__ import annotations

import contextvars
import threading
import time
import typing
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

from ..address import Address, parse_address
from ..errors import (
    AddressError,
    BuzonError,
    ChannelClosed,
    CodecError,
    DeadlineExceeded,
    EndOfChannel,
    MessageTooLarge,
    RemoteError,
    ServerRestarted,
    UnsupportedOperation,
)
from ..errors import Timeout as _Timeout
from ..names import lookup
from ..protocol._rpc import parse as _PARSE
from ..protocol._rpc import request as _request
from ..sync import Channel
from ..sync import connect as _connect
from . import _wire as w
from ._clientcore import ClientCore
from ._context import _DEADLINE
from ._jsonrpc import JsonRpcClient, connect_jsonrpc
from ._msgpack import MsgpackRpcClient, connect_msgpack
from ._remote import _PLAIN, RELEASE, LostPeer
from ._retry import RETRY, Retrying, note_restart, raise_outcome, server_start
from ._server import _check
from ._service import handler_failure

__all__ = ["Call", "Client", "ServerRestarted", "close", "connect"]

P = TypeVar("P")

_monotonic = time.monotonic
# the reader of call_async futures reads in slices of at most this, to expire the
# futures whose deadline passes even while no message comes (a close() from another
# thread wakes any blocked receive: the blocking calls read without slices)
_SLICE = 0.25
_NOT_SOLO = object()  # Client._solo did not apply


class _Pending:
    """One call waiting for its reply (the light object of a blocking call; a
    ``call_async`` call has a :class:`Call` future as well)."""

    __slots__ = (
        "at",
        "call_id",
        "done",
        "error",
        "finished",
        "future",
        "method",
        "result",
        "rtype",
    )

    def __init__(self, call_id: int, method: str, at: float | None, rtype: Any) -> None:
        self.call_id = call_id
        self.method = method
        self.at = at
        self.rtype = rtype
        self.done = False
        self.error: BaseException | None = None
        self.result: Any = None
        self.future: Call | None = None
        self.finished = False  # the future was completed


class Call(Future[Any]):
    """The future of one call (``Client.call_async``). ``result(timeout)`` waits (and
    reads the connection meanwhile, if no other thread does); the call's own deadline
    turns into :class:`~buzon.errors.DeadlineExceeded`. ``cancel()`` gives the call
    up and tells the server (its handler sees ``context().cancelled``)."""

    def __init__(self, client: Client, pending: _Pending) -> None:
        super().__init__()
        self.client = client
        self._p = pending
        pending.future = self

    @property
    def method(self) -> str:
        """The name of the method called."""
        return self._p.method

    def result(self, timeout: float | None = None) -> Any:
        if not self._p.done:
            self.client._wait(self._p, None if timeout is None else _monotonic() + timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._p.done:
            self.client._wait(self._p, None if timeout is None else _monotonic() + timeout)
        return super().exception(0)

    def cancel(self) -> bool:
        """Give the call up and tell the server; False if it had finished already."""
        return self.client._abandon(self._p, _CANCELLED)


class _RetryingCall(Call):
    """A ``call_async`` future of a retrying client: :meth:`Client.call` (its retry
    loop) runs in a thread, with the caller's context (deadline) copied."""

    def __init__(self, client: Client, method: str, args: tuple[Any, ...], kwargs: Any) -> None:
        super().__init__(client, _Pending(0, method, None, Any))
        self._p.done = True  # the waiting is Future's own, not a read of the connection
        run = contextvars.copy_context().run
        threading.Thread(
            target=run, args=(self._run, method, args, kwargs), name="buzon-rpc-retry", daemon=True
        ).start()

    def _run(self, method: str, args: tuple[Any, ...], kwargs: Any) -> None:
        try:
            try:
                result = self.client.call(method, *args, **kwargs)
            except BaseException as exc:
                self.set_exception(exc)
            else:
                self.set_result(result)
        except InvalidStateError:
            pass  # cancelled meanwhile: nobody waits for it

    def result(self, timeout: float | None = None) -> Any:
        return Future.result(self, timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return Future.exception(self, timeout)

    def cancel(self) -> bool:
        return Future.cancel(self)


_CANCELLED = "cancelled by the caller"

# what a retrying call tries again after: the connection was lost, could not be made
# again yet, or broke during its handshake


class _Cancelled(Exception):
    """Marks a call its future's ``cancel()`` gave up (the future ends CANCELLED)."""


_LOST = LostPeer()  # where proxies of a replaced connection point


class Client(ClientCore[Channel]):
    """A connection to an RPC server (``buzon.rpc.connect``). Thread-safe.

    ``client.add(1, 2)`` or ``client.call("add", 1, 2)`` call and wait;
    ``client.notify("log", "x")`` sends without a reply; ``client.call_async("add", 1,
    2)`` returns a :class:`Call` future. Errors: :class:`~buzon.errors.RemoteError`
    (the server refused or the handler failed; ``.code``, ``.message``, ``.data``),
    :class:`~buzon.errors.DeadlineExceeded`, :class:`~buzon.errors.EndOfChannel` when
    the connection is lost with the call in flight (``at_most_once``: the call may or
    may not have run). A method named like one of the client's own
    (``call``, ``close``...) is called with ``call("close")``.

    Remote objects: a result marked ``@buzon.rpc.remote`` arrives as a
    :class:`~buzon.rpc.RemoteObject` proxy; such a proxy (or this client's own remote
    objects, for callbacks) can be passed as an argument. While a thread waits for a
    reply, the server's calls to this client's objects are read and run (each in a
    thread of its own).
    """

    def __init__(
        self,
        channel: Channel,
        proto: Any = None,
        *,
        timeout: float | None = 60.0,
        max_in_flight: int = 64,
        semantics: str = "at_most_once",
        reconnect: Callable[[float | None], Channel] | None = None,
        instance: Callable[[], str | None] | None = None,
    ) -> None:
        self._setup(channel, proto, timeout, max_in_flight, semantics, reconnect, instance)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._reading = False
        self._sleepers = 0
        self._max_in_flight = max_in_flight
        self._async = 0  # call_async futures outstanding
        self._reader: threading.Thread | None = None
        self._conn_lock = threading.Lock()
        self._msgpack = False  # _solo applies (set by _use_channel)
        self._max_frame = 0
        self._use_channel(channel)
        self._ref_init()

    def _use_channel(self, channel: Channel) -> None:
        """What the solo call path needs to know of a (new) connection."""
        core = channel._core
        self._msgpack = core.codec.name == "msgpack"
        self._max_frame = core.max_frame

    # -- calling -------------------------------------------------------------------

    def _start(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        at: float | None = None,
        key: list[Any] | None = None,
        target: int | None = None,
    ) -> _Pending:
        if self._broken is not None:
            raise self._broken
        if at is None:  # self._deadline(), inline (once per call)
            at = _DEADLINE.get()
            if self._timeout is not None:
                mine = _monotonic() + self._timeout
                if at is None or mine < at:
                    at = mine
        pending = self._pending
        if len(pending) >= self._max_in_flight:
            self._wait_for_slot(method, at)
        call_id = next(self._ids)
        if target is None and not kwargs and self._msgpack:
            # plain values (the common case, exactly-once keys too): framed in C
            left = None if at is None else max(0.0, at - _monotonic())
            frame = _request(method, args, call_id, -1 if left is None else int(left * 1000.0), key)
            if frame is not None and len(frame) <= self._max_frame:
                p = _Pending(call_id, method, at, self._rtypes.get(method, Any))
                pending[call_id] = p
                try:
                    w.send_frame(self._ch, frame, left)
                except _Timeout:
                    self._settle(
                        p, DeadlineExceeded(f"{method}: the deadline passed while sending")
                    )
                    raise p.error from None  # type: ignore[misc]
                except BaseException:
                    self._settle(p, None)
                    raise
                return p
        out = self._out
        wargs = list(args)
        for a in args:  # inline: plain arguments (the common case) cost no call
            if type(a) not in _PLAIN:
                wargs = out(wargs)  # remote objects and proxies -> references
                break
        if target is None:
            p = _Pending(call_id, method, at, self._rtypes.get(method, Any))
            body: list[Any] = [w.REQUEST, method, wargs]
        else:  # a method of a remote object
            p = _Pending(call_id, method, at, Any)
            body = [w.REQUEST, [target, method], wargs]
        pending[call_id] = p
        if kwargs or key is not None:
            body.append(out(kwargs) if kwargs else None)
        if key is not None:
            body.append(key)
        try:
            if at is None:
                w.send(self._ch, body, w.MESSAGE_ID, call_id, None, None)
            else:
                left = max(0.0, at - _monotonic())
                w.send(self._ch, body, w.MESSAGE_ID, call_id, left, left)
        except _Timeout:
            self._settle(p, DeadlineExceeded(f"{method}: the deadline passed while sending"))
            raise p.error from None  # type: ignore[misc]
        except BaseException:
            self._settle(p, None)
            raise
        return p

    def _wait_for_slot(self, method: str, at: float | None) -> None:
        """Wait (reading replies, if nobody else does) until fewer than
        ``max_in_flight`` calls are in flight, or raise at the deadline."""
        probe = _Pending(0, method, at, Any)
        while len(self._pending) >= self._max_in_flight:
            if at is not None and _monotonic() >= at:
                raise DeadlineExceeded(
                    f"{method}: the deadline passed waiting for one of the client's "
                    f"max_in_flight={self._max_in_flight} call slots"
                )
            if self._broken is not None:
                raise self._broken
            self._wait(probe, at, slot=True)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` with the arguments and wait for its result."""
        if self._semantics != "at_most_once":
            if self._semantics == "exactly_once" and not kwargs and not self._pending:
                got = self._call_once_solo(method, args)
                if got is not _NOT_SOLO:
                    return got
            return self._call_again_and_again(method, args, kwargs)
        if (
            not kwargs
            and not self._pending
            and not self._reading
            and self._broken is None
            and self._msgpack
        ):
            # the common case: no other call in flight, plain arguments (:meth:`_solo`)
            at = _DEADLINE.get()  # self._deadline(), inline
            if self._timeout is not None:
                mine = _monotonic() + self._timeout
                if at is None or mine < at:
                    at = mine
            solo = self._solo(method, args, at, None)
            if solo is not _NOT_SOLO:
                if solo.error is not None:
                    raise solo.error
                return solo.result
        p = self._start(method, args, kwargs)
        try:
            if not p.done:
                self._wait(p, None)
        except BaseException:  # interrupted: the server is told
            self._abandon(p, "the caller was interrupted")
            raise
        if p.error is not None:
            raise p.error
        return p.result

    def _call_once_solo(self, method: str, args: tuple[Any, ...]) -> Any:
        """An exactly-once call while no other call is in flight: the first attempt of
        :meth:`_call_again_and_again` (a sequence number opened, the key framed with
        the call by :meth:`_solo`) without its retry bookkeeping; a lost connection
        hands the call, with its sequence number, to that loop. Its result, or
        ``_NOT_SOLO`` (nothing sent, no number kept)."""
        if self._broken is not None or not self._msgpack or self._reading:
            return _NOT_SOLO
        now = _monotonic()
        at = _DEADLINE.get()  # self._deadline(), inline
        if self._timeout is not None:
            mine = now + self._timeout
            if at is None or mine < at:
                at = mine
        if at is not None and at <= now:
            return _NOT_SOLO  # the loop raises DeadlineExceeded
        restarts = self._restarts
        lock = self._conn_lock
        opened = self._open_seqs
        with lock:  # as Retrying does: open a number; acknowledge below the lowest open
            seq = self._next_seq
            self._next_seq = seq + 1
            acked = min(opened) if opened else seq
            opened.add(seq)
        try:
            p = self._solo(method, args, at, [self._client_id, seq, acked])
        except RETRY as exc:  # sending failed: the loop retries (or raises) from here
            return self._call_again_and_again(method, args, {}, (seq, at, restarts, exc), True)
        except BaseException:
            with lock:
                opened.discard(seq)
            raise
        if p is _NOT_SOLO:
            opened.discard(seq)  # one set operation: atomic (min() of ints is, too)
            return p
        error = p.error
        if isinstance(error, (EndOfChannel, ChannelClosed)) and not self._closing:
            # the connection was lost: the loop sends it again
            return self._call_again_and_again(method, args, {}, (seq, at, restarts, error))
        opened.discard(seq)  # as above: no lock needed to close a number
        if error is not None:
            raise_outcome(method, error)
        return p.result

    def _solo(self, method: str, args: tuple[Any, ...], at: float | None, key: Any) -> Any:
        """A call while no other call is in flight, its arguments plain (``key``: an
        exactly-once key, or None): its whole frame is made in C
        (``protocol._rpc.request``), sent, and this thread reads the connection until
        the reply is in or ``at`` passes (replies to nothing and the server's own
        messages are handled as :meth:`_read_one` always does); returns the settled
        :class:`_Pending`. ``_NOT_SOLO``: it does not apply (another call started
        meanwhile, a value is not plain, the channel's codec is not msgpack); nothing
        was sent then."""
        call_id = next(self._ids)
        if at is None:
            left = None
            frame = _request(method, args, call_id, -1, key)
        else:
            left = at - _monotonic()
            if left < 0.0:
                left = 0.0
            frame = _request(method, args, call_id, int(left * 1000.0), key)
        if frame is None or len(frame) > self._max_frame:
            return _NOT_SOLO
        lock = self._lock
        with lock:
            if self._reading or self._pending or self._broken is not None:
                return _NOT_SOLO
            self._reading = True
        p = _Pending(call_id, method, at, self._rtypes.get(method, Any))
        self._pending[call_id] = p
        try:
            try:
                w.send_frame(self._ch, frame, left)
            except _Timeout:
                self._settle(p, DeadlineExceeded(f"{method}: the deadline passed while sending"))
            except BaseException:
                self._settle(p, None)
                raise
            read = self._read_one
            # no slices: a close() from another thread wakes a blocked receive
            while not p.done:
                if at is None:
                    read(None)
                    continue
                rest = at - _monotonic()
                if rest <= 0.0:
                    break
                read(rest)
        except BaseException:  # interrupted: the server is told
            self._release_reading()
            self._abandon(p, "the caller was interrupted")
            raise
        self._release_reading()
        if not p.done:
            self._abandon(p, None)
        return p

    def _release_reading(self) -> None:
        with self._lock:
            self._reading = False
            if self._sleepers:
                self._cv.notify_all()

    def _call_ref(self, rid: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call method ``name`` of the server's object ``rid`` (a :class:`RemoteObject`
        proxy's call): at most once, whatever the client's ``semantics`` (a reference
        belongs to one connection)."""
        p = self._start(name, args, kwargs, target=rid)
        try:
            if not p.done:
                self._wait(p, None)
        except BaseException:
            self._abandon(p, "the caller was interrupted")
            raise
        if p.error is not None:
            raise p.error
        return p.result

    def _send_release(self, pairs: list[list[int]]) -> None:
        self._ch.send([RELEASE, pairs], 5.0)

    def _incoming(self, body: list[Any], fields: dict[int, bytes] | None) -> None:
        """A message from the server that is not a reply: a release of this client's
        objects, or a call to one of them (run in a thread of its own, so that it may
        call the server in turn)."""
        kind = body[0]
        if kind == RELEASE and len(body) == 2:
            self._exports.release(body[1])
        elif kind == w.REQUEST:
            call_id = w.read_id(fields, w.MESSAGE_ID)
            if call_id is not None:
                threading.Thread(
                    target=self._answer,
                    args=(call_id, body),
                    name="buzon-rpc-callback",
                    daemon=True,
                ).start()

    def _answer(self, call_id: int, body: list[Any]) -> None:
        """Run the server's call of one of this client's remote objects, and reply."""
        try:
            method, args, kwargs = self._ref_request(body)
            try:
                reply: list[Any] = [w.REPLY, None, self._out(method.run(args, kwargs))]
            except RemoteError:
                raise
            except Exception as exc:
                raise handler_failure(method.name, exc) from None
        except RemoteError as err:
            reply = w.error_body(err)
        try:
            w.send(self._ch, reply, w.CORRELATION, call_id, None, 5.0)
            return
        except (CodecError, MessageTooLarge, TypeError, ValueError, OverflowError) as exc:
            bad = RemoteError(f"the result cannot be encoded: {exc}", RemoteError.INVALID_RESULT)
        except BuzonError:
            return  # the connection is gone
        try:
            w.send(self._ch, w.error_body(bad), w.CORRELATION, call_id, None, 5.0)
        except BuzonError:
            pass

    def _call_again_and_again(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        first: tuple[int, float | None, int, BaseException] | None = None,
        raised: bool = False,
    ) -> Any:
        """``at_least_once`` / ``exactly_once``: send the call again after a lost
        connection (reconnecting, with backoff) until it is answered or its deadline
        passes (the rules: :mod:`buzon.rpc._retry`). ``exactly_once`` sends the same
        (client id, sequence number) every time, so the server runs it once and
        answers retries from its table. ``first``: its first attempt was made by
        :meth:`_call_once_solo` and lost the connection (``raised``: its send raised)."""
        r = Retrying(self, method, self._conn_lock, first)
        try:
            if first is not None:
                if raised:  # as below: a send that raised counts as not sent
                    r.sent = False
                    r.failed(first[3])
                time.sleep(r.pause())
            while True:
                r.check_deadline()
                broken = self._broken
                try:
                    if broken is not None:
                        self._reconnect(broken, r.at)
                    key = r.key()
                    p: Any = (
                        self._solo(method, args, r.at, key)
                        if not kwargs and not self._pending and not self._reading and self._msgpack
                        else _NOT_SOLO
                    )
                    if p is not _NOT_SOLO:  # the common case: sent and answered (or given up)
                        r.sent = True
                    else:
                        p = self._start(method, args, kwargs, r.at, key)
                        r.sent = True
                        try:
                            if not p.done:
                                self._wait(p, None)
                        except BaseException:
                            self._abandon(p, "the caller was interrupted")
                            raise
                    if not isinstance(p.error, (EndOfChannel, ChannelClosed)) or self._closing:
                        r.outcome(p.error)
                        return p.result
                    r.last = p.error
                except RETRY as exc:
                    r.failed(exc)
                time.sleep(r.pause())
        finally:
            r.done()

    def _reconnect(self, broken: BuzonError, at: float | None) -> None:
        """Replace the lost connection (once, whichever thread gets here first)."""
        with self._conn_lock:
            if self._broken is not broken:
                return  # another thread reconnected already
            assert self._reconnect_fn is not None
            left = None if at is None else max(0.001, at - _monotonic())
            before = server_start(self._ch, self._instance_of)
            ch = self._reconnect_fn(left)
            note_restart(self, before, server_start(ch, self._instance_of))
            self._use_channel(ch)
            old, self._ch = self._ch, ch
            self._broken = None
            self._forget_references(_LOST)
        old.close()

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> Call:
        """Send the call and return its :class:`Call` future at once. With
        ``semantics`` at_least_once / exactly_once the call is retried as :meth:`call`
        does, in a thread of its own (``cancel()`` then only stops the waiting)."""
        if self._semantics != "at_most_once":
            return _RetryingCall(self, method, args, kwargs)
        p = self._start(method, args, kwargs)
        call = Call(self, p)
        with self._cv:
            self._async += 1
        if p.done:  # settled before it had a future (the connection was lost meanwhile)
            self._finish_future(p)
            return call
        with self._cv:
            if self._reader is None or not self._reader.is_alive():
                self._reader = threading.Thread(
                    target=self._read_for_futures, name="buzon-rpc-reader", daemon=True
                )
                self._reader.start()
            else:
                self._cv.notify_all()
        return call

    def notify(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Send a one-way call: no reply, no error back (the server counts them)."""
        if self._broken is not None:
            raise self._broken
        body: list[Any] = [w.NOTIFY, method, list(args)]
        if kwargs:
            body.append(kwargs)
        at = self._deadline()
        self._ch.send(body, None if at is None else max(0.0, at - _monotonic()))

    # -- waiting and reading -------------------------------------------------------------

    def _read_for_futures(self) -> None:
        """The reader of ``call_async`` futures: reads while some are outstanding,
        expiring the ones whose deadline passes, then sleeps until there are more."""
        while self._broken is None:
            with self._cv:
                while self._async <= 0 and self._broken is None:
                    self._cv.wait()
            self._wait(None, None)

    def _next_deadline(self) -> float | None:
        ats = [p.at for p in list(self._pending.values()) if p.future is not None and p.at]
        return min(ats) if ats else None

    def _wait(self, p: _Pending | None, until: float | None, slot: bool = False) -> None:
        """Wait until ``p`` is settled (``None``: until no ``call_async`` future is
        outstanding; ``slot``: until a call slot is free) or ``until`` passes, reading
        the connection whenever no other thread does. A call's deadline settles it
        with ``DeadlineExceeded``."""
        cv = self._cv
        if p is not None and not slot and until is None and not self._reading:
            # the common case: one call, nobody else reading: read until its reply is
            # in (no closure, no re-checks per message); anything else, and the
            # deadline, are left to the general loop below
            with cv:
                mine = not self._reading and not p.done
                if mine:
                    self._reading = True
            if mine:
                at = p.at
                read = self._read_one
                try:
                    while not p.done and not self._closing:
                        if at is None:
                            read(None)  # a close() from another thread wakes it
                            continue
                        rest = at - _monotonic()
                        if rest <= 0:
                            break
                        read(rest)
                finally:
                    with cv:
                        self._reading = False
                        if self._sleepers:
                            cv.notify_all()
                if p.done or self._closing:
                    return

        def settled() -> bool:
            if slot:
                return len(self._pending) < self._max_in_flight or self._broken is not None
            if p is None:
                return self._async <= 0 or self._broken is not None
            return p.done

        while not settled():
            now = _monotonic()
            if p is None:
                self._expire_due(now)
                limit = self._next_deadline()
            else:
                limit = p.at
                if limit is not None and now >= limit:
                    if not slot:
                        self._abandon(p, None)
                    return
            if until is not None and (limit is None or until < limit):
                if now >= until:
                    return
                limit = until
            with cv:
                if settled():
                    return
                if self._reading:
                    self._sleepers += 1
                    try:
                        cv.wait(None if limit is None else max(0.0, limit - now))
                    finally:
                        self._sleepers -= 1
                    continue
                self._reading = True
            try:
                while not settled():
                    left = None if limit is None else limit - _monotonic()
                    if left is not None and left <= 0:
                        break
                    if p is None:  # the futures' reader: in slices (see _SLICE)
                        left = _SLICE if left is None or left > _SLICE else left
                    self._read_one(left)  # a close() from another thread wakes it
                    if self._closing:
                        break
                    if p is None:
                        break  # re-check the deadlines of the outstanding futures
            finally:
                with cv:
                    self._reading = False
                    if self._sleepers:
                        cv.notify_all()

    def _read_one(self, timeout: float | None) -> None:
        try:  # w.recv, inline (once per reply)
            item = self._ch._recv_parsed(_PARSE, timeout)
            if type(item) is tuple and item[0] == -1:  # taken apart in C
                kind, call_id, ms, body, fields = item[1]
            else:
                kind, call_id, ms, body, fields = w.from_item(self._ch, item)
        except _Timeout:
            return
        except (EndOfChannel, ChannelClosed) as exc:
            self._lost(exc)
            return
        except BuzonError:  # an undecodable message: not a reply to anything we know
            return
        if kind == w.REPLY:  # the common reply, taken apart in C: its result is plain
            p = self._pending.get(call_id)
            if p is None:
                self.late += 1
                return
            if p.rtype is Any:
                self._settle(p, None, body)
            else:
                self._settle(p, *self._converted(p.method, p.rtype, body))
            return
        if kind != w.OTHER:
            body, fields = w.as_message(kind, call_id, ms, body, fields)
        value = None if fields is None else fields.get(w.CORRELATION)  # w.read_id, inline
        p = self._pending.get(w.unpack_id(value)[0]) if value and len(value) == 8 else None
        if p is None:
            if type(body) is list and body and body[0] != w.REPLY:
                self._incoming(body, fields)  # the server's call to our object, a release
            else:
                self.late += 1
            return
        self._settle(p, *self._outcome(p.method, p.rtype, body))

    def _settle(self, p: _Pending, error: BaseException | None, result: Any = None) -> bool:
        """Complete ``p`` once (False if something else completed it first)."""
        if self._pending.pop(p.call_id, None) is None:
            return False
        p.error = error
        p.result = result
        p.done = True
        if p.future is not None:
            self._finish_future(p)
        if self._sleepers:
            with self._cv:
                self._cv.notify_all()
        return True

    def _finish_future(self, p: _Pending) -> None:
        fut = p.future
        with self._cv:
            if fut is None or p.finished:
                return
            p.finished = True
            self._async -= 1
        if isinstance(p.error, _Cancelled):
            Future.cancel(fut)
        elif p.error is not None:
            fut.set_exception(p.error)
        else:
            fut.set_result(p.result)

    def _abandon(self, p: _Pending, why: str | None) -> bool:
        """Give ``p`` up (deadline, interrupt, cancel) and send the server a cancel."""
        if why is None:
            err: BaseException = DeadlineExceeded(
                f"{p.method}: no reply by the call's deadline; the server was told to cancel it"
            )
        elif why is _CANCELLED:
            err = _Cancelled(why)
        else:
            err = DeadlineExceeded(f"{p.method}: {why}")
        if not self._settle(p, err):
            return False
        try:
            w.send(self._ch, [w.CANCEL], w.CORRELATION, p.call_id, None, 0.1)
        except BuzonError:
            pass  # the connection is gone or full: the server finds out on its own
        return True

    def _expire_due(self, now: float) -> None:
        for p in list(self._pending.values()):
            if p.future is not None and p.at is not None and now >= p.at:
                self._abandon(p, None)

    def _lost(self, exc: BuzonError) -> None:
        """The connection ended: every call in flight fails, its outcome unknown."""
        closed = isinstance(exc, ChannelClosed)
        self._broken = (
            ChannelClosed("the RPC client is closed")
            if closed
            else EndOfChannel("the RPC server closed the connection")
        )
        for p in list(self._pending.values()):
            self._settle(
                p,
                type(self._broken)(
                    f"{p.method}: the connection was lost with the call in flight; "
                    "it may or may not have run (at_most_once)"
                ),
            )
        with self._cv:
            self._cv.notify_all()

    # -- lifetime ------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; calls in flight fail with ``ChannelClosed``."""
        self._closing = True
        self._ref_close()
        if self._broken is None:
            self._lost(ChannelClosed("closed"))
        self._ch.close()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(5.0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@typing.overload
def connect(
    url: str | Address,
    proto: None = None,
    *,
    timeout: float | None = 60.0,
    wire: typing.Literal["msgpack-rpc"],
    handler: object = None,
    **options: Any,
) -> MsgpackRpcClient: ...
@typing.overload
def connect(
    url: str | Address,
    proto: None = None,
    *,
    timeout: float | None = 60.0,
    wire: typing.Literal["jsonrpc"],
    handler: object = None,
    **options: Any,
) -> JsonRpcClient: ...
@typing.overload
def connect(
    url: str | Address,
    proto: None = None,
    *,
    timeout: float | None = 60.0,
    wire: str = "buzon",
    semantics: str = "at_most_once",
    max_in_flight: int = 64,
    **options: Any,
) -> Client: ...
@typing.overload
def connect(
    url: str | Address,
    proto: Callable[..., P],
    *,
    timeout: float | None = 60.0,
    wire: str = "buzon",
    semantics: str = "at_most_once",
    max_in_flight: int = 64,
    **options: Any,
) -> P: ...


def connect(
    url: str | Address,
    proto: Any = None,
    *,
    timeout: float | None = 60.0,
    wire: str = "buzon",
    semantics: str = "at_most_once",
    max_in_flight: int = 64,
    handler: object = None,
    **options: Any,
) -> Any:
    """Connect to the RPC server at ``url`` and return a proxy (``buzon.rpc.connect``).

    With ``proto``, a ``typing.Protocol`` class describing the service, the proxy is
    typed as that protocol (mypy checks every call) and results are validated against
    its return hints; only its methods are reachable through attributes. ``timeout``
    bounds the connection and is every call's default deadline (None: wait for ever);
    ``with buzon.rpc.deadline(s)`` shortens it. ``options`` go to
    :func:`buzon.connect`. The proxy closes with ``close()`` (or ``with``).

    ``semantics``: ``"at_most_once"`` (a lost connection fails the call: it may or
    may not have run), ``"at_least_once"`` (reconnect and send it again until its
    deadline) or ``"exactly_once"`` (the same, with a (client id, sequence number)
    the server answers retries with from its completion table: run once).

    ``wire="msgpack-rpc"`` speaks the msgpack-rpc spec on a raw stream (e.g.
    ``unix:/abs/path`` to ``nvim --listen``) and returns a :class:`MsgpackRpcClient`;
    ``handler`` (a :class:`Service` or an object with ``@expose`` methods) answers the
    peer's own requests on the same connection. ``wire="jsonrpc"`` does the same
    with JSON-RPC 2.0 and LSP's ``Content-Length`` framing and returns a
    :class:`JsonRpcClient`.
    """
    if wire == "jsonrpc":
        if proto is not None:
            raise TypeError("wire='jsonrpc' proxies are untyped: pass no Protocol")
        if semantics != "at_most_once":
            raise UnsupportedOperation(
                "wire='jsonrpc' is at-most-once: JSON-RPC carries no retry ids"
            )
        return connect_jsonrpc(url, handler, timeout, **options)
    if wire == "msgpack-rpc":
        if proto is not None:
            raise TypeError("wire='msgpack-rpc' proxies are untyped: pass no Protocol")
        return connect_msgpack(url, handler, timeout, **options)
    if handler is not None:
        raise TypeError("handler= is for wire='msgpack-rpc' or 'jsonrpc' (the peer's own requests)")
    _check(wire, semantics)
    addr = parse_address(url)
    instance: list[str | None] = [None]

    def reconnect(left: float | None) -> Channel:
        if addr.scheme != "name":
            return _connect(url, left, **options)
        # name:NAME is looked up again on every reconnect: the server may have moved;
        # its instance id (registration metadata) tells a restarted server apart
        assert addr.name is not None
        address, found = resolve_server(addr.name)
        # one try per attempt (retry=False): a dying server's name outlives its socket
        # for a moment, and waiting on that dead address would use up the call's
        # deadline; the retry loop looks the name up again instead
        ch = _connect(address, left, **{"retry": False, **options})
        instance[0] = found
        return ch

    ch = reconnect(timeout)
    return Client(
        ch,
        proto,
        timeout=timeout,
        max_in_flight=max_in_flight,
        semantics=semantics,
        reconnect=reconnect,
        instance=lambda: instance[0],
    )


def resolve_server(name: str) -> tuple[str, str | None]:
    """The address ``name`` stands for now and the instance id of the server start
    registered there (None if its metadata has none); sans-IO for both clients."""
    record = lookup(name)
    if record.address.startswith("mailbox:"):
        raise AddressError(f"name {name!r} stands for {record.address}, not a server")
    meta = record.metadata
    return record.address, meta.get("instance") if isinstance(meta, dict) else None


def close(proxy: object) -> None:
    """Close a proxy made by :func:`connect`, a typed one included (its Protocol
    type need not declare ``close``)."""
    if not isinstance(proxy, Client):
        raise TypeError(f"not a buzon.rpc proxy: {proxy!r}")
    proxy.close()
