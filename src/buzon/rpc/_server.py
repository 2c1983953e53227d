"""The RPC server: a :class:`buzon.Server` whose per-client handler runs calls.

Per connection, calls run concurrently on a small pool of threads that take turns
reading ("leader/followers"): the thread that reads a request hands the reading role
to an idle thread and runs the handler itself, so a reply never waits for a thread
switch and a slow call does not hold up the ones behind it. Replies go out as their
calls finish, in any order, each naming its call id. The pool grows to at most
``max_in_flight`` threads per connection; when all of them are busy, nobody reads, so
the client's further calls wait in the socket (backpressure, not an unbounded queue).
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import (
    ChannelClosed,
    CodecError,
    EndOfChannel,
    MessageTooLarge,
    RemoteError,
    UnsupportedOperation,
)
from ..errors import Timeout as _Timeout
from ..sync import Channel
from ..sync import Server as ChannelServer
from . import _wire as w
from ._context import _CURRENT, _DEADLINE, CallContext
from ._service import Method, Service, as_service

__all__ = ["CompletionTable", "Server", "serve"]

WIRES = ("buzon",)
SEMANTICS = ("at_most_once", "at_least_once", "exactly_once")


def _log() -> Any:
    import logging

    return logging.getLogger("buzon.rpc")


def _check(wire: str, semantics: str, name: str | None) -> None:
    if wire not in WIRES:
        raise UnsupportedOperation(f"wire={wire!r}: this version speaks {', '.join(WIRES)}")
    if semantics not in SEMANTICS:
        raise UnsupportedOperation(
            f"semantics={semantics!r}: this version offers {', '.join(SEMANTICS)}"
        )
    if name is not None:
        raise UnsupportedOperation("serve(name=...): binding by name is not available yet")


def _once_key(value: Any) -> tuple[bytes, int, int]:
    """An exactly-once request's ``[client id, sequence number, acknowledged]``."""
    if (
        type(value) is list
        and len(value) == 3
        and type(value[0]) is bytes
        and 0 < len(value[0]) <= 64
        and type(value[1]) is int
        and type(value[2]) is int
        and 0 <= value[2] <= value[1]
    ):
        return value[0], value[1], value[2]
    raise RemoteError("a malformed exactly-once key", RemoteError.INVALID_REQUEST)


class _Entry:
    __slots__ = ("digest", "done", "reply", "since")

    def __init__(self, digest: bytes) -> None:
        self.digest = digest
        self.done = False
        self.reply: list[Any] | None = None
        self.since = time.monotonic()


