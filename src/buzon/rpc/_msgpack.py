"""``wire="msgpack-rpc"``: the msgpack-rpc spec, as Neovim speaks it.

Messages are bare msgpack arrays back to back on a byte stream (no buzon frames):

=============  ====================================  ===================================
message        array                                 notes
=============  ====================================  ===================================
request        ``[0, msgid, method, params]``        msgid: u32, chosen by the caller
response       ``[1, msgid, error, result]``         ``error`` is nil on success;
                                                     Neovim sends ``[type, message]``
notification   ``[2, method, params]``               no response
=============  ====================================  ===================================

Both ends may send requests on the same connection at any time: while we wait for
Neovim's answer to ``nvim_eval("rpcrequest(1, 'add', 2, 3)")``, Neovim asks us for
``add(2, 3)`` and waits for our answer first. Whoever reads routes responses to the
waiting calls and runs the peer's requests on worker threads (a request may call back
into the peer while reading goes on; the workers wait for the next request a while).

Who reads ("leader/followers", as the ``wire="buzon"`` client does): a calling thread
reads the connection itself while no other thread does, so a call costs no thread
switch (a bare loop's cost: send, read, decode); other callers wait until their
response is in or the reading role is free. The session's reader thread reads only
when the connection has been idle (no call) for ``_IDLE`` seconds, so the peer's
requests and notifications between calls are answered within about that long.

msgpack has no length prefix: :func:`object_end` walks one object's headers to find
where it ends, checking every length against what arrived and the size cap before
anything is decoded (msgspec decodes the complete object).
"""

from __future__ import annotations

import abc
import itertools
import os
import queue
import struct
import subprocess
import threading
import time
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

import msgspec

from ..errors import (
    BuzonError,
    ChannelClosed,
    DeadlineExceeded,
    EndOfChannel,
    FrameError,
    FrameTooLarge,
    RemoteError,
    Timeout,
)
from ._context import _DEADLINE
from ._publish import CALLS, ENDED, ERRORS, STARTED, Counter, Publication
from ._service import Service, as_service, handler_failure

if TYPE_CHECKING:
    from ._jsonrpc import JsonRpcClient

__all__ = ["MsgpackRpcClient", "connect_msgpack", "connect_process", "object_end"]

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_MESSAGE = 64 * 1024 * 1024
_MAX_ITEMS = 1 << 24  # containers announcing more items than this are refused

_monotonic = time.monotonic
_SLICE = 0.25  # longest single read, so that close() is noticed
_IDLE = 0.02  # the reader thread reads once no call has been made for this long

# first byte -> (header size, how the header gives a length, kind)
# kinds: "n" nothing follows; "b" that many bytes follow; "a" that many items; "m" pairs
_FIXED: dict[int, tuple[int, str, str]] = {
    0xC0: (1, "", "n"),
    0xC2: (1, "", "n"),
    0xC3: (1, "", "n"),
    0xC4: (2, "B", "b"),
    0xC5: (3, ">H", "b"),
    0xC6: (5, ">I", "b"),
    0xC7: (3, "B", "x"),  # ext8: length, type, data
    0xC8: (4, ">H", "x"),
    0xC9: (6, ">I", "x"),
    0xCA: (5, "", "n"),
    0xCB: (9, "", "n"),
    0xCC: (2, "", "n"),
    0xCD: (3, "", "n"),
    0xCE: (5, "", "n"),
    0xCF: (9, "", "n"),
    0xD0: (2, "", "n"),
    0xD1: (3, "", "n"),
    0xD2: (5, "", "n"),
    0xD3: (9, "", "n"),
    0xD4: (3, "", "n"),
    0xD5: (4, "", "n"),
    0xD6: (6, "", "n"),
    0xD7: (10, "", "n"),
    0xD8: (18, "", "n"),
    0xD9: (2, "B", "b"),
    0xDA: (3, ">H", "b"),
    0xDB: (5, ">I", "b"),
    0xDC: (3, ">H", "a"),
    0xDD: (5, ">I", "a"),
    0xDE: (3, ">H", "m"),
    0xDF: (5, ">I", "m"),
}
_LEN = {"B": struct.Struct("B"), ">H": struct.Struct(">H"), ">I": struct.Struct(">I")}


