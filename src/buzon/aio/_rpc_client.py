"""The asyncio RPC client of ``wire="buzon"`` (``buzon.aio.rpc.connect``).

The messages are :mod:`buzon.rpc._wire`'s, the references :mod:`buzon.rpc._remote`'s
(the same :class:`~buzon.rpc._remote.RefPeer` tables as the blocking client): what is
here is the asyncio I/O. One reader task per connection hands each reply to the future
of the call it answers, and runs the server's calls to this client's remote objects
(callbacks) in tasks of their own, whether or not a call of ours is waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import (
    BuzonError,
    ChannelClosed,
    CodecError,
    DeadlineExceeded,
    EndOfChannel,
    MessageTooLarge,
    RemoteError,
)
from ..errors import Timeout as _Timeout
from ..protocol._rpc import reply as _reply
from ..protocol._rpc import request as _request
from ..protocol.frames import Kind, encode_frame
from ..rpc import _wire as w
from ..rpc._client import resolve_server
from ..rpc._clientcore import ClientCore
from ..rpc._remote import _PLAIN, RELEASE, RefPeer
from ..rpc._retry import RETRY, Retrying, note_restart, server_start
from ..rpc._service import handler_failure
from ._channel import Channel

__all__ = ["Client", "send_body"]

_monotonic = time.monotonic

# what a retrying call tries again after (as the blocking client): the connection was
# lost, could not be made again yet, or broke during its handshake
_UNENCODABLE = (CodecError, TypeError, ValueError, OverflowError, MessageTooLarge)


async def send_body(
    ch: Channel, body: Any, tag: int, call_id: int, budget: float | None, timeout: float | None
) -> None:
    """The asyncio form of :func:`buzon.rpc._wire.send` (the same frame). A request or
    a reply of plain values (the common case) is framed in C, as the blocking client
    and server frame it (``protocol._rpc``)."""
    core = ch._core
    if type(body) is list and core.codec.name == "msgpack":
        frame = _frame_in_c(body, tag, call_id, budget)
        if frame is not None and len(frame) <= core.max_frame:
            await ch._send_encoded([frame], timeout)
            return
    codec, payload, buffers = core.codec.encode(body)
    fields = {tag: w.id_field(call_id)}
    if budget is not None:
        fields[w.DEADLINE] = w.ms_field(budget)
    bufs = encode_frame(Kind.DATA, codec, payload, buffers, fields=fields, max_frame=core.max_frame)
    await ch._send_encoded(bufs, timeout)


def _frame_in_c(body: list[Any], tag: int, call_id: int, budget: float | None) -> bytes | None:
    """``body``'s whole frame from ``protocol._rpc`` (None: not of the common shape)."""
    n = len(body)
    if tag == w.MESSAGE_ID and n in (3, 5) and body[0] == w.REQUEST and type(body[1]) is str:
        key = None
        if n == 5:
            if body[3] is not None or type(body[4]) is not list:
                return None
            key = body[4]
        ms = -1 if budget is None else max(0, int(budget * 1000.0))
        return _request(body[1], body[2], call_id, ms, key)
    if tag == w.CORRELATION and n == 3 and body[0] == w.REPLY and body[1] is None:
        return _reply(call_id, body[2])
    return None


async def answer_ref_call(
    peer: RefPeer, ch: Channel, call_id: int, body: list[Any], timeout: float | None
) -> None:
    """Run the other end's call of one of ``peer``'s remote objects and reply (both
    ends of an asyncio connection: a server's callback to a client, a client's call of
    a server object is the server's ordinary request path)."""
    try:
        method, args, kwargs = peer._ref_request(body)
        try:
            reply: list[Any] = [w.REPLY, None, peer._out(await method.run_async(args, kwargs))]
        except RemoteError:
            raise
        except Exception as exc:
            raise handler_failure(method.name, exc) from None
    except RemoteError as err:
        reply = w.error_body(err)
    try:
        await send_body(ch, reply, w.CORRELATION, call_id, None, timeout)
        return
    except _UNENCODABLE as exc:
        bad = RemoteError(f"the result cannot be encoded: {exc}", RemoteError.INVALID_RESULT)
    except BuzonError:
        return  # the connection is gone
    try:
        await send_body(ch, w.error_body(bad), w.CORRELATION, call_id, None, timeout)
    except BuzonError:
        pass