class CompletionTable:
    """The exactly-once memory of a server: ``(client id, sequence number)`` ->
    in progress, or completed with its reply.

    A request whose key is new runs and its reply is recorded; a retry of a completed
    key gets the recorded reply without running anything again; a retry of a key still
    in progress waits for it; the same key with other arguments is refused
    (``INVALID_REQUEST``). Entries are collected when the client acknowledges them
    (each request says below which sequence number the client has every reply) or when
    ``lease`` seconds pass without that.
    """

    def __init__(self, lease: float = 600.0) -> None:
        self.lease = lease
        self._clients: dict[bytes, dict[int, _Entry]] = {}
        self._cv = threading.Condition(threading.Lock())
        self._last_sweep = 0.0
        self.replayed = 0  # replies sent from the table, without running the call

    def __len__(self) -> int:
        with self._cv:
            return sum(len(c) for c in self._clients.values())

    def run(
        self,
        key: tuple[bytes, int, int],
        body: list[Any],
        call: Callable[[], list[Any]],
        at: float | None = None,
    ) -> list[Any]:
        """Run ``call`` once for ``key``; a retry gets the recorded reply (waiting for
        the first attempt until the deadline ``at``, a ``time.monotonic()`` value)."""
        client, seq, acked = key
        digest = hashlib.blake2b(msgspec.msgpack.encode(body[1:4]), digest_size=16).digest()
        with self._cv:
            entries = self._clients.setdefault(client, {})
            for old in [s for s in entries if s < acked]:
                del entries[old]  # the client has these replies: forget them
            entry = entries.get(seq)
            if entry is None:
                entry = entries[seq] = _Entry(digest)
                self._collect_expired()
            else:
                if entry.digest != digest:
                    raise RemoteError(
                        f"exactly-once call {seq} of this client was made with other "
                        "arguments: refused",
                        RemoteError.INVALID_REQUEST,
                    )
                while not entry.done:  # a retry while the first attempt still runs
                    left = None if at is None else at - time.monotonic()
                    if left is not None and left <= 0:
                        raise RemoteError(
                            f"exactly-once call {seq}: its first attempt still runs",
                            RemoteError.DEADLINE_EXCEEDED,
                        )
                    self._cv.wait(left)
                self.replayed += 1
                assert entry.reply is not None
                return entry.reply
        try:
            reply: list[Any] = call()
        except RemoteError as err:
            reply = w.error_body(err)
        with self._cv:
            entry.reply = reply
            entry.done = True
            self._cv.notify_all()
        return reply

    def _collect_expired(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for client, entries in list(self._clients.items()):
            for seq in [s for s, e in entries.items() if e.done and now - e.since > self.lease]:
                del entries[seq]
            if not entries:
                del self._clients[client]


class _Connection:
    """One client connection: reads requests, runs them, writes replies."""

    def __init__(self, server: Server, ch: Channel) -> None:
        self.server = server
        self.ch = ch
        self.service = server.service
        self.peer = ch.peer
        self.read_lock = threading.Lock()
        self.state = threading.Condition(threading.Lock())
        self.waiting = 0  # threads waiting for the reading role
        self.threads = 0  # threads started for this connection (the handler's not counted)
        self.running: dict[int, CallContext] = {}  # calls in flight, by call id
        self.done = False

    def run(self) -> None:
        """The connection's handler thread: serve until the client leaves, then wait
        for the connection's other threads."""
        try:
            while (request := self._next()) is not None:
                self._handle(*request)
        finally:
            self._end()
            with self.state:
                while self.threads > 0:
                    self.state.wait()

    def _work_thread(self) -> None:
        try:
            while (request := self._next()) is not None:
                self._handle(*request)
        finally:
            with self.state:
                self.threads -= 1
                self.state.notify_all()

    def _next(self) -> tuple[Any, dict[int, bytes] | None] | None:
        """Take the reading role and read until a request or notify arrives (cancels are
        applied on the way); None when the connection is over."""
        with self.state:
            self.waiting += 1
        with self.read_lock:
            with self.state:
                self.waiting -= 1
            while not self.done:
                try:
                    body, fields = self.ch._recv_fields(None)
                except _Timeout:
                    continue  # an idle_timeout on the channel: keep serving
                except (EndOfChannel, ChannelClosed):
                    self._end()
                    return None
                except CodecError:
                    self.server.errors += 1  # undecodable: refused, the connection goes on
                    continue
                if type(body) is list and body and body[0] == w.CANCEL:
                    self._cancel(fields)
                    continue
                with self.state:
                    spawn = self.waiting == 0 and self.threads + 1 < self.server.max_in_flight
                    if spawn:
                        self.threads += 1
                if spawn:  # nobody would read while this call runs: one more reader
                    threading.Thread(
                        target=self._work_thread, name="buzon-rpc-call", daemon=True
                    ).start()
                return body, fields
        return None

    def _end(self) -> None:
        self.done = True
        for ctx in list(self.running.values()):
            ctx.cancel()  # the caller is gone: its calls are cancelled

    def _cancel(self, fields: dict[int, bytes] | None) -> None:
        call_id = w.read_id(fields, w.CORRELATION)
        ctx = self.running.get(call_id) if call_id is not None else None
        if ctx is not None:
            ctx.cancel()

    def _handle(self, body: Any, fields: dict[int, bytes] | None) -> None:
        server = self.server
        call_id = w.read_id(fields, w.MESSAGE_ID)
        try:
            if (
                type(body) is not list
                or len(body) not in (3, 4, 5)
                or body[0]
                not in (
                    w.REQUEST,
                    w.NOTIFY,
                )
            ):
                raise RemoteError("not an RPC request", RemoteError.INVALID_REQUEST)
            kind, name, args = body[0], body[1], body[2]
            kwargs = body[3] if len(body) >= 4 else None
            key = _once_key(body[4]) if len(body) == 5 and kind == w.REQUEST else None
            if kind == w.REQUEST and call_id is None:
                raise RemoteError("a request without a call id", RemoteError.INVALID_REQUEST)
            if kind == w.NOTIFY:
                call_id = None
            method = self.service.lookup(name)  # the allowlist: nothing runs before it
            if type(args) is not list or (kwargs is not None and type(kwargs) is not dict):
                raise RemoteError(
                    f"{name}: arguments are a list (and keywords a map)", RemoteError.INVALID_PARAMS
                )
            budget = w.read_ms(fields)
            at = None if budget is None else time.monotonic() + budget
            if key is None:
                reply = self._run(method, args, kwargs, call_id, at)
            else:
                reply = server.table.run(
                    key, body, lambda: self._run(method, args, kwargs, call_id, at), at
                )
        except RemoteError as err:
            server.errors += 1
            reply = w.error_body(err)
        if call_id is not None:
            self._reply(call_id, reply)

    def _run(
        self,
        method: Method,
        args: list[Any],
        kwargs: dict[str, Any] | None,
        call_id: int | None,
        at: float | None,
    ) -> list[Any]:
        ctx = CallContext(method.name, call_id, at, self.peer)
        if at is not None and time.monotonic() >= at:
            raise RemoteError(
                f"{method.name}: the deadline passed before the call started",
                RemoteError.DEADLINE_EXCEEDED,
            )
        key = call_id if call_id is not None else -id(ctx)  # notifies count as in flight
        running = self.running
        running[key] = ctx  # one dict operation: atomic, no lock needed
        # this thread's context: the handler (and the calls it makes) see ctx and its
        # deadline; reset after, so nothing leaks into the next call of this thread
        current = _CURRENT.set(ctx)
        budget = _DEADLINE.set(at)
        try:
            return [w.REPLY, None, method.run(args, kwargs)]
        except RemoteError:
            raise
        except Exception as exc:  # the handler's own failure: reported, never its traceback
            raise RemoteError(
                f"{method.name} raised {type(exc).__name__}: {exc}",
                RemoteError.SERVER_ERROR,
                {"type": type(exc).__name__},
            ) from None
        finally:
            _DEADLINE.reset(budget)
            _CURRENT.reset(current)
            del running[key]

    def _reply(self, call_id: int, reply: list[Any]) -> None:
        server = self.server
        try:
            w.send(self.ch, reply, w.CORRELATION, call_id, None, server.reply_timeout)
            server.calls += 1  # under the GIL; a lost increment only blurs a statistic
            return
        except (CodecError, TypeError, ValueError, OverflowError, MessageTooLarge) as exc:
            # the result cannot go on the wire: say so instead of dropping the connection
            err = RemoteError(f"the result cannot be encoded: {exc}", RemoteError.INVALID_RESULT)
        except (EndOfChannel, ChannelClosed, _Timeout):
            return  # the client is gone, or not reading: the read side sees the end
        server.errors += 1
        try:
            w.send(self.ch, w.error_body(err), w.CORRELATION, call_id, None, server.reply_timeout)
        except Exception:  # pragma: no cover - the client is gone meanwhile
            pass


class Server:
    """An RPC server object (``buzon.rpc.Server``), like :class:`buzon.Server`::

        srv = buzon.rpc.Server("unix:calc", svc)
        threading.Thread(target=srv.serve_forever).start()
        ...
        srv.shutdown()

    ``service`` is a :class:`Service` or an object whose methods carry
    ``@buzon.rpc.expose``. ``mode``: ``"thread"`` (a thread per client, calls of one
    client concurrent on up to ``max_in_flight`` threads) or ``"process"`` (a forked
    process per client). ``wire``: ``"buzon"``. ``semantics`` is the client's choice
    (see :func:`connect`); whatever it says here, the server keeps its
    :class:`CompletionTable` (``table``) for the calls that ask for exactly-once.
    ``options`` go to :func:`buzon.listen` (``max_clients``, ``grace`` to the server).

    Counters: ``calls`` (replies sent), ``errors`` (error replies and refused
    messages), ``in_flight`` (calls running now). With ``mode="process"`` they count
    only what this process did (each client is served in a child).
    """

    def __init__(
        self,
        url: str,
        service: Service | object,
        *,
        mode: str = "thread",
        wire: str = "buzon",
        semantics: str = "at_most_once",
        name: str | None = None,
        max_in_flight: int = 64,
        reply_timeout: float | None = 30.0,
        **options: Any,
    ) -> None:
        if mode == "async":
            raise UnsupportedOperation(
                "mode='async': use buzon.aio.rpc.Server (or buzon.rpc.serve(..., mode='async'))"
            )
        _check(wire, semantics, name)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.service = as_service(service)
        self.wire = wire
        self.semantics = semantics
        self.max_in_flight = max_in_flight
        self.reply_timeout = reply_timeout
        self.calls = 0
        self.errors = 0
        self._connections: set[_Connection] = set()
        self.table = CompletionTable()
        self._server = ChannelServer(url, self._serve_client, mode=mode, **options)

    @property
    def in_flight(self) -> int:
        """Calls (and notifies) running now, over all connections of this process."""
        return sum(len(c.running) for c in list(self._connections))

    @property
    def address(self) -> Any:
        """The bound address (a TCP port 0 is resolved)."""
        return self._server.address

    def _serve_client(self, ch: Channel) -> None:
        conn = _Connection(self, ch)
        self._connections.add(conn)
        try:
            conn.run()
        finally:
            self._connections.discard(conn)

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`."""
        self._server.serve_forever()

    def shutdown(self) -> None:
        """Stop serving (safe from any thread or a signal handler)."""
        self._server.shutdown()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<buzon.rpc.Server {self.service.name} at {self.address}>"


def serve(
    url: str,
    service: Service | object,
    *,
    mode: str = "thread",
    wire: str = "buzon",
    semantics: str = "at_most_once",
    name: str | None = None,
    **options: Any,
) -> None:
    """Serve ``service`` at ``url`` until SIGINT/SIGTERM (``buzon.rpc.serve``).

    The arguments are :class:`Server`'s; for control from code use that class.
    ``mode="async"`` serves with :class:`buzon.aio.rpc.Server` on a fresh event loop
    (coroutine handlers are awaited, each call in a task of its own).
    """
    if mode == "async":
        import asyncio

        from ..aio import rpc as aio_rpc

        asyncio.run(
            aio_rpc.serve(url, service, wire=wire, semantics=semantics, name=name, **options)
        )
        return
    server = Server(url, service, mode=mode, wire=wire, semantics=semantics, name=name, **options)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: server.shutdown())
    try:
        server.serve_forever()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
