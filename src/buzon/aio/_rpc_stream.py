"""The asyncio sessions of the two stream wires: ``msgpack-rpc`` and ``jsonrpc``.

The message rules are the blocking sessions' own, sans-IO: msgpack-rpc's
:func:`~buzon.rpc._msgpack.object_end` (where one msgpack object ends, checked before
anything is decoded) and :func:`~buzon.rpc._msgpack.peer_error`, JSON-RPC's
``_jsonrpc_codec`` (``Content-Length`` framing, ``classify``, ``error_response``) and
``_jsonrpc.route`` / ``result_response``. What is here is only the I/O: one reader task
per session hands responses to the futures of the calls waiting for them and runs each
request of the peer in a task of its own (so a handler may call back into the peer
while the reader goes on reading; at most ``max_in_flight`` run at once).
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any, Self

import msgspec

from ..errors import (
    BuzonError,
    ChannelClosed,
    DeadlineExceeded,
    EndOfChannel,
    FrameError,
    FrameTooLarge,
    RemoteError,
    UnsupportedOperation,
)
from ..rpc import _jsonrpc_codec as codec
from ..rpc._context import _CURRENT, _DEADLINE, CallContext
from ..rpc._jsonrpc import _NO_ID, CANCEL_METHOD, _invalid, result_response, route
from ..rpc._msgpack import (
    MAX_MESSAGE,
    NOTIFICATION,
    REQUEST,
    RESPONSE,
    _peer_error,
    object_end,
)
from ..rpc._publish import CALLS, ENDED, ERRORS, STARTED, Counter, Publication
from ..rpc._service import Service, as_service, handler_failure
from ._channel import Channel

__all__ = ["JsonRpcClient", "MsgpackRpcClient", "connect_process", "open_stream_session"]

_monotonic = time.monotonic
_json = msgspec.json.Encoder()


class _Stream(abc.ABC):
    """An asyncio byte stream: ``await read()`` (b"" at the end), ``await
    write(data)``, ``await close()``."""

    @abc.abstractmethod
    async def read(self) -> bytes: ...

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class _ChannelStream(_Stream):
    """A raw asyncio channel (``unix:/abs/path`` to ``nvim --listen``, a served client)."""

    def __init__(self, ch: Channel) -> None:
        self.ch = ch

    async def read(self) -> bytes:
        try:
            return bytes(await self.ch.recv_bytes(None))
        except (EndOfChannel, ChannelClosed):
            return b""

    async def write(self, data: bytes) -> None:
        await self.ch.send_bytes(data)

    async def close(self) -> None:
        await self.ch.aclose()


class _ProcessStream(_Stream):
    """A child's stdin (we write) and stdout (we read)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.stdin = proc.stdin
        self.stdout = proc.stdout

    async def read(self) -> bytes:
        try:
            return await self.stdout.read(65536)
        except OSError:
            return b""

    async def write(self, data: bytes) -> None:
        try:
            self.stdin.write(data)
            await self.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise EndOfChannel("the peer process closed its stdin") from None

    async def close(self) -> None:
        proc = self.proc
        if not self.stdin.is_closing():
            self.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 5)


