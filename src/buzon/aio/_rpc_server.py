"""The asyncio RPC server (``buzon.aio.rpc.Server``): a task per connection, a task per call.

The request rules are the blocking server's (:mod:`buzon.rpc._wire` messages, the
``_once_key`` of an exactly-once request, the :class:`~buzon.rpc.CompletionTable`
that answers retries, the :class:`~buzon.rpc._remote.RefPeer` reference tables); what is
here is the asyncio I/O. The completion table is the blocking server's own object and
its waits are a thread's (a retry waits for its first attempt on a condition), so an
exactly-once call goes through it in a worker thread, while its handler still runs as
a task on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import (
    BuzonError,
    ChannelClosed,
    CodecError,
    DeadlineExceeded,
    EndOfChannel,
    RemoteError,
)
from ..errors import Timeout as _Timeout
from ..rpc import _wire as w
from ..rpc._completion import CompletionTable, is_transactional
from ..rpc._context import _CURRENT, _DEADLINE, CallContext
from ..rpc._publish import ENDED, STARTED, publish_server
from ..rpc._remote import _PLAIN, RELEASE, RefPeer
from ..rpc._server import ServedIdentity, _once_key
from ..rpc._service import Method, Service, handler_failure
from ._channel import Channel
from ._rpc_client import _UNENCODABLE, post_release, send_body
from ._rpc_stream import _ChannelStream, open_stream_session
from ._server import Server as ChannelServer

__all__ = ["Server", "serve"]

_monotonic = time.monotonic


class _Connection(RefPeer):
    """One client connection: reads requests, runs each in a task, writes replies; one
    end of the connection's remote objects (calls to the client's objects go out here
    and their replies are read by the same loop)."""

    def __init__(self, server: Server, ch: Channel) -> None:
        self.server = server
        self.ch = ch
        self.loop = asyncio.get_running_loop()
        self.running: dict[int, tuple[CallContext, asyncio.Task[Any] | None]] = {}
        self.slots = asyncio.Semaphore(server.max_in_flight)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._out_ids = itertools.count(1)
        self._callbacks: dict[int, asyncio.Future[Any]] = {}
        self._ref_init()

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
                if type(body) is list and body and body[0] != w.REQUEST:
                    kind = body[0]
                    if kind == w.CANCEL:
                        self._cancel(w.read_id(fields, w.CORRELATION))
                        continue
                    if kind == w.REPLY:
                        self._callback_reply(body, fields)
                        continue
                    if kind == RELEASE and len(body) == 2:
                        self._exports.release(body[1])
                        continue
                await self.slots.acquire()  # at most max_in_flight calls: backpressure
                task = self.loop.create_task(self._handle(body, fields))
                self._tasks.add(task)
                task.add_done_callback(self._done)
        except (EndOfChannel, ChannelClosed):
            pass
        finally:
            self._ref_close()  # the client's references go with its connection
            for fut in self._callbacks.values():
                if not fut.done():
                    fut.set_exception(
                        EndOfChannel("the client left with a call to its object in flight")
                    )
            for ctx, running in list(self.running.values()):
                ctx.cancel()
                if running is not None:
                    running.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self.slots.release()

    def _cancel(self, call_id: int | None) -> None:
        entry = self.running.get(call_id) if call_id is not None else None
        if entry is not None:
            entry[0].cancel()
            if entry[1] is not None:
                entry[1].cancel()

    async def _handle(self, body: Any, fields: dict[int, bytes] | None) -> None:
        server = self.server
        call_id = w.read_id(fields, w.MESSAGE_ID)
        try:
            if (
                type(body) is not list
                or len(body) not in (3, 4, 5)
                or body[0] not in (w.REQUEST, w.NOTIFY)
            ):
                raise RemoteError("not an RPC request", RemoteError.INVALID_REQUEST)
            kind, name, args = body[0], body[1], body[2]
            kwargs = body[3] if len(body) >= 4 else None
            key = _once_key(body[4]) if len(body) == 5 and kind == w.REQUEST else None
            if kind == w.REQUEST and call_id is None:
                raise RemoteError("a request without a call id", RemoteError.INVALID_REQUEST)
            if kind == w.NOTIFY:
                call_id = None
            # the allowlist: nothing runs before it ([id, name]: a remote object's method)
            lookup = self._exports.method if type(name) is list else server.service.lookup
            method = lookup(name)
            if type(args) is not list or (kwargs is not None and type(kwargs) is not dict):
                raise RemoteError(
                    f"{name}: arguments are a list (and keywords a map)", RemoteError.INVALID_PARAMS
                )
            for a in args:
                if type(a) not in _PLAIN:
                    args = self._in(args)  # references -> proxies, or our own objects
                    break
            if kwargs:
                kwargs = self._in(kwargs)
            budget = w.read_ms(fields)
            at = None if budget is None else _monotonic() + budget
            if key is None:
                reply = await self._run(method, args, kwargs, call_id, at)
            else:
                reply = await self._once(key, body, method, args, kwargs, call_id, at)
        except RemoteError as err:
            server.errors += 1
            reply = w.error_body(err)
        except asyncio.CancelledError:
            return  # the caller gave up (or left): it expects no reply
        if call_id is not None:
            await self._reply(call_id, reply)

    async def _run(
        self,
        method: Method,
        args: list[Any],
        kwargs: dict[str, Any] | None,
        call_id: int | None,
        at: float | None,
    ) -> list[Any]:
        """Run the handler in this task (its context and deadline set); the reply body."""
        if at is not None and _monotonic() >= at:
            raise RemoteError(
                f"{method.name}: the deadline passed before the call started",
                RemoteError.DEADLINE_EXCEEDED,
            )
        ctx = CallContext(method.name, call_id, at, self.ch.peer)
        key = call_id if call_id is not None else -id(ctx)  # notifies count as in flight
        self.running[key] = (ctx, asyncio.current_task())
        counters = self.server._pub.counters
        counters[STARTED] += 1  # published for buzon ls (rpc/_publish.py)
        _CURRENT.set(ctx)  # this task's own context: nothing leaks to others
        _DEADLINE.set(at)  # nested calls made by the handler inherit the budget
        try:
            result = await method.run_async(args, kwargs)
            if type(result) not in _PLAIN:
                result = self._out(result)  # remote objects -> references
            return [w.REPLY, None, result]
        except (RemoteError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise handler_failure(method.name, exc) from None
        finally:
            self.running.pop(key, None)
            counters[ENDED] += 1

    async def _once(
        self,
        key: tuple[bytes, int, int],
        body: list[Any],
        method: Method,
        args: list[Any],
        kwargs: dict[str, Any] | None,
        call_id: int | None,
        at: float | None,
    ) -> list[Any]:
        """An exactly-once request through the server's completion table (run once;
        a retry gets the recorded reply)."""
        loop = self.loop

        async def attempt() -> list[Any]:
            try:
                return await self._run(method, args, kwargs, call_id, at)
            except asyncio.CancelledError:  # recorded: a retry must not wait for ever
                raise RemoteError(
                    f"{method.name}: cancelled by the caller", RemoteError.CANCELLED
                ) from None

        def call() -> list[Any]:  # in a worker thread; the handler runs on the loop
            stopped = RemoteError(f"{method.name}: the server stopped", RemoteError.CANCELLED)
            try:
                cf = asyncio.run_coroutine_threadsafe(attempt(), loop)
            except RuntimeError:  # the loop is closed
                raise stopped from None
            while True:  # never a thread stuck on a loop that has stopped
                try:
                    return cf.result(0.5)
                except concurrent.futures.TimeoutError:
                    if loop.is_closed() or not loop.is_running():
                        cf.cancel()
                        raise stopped from None

        table = self.server.table
        return await loop.run_in_executor(
            self.server._pool(),
            lambda: table.run(key, body, call, at, is_transactional(method.fn)),
        )

    async def _reply(self, call_id: int, reply: list[Any]) -> None:
        server = self.server
        try:
            await send_body(self.ch, reply, w.CORRELATION, call_id, None, server.reply_timeout)
            server.calls += 1
            return
        except _UNENCODABLE as exc:
            # the result cannot go on the wire: say so instead of dropping the connection
            err = RemoteError(f"the result cannot be encoded: {exc}", RemoteError.INVALID_RESULT)
        except BuzonError:
            return  # the client is gone
        server.errors += 1
        try:
            await send_body(
                self.ch, w.error_body(err), w.CORRELATION, call_id, None, server.reply_timeout
            )
        except BuzonError:
            pass

    # -- remote objects: calls to the client's objects ------------------------------

    def _call_ref(self, rid: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A proxy of the client's object: its calls are coroutines."""
        return self._call_client(rid, name, args, kwargs)

    async def _call_client(
        self, rid: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call method ``name`` of the client's object ``rid`` and await the result
        (within the handler's deadline, else the server's ``reply_timeout``)."""
        at = _DEADLINE.get()
        if at is None and self.server.reply_timeout is not None:
            at = _monotonic() + self.server.reply_timeout
        body: list[Any] = [w.REQUEST, [rid, name], self._out(list(args))]
        if kwargs:
            body.append(self._out(kwargs))
        call_id = next(self._out_ids)
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._callbacks[call_id] = fut
        try:
            left = None if at is None else max(0.0, at - _monotonic())
            await send_body(self.ch, body, w.MESSAGE_ID, call_id, left, left)
            left = None if at is None else max(0.0, at - _monotonic())
            try:
                return await asyncio.wait_for(fut, left)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"{name}: the client's object did not answer in time"
                ) from None
        finally:
            self._callbacks.pop(call_id, None)

    def _callback_reply(self, body: list[Any], fields: dict[int, bytes] | None) -> None:
        call_id = w.read_id(fields, w.CORRELATION)
        fut = self._callbacks.get(call_id) if call_id is not None else None
        if fut is None or fut.done():
            return  # late (its caller gave up) or junk
        try:
            if len(body) != 3:
                fut.set_exception(RemoteError("malformed reply", RemoteError.INTERNAL_ERROR))
            elif body[1] is not None:
                fut.set_exception(w.error_from(body[1]))
            else:
                fut.set_result(self._in(body[2]))
        except RemoteError as err:
            fut.set_exception(err)

    def _send_release(self, pairs: list[list[int]]) -> None:
        post_release(self, self.loop, pairs)

    async def _release_now(self, pairs: list[list[int]]) -> None:
        try:
            await self.ch.send([RELEASE, pairs], self.server.reply_timeout)
        except BuzonError:
            pass


class Server(ServedIdentity):
    """An asyncio RPC server (``buzon.aio.rpc.Server``), the twin of
    :class:`buzon.rpc.Server`: ``await srv.serve_forever()``, ``srv.shutdown()``.

    Each connection is a task and each call a task of its own (coroutine handlers are
    awaited; a plain function runs in the loop's thread: keep it short); a call the
    client gives up on (deadline, cancel) has its task cancelled and its
    ``context().cancelled`` set. ``wire``: ``"buzon"`` (default), ``"jsonrpc"`` or
    ``"msgpack-rpc"`` (a session per connection, at most once). ``semantics``: as the
    blocking server, the ``table`` answers the retries of exactly-once calls:
    ``table=`` as :class:`buzon.rpc.Server`'s (None: in memory; a path: an SQLite file
    that survives a restart, with ``context().transaction`` for the handler's own
    writes, coroutine handlers included; its waits run in worker threads). ``name``:
    register the bound address under this name with metadata ``{"service", "wire",
    "semantics", "instance"}`` (the name goes when the server stops);
    ``url="name:NAME"`` serves ``unix:NAME``.

    Attributes: ``address``, ``name``, ``instance`` (a random id of this start),
    counters ``calls``, ``errors`` (published for ``buzon ls`` like the blocking
    server's); ``in_flight`` and ``references`` (remote objects clients hold now).
    """

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
        table: str | os.PathLike[str] | CompletionTable | None = None,
        **options: Any,
    ) -> None:
        addr = self._init_identity(
            url, service, wire, semantics, name, table, max_in_flight, reply_timeout
        )
        self._connections: set[_Connection] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        try:
            if wire == "buzon":
                self._server = ChannelServer(
                    str(addr), self._serve_client, hello=self._hello(), **options
                )
            else:
                self._server = ChannelServer(str(addr), self._serve_stream, raw=True, **options)
            if self.name is not None:
                from ..names import bind

                # closes the listener if refused
                bind(self._server._listener, self.name, self._metadata())
        except BaseException:
            if self._own_table:
                self.table.close()
            raise
        publish_server(self)

    @property
    def address(self) -> Any:
        """The bound address (a TCP port 0 is resolved)."""
        return self._server.address

    @property
    def in_flight(self) -> int:
        """Calls (and notifies) running now, over all connections."""
        if self.wire != "buzon":  # their sessions count only in the counters
            return self._pub.in_flight
        return sum(len(c.running) for c in list(self._connections))

    @property
    def references(self) -> int:
        """Objects of this server that clients hold references to now."""
        return sum(len(c._exports) for c in list(self._connections))

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:  # the completion table's waits (exactly_once only)
            self._executor = ThreadPoolExecutor(
                self.max_in_flight * 4, thread_name_prefix="buzon-aio-rpc-once"
            )
        return self._executor

    async def _serve_client(self, ch: Channel) -> None:
        conn = _Connection(self, ch)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    async def _serve_stream(self, ch: Channel) -> None:
        session = open_stream_session(
            self.wire, _ChannelStream(ch), self.service, None, self.max_in_flight, self._pub
        )
        try:
            await session.wait_closed()
        finally:
            await session.aclose()

    async def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (called before, it returns at once)."""
        try:
            if self._stopping:  # shut down before it started: nothing to serve
                self._server._listener.close()
                return
            await self._server.serve_forever()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            if self._own_table:
                self.table.close()
            self._pub.close()

    def shutdown(self) -> None:
        """Stop serving (from the loop's thread; another thread uses
        ``loop.call_soon_threadsafe(srv.shutdown)``)."""
        self._stopping = True
        self._server.shutdown()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<buzon.aio.rpc.Server {self.service.name} at {self.address}>"


async def serve(url: str, service: Service | object, **options: Any) -> None:
    """Serve ``service`` at ``url`` until SIGINT/SIGTERM, on the running loop (the
    arguments are :class:`Server`'s)."""
    server = Server(url, service, **options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.shutdown)
    try:
        await server.serve_forever()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
