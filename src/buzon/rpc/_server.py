"""The RPC server: a :class:`buzon.Server` whose per-client handler runs calls.

Per connection, one thread at a time reads; the reader runs the call it read itself,
so a quick call costs no thread switch. When a call runs longer than a couple of
milliseconds, a monitor thread gives the connection's reading role to another thread
of that connection (an idle one, or a new one), so the calls behind a slow one are read
and run meanwhile. Replies go out as calls finish, in any order, each naming its call
id. A connection has at most ``max_in_flight`` threads; when all of them are busy,
nobody reads, so the client's further calls wait in the socket (backpressure, not an
unbounded queue).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from typing import Any

from ..errors import (
    ChannelClosed,
    CodecError,
    DeadlineExceeded,
    EndOfChannel,
    MessageTooLarge,
    RemoteError,
    UnsupportedOperation,
)
from ..errors import Timeout as _Timeout
from ..protocol._rpc import parse as _PARSE
from ..protocol._rpc import reply as _reply_frame
from ..sync import Channel
from ..sync import Server as ChannelServer
from . import _wire as w
from ._completion import CompletionTable, MemoryTable, is_transactional, open_table
from ._context import _CURRENT, _DEADLINE, CallContext
from ._publish import CALLS, ENDED, ERRORS, STARTED, Counter, Publication, publish_server
from ._remote import _PLAIN, RELEASE, RefPeer
from ._service import Method, Service, as_service

__all__ = ["CompletionTable", "Server", "serve"]  # CompletionTable: see _completion

_monotonic = time.monotonic
WIRES = ("buzon", "jsonrpc", "msgpack-rpc")
SEMANTICS = ("at_most_once", "at_least_once", "exactly_once")


def _log() -> Any:
    import logging

    return logging.getLogger("buzon.rpc")


def _check(wire: str, semantics: str) -> None:
    if wire not in WIRES:
        raise UnsupportedOperation(f"wire={wire!r}: this version speaks {', '.join(WIRES)}")
    if semantics not in SEMANTICS:
        raise UnsupportedOperation(
            f"semantics={semantics!r}: this version offers {', '.join(SEMANTICS)}"
        )


def check_served_wire(wire: str, semantics: str) -> None:
    """What a server (blocking or asyncio) refuses: an unknown wire or semantics, and
    retrying semantics on a stream wire (its messages carry no retry ids)."""
    _check(wire, semantics)
    if wire != "buzon" and semantics != "at_most_once":
        raise UnsupportedOperation(
            f"wire={wire!r} is at-most-once: its messages carry no retry ids"
        )


class ServedIdentity:
    """What the blocking and asyncio RPC servers share about themselves: the checked
    wire and semantics, the bound name, a fresh instance id per start, the completion
    table, the published counters (``calls``, ``errors``), the handshake's HELLO entry
    and the name's metadata (written once here, for both)."""

    calls = Counter(CALLS)
    errors = Counter(ERRORS)

    def _init_identity(
        self,
        url: Any,
        service: Service | object,
        wire: str,
        semantics: str,
        name: str | None,
        table: Any,
        max_in_flight: int,
        reply_timeout: float | None,
    ) -> Any:
        """Check and keep the server's settings; returns the address to bind."""
        check_served_wire(wire, semantics)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        from ..names import listen_address

        addr, name = listen_address(url, name)
        self.service = as_service(service)
        self.name = name
        self.instance = os.urandom(16).hex()  # this start's id (restart detection)
        self.wire = wire
        self.semantics = semantics
        self.max_in_flight = max_in_flight
        self.reply_timeout = reply_timeout
        self._pub = Publication()  # calls and errors live in it (buzon ls reads them)
        self.table, self._own_table = open_table(table)
        return addr

    def _hello(self) -> dict[str, Any]:
        """The HELLO entry of every connection: which start of the server this is and
        whether its completion table outlives it (a client at a fixed address tells a
        restarted server apart: buzon.errors.ServerRestarted)."""
        return {"rpc": {"instance": self.instance, "durable": self.table.durable}}

    def _metadata(self) -> dict[str, Any]:
        """What the server's name registration says of it."""
        return {
            "service": self.service.name,
            "wire": self.wire,
            "semantics": self.semantics,
            "instance": self.instance,
        }


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


