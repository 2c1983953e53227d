"""The asyncio twin of :mod:`buzon.rpc` (``buzon.aio.rpc``): same services, same wire.

>>> calc = await buzon.aio.rpc.connect("unix:calc")
>>> await calc.add(1, 2)
3

A client has one reader task that hands each reply to the future of the call it answers
(replies come back in any order); ``call`` awaits that future by the call's deadline,
and a call given up (deadline, ``asyncio.CancelledError``, ``task.cancel()``) sends the
server a cancel message. The server (``mode="async"``) runs each request in a task of
its own, at most ``max_in_flight`` per connection; a coroutine handler that is
cancelled by its caller gets ``CancelledError`` (and ``context().cancelled``). A plain
function handler runs in the event loop's thread: keep it short.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from ..address import Address
from ..errors import (
    BuzonError,
    ChannelClosed,
    CodecError,
    DeadlineExceeded,
    EndOfChannel,
    MessageTooLarge,
    RemoteError,
    UnsupportedOperation,
    ValidationError,
)
from ..errors import Timeout as _Timeout
from ..protocol.frames import Kind, encode_frame
from ..rpc import _wire as w
from ..rpc._client import _return_types
from ..rpc._context import _CURRENT, _DEADLINE, CallContext
from ..rpc._service import Service, as_service
from ._channel import Channel
from ._open import connect as _connect
from ._server import Server as ChannelServer

__all__ = ["Client", "Server", "connect", "serve"]

P = TypeVar("P")
_monotonic = time.monotonic


async def _send(
    ch: Channel, body: Any, tag: int, call_id: int, budget: float | None, timeout: float | None
) -> None:
    """The asyncio form of :func:`buzon.rpc._wire.send`."""
    core = ch._core
    codec, payload, buffers = core.codec.encode(body)
    fields = {tag: w.id_field(call_id)}
    if budget is not None:
        fields[w.DEADLINE] = w.ms_field(budget)
    bufs = encode_frame(Kind.DATA, codec, payload, buffers, fields=fields, max_frame=core.max_frame)
    await ch._send_encoded(bufs, timeout)


class Client:
    """An asyncio RPC client (``await buzon.aio.rpc.connect(url)``); see the module doc.

    ``await client.add(1, 2)`` / ``await client.call("add", 1, 2)``, ``await
    client.notify(...)``, ``client.call_async(...)`` (an ``asyncio.Task``), ``await
    client.aclose()`` (or ``async with``).
    """

    def __init__(self, ch: Channel, proto: Any, timeout: float | None, max_in_flight: int) -> None:
        self._ch = ch
        self._proto = proto
        self._rtypes: dict[str, Any] = {} if proto is None else _return_types(proto)
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Any], str, Any]] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._broken: BuzonError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.late = 0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._proto is not None and name not in self._rtypes:
            raise AttributeError(f"{self._proto.__name__} has no method {name!r}")

        async def stub(*args: Any, **kwargs: Any) -> Any:
            return await self.call(name, *args, **kwargs)

        stub.__name__ = name
        return stub

    def _deadline(self) -> float | None:
        at = _DEADLINE.get()
        if self._timeout is not None:
            mine = _monotonic() + self._timeout
            if at is None or mine < at:
                at = mine
        return at

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` and await its result (by the call's deadline)."""
        if self._broken is not None:
            raise self._broken
        at = self._deadline()
        left = None if at is None else max(0.0, at - _monotonic())
        try:
            await asyncio.wait_for(self._slots.acquire(), left)
        except TimeoutError:
            raise DeadlineExceeded(f"{method}: no call slot free by the deadline") from None
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = (fut, method, self._rtypes.get(method, Any))
        try:
            body: list[Any] = [w.REQUEST, method, list(args)]
            if kwargs:
                body.append(kwargs)
            left = None if at is None else max(0.0, at - _monotonic())
            await _send(self._ch, body, w.MESSAGE_ID, call_id, left, left)
            left = None if at is None else max(0.0, at - _monotonic())
            try:
                return await asyncio.wait_for(asyncio.shield(fut), left)
            except TimeoutError:
                await self._cancel(call_id)
                raise DeadlineExceeded(
                    f"{method}: no reply by the call's deadline; the server was told to cancel it"
                ) from None
            except asyncio.CancelledError:
                await asyncio.shield(self._cancel(call_id))
                raise
        finally:
            self._pending.pop(call_id, None)
            self._slots.release()

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        """Start the call as a task; cancelling the task cancels the call."""
        return asyncio.get_running_loop().create_task(self.call(method, *args, **kwargs))

    async def notify(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Send a one-way call (no reply)."""
        if self._broken is not None:
            raise self._broken
        body: list[Any] = [w.NOTIFY, method, list(args)]
        if kwargs:
            body.append(kwargs)
        await self._ch.send(body)

    async def _cancel(self, call_id: int) -> None:
        self._pending.pop(call_id, None)
        try:
            await _send(self._ch, [w.CANCEL], w.CORRELATION, call_id, None, 0.1)
        except BuzonError:
            pass

    async def _read(self) -> None:
        why: BuzonError = EndOfChannel("the RPC server closed the connection")
        try:
            while True:
                try:
                    body, fields = await self._ch._recv_fields(None)
                except _Timeout:
                    continue
                except CodecError:
                    continue
                call_id = w.read_id(fields, w.CORRELATION)
                entry = self._pending.get(call_id) if call_id is not None else None
                if entry is None or entry[0].done():
                    self.late += 1
                    continue
                fut, method, rtype = entry
                if type(body) is not list or len(body) != 3 or body[0] != w.REPLY:
                    fut.set_exception(RemoteError("malformed reply", RemoteError.INTERNAL_ERROR))
                elif body[1] is not None:
                    fut.set_exception(w.error_from(body[1]))
                elif rtype is not Any:
                    try:
                        fut.set_result(msgspec.convert(body[2], rtype))
                    except msgspec.ValidationError as exc:
                        fut.set_exception(
                            ValidationError(f"{method}: the result does not match {rtype!r}: {exc}")
                        )
                else:
                    fut.set_result(body[2])
        except (EndOfChannel, ChannelClosed) as exc:
            if isinstance(exc, ChannelClosed):
                why = ChannelClosed("the RPC client is closed")
        self._broken = why
        for fut, method, _ in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(
                    type(why)(
                        f"{method}: the connection was lost with the call in flight; "
                        "it may or may not have run (at_most_once)"
                    )
                )

    async def aclose(self) -> None:
        """Close the connection; calls in flight fail with ``ChannelClosed``."""
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
        if self._broken is None:
            self._broken = ChannelClosed("the RPC client is closed")
        for fut, method, _ in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(ChannelClosed(f"{method}: the client was closed"))
        await self._ch.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@typing.overload
async def connect(
    url: str | Address,
    proto: None = None,
    *,
    timeout: float | None = 60.0,
    max_in_flight: int = 64,
    **options: Any,
) -> Client: ...
@typing.overload
async def connect(
    url: str | Address,
    proto: Callable[..., P],
    *,
    timeout: float | None = 60.0,
    max_in_flight: int = 64,
    **options: Any,
) -> P: ...


async def connect(
    url: str | Address,
    proto: Any = None,
    *,
    timeout: float | None = 60.0,
    max_in_flight: int = 64,
    **options: Any,
) -> Any:
    """Connect to an RPC server (``await buzon.aio.rpc.connect(url, Proto)``).

    As :func:`buzon.rpc.connect` (``wire="buzon"``, at-most-once); with a Protocol
    whose methods are ``async def``, mypy checks ``await calc.add(1, 2)``.
    """
    ch = await _connect(url, timeout, **options)
    return Client(ch, proto, timeout, max_in_flight)


class _Connection:
    def __init__(self, server: Server, ch: Channel) -> None:
        self.server = server
        self.ch = ch
        self.running: dict[int, tuple[CallContext, asyncio.Task[Any]]] = {}
        self.slots = asyncio.Semaphore(server.max_in_flight)
        self.tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    body, fields = await self.ch._recv_fields(None)
                except _Timeout:
                    continue
                except CodecError:
                    self.server.errors += 1
                    continue
                if type(body) is list and body and body[0] == w.CANCEL:
                    entry = self.running.get(w.read_id(fields, w.CORRELATION) or -1)
                    if entry is not None:
                        entry[0].cancel()
                        entry[1].cancel()
                    continue
                await self.slots.acquire()  # at most max_in_flight calls: backpressure
                task = asyncio.get_running_loop().create_task(self._handle(body, fields))
                self.tasks.add(task)
                task.add_done_callback(self._done)
        except (EndOfChannel, ChannelClosed):
            pass
        finally:
            for ctx, task in list(self.running.values()):
                ctx.cancel()
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        self.slots.release()

    async def _handle(self, body: Any, fields: dict[int, bytes] | None) -> None:
        server = self.server
        call_id = w.read_id(fields, w.MESSAGE_ID)
        try:
            if (
                type(body) is not list
                or len(body) not in (3, 4)
                or body[0]
                not in (
                    w.REQUEST,
                    w.NOTIFY,
                )
            ):
                raise RemoteError("not an RPC request", RemoteError.INVALID_REQUEST)
            kind, name, args = body[0], body[1], body[2]
            kwargs = body[3] if len(body) == 4 else None
            if kind == w.REQUEST and call_id is None:
                raise RemoteError("a request without a call id", RemoteError.INVALID_REQUEST)
            if kind == w.NOTIFY:
                call_id = None
            method = server.service.lookup(name)
            if type(args) is not list or (kwargs is not None and type(kwargs) is not dict):
                raise RemoteError(
                    f"{name}: arguments are a list (and keywords a map)", RemoteError.INVALID_PARAMS
                )
            budget = w.read_ms(fields)
            at = None if budget is None else _monotonic() + budget
            if at is not None and budget == 0:
                raise RemoteError(
                    f"{name}: the deadline passed before the call started",
                    RemoteError.DEADLINE_EXCEEDED,
                )
            ctx = CallContext(method.name, call_id, at, self.ch.peer)
            task = asyncio.current_task()
            assert task is not None
            key = call_id if call_id is not None else -id(ctx)
            self.running[key] = (ctx, task)
            _CURRENT.set(ctx)  # this task's own context: nothing leaks to others
            _DEADLINE.set(at)
            try:
                result = await method.run_async(args, kwargs)
            except (RemoteError, asyncio.CancelledError):
                raise
            except Exception as exc:
                raise RemoteError(
                    f"{method.name} raised {type(exc).__name__}: {exc}",
                    RemoteError.SERVER_ERROR,
                    {"type": type(exc).__name__},
                ) from None
            finally:
                del self.running[key]
            reply: list[Any] = [w.REPLY, None, result]
        except RemoteError as err:
            server.errors += 1
            reply = w.error_body(err)
        except asyncio.CancelledError:
            return  # the caller gave up: it expects no reply
        if call_id is None:
            return
        try:
            await _send(self.ch, reply, w.CORRELATION, call_id, None, server.reply_timeout)
            server.calls += 1
        except (CodecError, TypeError, ValueError, OverflowError, MessageTooLarge) as exc:
            server.errors += 1
            refusal = RemoteError(
                f"the result cannot be encoded: {exc}", RemoteError.INVALID_RESULT
            )
            try:
                await _send(
                    self.ch,
                    w.error_body(refusal),
                    w.CORRELATION,
                    call_id,
                    None,
                    server.reply_timeout,
                )
            except BuzonError:
                pass
        except BuzonError:
            pass  # the client is gone


class Server:
    """An asyncio RPC server (``buzon.aio.rpc.Server``): ``await srv.serve_forever()``,
    ``srv.shutdown()``, ``srv.address``; counters ``calls`` and ``errors``."""

    def __init__(
        self,
        url: str,
        service: Service | object,
        *,
        wire: str = "buzon",
        semantics: str = "at_most_once",
        name: str | None = None,
        max_in_flight: int = 64,
        reply_timeout: float | None = 30.0,
        **options: Any,
    ) -> None:
        if wire != "buzon" or semantics != "at_most_once" or name is not None:
            raise UnsupportedOperation(
                "buzon.aio.rpc serves wire='buzon', semantics='at_most_once', without name="
            )
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.service = as_service(service)
        self.max_in_flight = max_in_flight
        self.reply_timeout = reply_timeout
        self.calls = 0
        self.errors = 0
        self._server = ChannelServer(url, self._serve_client, **options)

    @property
    def address(self) -> Any:
        """The bound address."""
        return self._server.address

    async def _serve_client(self, ch: Channel) -> None:
        await _Connection(self, ch).run()

    async def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`."""
        await self._server.serve_forever()

    def shutdown(self) -> None:
        """Stop serving."""
        self._server.shutdown()


async def serve(url: str, service: Service | object, **options: Any) -> None:
    """Serve ``service`` at ``url`` until SIGINT/SIGTERM, on the running loop."""
    server = Server(url, service, **options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.shutdown)
    try:
        await server.serve_forever()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
