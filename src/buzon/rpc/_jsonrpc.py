"""``wire="jsonrpc"``: JSON-RPC 2.0 over a byte stream with LSP's ``Content-Length`` framing.

One :class:`JsonRpcClient` is a session on one connection, in both roles at once: it
calls the peer (``call``, ``notify``, ``call_batch``) and answers the peer's requests,
notifications and batches through a :class:`~buzon.rpc.Service` (the same allowlist and
type checks as every wire). A reader thread routes responses to the waiting calls and
runs each request of the peer on a worker thread (a batch: one, answered
with one array once all its requests are done), so a handler may call back into the
peer while the reader goes on reading.

Params are positional (an array: ``call("subtract", 42, 23)``) or named (an object:
``call("subtract", minuend=42, subtrahend=23)``). The peer's error objects raise
:class:`~buzon.errors.RemoteError` with their ``code``, ``message`` and ``data``.

Cancellation is LSP's: when a call's deadline passes the caller raises
:class:`~buzon.errors.DeadlineExceeded` and sends the notification
``$/cancelRequest {"id": id}``; an incoming ``$/cancelRequest`` marks the handler's
``buzon.rpc.context().cancelled``. The framing and message rules are in
``_jsonrpc_codec.py`` (sans-IO).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from ..errors import (
    BuzonError,
    ChannelClosed,
    DeadlineExceeded,
    EndOfChannel,
    FrameError,
    RemoteError,
)
from . import _jsonrpc_codec as codec
from ._context import _CURRENT, _DEADLINE, CallContext
from ._msgpack import _ChannelStream, _Stream, _StreamSession, _Waiting
from ._publish import CALLS, ENDED, STARTED, Publication
from ._service import Service, as_service, handler_failure

__all__ = ["CANCEL_METHOD", "JsonRpcClient", "connect_jsonrpc"]

CANCEL_METHOD = "$/cancelRequest"
_monotonic = time.monotonic
_encoder = msgspec.json.Encoder()


class JsonRpcClient(_StreamSession):
    """A JSON-RPC 2.0 session (``wire="jsonrpc"``): call the peer, and answer it.

    ``s.call("initialize", processId=None, rootUri=None, capabilities={})`` (named
    params) or ``s.call("subtract", 42, 23)`` (positional) call and wait; so does
    ``s.subtract(42, 23)``. ``s.notify(method, ...)`` sends a notification and
    ``s.call_batch([(method, params), ...])`` one batch (results, or the
    ``RemoteError`` of each, in order). The peer's requests go to ``handler`` (a
    :class:`~buzon.rpc.Service` or an object with ``@expose`` methods): unknown
    methods get -32601, bad params -32602, malformed messages -32600 / -32700, and
    nothing outside the allowlist runs. Thread-safe. ``errors`` counts malformed
    messages and error answers sent.
    """

    def __init__(
        self,
        stream: _Stream,
        handler: Service | object | None,
        timeout: float | None,
        *,
        max_message: int = codec.MAX_MESSAGE,
        max_in_flight: int = 64,
        pub: Publication | None = None,
    ) -> None:
        self._init_answering(max_in_flight, pub)
        self._stream = stream
        self._service = None if handler is None else as_service(handler)
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[Any, _Waiting] = {}
        self._running: dict[Any, CallContext] = {}
        self._max_message = max_message
        self._wlock = threading.Lock()
        self._closed = False
        self._broken: BuzonError | None = None
        self._reader = threading.Thread(target=self._read_loop, name="buzon-jsonrpc")
        self._reader.daemon = True
        self._reader.start()

    # -- calling --------------------------------------------------------------------

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def stub(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, *args, **kwargs)

        stub.__name__ = name
        return stub

    def _send(self, message: Any) -> None:
        data = codec.encode_frame(_encoder.encode(message))
        with self._wlock:
            self._stream.write(data)

    def _deadline(self) -> float | None:
        at = _DEADLINE.get()
        if self._timeout is not None:
            mine = _monotonic() + self._timeout
            at = mine if at is None or mine < at else at
        return at

    @staticmethod
    def _params(method: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if args and kwargs:
            raise TypeError(f"{method}: JSON-RPC params are positional or named, not both")
        if kwargs:
            return dict(kwargs)
        return list(args) if args else None  # no params: the member is left out

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the peer and wait for its result.

        Positional arguments go as an array, keyword arguments as an object (not
        both). At the deadline (``timeout=``, or ``buzon.rpc.deadline``) this raises
        :class:`~buzon.errors.DeadlineExceeded` and sends ``$/cancelRequest``.
        """
        return self._call(method, self._params(method, args, kwargs))

    def _call(self, method: str, params: Any) -> Any:
        if self._broken is not None:
            raise self._broken
        at = self._deadline()
        msgid = next(self._ids)
        waiting = _Waiting(method)
        self._pending[msgid] = waiting
        try:
            message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": msgid}
            if params is not None:
                message["params"] = params
            self._send(message)
            if not waiting.event.wait(None if at is None else max(0.0, at - _monotonic())):
                self._cancel(msgid)
                raise DeadlineExceeded(f"{method}: no response by the deadline (cancel sent)")
        finally:
            self._pending.pop(msgid, None)
        if waiting.error is not None:
            raise waiting.error
        return waiting.result

    def _cancel(self, msgid: Any) -> None:
        try:
            self._send({"jsonrpc": "2.0", "method": CANCEL_METHOD, "params": {"id": msgid}})
        except (BuzonError, OSError):
            pass  # the peer is gone: nothing left to cancel

    def notify(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Send a notification (no ``id``; the peer never answers it)."""
        if self._broken is not None:
            raise self._broken
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        params = self._params(method, args, kwargs)
        if params is not None:
            message["params"] = params
        self._send(message)

    def call_batch(self, calls: Sequence[tuple[str, Any]], *, notify: bool = False) -> list[Any]:
        """Send ``calls`` (``(method, params)`` pairs; params a list, a dict or None)
        as one batch and wait for all their responses. Returns, in order, each result
        or the :class:`~buzon.errors.RemoteError` the peer answered it with.
        ``notify=True`` sends them all as notifications and returns ``[]``."""
        if self._broken is not None:
            raise self._broken
        if not calls:
            raise ValueError("call_batch: a JSON-RPC batch must not be empty")
        batch: list[dict[str, Any]] = []
        ids: list[int] = []
        for method, params in calls:
            message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
            if params is not None:
                if type(params) not in (list, dict):
                    raise TypeError(f"{method}: params must be a list, a dict or None")
                message["params"] = params
            if not notify:
                msgid = next(self._ids)
                message["id"] = msgid
                ids.append(msgid)
                self._pending[msgid] = _Waiting(method)
            batch.append(message)
        at = self._deadline()
        try:
            self._send(batch)
            out: list[Any] = []
            for msgid in ids:
                waiting = self._pending[msgid]
                if not waiting.event.wait(None if at is None else max(0.0, at - _monotonic())):
                    for left in ids:
                        if not self._pending[left].event.is_set():
                            self._cancel(left)
                    raise DeadlineExceeded(f"batch of {len(ids)}: not answered by the deadline")
                if isinstance(waiting.error, RemoteError):
                    out.append(waiting.error)
                elif waiting.error is not None:
                    raise waiting.error
                else:
                    out.append(waiting.result)
            return out
        finally:
            for msgid in ids:
                self._pending.pop(msgid, None)

    # -- the reader -----------------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = codec.FrameDecoder(self._max_message)
        why: BuzonError = EndOfChannel("the JSON-RPC peer closed the connection")
        try:
            while not self._closed:
                data = self._stream.read(0.25)
                if data is None:
                    continue
                if not data:
                    break
                for body in decoder.feed(data):
                    self._on_body(body)
        except (FrameError, BuzonError) as exc:  # malformed stream: close with the reason
            why = exc
        except OSError as exc:
            why = EndOfChannel(f"the JSON-RPC connection failed: {exc}")
        except Exception as exc:  # never a silent dead reader: the calls learn why
            why = EndOfChannel(f"the JSON-RPC session failed: {type(exc).__name__}: {exc}")
        if self._closed:
            why = ChannelClosed("the JSON-RPC session is closed")
        self._broken = why
        for waiting in list(self._pending.values()):
            waiting.error = type(why)(f"{waiting.method}: {why}; the call may or may not have run")
            waiting.event.set()
        for ctx in list(self._running.values()):
            ctx.cancel()
        self._end_workers()  # idle workers leave now (no request can come)

    def _on_body(self, body: bytes) -> None:
        for action, obj in route(body):
            if action == "send":
                self.errors += 1
                self._send_safe(obj)
            elif action == "ignored":
                self.errors += 1  # a malformed response: never answered (no ping-pong)
            elif action == "response":
                self._on_response(obj)
            elif action == "cancel":
                self._on_cancel(obj)
            elif self._admit():  # a batch, a request or a notification
                if action == "batch":
                    self._start(self._answer_batch, obj)
                else:
                    self._start(self._answer_one, action, obj)
            elif action != "notification":  # refused (a notification is dropped)
                msgid = obj.get("id") if action == "request" else None
                self._send_safe(codec.error_response(msgid, self._overloaded()))

    def _on_response(self, obj: dict[str, Any]) -> None:
        msgid = obj.get("id")
        waiting = self._pending.get(msgid) if type(msgid) is int else None
        if waiting is None:
            self.errors += 1  # an answer to nothing we asked (or a call given up on)
            return
        if "error" in obj:
            waiting.error = codec.peer_error(obj["error"])
        else:
            waiting.result = obj["result"]
        waiting.event.set()

    def _on_cancel(self, params: Any) -> None:
        msgid = params.get("id") if type(params) is dict else None
        ctx = self._running.get(msgid) if msgid is not None and type(msgid) is not dict else None
        if ctx is not None:
            ctx.cancel()

    def _answer_one(self, kind: str, obj: dict[str, Any]) -> None:
        reply = self._run(kind, obj)
        if reply is not None:
            self._send_safe(reply)

    def _answer_batch(self, items: list[tuple[str, Any]]) -> None:
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
                reply = self._run(kind, obj)
                if reply is not None:
                    replies.append(reply)
        if replies:  # a batch of notifications only: no response at all
            self._send_safe(replies)

    def _run(self, kind: str, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Run one request or notification; its response object (None: a notification)."""
        method: str = obj["method"]
        msgid = obj.get("id") if kind == "request" else None
        params = obj.get("params")
        ctx = CallContext(method, msgid, None, None)
        if kind == "request":
            self._running[msgid] = ctx
        token = _CURRENT.set(ctx)
        try:
            if self._service is None:
                raise RemoteError(
                    f"no method {method!r}: this end serves nothing", RemoteError.METHOD_NOT_FOUND
                )
            entry = self._service.lookup(method)
            self._pub.counters[STARTED] += 1
            try:
                if type(params) is dict:
                    result = entry.run([], params)
                else:
                    result = entry.run(params or [], None)
            finally:
                self._pub.counters[ENDED] += 1
        except RemoteError as err:
            self.errors += 1
            return None if kind != "request" else codec.error_response(msgid, err)
        except Exception as exc:
            self.errors += 1
            failed = handler_failure(method, exc)
            return None if kind != "request" else codec.error_response(msgid, failed)
        finally:
            _CURRENT.reset(token)
            if kind == "request":
                self._running.pop(msgid, None)
        if kind != "request":
            return None
        reply = result_response(msgid, method, result)
        if "error" in reply:
            self.errors += 1
        return reply

    def _send_safe(self, message: Any) -> None:
        """Send a response (or a batch of them: each counts as a call served)."""
        try:
            self._send(message)
        except (BuzonError, OSError):
            return  # the peer is gone; the reader reports it
        self._pub.counters[CALLS] += len(message) if type(message) is list else 1

    # -- lifetime -------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<buzon.rpc.JsonRpcClient in_flight={len(self._pending)}>"


_NO_ID = object()


def route(body: bytes) -> list[tuple[str, Any]]:
    """What to do with one framed body, sans-IO (both sessions, blocking and asyncio):
    a list of ``(action, obj)``: ``("send", response)`` an error answer (counted),
    ``("ignored", obj)`` a malformed response (counted, never answered),
    ``("response", obj)``, ``("cancel", params)`` of ``$/cancelRequest``,
    ``("batch", [(kind, obj), ...])`` to run, or ``("request" | "notification", obj)``."""
    try:
        value = codec.parse(body)
    except RemoteError as err:
        return [("send", codec.error_response(None, err))]
    if type(value) is list:
        if not value:
            return [("send", codec.error_response(None, _invalid()))]
        items = [codec.classify(v) for v in value]
        if all(kind in ("response", "ignored") for kind, _ in items):
            return items
        return [("batch", items)]
    kind, obj = codec.classify(value)
    if kind == "invalid":
        return [("send", codec.error_response(obj, _invalid()))]
    if kind == "notification" and obj["method"] == CANCEL_METHOD:
        return [("cancel", obj.get("params"))]
    return [(kind, obj)]


def result_response(msgid: Any, method: str, result: Any) -> dict[str, Any]:
    """The response carrying ``result`` for ``msgid``, encoded here once: a result
    JSON cannot carry becomes an INVALID_RESULT error response."""
    try:
        raw = msgspec.Raw(_encoder.encode(result))
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        unencodable = RemoteError(
            f"{method}: cannot encode its result: {exc}", RemoteError.INVALID_RESULT
        )
        return codec.error_response(msgid, unencodable)
    return {"jsonrpc": "2.0", "result": raw, "id": msgid}


def _invalid() -> RemoteError:
    return RemoteError("Invalid Request", RemoteError.INVALID_REQUEST)


def connect_jsonrpc(
    url: Any, handler: Service | object | None, timeout: float | None, **options: Any
) -> JsonRpcClient:
    """A JSON-RPC session over a raw stream channel to ``url``."""
    from ..sync import connect

    ch = connect(url, timeout, raw=True, **options)
    return JsonRpcClient(_ChannelStream(ch), handler, timeout)