class _Monitor:
    """Hands a connection's reading role on when its reader is busy in a slow call.

    A connection's reader runs each call itself, inline: no thread switch for a call
    that is quick, which most are. While a call runs, this thread (one per server
    process) looks every ``PROMOTE`` seconds; a call running longer than that has its
    connection's reading role given to another thread of the connection (an idle one,
    or a new one up to ``max_in_flight``), so the calls behind it are read and run
    meanwhile. It sleeps when no call has run for ``IDLE`` seconds; the first call
    after that wakes it (one ``Event.set``), the next ones cost nothing.
    """

    PROMOTE = 0.002
    IDLE = 0.05

    def __init__(self, server: Server) -> None:
        self.server = server
        self.wake = threading.Event()
        self.awake = False  # wake is set (read by the readers without a call)
        self.stopped = False
        self.pid = os.getpid()
        threading.Thread(target=self._run, name="buzon-rpc-monitor", daemon=True).start()

    def busy(self) -> None:
        """A call started (its ``inline_since`` set first): make sure the monitor looks."""
        if not self.awake:
            self.awake = True
            self.wake.set()

    def stop(self) -> None:
        self.stopped = True
        self.awake = True
        self.wake.set()

    def _run(self) -> None:
        last = time.monotonic()
        connections = self.server._connections
        while not self.stopped:
            self.wake.wait()
            time.sleep(self.PROMOTE)
            now = time.monotonic()
            for conn in list(connections):
                since = conn.inline_since
                if since is not None:
                    last = now
                    if now - since >= self.PROMOTE:
                        conn.promote()
            if now - last > self.IDLE:
                self.wake.clear()
                self.awake = False
                if any(c.inline_since is not None for c in list(connections)):
                    self.awake = True  # a call started as we were about to sleep
                    self.wake.set()


class _Callback:
    """A call this server makes on a client's remote object, waiting for its reply."""

    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.result: Any = None