def post_release(peer: Any, loop: asyncio.AbstractEventLoop, pairs: list[list[int]]) -> None:
    """``RefPeer._send_release`` for an asyncio end: called in the release thread, the
    message is sent by a task on ``loop`` (RuntimeError if the loop is closed: the
    caller ignores it, the other end drops everything with the connection)."""

    def start() -> None:
        task = loop.create_task(peer._release_now(pairs))
        peer._tasks.add(task)
        task.add_done_callback(peer._tasks.discard)

    loop.call_soon_threadsafe(start)


class _LostPeer(RefPeer):
    """Where the proxies of a lost connection point: every call fails."""

    def _call_ref(self, rid: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        async def lost() -> Any:
            raise EndOfChannel(
                f"{name}: this remote object belonged to a connection that was lost "
                "(references do not survive a reconnect)"
            )

        return lost()

    def _send_release(self, pairs: list[list[int]]) -> None:
        pass


_LOST = _LostPeer()


class Client(ClientCore[Channel]):
    """An asyncio RPC client (``await buzon.aio.rpc.connect(url)``): the twin of
    :class:`buzon.rpc.Client`.

    ``await client.add(1, 2)`` / ``await client.call("add", 1, 2)``, ``await
    client.notify(...)``, ``client.call_async(...)`` (an ``asyncio.Task``; cancelling
    it cancels the call on the server), ``await client.aclose()`` (or ``async with``).
    Errors as the blocking client's: :class:`~buzon.errors.RemoteError`,
    :class:`~buzon.errors.DeadlineExceeded`, :class:`~buzon.errors.EndOfChannel`
    (``at_most_once``: a call lost with its connection may or may not have run).

    ``semantics="at_least_once"`` / ``"exactly_once"``: a call lost with its
    connection is sent again on a new connection (backoff 5 ms doubling to 200 ms)
    until its deadline; ``exactly_once`` sends the same (client id, sequence number)
    every time, so the server runs it once. Remote objects: a result marked
    ``@buzon.rpc.remote`` arrives as a :class:`~buzon.rpc.RemoteObject` whose methods
    are awaited (``await proxy.incr()``); proxies and this client's own remote objects
    may be arguments (the server calls the latter back over this connection).
    """

    _NAME = "buzon.aio.rpc.Client"

    def __init__(
        self,
        ch: Channel,
        proto: Any = None,
        *,
        timeout: float | None = 60.0,
        max_in_flight: int = 64,
        semantics: str = "at_most_once",
        reconnect: Callable[[float | None], Awaitable[Channel]] | None = None,
        instance: Callable[[], str | None] | None = None,
    ) -> None:
        self._setup(ch, proto, timeout, max_in_flight, semantics, reconnect, instance)
        # call id -> (future, method, result type, the channel it was sent on)
        self._pending: dict[int, tuple[asyncio.Future[Any], str, Any, Channel]] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conn_lock = asyncio.Lock()
        self._ref_init()
        self._reader = self._loop.create_task(self._read(ch))

    # -- calling -------------------------------------------------------------------

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` and await its result (by the call's deadline; retried by
        the client's ``semantics``)."""
        if self._semantics != "at_most_once":
            return await self._call_again_and_again(method, args, kwargs)
        return await self._call(method, args, kwargs)

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        """Start the call as a task (retried as :meth:`call` is); cancelling the task
        cancels the call and tells the server."""
        return self._loop.create_task(self.call(method, *args, **kwargs))

    async def notify(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Send a one-way call (no reply, no error back)."""
        if self._broken is not None:
            raise self._broken
        body: list[Any] = [w.NOTIFY, method, self._out(list(args))]
        if kwargs:
            body.append(self._out(kwargs))
        at = self._deadline()
        await self._ch.send(body, None if at is None else max(0.0, at - _monotonic()))

    def _call_ref(self, rid: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A :class:`~buzon.rpc.RemoteObject` proxy's call: a coroutine (at most once,
        whatever the client's ``semantics``: a reference belongs to one connection)."""
        return self._call(name, args, kwargs, target=rid)

    async def _call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        at: float | None = None,
        key: list[Any] | None = None,
        target: int | None = None,
    ) -> Any:
        if self._broken is not None:
            raise self._broken
        if at is None:
            at = self._deadline()
        left = None if at is None else max(0.0, at - _monotonic())
        try:
            await asyncio.wait_for(self._slots.acquire(), left)
        except TimeoutError:
            raise DeadlineExceeded(f"{method}: no call slot free by the deadline") from None
        try:
            return await self._send_and_wait(method, args, kwargs, at, key, target)
        finally:
            self._slots.release()

    async def _send_and_wait(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        at: float | None,
        key: list[Any] | None,
        target: int | None,
    ) -> Any:
        ch = self._ch
        wargs = list(args)
        for a in args:  # plain arguments (the common case) cost no walk
            if type(a) not in _PLAIN:
                wargs = self._out(wargs)  # remote objects and proxies -> references
                break
        body: list[Any] = [w.REQUEST, method if target is None else [target, method], wargs]
        if kwargs or key is not None:
            body.append(self._out(kwargs) if kwargs else None)
        if key is not None:
            body.append(key)
        rtype = Any if target is not None else self._rtypes.get(method, Any)
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[call_id] = (fut, method, rtype, ch)
        try:
            left = None if at is None else max(0.0, at - _monotonic())
            try:
                await send_body(ch, body, w.MESSAGE_ID, call_id, left, left)
            except _Timeout:
                raise DeadlineExceeded(f"{method}: the deadline passed while sending") from None
            left = None if at is None else max(0.0, at - _monotonic())
            try:
                return await asyncio.wait_for(asyncio.shield(fut), left)
            except TimeoutError:
                await self._cancel(ch, call_id)
                raise DeadlineExceeded(
                    f"{method}: no reply by the call's deadline; the server was told to cancel it"
                ) from None
            except asyncio.CancelledError:
                await asyncio.shield(self._cancel(ch, call_id))
                raise
        finally:
            self._pending.pop(call_id, None)

    async def _cancel(self, ch: Channel, call_id: int) -> None:
        self._pending.pop(call_id, None)
        try:
            await send_body(ch, [w.CANCEL], w.CORRELATION, call_id, None, 0.1)
        except BuzonError:
            pass  # the connection is gone or full: the server finds out on its own

    async def _call_again_and_again(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """``at_least_once`` / ``exactly_once``: as the blocking client's (the rules:
        :mod:`buzon.rpc._retry`; send again after a lost connection, with backoff,
        until answered or the deadline)."""
        r = Retrying(self, method)  # one loop: no lock around the sequence numbers
        try:
            while True:
                r.check_deadline()
                broken = self._broken
                try:
                    if broken is not None:
                        await self._reconnect(broken, r.at)
                    key = r.key()
                    r.sent = True
                    try:
                        return await self._call(method, args, kwargs, r.at, key)
                    except RemoteError as err:
                        r.outcome(err)  # the server's "outcome unknown": ServerRestarted
                        raise
                except RETRY as exc:
                    r.failed(exc)
                await asyncio.sleep(r.pause())
        finally:
            r.done()

    async def _reconnect(self, broken: BuzonError, at: float | None) -> None:
        """Replace the lost connection (once, whichever task gets here first)."""
        async with self._conn_lock:
            if self._broken is not broken:
                return  # another task reconnected already
            assert self._reconnect_fn is not None
            left = None if at is None else max(0.001, at - _monotonic())
            before = server_start(self._ch, self._instance_of)
            ch = await self._reconnect_fn(left)
            note_restart(self, before, server_start(ch, self._instance_of))
            old, self._ch = self._ch, ch
            self._broken = None
            self._forget_references(_LOST)
            self._reader = self._loop.create_task(self._read(ch))
        await old.aclose()

    # -- reading -------------------------------------------------------------------

    async def _read(self, ch: Channel) -> None:
        why: BuzonError = EndOfChannel("the RPC server closed the connection")
        try:
            while True:
                try:
                    body, fields = await ch._recv_fields(None)
                except _Timeout:
                    continue
                except CodecError:
                    continue  # undecodable: not a reply to anything we know
                call_id = w.read_id(fields, w.CORRELATION)
                entry = self._pending.get(call_id) if call_id is not None else None
                if entry is None:
                    if type(body) is list and body and body[0] != w.REPLY:
                        self._incoming(ch, body, fields)
                    else:
                        self.late += 1
                    continue
                self._settle(entry, body)
        except (EndOfChannel, ChannelClosed) as exc:
            if isinstance(exc, ChannelClosed) or self._closing:
                why = ChannelClosed("the RPC client is closed")
        if ch is self._ch:
            self._broken = why
        for fut, method, _, sent_on in list(self._pending.values()):
            if sent_on is ch and not fut.done():
                fut.set_exception(
                    type(why)(
                        f"{method}: the connection was lost with the call in flight; "
                        "it may or may not have run (at_most_once)"
                    )
                )

    def _settle(self, entry: tuple[asyncio.Future[Any], str, Any, Channel], body: Any) -> None:
        fut, method, rtype, _ = entry
        if fut.done():
            self.late += 1
            return
        error, result = self._outcome(method, rtype, body)
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)

    def _incoming(self, ch: Channel, body: list[Any], fields: dict[int, bytes] | None) -> None:
        """A message from the server that is not a reply: a release of this client's
        objects, or a call to one of them (run in a task of its own)."""
        kind = body[0]
        if kind == RELEASE and len(body) == 2:
            self._exports.release(body[1])
        elif kind == w.REQUEST:
            call_id = w.read_id(fields, w.MESSAGE_ID)
            if call_id is not None:
                task = self._loop.create_task(answer_ref_call(self, ch, call_id, body, 5.0))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _send_release(self, pairs: list[list[int]]) -> None:
        post_release(self, self._loop, pairs)

    async def _release_now(self, pairs: list[list[int]]) -> None:
        try:
            await self._ch.send([RELEASE, pairs], 5.0)
        except BuzonError:
            pass  # the connection is gone: the server drops everything with it

    # -- lifetime ------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection; calls in flight fail with ``ChannelClosed``."""
        self._closing = True
        self._ref_close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        if self._broken is None or not isinstance(self._broken, ChannelClosed):
            self._broken = ChannelClosed("the RPC client is closed")
        for fut, method, _, _ in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(ChannelClosed(f"{method}: the client was closed"))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._ch.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def name_reconnect(
    url: Any, options: dict[str, Any], connect: Callable[..., Awaitable[Channel]]
) -> tuple[Callable[[float | None], Awaitable[Channel]], Callable[[], str | None]]:
    """How a client (re)connects to ``url``: ``name:NAME`` is looked up again every
    time (the server may have moved); its registration's instance id tells a restarted
    server apart. Returns (reconnect, instance of the last connection)."""
    from ..address import parse_address

    addr = parse_address(url)
    instance: list[str | None] = [None]

    async def reconnect(left: float | None) -> Channel:
        if addr.scheme != "name":
            return await connect(url, left, **options)
        assert addr.name is not None
        address, found = resolve_server(addr.name)  # the blocking client's rule
        # one try per attempt: see the blocking client's reconnect (a stale name)
        ch = await connect(address, left, **{"retry": False, **options})
        instance[0] = found
        return ch

    return reconnect, lambda: instance[0]