def object_end(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """Where the msgpack object at ``start`` ends, or -1 if it is not all there yet.

    Raises :class:`~buzon.errors.FrameError` for a byte that starts no object (0xC1)
    and :class:`~buzon.errors.FrameTooLarge` for a container announcing more than
    2**24 items or an object over 64 MiB. Nothing is allocated for announced sizes.
    """
    n = len(data)
    pos = start
    need = 1
    while need:
        if pos >= n:
            return -1
        b = data[pos]
        need -= 1
        if b <= 0x7F or b >= 0xE0:
            pos += 1
        elif b <= 0x8F:
            need += 2 * (b & 0x0F)
            pos += 1
        elif b <= 0x9F:
            need += b & 0x0F
            pos += 1
        elif b <= 0xBF:
            pos += 1 + (b & 0x1F)
        else:
            spec = _FIXED.get(b)
            if spec is None:
                raise FrameError(f"byte 0x{b:02x} at {pos - start} starts no msgpack object")
            size, fmt, kind = spec
            if pos + size > n:
                return -1
            length = _LEN[fmt].unpack_from(data, pos + 1)[0] if fmt else 0
            if kind == "b":
                pos += size + length
            elif kind == "x":
                pos += size + length  # the type byte is part of the header size
            elif kind == "a" or kind == "m":
                if length > _MAX_ITEMS:
                    raise FrameTooLarge(f"a msgpack container announces {length} items")
                need += length * (2 if kind == "m" else 1)
                pos += size
            else:
                pos += size
        if pos - start > MAX_MESSAGE:
            raise FrameTooLarge(f"a msgpack-rpc message over {MAX_MESSAGE} bytes")
    return pos if pos <= n else -1


class _Stream(abc.ABC):
    """A byte stream: ``read(timeout)`` (b"" at the end, None when nothing came in
    time), ``write(data)``, ``close()``."""

    @abc.abstractmethod
    def read(self, timeout: float) -> bytes | None: ...

    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class _ChannelStream(_Stream):
    """A raw buzon channel (``unix:/abs/path`` to ``nvim --listen``)."""

    def __init__(self, ch: Any) -> None:
        self.ch = ch

    def read(self, timeout: float) -> bytes | None:
        try:
            return bytes(self.ch.recv_bytes(timeout))
        except Timeout:
            return None
        except (EndOfChannel, ChannelClosed):
            return b""

    def write(self, data: bytes) -> None:
        self.ch.send_bytes(data)

    def close(self) -> None:
        self.ch.close()


class _ProcessStream(_Stream):
    """A child's stdin (we write) and stdout (we read)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.rfd = proc.stdout.fileno()
        self.wfd = proc.stdin.fileno()
        self.wlock = threading.Lock()
        import select

        self.poller = select.poll()
        self.poller.register(self.rfd, select.POLLIN | select.POLLHUP)

    def read(self, timeout: float) -> bytes | None:
        if not self.poller.poll(int(timeout * 1000)):
            return None
        try:
            return os.read(self.rfd, 65536)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        with self.wlock:
            while view:
                try:
                    n = os.write(self.wfd, view)
                except BrokenPipeError:
                    raise EndOfChannel("the peer process closed its stdin") from None
                view = view[n:]

    def close(self) -> None:
        proc = self.proc
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class _Waiting:
    """A call waiting for its response (both stream wires: msgpack-rpc, jsonrpc)."""

    __slots__ = ("error", "event", "method", "result")

    def __init__(self, method: str) -> None:
        self.method = method
        self.error: BaseException | None = None
        self.result: Any = None
        self.event = threading.Event()


class _StreamSession:
    """What both stream-wire sessions share: the stream, the reader thread, their end
    (``close``, the context manager), and their counters.

    The counters are a :class:`~buzon.rpc._publish.Publication`'s: a served session's
    are its server's (published for ``buzon ls``), a client's its own. ``errors``
    (malformed messages and error answers) is one of them; the peer's requests add to
    calls started and ended around their handler, each response sent to calls served.
    """

    _stream: _Stream
    _reader: threading.Thread
    _closed: bool
    _pub: Publication
    errors = Counter(ERRORS)
    _WORKER_IDLE = 2.0  # a worker thread with nothing to run for this long ends

    def _init_answering(self, max_in_flight: int, pub: Publication | None) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._pub = Publication() if pub is None else pub  # errors, calls: counted there
        self._max_in_flight = max_in_flight
        self._answering = 0  # the peer's requests (notifications, batches) running now
        self._alock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._idle = 0  # worker threads waiting for a job, less the jobs queued
        self._workers_end = False  # the session ended: workers leave (_end_workers)

    def _admit(self) -> bool:
        """Room for one more of the peer's requests (at most ``max_in_flight`` run at
        once)? If not, it is counted in ``errors`` and must not run: the caller
        refuses it with :meth:`_overloaded` (a notification is dropped)."""
        with self._alock:
            if self._answering < self._max_in_flight:
                self._answering += 1
                return True
        self.errors += 1
        return False

    def _overloaded(self) -> RemoteError:
        return RemoteError(
            f"over {self._max_in_flight} requests in flight on this connection",
            RemoteError.OVERLOADED,
        )

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        """Run an admitted request on a worker thread (never the reader: a handler
        may call the peer back while reading goes on): an idle worker of this session
        if there is one, else a new one. Workers stay ``_WORKER_IDLE`` seconds for
        the next request (no thread started per request), at most ``max_in_flight``."""
        with self._alock:
            self._jobs.put((target, args))
            if self._idle:
                self._idle -= 1  # a waiting worker takes it
                return
        threading.Thread(target=self._work, name="buzon-rpc-stream-call", daemon=True).start()

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            try:
                job = jobs.get(timeout=self._WORKER_IDLE)
            except queue.Empty:
                with self._alock:
                    if jobs.empty():  # nothing claimed this worker: it ends
                        self._idle -= 1
                        return
                continue  # a job came as the wait ended: it is this worker's
            if job is None:  # the session ended (_end_workers)
                return
            target, args = job
            try:
                target(*args)
            finally:
                with self._alock:
                    self._answering -= 1
                    ended = self._workers_end  # the session ended: no more jobs come
                    if not ended:
                        self._idle += 1
            if ended:
                return

    def _end_workers(self) -> None:
        """The session ended (closed, or the peer went): its idle workers leave now
        (one ``None`` each, queued after the jobs already claimed), and busy ones once
        their request is answered, instead of waiting ``_WORKER_IDLE`` for a request
        that cannot come."""
        with self._alock:
            self._workers_end = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)

    def close(self) -> None:
        """End the session (a child process is waited for, then killed if it lingers)."""
        self._closed = True
        self._stream.close()
        if self._reader is not threading.current_thread():
            self._reader.join(5)
        self._end_workers()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the connection ends (True) or ``timeout`` passes (False)."""
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MsgpackRpcClient(_StreamSession):
    """A msgpack-rpc session (``wire="msgpack-rpc"``): call the peer, and answer it.

    ``s.call("nvim_eval", "1+1")`` or ``s.nvim_eval("1+1")`` call and wait;
    ``s.notify(method, *params)`` sends a notification. The peer's error (Neovim:
    ``[type, message]``) raises :class:`~buzon.errors.RemoteError` with ``code`` =
    type and ``message``. The peer's requests and notifications go to ``handler`` (a
    :class:`~buzon.rpc.Service` or an object with ``@expose`` methods); an unknown
    method is answered with an error, never by running anything else. Thread-safe.
    """

    def __init__(
        self,
        stream: _Stream,
        handler: Service | object | None,
        timeout: float | None,
        *,
        max_in_flight: int = 64,
        pub: Publication | None = None,
    ) -> None:
        self._init_answering(max_in_flight, pub)
        self._stream = stream
        self._service = None if handler is None else as_service(handler)
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _Waiting] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder()
        self._wlock = threading.Lock()
        self._closed = False
        self._broken: BuzonError | None = None
        # the reading role (one thread at a time) and the bytes read but not yet parsed
        self._cv = threading.Condition(threading.Lock())
        self._reading = False
        self._waiters = 0  # callers waiting on _cv for their response or the role
        self._active = _monotonic()  # when a caller last had the role
        self._buf = bytearray()
        self._reader = threading.Thread(target=self._read_loop, name="buzon-msgpack-rpc")
        self._reader.daemon = True
        self._reader.start()

    # -- calling --------------------------------------------------------------------

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def stub(*args: Any) -> Any:
            return self.call(name, *args)

        stub.__name__ = name
        return stub

    def _send(self, message: list[Any]) -> None:
        data = self._encoder.encode(message)
        with self._wlock:
            self._stream.write(data)

    def call(self, method: str, *params: Any) -> Any:
        """Call ``method`` with ``params`` on the peer and wait for its result."""
        if self._broken is not None:
            raise self._broken
        at = _DEADLINE.get()
        if self._timeout is not None:
            mine = _monotonic() + self._timeout
            at = mine if at is None or mine < at else at
        msgid = next(self._ids) & 0xFFFFFFFF
        waiting = _Waiting(method)
        self._pending[msgid] = waiting
        try:
            self._send([REQUEST, msgid, method, list(params)])
            self._await(waiting, at)
        finally:
            self._pending.pop(msgid, None)
        if waiting.error is not None:
            raise waiting.error
        return waiting.result

    def _await(self, waiting: _Waiting, at: float | None) -> None:
        """Wait for ``waiting``'s response, reading the connection whenever no other
        thread does; ``DeadlineExceeded`` at ``at``."""
        cv = self._cv
        event = waiting.event
        while not event.is_set():
            broken = self._broken
            if broken is not None:  # the end came before this call was registered
                waiting.error = type(broken)(
                    f"{waiting.method}: {broken}; the call may or may not have run"
                )
                return
            left = None if at is None else at - _monotonic()
            if left is not None and left <= 0:
                raise DeadlineExceeded(f"{waiting.method}: no response by the deadline")
            limit = _SLICE if left is None or left > _SLICE else left
            with cv:
                if event.is_set():
                    return
                if self._reading:  # another thread reads: its dispatch sets our event
                    self._waiters += 1
                    try:
                        cv.wait(limit)
                    finally:
                        self._waiters -= 1
                    continue
                self._reading = True
            try:
                self._read_some(limit)
            finally:
                with cv:
                    self._reading = False
                    self._active = _monotonic()
                    if self._waiters:
                        cv.notify_all()

    def notify(self, method: str, *params: Any) -> None:
        """Send a notification ``[2, method, params]`` (no response)."""
        if self._broken is not None:
            raise self._broken
        self._send([NOTIFICATION, method, list(params)])

    # -- the reader -----------------------------------------------------------------

    def _read_loop(self) -> None:
        """The session's reader thread: reads while no call has been made for
        ``_IDLE`` seconds (the peer's requests between calls); callers read for
        themselves otherwise."""
        cv = self._cv
        while not self._closed and self._broken is None:
            with cv:
                if self._reading or self._pending or _monotonic() - self._active < _IDLE:
                    cv.wait(_IDLE)
                    continue
                self._reading = True
            try:
                self._read_some(_SLICE)
            finally:
                with cv:
                    self._reading = False
                    if self._waiters:
                        cv.notify_all()
        if self._broken is None:  # closed by us
            self._end(EndOfChannel("closed"))

    def _read_some(self, timeout: float) -> None:
        """Read once (the caller has the reading role), dispatch every complete
        message; at the end of the stream or a malformed one, end the session."""
        try:
            data = self._stream.read(timeout)
            if data is None:
                return
            if not data:
                raise EndOfChannel("the msgpack-rpc peer closed the connection")
            buf = self._buf
            buf += data
            start = 0
            try:
                while True:
                    end = object_end(buf, start)
                    if end < 0:
                        break
                    self._dispatch(self._decode(bytes(buf[start:end])))
                    start = end
            finally:
                del buf[:start]
            if len(buf) > MAX_MESSAGE:
                raise FrameTooLarge(f"a msgpack-rpc message over {MAX_MESSAGE} bytes")
        except (FrameError, BuzonError) as exc:  # malformed stream: close with the reason
            self._end(exc if isinstance(exc, BuzonError) else EndOfChannel(str(exc)))
        except OSError as exc:
            self._end(EndOfChannel(f"the msgpack-rpc connection failed: {exc}"))

    def _end(self, why: BuzonError) -> None:
        """The session is over: every call waiting fails (its outcome unknown)."""
        if self._closed:
            why = ChannelClosed("the msgpack-rpc session is closed")
        if self._broken is None:
            self._broken = why
        why = self._broken
        self._end_workers()
        for waiting in list(self._pending.values()):
            if not waiting.event.is_set():
                waiting.error = type(why)(
                    f"{waiting.method}: {why}; the call may or may not have run"
                )
                waiting.event.set()
        with self._cv:
            self._cv.notify_all()

    def _decode(self, raw: bytes) -> Any:
        try:
            return self._decoder.decode(raw)
        except msgspec.DecodeError:
            return None

    def _dispatch(self, msg: Any) -> None:
        if type(msg) is not list or not msg or msg[0] not in (REQUEST, RESPONSE, NOTIFICATION):
            self.errors += 1  # not a message: refused (the spec's invalid request)
            return
        kind = msg[0]
        if kind == RESPONSE and len(msg) == 4:
            waiting = self._pending.get(msg[1]) if type(msg[1]) is int else None
            if waiting is None:
                self.errors += 1
                return
            if msg[2] is not None:
                waiting.error = _peer_error(msg[2])
            else:
                waiting.result = msg[3]
            waiting.event.set()
        elif kind == REQUEST and len(msg) == 4 and type(msg[1]) is int:
            if self._admit():
                self._start(self._answer, msg[1], msg[2], msg[3])
            else:
                self._respond(msg[1], self._overloaded(), None)
        elif kind == NOTIFICATION and len(msg) == 3:
            if self._admit():  # else dropped (counted)
                self._start(self._answer, None, msg[1], msg[2])
        else:
            self.errors += 1
            if kind == REQUEST and len(msg) >= 2 and type(msg[1]) is int:
                self._respond(
                    msg[1], RemoteError("invalid request", RemoteError.INVALID_REQUEST), None
                )

    def _answer(self, msgid: int | None, method: Any, params: Any) -> None:
        """Run the peer's request (or notification) through the service's allowlist."""
        try:
            if self._service is None:
                raise RemoteError(
                    f"no method {method!r}: this end serves nothing", RemoteError.METHOD_NOT_FOUND
                )
            entry = self._service.lookup(method)
            if type(params) is not list:
                raise RemoteError(f"{method}: params must be an array", RemoteError.INVALID_PARAMS)
            self._pub.counters[STARTED] += 1
            try:
                result = entry.run(params, None)
            except RemoteError:
                raise
            except Exception as exc:
                raise handler_failure(method, exc) from None
            finally:
                self._pub.counters[ENDED] += 1
            error = None
        except RemoteError as err:
            self.errors += 1
            error, result = err, None
        if msgid is not None:
            self._respond(msgid, error, result)

    def _respond(self, msgid: int, error: RemoteError | None, result: Any) -> None:
        wire_error = None if error is None else error.message
        try:
            try:
                self._send([RESPONSE, msgid, wire_error, result])
            except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
                self.errors += 1
                unencodable = [RemoteError.INVALID_RESULT, f"cannot encode: {exc}"]
                self._send([RESPONSE, msgid, unencodable, None])
            self._pub.counters[CALLS] += 1
        except BuzonError:
            pass  # the peer is gone; the reader reports it

    # -- lifetime -------------------------------------------------------------------