class _Connection(RefPeer):
    """One client connection: reads requests, runs them, writes replies.

    It is also one end of the connection's remote objects (:class:`RefPeer`): the
    server's objects the client holds references to, and proxies of the client's
    objects, whose calls (callbacks) go out on this connection; their replies are read
    by whichever thread has the reading role.

    Exactly one thread of the connection reads at a time (``reader``); it runs the
    call it read itself, and reads on afterwards unless :class:`_Monitor` gave the
    role to another thread meanwhile (then it waits to be given it back, or for the
    end). Threads are started only when a slow call needs one: at most
    ``max_in_flight`` calls of a connection run at once, and then nobody reads.
    """

    def __init__(self, server: Server, ch: Channel, monitor: _Monitor) -> None:
        self.server = server
        self.ch = ch
        self.service = server.service
        self.peer = ch.peer
        self.monitor = monitor
        self.cv = threading.Condition(threading.Lock())
        self.reader: threading.Thread | None = None  # who has the reading role
        self.idle = 0  # threads waiting for the role
        self.threads = 0  # threads started for this connection (the handler's not counted)
        self.inline_since: float | None = None  # the reader's call started then
        self.running: dict[int, CallContext] = {}  # calls in flight, by call id
        core = ch._core
        self.msgpack = core.codec.name == "msgpack"  # replies may be framed in C
        table = server.table  # exactly-once requests taken apart in C: its lean path
        self.memory = table if type(table) is MemoryTable else None
        self.max_frame = core.max_frame
        self.done = False
        self._ref_init()
        self._out_ids = itertools.count(1)
        self._callbacks: dict[int, _Callback] = {}  # calls to the client's objects

    def run(self) -> None:
        """The connection's handler thread: serve until the client leaves, then wait
        for the connection's other threads."""
        try:
            self._serve()
        finally:
            self._end()
            with self.cv:
                self.cv.notify_all()
                while self.threads > 0:
                    self.cv.wait()

    def _work_thread(self) -> None:
        try:
            self._serve()
        finally:
            with self.cv:
                self.threads -= 1
                self.cv.notify_all()

    def _serve(self) -> None:
        me = threading.current_thread()
        cv = self.cv
        monitor = self.monitor
        while True:
            if self.reader is not me:
                with cv:
                    while self.reader is not None and self.reader is not me and not self.done:
                        self.idle += 1
                        try:
                            cv.wait()
                        finally:
                            self.idle -= 1
                    if self.done:
                        return
                    self.reader = me
            request = self._next()
            if request is None:
                return
            self.inline_since = started = _monotonic()
            if not monitor.awake:
                monitor.busy()
            try:
                kind = request[0]
                if kind == w.REQUEST:
                    self._call(*request)
                elif kind == w.ONCE:
                    self._call_once(*request)
                else:
                    self._handle(request[3], request[4])
            finally:
                if self.inline_since is started:  # not the next reader's call's
                    self.inline_since = None

    def promote(self, me: threading.Thread | None = None) -> None:
        """The reader has been in one call too long: let another thread read.
        ``me``: the calling thread is the reader and must hand the role on now (it
        waits for a reply that another thread must read: a call back to the client)."""
        with self.cv:
            if me is not None:
                if self.reader is not me or self.done:
                    return
            elif self.inline_since is None or self.done or self.reader is None:
                return
            if self.idle:
                self.reader = None
                self.cv.notify()
            elif self.threads + 1 < self.server.max_in_flight:
                self.reader = None
                self.threads += 1
                threading.Thread(
                    target=self._work_thread, name="buzon-rpc-call", daemon=True
                ).start()
            self.inline_since = None  # once per call

    def _next(self) -> tuple[int, int, int, Any, Any] | None:
        """Read until a request or notify arrives (cancels are applied on the way), as
        :func:`~buzon.rpc._wire.recv` gives it: the common request taken apart, or
        ``(OTHER, 0, -1, body, fields)``; None when the connection is over."""
        ch = self.ch
        while not self.done:
            try:  # w.recv, inline (once per request)
                item = ch._recv_parsed(_PARSE, None)
                if type(item) is tuple and item[0] == -1:  # taken apart in C
                    got: tuple[int, int, int, Any, Any] = item[1]
                else:
                    got = w.from_item(ch, item)
            except _Timeout:
                continue  # an idle_timeout on the channel: keep serving
            except (EndOfChannel, ChannelClosed):
                self._end()
                return None
            except CodecError:
                self.server.errors += 1  # undecodable: refused, the connection goes on
                continue
            if got[0] == w.REQUEST or got[0] == w.ONCE:
                return got
            body, fields = w.as_message(*got)
            if type(body) is list and body and body[0] != w.REQUEST:
                kind = body[0]
                if kind == w.CANCEL:
                    self._cancel(fields)
                    continue
                if kind == w.REPLY:
                    self._callback_reply(body, fields)
                    continue
                if kind == RELEASE and len(body) == 2:
                    self._exports.release(body[1])
                    continue
            return w.OTHER, 0, -1, body, fields
        return None

    def _end(self) -> None:
        self.done = True
        self._ref_close()  # the client's references are dropped with its connection
        for cb in list(self._callbacks.values()):
            cb.error = EndOfChannel("the client left with a call to its object in flight")
            cb.event.set()
        for ctx in list(self.running.values()):
            ctx.cancel()  # the caller is gone: its calls are cancelled
        with self.cv:
            self.cv.notify_all()  # threads waiting for the reading role: it is over

    def _cancel(self, fields: dict[int, bytes] | None) -> None:
        call_id = w.read_id(fields, w.CORRELATION)
        ctx = self.running.get(call_id) if call_id is not None else None
        if ctx is not None:
            ctx.cancel()

    def _call(self, kind: int, call_id: int, ms: int, name: str, args: list[Any]) -> None:
        """The common request, taken apart in C (``[0, name, [plain...]]`` with its
        call id and deadline): what :meth:`_handle` does for it, without its checks
        of the shape; anything not a plain method of the service goes to it."""
        method = self.service.methods.get(name)
        if method is None:  # the allowlist's refusal, with its error
            self._handle(*w.as_message(kind, call_id, ms, name, args))
            return
        at = None if ms < 0 else _monotonic() + ms / 1000.0
        try:
            reply = self._run(method, args, None, call_id, at)
        except RemoteError as err:
            self.server.errors += 1
            reply = w.error_body(err)
        self._reply(call_id, reply)

    def _call_once(self, kind: int, call_id: int, ms: int, name: str, once: Any) -> None:
        """An exactly-once request taken apart in C (``once``: ``(args, client, seq,
        acked, enc)``, every part checked there): with the in-memory table, what
        :meth:`_handle` does for it without taking it apart again; another table, or a
        name that is not a plain method of the service, goes to :meth:`_handle`."""
        method = self.service.methods.get(name)
        table = self.memory
        if method is None or table is None:
            self._handle(*w.as_message(kind, call_id, ms, name, once))
            return
        args, client, seq, acked, enc = once
        at = None if ms < 0 else time.monotonic() + ms / 1000.0
        try:
            reply = table.run_plain(
                client, seq, acked, enc, at, self._run, method, args, None, call_id, at
            )
        except RemoteError as err:
            self.server.errors += 1
            reply = w.error_body(err)
        self._reply(call_id, reply)

    def _handle(self, body: Any, fields: dict[int, bytes] | None) -> None:
        server = self.server
        value = None if fields is None else fields.get(w.MESSAGE_ID)  # w.read_id, inline
        call_id = w.unpack_id(value)[0] if value and len(value) == 8 else None
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
            # the allowlist: nothing runs before it ([id, name]: a remote object's method)
            method = self.service.methods.get(name) if type(name) is str else None
            if method is None:  # not a plain method name: look it up for the error
                lookup = self._exports.method if type(name) is list else self.service.lookup
                method = lookup(name)
            if type(args) is not list or (kwargs is not None and type(kwargs) is not dict):
                raise RemoteError(
                    f"{name}: arguments are a list (and keywords a map)", RemoteError.INVALID_PARAMS
                )
            for a in args:  # inline: plain arguments (the common case) cost no call
                if type(a) not in _PLAIN:
                    args = self._in(args)  # references -> proxies, or our own objects
                    break
            if kwargs:
                kwargs = self._in(kwargs)
            budget = None if fields is None else fields.get(w.DEADLINE)  # w.read_ms, inline
            at = (
                time.monotonic() + w.unpack_ms(budget)[0] / 1000.0
                if budget and len(budget) == 4
                else None
            )
            if key is None:
                reply = self._run(method, args, kwargs, call_id, at)
            else:
                reply = server.table.run(
                    key,
                    body,
                    lambda: self._run(method, args, kwargs, call_id, at),
                    at,
                    is_transactional(method.fn),
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
        if at is not None and _monotonic() >= at:
            raise RemoteError(
                f"{method.name}: the deadline passed before the call started",
                RemoteError.DEADLINE_EXCEEDED,
            )
        key = call_id if call_id is not None else -id(ctx)  # notifies count as in flight
        running = self.running
        running[key] = ctx  # one dict operation: atomic, no lock needed
        pub = self.server._pub
        pub.counters[STARTED] += 1  # published for buzon ls (rpc/_publish.py)
        # this thread's context: the handler (and the calls it makes) see ctx and its
        # deadline; reset after, so nothing leaks into the next call of this thread
        current = _CURRENT.set(ctx)
        budget = _DEADLINE.set(at)
        try:
            result = method.run(args, kwargs)
            if type(result) not in _PLAIN:
                result = self._out(result)  # remote objects -> references
            return [w.REPLY, None, result]
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
            pub.counters[ENDED] += 1

    # -- remote objects: calls to the client's objects ------------------------------

    def _call_ref(self, rid: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call method ``name`` of the client's object ``rid`` and wait for the result
        (within the handler's deadline, else the server's ``reply_timeout``)."""
        if self.done:
            raise EndOfChannel("the client has left: its objects cannot be called")
        at = _DEADLINE.get()
        if at is None and self.server.reply_timeout is not None:
            at = time.monotonic() + self.server.reply_timeout
        body: list[Any] = [w.REQUEST, [rid, name], self._out(args)]
        if kwargs:
            body.append(self._out(kwargs))
        call_id = next(self._out_ids)
        cb = self._callbacks[call_id] = _Callback()
        try:
            left = None if at is None else max(0.0, at - time.monotonic())
            w.send(self.ch, body, w.MESSAGE_ID, call_id, left, left)
            self.promote(threading.current_thread())  # another thread must read the reply
            if not cb.event.wait(None if at is None else max(0.0, at - time.monotonic())):
                raise DeadlineExceeded(f"{name}: the client's object did not answer in time")
        finally:
            self._callbacks.pop(call_id, None)
        if cb.error is not None:
            raise cb.error
        return cb.result

    def _callback_reply(self, body: list[Any], fields: dict[int, bytes] | None) -> None:
        call_id = w.read_id(fields, w.CORRELATION)
        cb = self._callbacks.get(call_id) if call_id is not None else None
        if cb is None:
            return  # late (its caller gave up) or junk
        try:
            if len(body) != 3:
                cb.error = RemoteError("malformed reply", RemoteError.INTERNAL_ERROR)
            elif body[1] is not None:
                cb.error = w.error_from(body[1])
            else:
                cb.result = self._in(body[2])
        except RemoteError as err:
            cb.error = err
        cb.event.set()

    def _send_release(self, pairs: list[list[int]]) -> None:
        self.ch.send([RELEASE, pairs], self.server.reply_timeout)

    def _reply(self, call_id: int, reply: list[Any]) -> None:
        server = self.server
        try:
            # a plain result (the common case): its whole frame made in C
            frame = _reply_frame(call_id, reply[2]) if self.msgpack and reply[1] is None else None
            if frame is not None and len(frame) <= self.max_frame:
                w.send_frame(self.ch, frame, server.reply_timeout)
            else:
                w.send(self.ch, reply, w.CORRELATION, call_id, None, server.reply_timeout)
            # server.calls += 1, without the descriptor: under the GIL; a lost
            # increment only blurs a statistic
            server._pub.counters[CALLS] += 1
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


class Server(ServedIdentity):
    """An RPC server object (``buzon.rpc.Server``), like :class:`buzon.Server`::

        srv = buzon.rpc.Server("unix:calc", svc)
        threading.Thread(target=srv.serve_forever).start()
        ...
        srv.shutdown()

    ``service`` is a :class:`Service` or an object whose methods carry
    ``@buzon.rpc.expose``. ``mode``: ``"thread"`` (a thread per client; a client's
    calls run inline, and concurrently on up to ``max_in_flight`` threads when some
    are slow) or ``"process"`` (a forked process per client). ``wire``: ``"buzon"``,
    ``"jsonrpc"`` (JSON-RPC 2.0 with ``Content-Length`` framing on a raw stream) or
    ``"msgpack-rpc"`` (the msgpack-rpc spec, as Neovim speaks it): on these two a
    session per connection answers requests (at-most-once; at most ``max_in_flight``
    at once, more are refused with OVERLOADED; a malformed stream ends only its own
    connection) and adds to the counters below.
    ``semantics`` is the client's choice (see :func:`connect`); whatever it says here,
    the server keeps a completion table (``.table``) for the calls that ask for
    exactly-once. ``table``: where it lives: None (the default) in this process's
    memory, lost when the server stops; a path: an SQLite database file (created if
    missing), so that recorded replies survive a server restart (a reply goes out once
    its completion is committed; completions are group-committed) and a handler can
    write in the same transaction (``buzon.rpc.context().transaction``); or a
    :class:`~buzon.rpc.CompletionTable` (e.g. ``SqliteTable(path,
    synchronous="NORMAL")``), which the caller closes.
    ``options`` go to :func:`buzon.listen` (``max_clients``, ``grace`` to the server).

    ``name``: also register the real address under this name (:mod:`buzon.names`),
    with metadata ``{"service", "wire", "semantics", "instance"}``; ``EndpointInUse``
    if a live process holds it (nothing stays bound then). The name goes when the
    server stops serving (or its process dies). ``url`` may be ``name:NAME``: serves
    ``unix:NAME`` registered as NAME. ``instance`` is a random id of this server start,
    sent in every connection's handshake (HELLO options ``{"rpc": {"instance",
    "durable"}}``, ``durable``: the completion table outlives the process), by which a
    reconnecting client notices a restarted server, at a fixed address as through a name.

    Counters: ``calls`` (replies sent), ``errors`` (error replies and refused
    messages), ``in_flight`` (calls running now). The server publishes them for
    ``buzon ls`` in shared memory (:mod:`buzon.rpc._publish`), so with
    ``mode="process"`` ``calls`` and ``errors`` include its children's, while the
    ``in_flight`` property counts this process's calls (``buzon ls`` shows all).
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
        table: str | os.PathLike[str] | CompletionTable | None = None,
        max_in_flight: int = 64,
        reply_timeout: float | None = 30.0,
        **options: Any,
    ) -> None:
        if mode == "async":
            raise UnsupportedOperation(
                "mode='async': use buzon.aio.rpc.Server (or buzon.rpc.serve(..., mode='async'))"
            )
        url = str(
            self._init_identity(
                url, service, wire, semantics, name, table, max_in_flight, reply_timeout
            )
        )
        self._connections: set[_Connection] = set()
        self._monitor_lock = threading.Lock()
        self._monitor_obj: _Monitor | None = None
        try:
            if wire != "buzon":  # a stream wire: a session per connection, on raw bytes
                self._server = ChannelServer(
                    url, self._serve_stream, mode=mode, raw=True, **options
                )
            else:
                self._server = ChannelServer(
                    url, self._serve_client, mode=mode, hello=self._hello(), **options
                )
            if self.name is not None:
                self._register(self.name)
        except BaseException:
            if self._own_table:
                self.table.close()
            raise
        publish_server(self)

    def _register(self, name: str) -> None:
        """Register the bound address under ``name``; on failure nothing stays bound."""
        from ..names import bind

        server = self._server
        try:
            bind(server._listener, name, self._metadata())  # closes the listener if refused
        except BaseException:
            os.close(server._wake_r)
            os.close(server._wake_w)
            raise

    @property
    def in_flight(self) -> int:
        """Calls (and notifies) running now, over all connections of this process
        (``wire="jsonrpc"``/``"msgpack-rpc"``: of the whole server, from its counters)."""
        if self.wire != "buzon":  # their sessions count only in the counters
            return self._pub.in_flight
        return sum(len(c.running) for c in list(self._connections))

    @property
    def references(self) -> int:
        """Objects of this process that clients hold references to now (remote
        objects): it goes back to 0 as clients drop their proxies or disconnect.
        With ``mode="process"`` it counts only this process's clients (none: each
        client is served in a child)."""
        return sum(len(c._exports) for c in list(self._connections))

    @property
    def address(self) -> Any:
        """The bound address (a TCP port 0 is resolved)."""
        return self._server.address

    def _monitor(self) -> _Monitor:
        with self._monitor_lock:
            monitor = self._monitor_obj
            if monitor is None or monitor.pid != os.getpid():  # a forked child: its own
                monitor = self._monitor_obj = _Monitor(self)
            return monitor

    def _serve_client(self, ch: Channel) -> None:
        conn = _Connection(self, ch, self._monitor())
        self._connections.add(conn)
        try:
            conn.run()
        finally:
            self._connections.discard(conn)

    def _serve_stream(self, ch: Channel) -> None:
        from ._msgpack import serve_stream

        serve_stream(self.wire, ch, self.service, self.max_in_flight, self._pub)

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`."""
        try:
            self._server.serve_forever()
        finally:
            if self._monitor_obj is not None:
                self._monitor_obj.stop()
            if self._own_table:
                self.table.close()
            self._pub.close()

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