class _Session(abc.ABC):
    """What both asyncio stream sessions share: the stream, the reader task, the
    calls waiting for responses, the peer's requests running, the end, and the
    counters (as the blocking sessions': ``pub``'s, a server's or, None, its own)."""

    _wire = ""
    errors = Counter(ERRORS)  # malformed messages from the peer and error answers sent

    def __init__(
        self,
        stream: _Stream,
        handler: Service | object | None,
        timeout: float | None,
        max_in_flight: int = 64,
        pub: Publication | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._pub = Publication() if pub is None else pub
        self._stream = stream
        self._service = None if handler is None else as_service(handler)
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._ids = itertools.count(1)
        self._pending: dict[Any, tuple[asyncio.Future[Any], str]] = {}
        self._running: dict[Any, tuple[CallContext, asyncio.Task[Any] | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wlock = asyncio.Lock()
        self._closed = False
        self._broken: BuzonError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        async def stub(*args: Any, **kwargs: Any) -> Any:
            return await self.call(name, *args, **kwargs)

        stub.__name__ = name
        return stub

    @abc.abstractmethod
    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the peer and await its result (each wire defines it)."""

    def _deadline(self) -> float | None:
        at = _DEADLINE.get()
        if self._timeout is not None:
            mine = _monotonic() + self._timeout
            at = mine if at is None or mine < at else at
        return at

    async def _write(self, data: bytes) -> None:
        async with self._wlock:
            await self._stream.write(data)

    async def _request(
        self, msgid: Any, method: str, data: bytes, on_give_up: Callable[[], Any] | None
    ) -> Any:
        """Send ``data`` (a request with ``msgid``) and await its response by the
        deadline; giving up (deadline, cancellation) runs ``on_give_up`` (a cancel)."""
        if self._broken is not None:
            raise self._broken
        at = self._deadline()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msgid] = (fut, method)
        try:
            await self._write(data)
            left = None if at is None else max(0.0, at - _monotonic())
            try:
                return await asyncio.wait_for(asyncio.shield(fut), left)
            except TimeoutError:
                if on_give_up is not None:
                    await on_give_up()
                    raise DeadlineExceeded(
                        f"{method}: no response by the deadline (cancel sent)"
                    ) from None
                raise DeadlineExceeded(f"{method}: no response by the deadline") from None
            except asyncio.CancelledError:
                if on_give_up is not None:
                    await asyncio.shield(on_give_up())
                raise
        finally:
            self._pending.pop(msgid, None)

    def _respond_to(self, msgid: Any, error: BaseException | None, result: Any = None) -> None:
        entry = self._pending.get(msgid)
        if entry is None or entry[0].done():
            self.errors += 1  # an answer to nothing we asked (or a call given up on)
            return
        if error is not None:
            entry[0].set_exception(error)
        else:
            entry[0].set_result(result)

    def _admit(self) -> bool:
        return len(self._tasks) < self._max_in_flight

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, method: Any, params: Any, msgid: Any, track: bool) -> Any:
        """Run the peer's request through the service's allowlist (``params``: a list,
        or a dict of named params); raises :class:`RemoteError`."""
        if self._service is None:
            raise RemoteError(
                f"no method {method!r}: this end serves nothing", RemoteError.METHOD_NOT_FOUND
            )
        entry = self._service.lookup(method)
        ctx = CallContext(entry.name, msgid if type(msgid) is int else None, None, None)
        if track:
            self._running[msgid] = (ctx, asyncio.current_task())
        _CURRENT.set(ctx)  # this task's own context
        self._pub.counters[STARTED] += 1
        try:
            if type(params) is dict:
                return await entry.run_async([], params)
            if type(params) is not list:
                raise RemoteError(f"{method}: params must be an array", RemoteError.INVALID_PARAMS)
            return await entry.run_async(params, None)
        except (RemoteError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise handler_failure(entry.name, exc) from None
        finally:
            self._pub.counters[ENDED] += 1  # read afresh: the server may have unmapped it
            if track:
                self._running.pop(msgid, None)

    def _cancel_running(self, msgid: Any) -> None:
        entry = self._running.get(msgid)
        if entry is not None:
            entry[0].cancel()
            if entry[1] is not None:
                entry[1].cancel()

    async def _read_loop(self) -> None:
        why: BuzonError = EndOfChannel(f"the {self._wire} peer closed the connection")
        try:
            while not self._closed:
                data = await self._stream.read()
                if not data:
                    break
                self._feed(data)
        except (FrameError, BuzonError) as exc:  # malformed stream: close with the reason
            why = exc
        except OSError as exc:
            why = EndOfChannel(f"the {self._wire} connection failed: {exc}")
        except asyncio.CancelledError:
            pass
        if self._closed:
            why = ChannelClosed(f"the {self._wire} session is closed")
        self._broken = why
        for fut, method in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(type(why)(f"{method}: {why}; the call may or may not have run"))
        for ctx, task in list(self._running.values()):
            ctx.cancel()
            if task is not None:
                task.cancel()

    @abc.abstractmethod
    def _feed(self, data: bytes) -> None:
        """Take bytes read from the stream (each wire parses its own messages)."""

    async def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the connection ends (True) or ``timeout`` passes (False)."""
        done, _ = await asyncio.wait({self._reader}, timeout=timeout)
        return bool(done)

    async def aclose(self) -> None:
        """End the session: calls in flight fail with ``ChannelClosed``, the peer's
        requests running are cancelled, a child process is waited for (killed if it
        lingers)."""
        self._closed = True
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stream.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class MsgpackRpcClient(_Session):
    """The asyncio msgpack-rpc session (``wire="msgpack-rpc"``), as
    :class:`buzon.rpc.MsgpackRpcClient`: ``await s.nvim_eval("1+1")`` or ``await
    s.call(method, *params)``, ``await s.notify(method, *params)``; the peer's errors
    (Neovim: ``[type, message]``) raise :class:`~buzon.errors.RemoteError`; the peer's
    requests go to ``handler`` (coroutine methods are awaited), each in a task.
    ``await s.aclose()`` (or ``async with``)."""

    _wire = "msgpack-rpc"

    def __init__(
        self,
        stream: _Stream,
        handler: Service | object | None,
        timeout: float | None,
        max_in_flight: int = 64,
        pub: Publication | None = None,
    ) -> None:
        super().__init__(stream, handler, timeout, max_in_flight, pub)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder()
        self._buf = bytearray()

    async def call(self, method: str, /, *params: Any) -> Any:
        """Call ``method`` with ``params`` on the peer and await its result (by the
        deadline: msgpack-rpc has no cancel message, a late response is dropped)."""
        msgid = next(self._ids) & 0xFFFFFFFF
        data = self._encoder.encode([REQUEST, msgid, method, list(params)])
        return await self._request(msgid, method, data, None)

    async def notify(self, method: str, /, *params: Any) -> None:
        """Send a notification ``[2, method, params]`` (no response)."""
        if self._broken is not None:
            raise self._broken
        await self._write(self._encoder.encode([NOTIFICATION, method, list(params)]))

    def _feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        while True:
            end = object_end(buf, start)
            if end < 0:
                break
            try:
                msg = self._decoder.decode(bytes(buf[start:end]))
            except msgspec.DecodeError:
                msg = None
            self._dispatch(msg)
            start = end
        del buf[:start]
        if len(buf) > MAX_MESSAGE:
            raise FrameTooLarge(f"a msgpack-rpc message over {MAX_MESSAGE} bytes")

    def _dispatch(self, msg: Any) -> None:
        if type(msg) is not list or not msg or msg[0] not in (REQUEST, RESPONSE, NOTIFICATION):
            self.errors += 1
            return
        kind = msg[0]
        if kind == RESPONSE and len(msg) == 4:
            if msg[2] is not None:
                self._respond_to(msg[1], _peer_error(msg[2]))
            else:
                self._respond_to(msg[1], None, msg[3])
        elif kind == REQUEST and len(msg) == 4 and type(msg[1]) is int:
            if not self._admit():
                self.errors += 1
                overloaded = RemoteError(
                    f"over {self._max_in_flight} requests in flight", RemoteError.OVERLOADED
                )
                self._spawn(self._respond(msg[1], overloaded, None))
                return
            self._spawn(self._answer(msg[1], msg[2], msg[3]))
        elif kind == NOTIFICATION and len(msg) == 3:
            if self._admit():
                self._spawn(self._answer(None, msg[1], msg[2]))
            else:
                self.errors += 1
        else:
            self.errors += 1
            if kind == REQUEST and len(msg) >= 2 and type(msg[1]) is int:
                invalid = RemoteError("invalid request", RemoteError.INVALID_REQUEST)
                self._spawn(self._respond(msg[1], invalid, None))

    async def _answer(self, msgid: int | None, method: Any, params: Any) -> None:
        try:
            if type(params) is not list:
                raise RemoteError(f"{method}: params must be an array", RemoteError.INVALID_PARAMS)
            result = await self._run(method, params, msgid, msgid is not None)
            error = None
        except RemoteError as err:
            self.errors += 1
            error, result = err, None
        if msgid is not None:
            await self._respond(msgid, error, result)

    async def _respond(self, msgid: int, error: RemoteError | None, result: Any) -> None:
        wire_error = None if error is None else error.message
        try:
            data = self._encoder.encode([RESPONSE, msgid, wire_error, result])
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            self.errors += 1
            data = self._encoder.encode(
                [RESPONSE, msgid, [RemoteError.INVALID_RESULT, f"cannot encode: {exc}"], None]
            )
        try:
            await self._write(data)
        except BuzonError:
            return  # the peer is gone; the reader reports it
        self._pub.counters[CALLS] += 1

    def __repr__(self) -> str:
        return f"<buzon.aio.rpc.MsgpackRpcClient in_flight={len(self._pending)}>"


class JsonRpcClient(_Session):
    """The asyncio JSON-RPC 2.0 session (``wire="jsonrpc"``), as
    :class:`buzon.rpc.JsonRpcClient`: ``await s.call(method, *args)`` (positional) or
    ``await s.call(method, **kwargs)`` (named), ``await s.notify(...)``, ``await
    s.call_batch([(method, params), ...])``. At the deadline a call raises
    :class:`~buzon.errors.DeadlineExceeded` and sends ``$/cancelRequest``; so does a
    cancelled task. The peer's requests go to ``handler`` (coroutine methods are
    awaited), each in a task; its ``$/cancelRequest`` cancels that task and marks
    ``context().cancelled``."""

    _wire = "JSON-RPC"

    def __init__(
        self,
        stream: _Stream,
        handler: Service | object | None,
        timeout: float | None,
        max_in_flight: int = 64,
        pub: Publication | None = None,
        *,
        max_message: int = codec.MAX_MESSAGE,
    ) -> None:
        super().__init__(stream, handler, timeout, max_in_flight, pub)
        self._decoder = codec.FrameDecoder(max_message)

    async def _send(self, message: Any) -> None:
        await self._write(codec.encode_frame(_json.encode(message)))

    async def _send_safe(self, message: Any) -> None:
        """Send a response (or a batch of them: each counts as a call served)."""
        try:
            await self._send(message)
        except (BuzonError, OSError):
            return  # the peer is gone; the reader reports it
        self._pub.counters[CALLS] += len(message) if type(message) is list else 1

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the peer and await its result (positional arguments go
        as an array, keyword arguments as an object; not both)."""
        if args and kwargs:
            raise TypeError(f"{method}: JSON-RPC params are positional or named, not both")
        params: Any = dict(kwargs) if kwargs else (list(args) if args else None)
        msgid = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": msgid}
        if params is not None:
            message["params"] = params
        data = codec.encode_frame(_json.encode(message))
        return await self._request(msgid, method, data, lambda: self._cancel(msgid))

    async def _cancel(self, msgid: Any) -> None:
        await self._send_safe({"jsonrpc": "2.0", "method": CANCEL_METHOD, "params": {"id": msgid}})

    async def notify(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Send a notification (no ``id``; the peer never answers it)."""
        if self._broken is not None:
            raise self._broken
        if args and kwargs:
            raise TypeError(f"{method}: JSON-RPC params are positional or named, not both")
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if args or kwargs:
            message["params"] = dict(kwargs) if kwargs else list(args)
        await self._send(message)

    async def call_batch(
        self, calls: Sequence[tuple[str, Any]], *, notify: bool = False
    ) -> list[Any]:
        """Send ``calls`` (``(method, params)`` pairs) as one batch and await all the
        responses: each result, or the :class:`~buzon.errors.RemoteError` the peer
        answered it with, in order (``notify=True``: notifications, returns ``[]``)."""
        if self._broken is not None:
            raise self._broken
        if not calls:
            raise ValueError("call_batch: a JSON-RPC batch must not be empty")
        batch: list[dict[str, Any]] = []
        futs: list[tuple[int, asyncio.Future[Any]]] = []
        loop = asyncio.get_running_loop()
        for method, params in calls:
            message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
            if params is not None:
                if type(params) not in (list, dict):
                    raise TypeError(f"{method}: params must be a list, a dict or None")
                message["params"] = params
            if not notify:
                msgid = next(self._ids)
                message["id"] = msgid
                fut: asyncio.Future[Any] = loop.create_future()
                self._pending[msgid] = (fut, method)
                futs.append((msgid, fut))
            batch.append(message)
        at = self._deadline()
        try:
            await self._send(batch)
            if not futs:
                return []
            left = None if at is None else max(0.0, at - _monotonic())
            _, waiting = await asyncio.wait([f for _, f in futs], timeout=left)
            if waiting:
                for msgid, fut in futs:
                    if not fut.done():
                        await self._cancel(msgid)
                raise DeadlineExceeded(f"batch of {len(futs)}: not answered by the deadline")
            out: list[Any] = []
            for _, fut in futs:
                error = fut.exception()
                if error is None:
                    out.append(fut.result())
                elif isinstance(error, RemoteError):
                    out.append(error)
                else:
                    raise error
            return out
        finally:
            for msgid, _ in futs:
                self._pending.pop(msgid, None)

    def _feed(self, data: bytes) -> None:
        for body in self._decoder.feed(data):
            self._on_body(body)

    def _on_body(self, body: bytes) -> None:
        for action, obj in route(body):  # the sans-IO rules, shared with the blocking session
            if action == "send":
                self.errors += 1
                self._spawn(self._send_safe(obj))
            elif action == "ignored":
                self.errors += 1
            elif action == "response":
                self._on_response(obj)
            elif action == "cancel":
                self._on_cancel(obj)
            elif self._admit():  # a batch, a request or a notification
                if action == "batch":
                    self._spawn(self._answer_batch(obj))
                else:
                    self._spawn(self._answer_one(action, obj))
            else:
                self.errors += 1
                if action != "notification":  # refused, as the blocking session does: a
                    # request by its id, a batch with one error response (id null); both
                    # count as a call served once sent (a notification is dropped)
                    msgid = obj.get("id") if action == "request" else None
                    overloaded = RemoteError(
                        f"over {self._max_in_flight} requests in flight on this connection",
                        RemoteError.OVERLOADED,
                    )
                    self._spawn(self._send_safe(codec.error_response(msgid, overloaded)))

    def _on_response(self, obj: dict[str, Any]) -> None:
        msgid = obj.get("id")
        if type(msgid) is not int:
            self.errors += 1
            return
        if "error" in obj:
            self._respond_to(msgid, codec.peer_error(obj["error"]))
        else:
            self._respond_to(msgid, None, obj["result"])

    def _on_cancel(self, params: Any) -> None:
        msgid = params.get("id") if type(params) is dict else None
        if msgid is not None and type(msgid) is not dict and type(msgid) is not list:
            self._cancel_running(msgid)

    async def _answer_one(self, kind: str, obj: dict[str, Any]) -> None:
        reply = await self._run_one(kind, obj)
        if reply is not None:
            await self._send_safe(reply)

    async def _answer_batch(self, items: list[tuple[str, Any]]) -> None:
        replies: list[Any] = []
        for kind, obj in items:
            if kind == "invalid":
                self.errors += 1
                replies.append(codec.error_response(obj, _invalid()))
            elif kind == "ignored":
                self.errors += 1
            elif kind == "response":
                self._on_response(obj)
            elif kind == "notification" and obj["method"] == CANCEL_METHOD:
                self._on_cancel(obj.get("params"))
            else:
                reply = await self._run_one(kind, obj)
                if reply is not None:
                    replies.append(reply)
        if replies:  # a batch of notifications only: no response at all
            await self._send_safe(replies)

    async def _run_one(self, kind: str, obj: dict[str, Any]) -> dict[str, Any] | None:
        method: str = obj["method"]
        msgid = obj.get("id") if kind == "request" else _NO_ID
        try:
            result = await self._run(method, obj.get("params") or [], msgid, kind == "request")
        except RemoteError as err:
            self.errors += 1
            return None if kind != "request" else codec.error_response(msgid, err)
        except asyncio.CancelledError:
            if self._closed or self._broken is not None:
                raise
            # cancelled by the peer's $/cancelRequest: LSP's answer for it
            cancelled = RemoteError(f"{method}: cancelled by the caller", RemoteError.CANCELLED)
            return None if kind != "request" else codec.error_response(msgid, cancelled)
        if kind != "request":
            return None
        reply = result_response(msgid, method, result)
        if "error" in reply:
            self.errors += 1
        return reply

    def __repr__(self) -> str:
        return f"<buzon.aio.rpc.JsonRpcClient in_flight={len(self._pending)}>"


def open_stream_session(
    wire: str,
    stream: _Stream,
    handler: Service | object | None,
    timeout: float | None,
    max_in_flight: int = 64,
    pub: Publication | None = None,
) -> MsgpackRpcClient | JsonRpcClient:
    """The session of ``wire`` on ``stream``, counting in ``pub`` (None: its own)."""
    if wire == "jsonrpc":
        return JsonRpcClient(stream, handler, timeout, max_in_flight, pub)
    if wire == "msgpack-rpc":
        return MsgpackRpcClient(stream, handler, timeout, max_in_flight, pub)
    raise UnsupportedOperation(f"wire={wire!r}: the stream wires are msgpack-rpc and jsonrpc")


async def connect_process(
    argv: Sequence[str],
    *,
    wire: str = "msgpack-rpc",
    handler: Service | object | None = None,
    timeout: float | None = 60.0,
) -> Any:
    """Start ``argv`` and talk RPC over its stdin/stdout (``await
    buzon.aio.rpc.connect_process(argv, wire=...)``), as
    :func:`buzon.rpc.connect_process`: ``wire`` ``"msgpack-rpc"`` (Neovim) or
    ``"jsonrpc"`` (a language server); ``handler`` answers the child's own requests;
    ``await session.aclose()`` closes its stdin and waits for it to exit."""
    if wire not in ("msgpack-rpc", "jsonrpc"):
        raise UnsupportedOperation(
            f"connect_process: wire={wire!r}; this version speaks msgpack-rpc and jsonrpc"
        )
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return open_stream_session(wire, _ProcessStream(proc), handler, timeout)