def _peer_error(value: Any) -> RemoteError:
    """A msgpack-rpc error value (Neovim: ``[type, message]``) as a RemoteError."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], str):
        code = value[0] if isinstance(value[0], int) else RemoteError.SERVER_ERROR
        return RemoteError(value[1], code, value)
    return RemoteError(str(value), RemoteError.SERVER_ERROR, value)


@typing.overload
def connect_process(
    argv: Sequence[str],
    *,
    wire: typing.Literal["msgpack-rpc"] = "msgpack-rpc",
    handler: Service | object | None = None,
    timeout: float | None = 60.0,
) -> MsgpackRpcClient: ...
@typing.overload
def connect_process(
    argv: Sequence[str],
    *,
    wire: typing.Literal["jsonrpc"],
    handler: Service | object | None = None,
    timeout: float | None = 60.0,
) -> JsonRpcClient: ...


def connect_process(
    argv: Sequence[str],
    *,
    wire: str = "msgpack-rpc",
    handler: Service | object | None = None,
    timeout: float | None = 60.0,
) -> MsgpackRpcClient | JsonRpcClient:
    """Start ``argv`` and talk RPC over its stdin/stdout (``buzon.rpc.connect_process``)::

        nv = buzon.rpc.connect_process(["nvim", "--headless", "--embed", "--clean", "-n"],
                                       wire="msgpack-rpc", handler=svc)
        nv.nvim_eval("1+1")      # 2
        nv.close()               # closes its stdin; the child exits and is waited for

        ls = buzon.rpc.connect_process(["pylsp"], wire="jsonrpc")   # an LSP server
        ls.call("initialize", processId=None, rootUri=None, capabilities={})

    ``wire``: ``"msgpack-rpc"`` or ``"jsonrpc"`` (JSON-RPC 2.0, ``Content-Length``
    framing). ``handler`` answers the child's own requests. ``timeout`` is every
    call's default deadline (None: wait for ever).
    """
    if wire not in ("msgpack-rpc", "jsonrpc"):
        from ..errors import UnsupportedOperation

        raise UnsupportedOperation(
            f"connect_process: wire={wire!r}; this version speaks msgpack-rpc and jsonrpc"
        )
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    return open_session(wire, _ProcessStream(proc), handler, timeout)


def open_session(
    wire: str,
    stream: _Stream,
    handler: Service | object | None,
    timeout: float | None,
    max_in_flight: int = 64,
    pub: Publication | None = None,
) -> MsgpackRpcClient | JsonRpcClient:
    """The session of ``wire`` (``"msgpack-rpc"`` or ``"jsonrpc"``) on ``stream``,
    running at most ``max_in_flight`` of the peer's requests at once, counting in
    ``pub`` (None: counters of its own)."""
    if wire == "jsonrpc":
        from ._jsonrpc import JsonRpcClient

        return JsonRpcClient(stream, handler, timeout, max_in_flight=max_in_flight, pub=pub)
    return MsgpackRpcClient(stream, handler, timeout, max_in_flight=max_in_flight, pub=pub)


def serve_stream(
    wire: str, ch: Any, service: Service, max_in_flight: int, pub: Publication
) -> None:
    """Answer the peer on the raw channel ``ch`` in ``wire``'s session until the peer
    closes it, or sends what ends the session (the per-client loop of
    ``buzon.rpc.Server(..., wire="msgpack-rpc" | "jsonrpc")``), counting in the
    server's ``pub``."""
    session = open_session(wire, _ChannelStream(ch), service, None, max_in_flight, pub)
    try:
        session.wait_closed()
    finally:
        session.close()


def connect_msgpack(
    url: Any, handler: Service | object | None, timeout: float | None, **options: Any
) -> MsgpackRpcClient:
    """A msgpack-rpc session over a raw stream channel to ``url``."""
    from ..sync import connect

    ch = connect(url, timeout, raw=True, **options)
    return MsgpackRpcClient(_ChannelStream(ch), handler, timeout)
