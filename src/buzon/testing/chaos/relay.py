"""The chaos relay: sockets and a selector loop in a thread of its own, applying the
fault models of :mod:`buzon.testing.chaos.faults` to real traffic (the theory of
operation is in :mod:`buzon.testing.chaos`)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import heapq
import itertools
import json
import math
import os
import random
import secrets
import selectors
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from ..._runtime import runtime_dir
from ...address import Address, parse_address
from ...errors import AddressError, InsecureBind, from_oserror
from ...transport.tcp import is_loopback, resolve
from ...transport.unix import bind_unix_path, unlink_if_ours
from .faults import (
    COUNTERS,
    DIRECTIONS,
    Direction,
    Event,
    Faults,
    _Pipe,
    _resolve_faults,
    _Shaper,
)

__all__ = ["ChaosRelay"]

_DGRAM_SCHEMES = ("udp", "unixgram")
_STREAM_SCHEMES = ("tcp", "unix")
_RECV_BUFFER = 1 << 18  # larger than any datagram a Unix or UDP socket carries by default
_STREAM_READ = 65536
_OUTBOX_LIMIT = 4096  # datagrams waiting for a full receiver, per flow and direction
_RETRY_FIRST = 0.001  # seconds before retrying a datagram a full receiver refused
_RETRY_MAX = 0.02
_ACCEPT_BATCH = 16
_FINE = 0.001  # timers closer than this are waited for with sleep(), not the selector


# ==================================================================== the relay state


class _Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False


@dataclass(slots=True, eq=False)
class _Held:
    """A reordered datagram waiting for ``left`` more datagrams of its flow."""

    payload: bytes
    delay: float
    since: float
    span: int
    left: int
    timer: _Timer | None = None


class _Flow:
    """One datagram client: its address, upstream socket and queues."""

    def __init__(self, fid: int, client: Any, upstream: socket.socket) -> None:
        self.id = fid
        self.client = client
        self.upstream = upstream
        self.file: tuple[str, os.stat_result] | None = None  # a unixgram upstream's own file
        self.held: dict[Direction, list[_Held]] = {"forward": [], "reply": []}
        self.outbox: dict[Direction, deque[bytes]] = {"forward": deque(), "reply": deque()}
        self.retry: dict[Direction, float] = {"forward": 0.0, "reply": 0.0}
        self.closed = False


class _Conn:
    """A relayed stream connection: the accepted client and its upstream connection."""

    def __init__(
        self,
        cid: int,
        client: socket.socket,
        upstream: socket.socket,
        pipes: dict[Direction, _Pipe],
    ) -> None:
        self.id = cid
        self.client = client
        self.upstream = upstream
        self.pipes = pipes
        self.connected = False
        self.closed = False

    def src(self, pipe: _Pipe) -> socket.socket:
        return self.client if pipe.direction == "forward" else self.upstream

    def dst(self, pipe: _Pipe) -> socket.socket:
        return self.upstream if pipe.direction == "forward" else self.client


# ========================================================================= the relay


class ChaosRelay:
    """Relay ``front`` <-> ``back`` with faults, in a background thread of its own.

    ``front`` is where clients connect (``udp://``, ``unixgram:``, ``tcp://``,
    ``unix:``; port 0 picks a free port); ``back`` is the real server, of the same
    kind (datagram or stream). ``profile`` is a name of :data:`PROFILES` or a
    :class:`Faults`. ``log`` names a JSON-lines file for every event. A front that is
    not loopback needs ``insecure=True`` (the relay authenticates nobody).
    """

    def __init__(
        self,
        front: str | Address,
        back: str | Address,
        *,
        profile: str | Faults = "clean",
        seed: int | None = None,
        log: str | os.PathLike[str] | None = None,
        max_events: int = 200_000,
        max_flows: int = 256,
        buffer_limit: int = 1 << 20,
        insecure: bool = False,
    ) -> None:
        self.front = parse_address(front)
        self.back = parse_address(back)
        kinds = {
            "front": self.front.scheme,
            "back": self.back.scheme,
        }
        for which, scheme in kinds.items():
            if scheme not in _DGRAM_SCHEMES + _STREAM_SCHEMES:
                raise AddressError(
                    f"the chaos relay's {which} is udp://, unixgram:, tcp:// or unix:, "
                    f"not {scheme}:"
                )
        if (self.front.scheme in _DGRAM_SCHEMES) != (self.back.scheme in _DGRAM_SCHEMES):
            raise AddressError(
                f"cannot relay between {self.front.scheme}: and {self.back.scheme}: "
                "(both ends must be datagram, or both stream)"
            )
        self.faults = _resolve_faults(profile)
        self.profile = profile if isinstance(profile, str) else "custom"
        self.seed = seed if seed is not None else secrets.randbits(32)
        self.datagrams = self.front.scheme in _DGRAM_SCHEMES
        self._log_path = log
        self._max_flows = max_flows
        self._buffer_limit = buffer_limit
        self._insecure = insecure
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=max_events)
        self._counts: dict[str, dict[str, int]] = {}
        self._reset_counts()
        self._address: Address | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self.failure: BaseException | None = None
        """The exception that stopped the relay's thread, if one did."""
        # loop state (touched by the relay's thread only, once started)
        self._t0 = 0.0
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._front_sock: socket.socket | None = None
        self._front_file: tuple[str, os.stat_result] | None = None
        self._back_sockaddr: Any = None
        self._back_family: int = socket.AF_UNIX
        self._interest: dict[int, int] = {}
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        self._flows: OrderedDict[Any, _Flow] = OrderedDict()
        self._conns: dict[int, _Conn] = {}
        self._shapers: dict[Direction, _Shaper] = {}
        self._logfile: IO[str] | None = None
        self._buf = bytearray(_RECV_BUFFER if self.datagrams else 0)

    # ----------------------------------------------------------------- public surface

    @property
    def address(self) -> Address:
        """The front address clients use (the real port once started)."""
        if self._address is None:
            raise RuntimeError("the relay is not started; call start() or use 'with'")
        return self._address

    @property
    def running(self) -> bool:
        """True while the relay's thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ChaosRelay:
        """Bind the front address and start relaying in the background; return self."""
        if self._thread is not None or self._closed:
            raise RuntimeError("a ChaosRelay starts once")
        try:
            self._open()
        except BaseException:
            self._teardown()
            self._closed = True
            raise
        self._thread = threading.Thread(target=self._run, name="buzon-chaos", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, close every socket, remove every file; idempotent.

        Open stream connections are closed (their peers see end-of-stream).
        """
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            self._teardown()
            return
        self._stopping = True
        self._wake()
        thread.join()

    def __enter__(self) -> ChaosRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.failure is not None and exc[0] is None:
            raise RuntimeError(f"the chaos relay failed: {self.failure!r}") from self.failure

    def events(self) -> list[Event]:
        """The events so far (the last ``max_events``), oldest first."""
        with self._lock:
            return list(self._events)

    def statistics(self, direction: Direction | None = None) -> dict[str, int]:
        """Counters per action (see :data:`COUNTERS`), for one direction or all."""
        with self._lock:
            if direction is not None:
                return dict(self._counts[direction])
            total = dict.fromkeys(self._counts["forward"], 0)
            for counts in self._counts.values():
                for key, value in counts.items():
                    total[key] += value
            return total

    def summary(self) -> str:
        """One line of the main counters, for humans."""
        s = self.statistics()
        keys = (
            "received",
            "forwarded",
            "dropped",
            "duplicated",
            "reordered",
            "corrupted",
            "delayed",
            "truncated",
            "resets",
        )
        return " ".join(f"{k}={s[k]}" for k in keys)

    def __repr__(self) -> str:
        where = self._address or self.front
        return f"<ChaosRelay {where} -> {self.back} profile={self.profile} seed={self.seed}>"

    # ------------------------------------------------------------------- bookkeeping

    def _reset_counts(self) -> None:
        keys = [*COUNTERS.values(), "forwarded_bytes"]
        self._counts = {d: dict.fromkeys(keys, 0) for d in (*DIRECTIONS, "-")}

    def _record(self, direction: str, action: str, size: int, detail: str, flow: int) -> None:
        event = Event(round(time.monotonic() - self._t0, 6), direction, action, size, detail, flow)
        with self._lock:
            self._events.append(event)
            counts = self._counts[direction]
            counts[COUNTERS[action]] += 1
            if action == "forward":
                counts["forwarded_bytes"] += size
        if self._logfile is not None:
            self._logfile.write(json.dumps(event._asdict()) + "\n")

    # ----------------------------------------------------------------------- opening

    def _open(self) -> None:
        self._t0 = time.monotonic()
        if self._log_path is not None:
            self._logfile = open(self._log_path, "w", encoding="utf-8")  # noqa: SIM115
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        front = self.front
        kind = socket.SOCK_DGRAM if self.datagrams else socket.SOCK_STREAM
        if front.is_inet:
            if not self._insecure and not is_loopback(front):
                raise InsecureBind(
                    f"{front}: the chaos relay binds loopback only unless insecure=True"
                )
            family, sockaddr = resolve(front, kind, passive=True)
            sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
            self._front_sock = sock
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if not self.datagrams:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise from_oserror(exc, f"bind {front}") from exc
            self._address = front.with_port(sock.getsockname()[1])
        else:
            sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
            self._front_sock = sock
            path = front.fs_path()
            self._front_file = (path, bind_unix_path(sock, front, path))
            self._address = front
        if not self.datagrams:
            sock.listen(128)
        sock.setblocking(False)
        if self.back.is_inet:
            self._back_family, self._back_sockaddr = resolve(self.back, kind, passive=False)
        else:
            self._back_family, self._back_sockaddr = socket.AF_UNIX, self.back.fs_path()
        handler = self._on_front_datagram if self.datagrams else self._on_accept
        self._watch(sock, selectors.EVENT_READ, handler)
        for direction in DIRECTIONS:
            rng = random.Random(f"{self.seed}:{direction}")
            self._shapers[direction] = _Shaper(self.faults.for_direction(direction), rng)
        if self._logfile is not None:
            header = {
                "relay": {
                    "front": str(self._address),
                    "back": str(self.back),
                    "profile": self.profile,
                    "seed": self.seed,
                    "faults": dataclasses.asdict(self.faults),
                }
            }
            self._logfile.write(json.dumps(header, default=str) + "\n")

    # -------------------------------------------------------------------- the loop

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stopping:
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                ready = sel.select(0 if timeout is not None and timeout < _FINE else timeout)
                if not ready and timeout is not None and 0 < timeout < _FINE:
                    # epoll counts whole milliseconds: sleep the fraction instead, so a
                    # 0.2 ms delay is 0.2 ms (the kernel queues what arrives meanwhile)
                    time.sleep(timeout)
                for key, mask in ready:
                    if self._stopping:
                        break
                    key.data(mask)
                self._fire_timers()
        except BaseException as exc:  # the tool must say why it stopped, never hang
            self.failure = exc
            with contextlib.suppress(Exception):
                self._record("-", "error", 0, f"relay stopped: {exc!r}", 0)
        finally:
            self._teardown()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def _on_wake(self, mask: int) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(OSError):
            self._wake_r.recv(64)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now and not self._stopping:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()

    def _at(self, due: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(callback)
        if math.isfinite(due):
            heapq.heappush(self._timers, (due, next(self._seq), timer))
        return timer

    def _watch(self, sock: socket.socket, mask: int, handler: Callable[[int], None]) -> None:
        """Set the events wanted on ``sock`` (0: none)."""
        assert self._sel is not None
        fd = sock.fileno()
        if fd < 0:
            return
        old = self._interest.get(fd, 0)
        if mask == old:
            return
        if not old:
            self._sel.register(sock, mask, handler)
            self._interest[fd] = mask
        elif not mask:
            self._sel.unregister(sock)
            del self._interest[fd]
        else:
            self._sel.modify(sock, mask, handler)
            self._interest[fd] = mask

    def _forget(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd >= 0 and self._interest.pop(fd, 0) and self._sel is not None:
            self._sel.unregister(sock)

    def _teardown(self) -> None:
        for conn in list(self._conns.values()):
            self._close_conn(conn, reason="relay closed", record=False)
        for flow in list(self._flows.values()):
            self._close_flow(flow, record=False)
        if self._front_sock is not None:
            self._forget(self._front_sock)
            self._front_sock.close()
            self._front_sock = None
        if self._front_file is not None:
            unlink_if_ours(*self._front_file)
            self._front_file = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        self._interest.clear()
        self._timers.clear()
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None

    # ================================================================== datagrams

    def _on_front_datagram(self, mask: int) -> None:
        sock = self._front_sock
        assert sock is not None
        buf = self._buf
        for _ in range(64):  # then let the others have a turn
            try:
                n, client = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier reply
                self._record("reply", "error", 0, f"front: {exc.strerror or exc}", 0)
                continue
            flow = self._flow_for(client)
            if flow is None:
                continue
            self._datagram_in(flow, "forward", bytes(buf[:n]))

    def _flow_for(self, client: Any) -> _Flow | None:
        key = client if client else ""
        flow = self._flows.get(key)
        if flow is not None:
            self._flows.move_to_end(key)
            return flow
        while len(self._flows) >= self._max_flows:
            _, oldest = self._flows.popitem(last=False)
            self._close_flow(oldest, record=True, why="evicted: too many clients")
        fid = next(self._ids)
        sock = socket.socket(self._back_family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        own: tuple[str, os.stat_result] | None = None
        try:
            if self._back_family == socket.AF_UNIX:
                path = os.path.join(runtime_dir(), f"c-{os.getpid()}-{secrets.token_hex(6)}.dgram")
                own = (path, bind_unix_path(sock, Address("unixgram", path=path), path))
            sock.connect(self._back_sockaddr)
            sock.setblocking(False)
        except Exception as exc:
            sock.close()
            if own is not None:
                unlink_if_ours(*own)
            self._record("forward", "drop", 0, f"cannot reach the back end: {exc}", fid)
            return None
        flow = _Flow(fid, key, sock)
        flow.file = own
        self._flows[key] = flow
        self._watch(sock, selectors.EVENT_READ, lambda mask: self._on_upstream(flow))
        self._record("-", "open", 0, f"client {_show(client)}", fid)
        return flow

    def _on_upstream(self, flow: _Flow) -> None:
        buf = self._buf
        for _ in range(64):
            if flow.closed:
                return
            try:
                n = flow.upstream.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ECONNREFUSED: nobody at the back address
                self._record("forward", "error", 0, f"back: {exc.strerror or exc}", flow.id)
                continue
            self._datagram_in(flow, "reply", bytes(buf[:n]))

    def _datagram_in(self, flow: _Flow, direction: Direction, data: bytes) -> None:
        now = time.monotonic()
        fid = flow.id
        self._record(direction, "receive", len(data), "", fid)
        verdict = self._shapers[direction].datagram(data, now - self._t0)
        for action, size, detail in verdict.notes:
            self._record(direction, action, size, detail, fid)
        if verdict.drop is not None:
            self._record(direction, "drop", len(data), verdict.drop, fid)
            return
        payload = verdict.payload
        due = now
        if verdict.hold:
            held = _Held(payload, verdict.delays[0], now, verdict.hold, verdict.hold)
            held.timer = self._at(
                now + self.faults.for_direction(direction).reorder_hold,
                lambda: self._release(flow, direction, held, now, "timeout"),
            )
        else:
            due = self._send_later(flow, direction, payload, verdict.delays[0])
        for extra in verdict.delays[1:]:  # the duplicate
            self._send_later(flow, direction, payload, extra)
        waiting = flow.held[direction]
        for held_before in list(waiting):
            held_before.left -= 1
            if held_before.left <= 0:
                self._release(flow, direction, held_before, due, f"after {held_before.span}")
        if verdict.hold:
            waiting.append(held)

    def _release(
        self, flow: _Flow, direction: Direction, held: _Held, after: float, why: str
    ) -> None:
        waiting = flow.held[direction]
        if held not in waiting or flow.closed:
            return
        waiting.remove(held)
        if held.timer is not None:
            held.timer.cancelled = True
        now = time.monotonic()
        self._record(direction, "release", len(held.payload), why, flow.id)
        due = max(after, held.since + held.delay, now)
        self._send_later(flow, direction, held.payload, due - now)

    def _send_later(self, flow: _Flow, direction: Direction, payload: bytes, delay: float) -> float:
        now = time.monotonic()
        if delay > 0:
            self._record(direction, "delay", len(payload), f"{delay * 1000:.3f} ms", flow.id)
            self._at(now + delay, lambda: self._send(flow, direction, payload))
            return now + delay
        self._send(flow, direction, payload)
        return now

    def _send(self, flow: _Flow, direction: Direction, payload: bytes) -> None:
        if flow.closed:
            return
        box = flow.outbox[direction]
        if box:  # a full receiver: keep the order, wait for the retry
            if len(box) >= _OUTBOX_LIMIT:
                self._record(direction, "overflow", len(payload), "relay queue full", flow.id)
            else:
                box.append(payload)
            return
        if self._send_now(flow, direction, payload) is None:
            box.append(payload)
            flow.retry[direction] = _RETRY_FIRST
            self._at(time.monotonic() + _RETRY_FIRST, lambda: self._retry(flow, direction))

    def _send_now(self, flow: _Flow, direction: Direction, payload: bytes) -> bool | None:
        """True sent, False dropped for an error, None: the receiver is full."""
        try:
            if direction == "forward":
                flow.upstream.send(payload)
            elif not flow.client:
                self._record(
                    direction, "drop", len(payload), "unroutable: client has no address", flow.id
                )
                return False
            else:
                assert self._front_sock is not None
                self._front_sock.sendto(payload, flow.client)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._record(direction, "drop", len(payload), f"send: {exc.strerror or exc}", flow.id)
            return False
        self._record(direction, "forward", len(payload), "", flow.id)
        return True

    def _retry(self, flow: _Flow, direction: Direction) -> None:
        box = flow.outbox[direction]
        while box and not flow.closed:
            if self._send_now(flow, direction, box[0]) is None:
                flow.retry[direction] = min(_RETRY_MAX, flow.retry[direction] * 2)
                self._at(
                    time.monotonic() + flow.retry[direction], lambda: self._retry(flow, direction)
                )
                return
            box.popleft()

    def _close_flow(self, flow: _Flow, *, record: bool, why: str = "") -> None:
        if flow.closed:
            return
        flow.closed = True
        self._flows.pop(flow.client, None)
        self._forget(flow.upstream)
        flow.upstream.close()
        if flow.file is not None:
            unlink_if_ours(*flow.file)
            flow.file = None
        for direction in DIRECTIONS:
            for held in flow.held[direction]:
                if held.timer is not None:
                    held.timer.cancelled = True
            flow.held[direction].clear()
            flow.outbox[direction].clear()
        if record:
            self._record("-", "close", 0, why, flow.id)

    # ==================================================================== streams

    def _on_accept(self, mask: int) -> None:
        sock = self._front_sock
        assert sock is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                client, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                self._record("-", "error", 0, f"accept: {exc.strerror or exc}", 0)
                return
            client.setblocking(False)
            cid = next(self._ids)
            if len(self._conns) >= self._max_flows:
                client.close()
                self._record("-", "error", 0, "refused: too many connections", cid)
                continue
            self._open_conn(cid, client, peer)

    def _open_conn(self, cid: int, client: socket.socket, peer: Any) -> None:
        upstream = socket.socket(
            self._back_family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        pipes: dict[Direction, _Pipe] = {}
        for direction in DIRECTIONS:
            rng = random.Random(f"{self.seed}:{direction}:{cid}")
            pipes[direction] = _Pipe(direction, self.faults.for_direction(direction), rng)
        conn = _Conn(cid, client, upstream, pipes)
        self._conns[cid] = conn
        _nodelay(client)  # (a no-op on Unix sockets)
        _nodelay(upstream)
        self._record("-", "open", 0, f"client {_show(peer)}", cid)
        self._connect_step(conn, first=True)

    def _connect_step(self, conn: _Conn, *, first: bool) -> None:
        if conn.closed:
            return
        if first:
            err = conn.upstream.connect_ex(self._back_sockaddr)
        else:
            err = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == errno.EINPROGRESS:
            self._sync(conn)  # wait for the upstream to become writable
            return
        if err == errno.EAGAIN:  # a Unix listener's backlog is full: try again soon
            self._at(time.monotonic() + 0.005, lambda: self._connect_step(conn, first=True))
            return
        if err:
            why = os.strerror(err)
            self._record("-", "error", 0, f"connect {self.back}: {why}", conn.id)
            self._close_conn(conn, reason=f"back end unreachable: {why}", reset=True)
            return
        conn.connected = True
        for pipe in conn.pipes.values():
            self._pump(conn, pipe)
        self._sync(conn)

    def _sync(self, conn: _Conn) -> None:
        """Recompute the selector interest of both sockets of ``conn``."""
        if conn.closed:
            return
        fwd, rep = conn.pipes["forward"], conn.pipes["reply"]
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        limit = self._buffer_limit
        cmask = (read if fwd.wants_read(limit) else 0) | (write if rep.blocked else 0)
        if conn.connected:
            umask = (read if rep.wants_read(limit) else 0) | (write if fwd.blocked else 0)
        else:
            umask = write
        self._watch(conn.client, cmask, lambda mask: self._on_client(conn, mask))
        self._watch(conn.upstream, umask, lambda mask: self._on_upstream_stream(conn, mask))

    def _on_client(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            conn.pipes["reply"].blocked = False
            self._pump(conn, conn.pipes["reply"])
        if mask & selectors.EVENT_READ:
            self._read(conn, conn.pipes["forward"])
        self._sync(conn)

    def _on_upstream_stream(self, conn: _Conn, mask: int) -> None:
        if not conn.connected:
            self._connect_step(conn, first=False)
            return
        if mask & selectors.EVENT_WRITE:
            conn.pipes["forward"].blocked = False
            self._pump(conn, conn.pipes["forward"])
        if mask & selectors.EVENT_READ:
            self._read(conn, conn.pipes["reply"])
        self._sync(conn)

    def _read(self, conn: _Conn, pipe: _Pipe) -> None:
        if conn.closed or pipe.eof:
            return
        f = pipe.faults
        if pipe.reset_pending:
            return
        size = pipe.read_size(_STREAM_READ)
        # With resets in play, look before taking: a Unix socket closed with unread
        # bytes is the only way to make its peer see ECONNRESET (AF_UNIX has no RST).
        src = conn.src(pipe)
        peek = f.reset > 0
        try:
            data = src.recv(size, socket.MSG_PEEK if peek else 0)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._abort(conn, pipe.direction, f"recv: {exc.strerror or exc}")
            return
        direction = pipe.direction
        if not data:
            pipe.eof = True
            self._record(direction, "receive", 0, "end of stream", conn.id)
            self._pump(conn, pipe)
            return
        dice = pipe.dice()  # the same draws for every chunk, as for datagrams
        if dice.reset:  # (only when peeking: f.reset > 0)
            self._record(direction, "receive", len(data), "", conn.id)
            self._reset(conn, direction, "random")
            return
        if peek:
            data = src.recv(len(data))  # the bytes just seen (this thread alone reads src)
        now = time.monotonic()
        self._record(direction, "receive", len(data), "", conn.id)
        if f.cut:
            self._record(direction, "drop", len(data), "cut", conn.id)
            return
        data, bits = pipe.take(data, dice)
        if bits is not None:
            self._record(direction, "corrupt", len(data), f"bits {bits}", conn.id)
        due = max(now + dice.delay, pipe.last_due)  # bytes never overtake
        t = now - self._t0
        if f.blackhole is not None and f.blackhole.active(t):
            until = f.blackhole.ends(t)
            self._record(direction, "stall", len(data), f"until {until:.3f} s", conn.id)
            due = max(due, self._t0 + until)
        elif due > now:
            self._record(direction, "delay", len(data), f"{(due - now) * 1000:.3f} ms", conn.id)
        if now < due < math.inf:
            self._at(due, lambda: self._pump(conn, pipe))
        pipe.last_due = due
        pipe.pending.append((due, data))
        pipe.pending_bytes += len(data)
        self._pump(conn, pipe)

    def _pump(self, conn: _Conn, pipe: _Pipe) -> None:
        """Write what is due from ``pipe`` to its destination, as the faults allow."""
        if conn.closed:
            return
        now = time.monotonic()
        while pipe.pending and pipe.pending[0][0] <= now:
            _, data = pipe.pending.popleft()
            pipe.pending_bytes -= len(data)
            pipe.out += data
        if not conn.connected:
            return
        dst = conn.dst(pipe)
        f = pipe.faults
        while pipe.out and not pipe.blocked:
            n = len(pipe.out)
            if f.slice:
                if now < pipe.gap_until:
                    self._at(pipe.gap_until, lambda: self._pump(conn, pipe))
                    break
                n = min(n, pipe.piece_left)
            try:
                sent = dst.send(memoryview(pipe.out)[:n])
            except (BlockingIOError, InterruptedError):
                pipe.blocked = True
                break
            except OSError as exc:
                other: Direction = "reply" if pipe.direction == "forward" else "forward"
                self._abort(conn, other, f"send: {exc.strerror or exc}")
                return
            del pipe.out[:sent]
            self._record(pipe.direction, "forward", sent, "slice" if f.slice else "", conn.id)
            if f.slice:
                pipe.piece_left -= sent
                if pipe.piece_left <= 0:
                    pipe.piece_left = pipe._piece()
                    if f.slice_gap:
                        pipe.gap_until = now + pipe.slicer.uniform(0, f.slice_gap)
        if pipe.idle():
            if pipe.reset_pending:
                self._reset(conn, pipe.direction, f"after {f.reset_after} bytes")
                return
            if pipe.eof and not pipe.done:
                pipe.done = True
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                if all(p.done for p in conn.pipes.values()):
                    self._close_conn(conn, reason="both directions ended")
                    return
        self._sync(conn)

    def _reset(self, conn: _Conn, direction: Direction, why: str) -> None:
        self._record(direction, "reset", 0, why, conn.id)
        self._close_conn(conn, reason="", reset=True, record=False)

    def _abort(self, conn: _Conn, failed: Direction, why: str) -> None:
        """One side failed (``failed``: the direction whose source or destination did)."""
        self._record(failed, "abort", 0, why, conn.id)
        self._close_conn(conn, reason="", reset=True, record=False)

    def _close_conn(
        self, conn: _Conn, *, reason: str, reset: bool = False, record: bool = True
    ) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.id, None)
        for sock in (conn.client, conn.upstream):
            self._forget(sock)
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        if record:
            self._record("-", "close", 0, reason, conn.id)


_LINGER_RESET = struct.pack("ii", 1, 0)


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _show(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    if isinstance(addr, bytes):
        addr = os.fsdecode(addr)
    return str(addr) if addr else "(unnamed)"
