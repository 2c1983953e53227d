"""The benchmark harness: cases, forked peers, watchdogs, timing loops and statistics.

Theory of operation
-------------------
Every case runs in this process (the *parent*, which measures) against one forked
*child* (the peer). A case builds its link in three steps:

1. before the fork the parent creates what both sides must share (pipes, a
   listening socket, FIFOs, queues, a ``buzon.pipe()`` pair) and registers each
   resource for cleanup on the case's :class:`contextlib.ExitStack`;
2. :meth:`Ctx.spawn` forks; the child opens its side, runs its half of the case and
   leaves with ``os._exit`` (it never returns into the parent's code, never runs the
   parent's cleanups and never flushes the parent's stdio buffers);
3. the parent opens its side and measures; a one-byte hello (child to parent) and go
   (parent to child) cross the link first, so both ends are connected and warm.

Nothing may outlive a case. The child reports on a *status pipe* (``ok {json}`` or
``error <traceback>``) and dies by ``SIGALRM`` if it outlives its time limit (so an
orphan never lingers). In the parent a :class:`_Watchdog` thread, which only sleeps
in ``select``, kills the child and interrupts the main thread (``SIGUSR1``, whose
handler raises :class:`CaseAborted`) when the child fails or the case overruns its
limit: a blocked ``recv`` on a datagram socket or a queue has no EOF to wake it. On
every exit path, Ctrl-C included, the case's stack closes every fd, reaps the child
(``SIGKILL`` first if it is still running) and unlinks every named object.

With ``Config.pin`` (the default of the command line) the parent runs on one CPU and
the child on another for the whole case: every wake-up then crosses CPUs, the case
the design's numbers describe, and a busy machine cannot silently turn some cases
into same-CPU context switches (several times cheaper, and fatal to spinning).

Timing uses :func:`time.perf_counter_ns`. Round trips record one latency per
iteration after a warm-up; one-way throughput is measured by the *receiver* over a
window it owns (see :func:`oneway_case`), so it counts only the messages that
actually arrived, whatever the sender managed to send.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import select
import signal
import statistics
import sys
import threading
import time
import traceback
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Literal, Protocol, TextIO

__all__ = [
    "END",
    "GO",
    "HELLO",
    "STOP",
    "Case",
    "CaseAborted",
    "Child",
    "Config",
    "Ctx",
    "NotApplicable",
    "Progress",
    "Quantity",
    "RecvWindow",
    "Result",
    "SendWindow",
    "LinkMaker",
    "Opener",
    "Side",
    "Skipped",
    "Status",
    "Values",
    "choose_cpus",
    "combine",
    "drain_into",
    "drain_stream",
    "drain_with",
    "handshake_child",
    "handshake_parent",
    "latency_values",
    "load_average",
    "oneway_case",
    "round_trip_case",
    "run_case",
]

# Control messages. Data messages are always longer than one byte, so a receiver
# tells data from control by length alone (one comparison in the hot loop).
HELLO = b"H"
GO = b"G"
STOP = b"S"
END = b"E"

Status = Literal["ok", "n/a", "skipped", "error"]
_GRACE_S = 10.0  # how long a finished case waits for its child to exit
_INTERRUPT = signal.SIGUSR1


class NotApplicable(Exception):
    """The case cannot exist on this transport or machine (reported as ``n/a``)."""


class Skipped(Exception):
    """Something the case needs is missing (reported as ``skipped``, with the reason)."""


class CaseAborted(Exception):
    """The watchdog stopped the case: the child failed or the case ran too long."""


@dataclass(frozen=True, slots=True)
class Quantity:
    """One measured number and its unit (``us``, ``msg/s``, ``MB/s``, ``count``, ``s``)."""

    value: float
    unit: str


Values = dict[str, Quantity]


@dataclass(frozen=True, slots=True)
class Config:
    """What the command line asked for."""

    seconds: float
    quick: bool = False
    only: tuple[str, ...] = ()
    repeat: int = 1
    progress: bool = True
    pin: tuple[int, int] | None = None  # (parent CPU, child CPU), or None to let the OS place
    time_limit: float | None = None  # per case; None: derived from ``seconds``
    # the CPUs this process may use when the Config is made, before any pinning (Ctx.unpin)
    cpus: frozenset[int] = field(default_factory=lambda: frozenset(os.sched_getaffinity(0)))

    @property
    def warmup(self) -> float:
        """Seconds of warm-up before each measurement."""
        return max(0.02, min(0.25, 0.15 * self.seconds))

    @property
    def limit(self) -> float:
        """Seconds after which the watchdog gives up on a case."""
        if self.time_limit is not None:
            return self.time_limit
        return 3.0 * (self.seconds + self.warmup) + 15.0


class Ctx:
    """Everything a case body needs: budget, names, cleanup stack and :meth:`spawn`."""

    def __init__(self, config: Config, tmpdir: str, seq: int, stack: contextlib.ExitStack):
        self.config = config
        self.tmpdir = tmpdir
        self.seq = seq
        self.stack = stack
        self._fds: set[int] = set()
        self.pinned = config.pin is not None
        stack.callback(self._close_fds)

    @property
    def measure_ns(self) -> int:
        return int(self.config.seconds * 1e9)

    @property
    def warmup_ns(self) -> int:
        return int(self.config.warmup * 1e9)

    def path(self, stem: str) -> str:
        """A fresh path in the run's private temporary directory, unlinked at the end."""
        path = os.path.join(self.tmpdir, f"{stem}{self.seq}")
        self.stack.callback(_unlink, path)
        return path

    def name(self, stem: str = "") -> str:
        """A fresh endpoint name for buzon's private namespace."""
        return f"bench-{os.getpid()}-{self.seq}{stem}"

    def own_fd(self, *fds: int) -> None:
        """Close these descriptors at the end of the case (unless closed before)."""
        self._fds.update(fds)

    def close_fd(self, fd: int) -> None:
        """Close a descriptor now; idempotent."""
        if fd in self._fds:
            self._fds.discard(fd)
            os.close(fd)

    def close_later(self, obj: _Closeable) -> None:
        self.stack.callback(_quiet_close, obj)

    def _close_fds(self) -> None:
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.pop())

    def unpin(self) -> None:
        """Let the OS place this process and the children spawned from now on (cases
        with more processes than CPUs); ``run_case`` restores the parent's affinity."""
        if self.pinned:
            self.pinned = False
            os.sched_setaffinity(0, self.config.cpus)

    def spawn(self, body: Callable[[], dict[str, Any] | None]) -> Child:
        """Fork a child that runs ``body`` and exits; returns its handle.

        ``body`` returns a JSON-able dict (handed back by :meth:`Child.join`) or None.
        """
        status_r, status_w = os.pipe()
        self.own_fd(status_r, status_w)
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        # The watchdog's interrupt waits until the child is on the stack: a watchdog
        # (this child's, which may trip at once, or an earlier one's) interrupting us
        # in between would leave the child unreaped and its handler installed.
        mask = threading.current_thread() is threading.main_thread()
        if mask:
            signal.pthread_sigmask(signal.SIG_BLOCK, {_INTERRUPT})
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, which never returns
                _child_main(body, status_w, self.config, self.pinned)
            self.close_fd(status_w)
            child = Child(pid, status_r, self.config.limit)
            self.stack.push(child)
        finally:
            if mask:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {_INTERRUPT})
        return child


class _Closeable(Protocol):
    def close(self) -> object: ...


def _quiet_close(obj: _Closeable) -> None:
    with contextlib.suppress(Exception):
        obj.close()


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _child_main(
    body: Callable[[], dict[str, Any] | None], status_w: int, config: Config, pin: bool
) -> None:
    code = 1
    try:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, _INTERRUPT):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {_INTERRUPT})  # blocked by spawn
        # An orphan (the parent was SIGKILLed) must not block forever in a recv; the
        # parent's watchdog, which reports why, acts first.
        signal.alarm(math.ceil(config.limit) + 10)
        if pin and config.pin is not None:
            os.sched_setaffinity(0, {config.pin[1]})
        info = body() or {}
        _write_status(status_w, b"ok " + json.dumps(info).encode())
        code = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            _write_status(status_w, b"error " + traceback.format_exc().encode()[-3000:])
    finally:
        os._exit(code)


def _write_status(fd: int, msg: bytes) -> None:
    view = memoryview(msg)
    while view:
        view = view[os.write(fd, view) :]


class _Watchdog:
    """A thread that kills the child and interrupts the main thread when the case fails.

    It wakes only on the child's status pipe, its own stop pipe or the deadline, so
    it costs nothing while the case measures.
    """

    def __init__(self, pid: int, status_fd: int, limit: float):
        self.pid = pid
        self.message = b""
        self.failure: str | None = None
        self.armed = True
        self._status_fd = status_fd
        self._deadline = time.monotonic() + limit
        self._limit = limit
        self._stop_r, self._stop_w = os.pipe()
        self._main = threading.main_thread().ident
        self._old_handler: Any = None
        self._handler_installed = False
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(_INTERRUPT, self._on_interrupt)
            self._handler_installed = True
        self._thread = threading.Thread(target=self._run, name="buzon-bench-watchdog", daemon=True)
        self._thread.start()

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            raise CaseAborted(self.failure or "aborted by the watchdog")

    def _run(self) -> None:
        buf = bytearray()
        reading = True
        while True:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                self._trip(f"the case ran longer than its {self._limit:.0f} s limit")
                return
            fds = [self._stop_r, self._status_fd] if reading else [self._stop_r]
            ready, _, _ = select.select(fds, [], [], timeout)
            if self._stop_r in ready:
                return
            if reading and self._status_fd in ready:
                chunk = os.read(self._status_fd, 65536)
                if chunk:
                    buf += chunk
                    continue
                reading = False
                self.message = bytes(buf)
                if not self.message.startswith(b"ok"):
                    self._trip(_child_failure(self.message))
                    return
                if not self.armed:
                    return

    def _trip(self, why: str) -> None:
        if not self.armed:
            return
        self.failure = why
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if self._handler_installed and self._main is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(self._main, _INTERRUPT)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Disarm, stop the thread and restore the signal handler; idempotent."""
        self.armed = False
        if self._stop_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
            self._thread.join()
            os.close(self._stop_r)
            os.close(self._stop_w)
            self._stop_r = self._stop_w = -1
        if self._handler_installed:
            signal.signal(_INTERRUPT, self._old_handler)
            self._handler_installed = False


def _child_failure(message: bytes) -> str:
    if message.startswith(b"error "):
        lines = message[6:].decode(errors="replace").strip().splitlines()
        return "child failed: " + (lines[-1] if lines else "unknown error")
    return "child died without reporting"


class Child:
    """A forked peer. Use :meth:`join` when the case is done; the case stack reaps it."""

    def __init__(self, pid: int, status_fd: int, limit: float):
        self.pid = pid
        self._reaped = False
        self._status: int | None = None
        self._watchdog = _Watchdog(pid, status_fd, limit)

    def join(self, grace: float = _GRACE_S) -> dict[str, Any]:
        """Wait for the child to finish; return what it reported, or raise if it failed."""
        self._watchdog.armed = False
        deadline = time.monotonic() + grace
        while not self._reap(os.WNOHANG):
            if time.monotonic() > deadline:
                self._kill()
                raise CaseAborted(f"the child did not exit within {grace:.0f} s")
            time.sleep(0.001)
        # The status pipe reaches EOF once the child is gone; let the thread read it.
        deadline = time.monotonic() + 2.0
        while self._watchdog.message == b"" and time.monotonic() < deadline:
            if not self._watchdog.alive():
                break
            time.sleep(0.001)
        self._watchdog.stop()
        message = self._watchdog.message
        if self._status != 0 or not message.startswith(b"ok"):
            raise CaseAborted(self._watchdog.failure or _child_failure(message))
        return dict(json.loads(message[3:] or b"{}"))

    def _reap(self, flags: int) -> bool:
        if self._reaped:
            return True
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            self._reaped = True
            return True
        if pid == 0:
            return False
        self._reaped = True
        self._status = os.waitstatus_to_exitcode(status)
        return True

    def _kill(self) -> None:
        if not self._reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._reap(0)

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Disarm first, so a late interrupt cannot land in the middle of the cleanup.
        self._watchdog.armed = False
        try:
            if exc_type is None and not self._reaped:
                deadline = time.monotonic() + _GRACE_S
                while not self._reap(os.WNOHANG) and time.monotonic() < deadline:
                    time.sleep(0.001)
        finally:
            self._kill()
            self._watchdog.stop()


# --- the two sides of a link -------------------------------------------------


class Side:
    """One process's end of a link, after the handshake.

    ``stream`` sides carry bytes without boundaries (reads may be short; the end of
    data is EOF); message sides carry whole messages (control messages are one byte
    long). ``lossy`` sides may drop messages, so control messages are repeated.

    :meth:`sender` and :meth:`receiver` return the fastest callables the mechanism
    has (a bound method or a :func:`functools.partial` of a builtin, so the hot
    loops pay no Python frame); raw sides override :meth:`blast` and :meth:`drain`
    where a tighter loop exists.
    """

    stream = False
    lossy = False

    def sender(self) -> Callable[[bytes], object]:
        """A callable sending one whole message (stream sides: up to ``PIPE_BUF``)."""
        raise NotImplementedError

    def receiver(self, size: int) -> Callable[[], bytes]:
        """A zero-argument callable returning one message (stream: up to ``size`` bytes)."""
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        """Send one control message (not for hot loops)."""
        self.sender()(data)

    def end_of_data(self) -> None:
        """Tell the peer that no more data follows (EOF or an END message)."""
        for _ in range(3 if self.lossy else 1):
            self.send(END)

    def close(self) -> None:
        """Release the side; idempotent."""

    def blast(self, msg: bytes, window: SendWindow) -> int:
        """Send ``msg`` until the window closes; return how many were sent."""
        send = self.sender()
        perf = time.perf_counter_ns
        batch = 64 if len(msg) <= 4096 else 1
        inner = range(batch)
        deadline = perf() + window.min_ns
        stopped = window.stopped
        sent = 0
        while True:
            for _ in inner:
                send(msg)
            sent += batch
            if perf() >= deadline and stopped():
                return sent

    def drain(self, size: int, window: RecvWindow) -> tuple[float, int]:
        """Receive until the end of data; return (messages in the window, its ns)."""
        recv = self.receiver(size)

        def length() -> int:
            return len(recv())

        def burst(n: int) -> tuple[int, bool]:
            for i in range(n):
                if len(recv()) != size:
                    return i, True
            return n, False

        return drain_with(length, burst, size, window)


@dataclass(frozen=True, slots=True)
class SendWindow:
    """The sender's side of the window: send at least ``min_ns``, then until ``stopped()``."""

    min_ns: int
    stopped: Callable[[], bool]


@dataclass(frozen=True, slots=True)
class RecvWindow:
    """The receiver's window: ``warmup_ns`` after the first message, then ``measure_ns``.

    ``stop`` tells the sender the window is over; the receiver then drains the rest
    (uncounted) up to the end mark, so the sender always finishes cleanly.
    """

    warmup_ns: int
    measure_ns: int
    stop: Callable[[], None]


def drain_with(
    length: Callable[[], int],
    burst: Callable[[int], tuple[int, bool]],
    size: int,
    window: RecvWindow,
    *,
    stream: bool = False,
) -> tuple[float, int]:
    """The receiver's three phases: warm-up, the measured window, the uncounted tail.

    ``length()`` receives one message (stream: one read) and returns its length;
    ``burst(n)`` receives up to ``n`` in a tight loop and returns (data units
    received, whether the end mark came). Units are messages, or bytes for streams
    (where the end mark is EOF, a zero-length read). The clock is read once per
    burst, so the measured loop stays a bare receive loop.
    """

    def is_end(n: int) -> bool:
        return n == 0 if stream else n != size

    perf = time.perf_counter_ns
    if is_end(length()):
        raise RuntimeError("the sender ended before sending any data")
    warm_end = perf() + window.warmup_ns
    while perf() < warm_end:
        if is_end(length()):
            raise RuntimeError("the sender ended during the warm-up")
    check = 1 if stream or size >= 1 << 16 else 32
    t0 = perf()
    stop_at = t0 + window.measure_ns
    total = 0
    while True:
        got, ended = burst(check)
        total += got
        t1 = perf()
        if ended:  # the sender stopped on its own (it should not): keep what came
            return (total / size if stream else total), t1 - t0
        if t1 >= stop_at:
            break
    window.stop()
    while not is_end(length()):
        pass
    return (total / size if stream else total), t1 - t0


def drain_into(
    recv_into: Callable[[bytearray], int], size: int, window: RecvWindow
) -> tuple[float, int]:
    """:meth:`Side.drain` for sides that receive one message into a buffer."""
    buf = bytearray(size)

    def length() -> int:
        return recv_into(buf)

    def burst(n: int) -> tuple[int, bool]:
        for i in range(n):
            if recv_into(buf) != size:
                return i, True
        return n, False

    return drain_with(length, burst, size, window)


def drain_stream(
    read_into: Callable[[bytearray], int], size: int, window: RecvWindow
) -> tuple[float, int]:
    """:meth:`Side.drain` for byte streams: bytes until EOF, counted in messages."""
    buf = bytearray(max(size, 1 << 20))

    def length() -> int:
        return read_into(buf)

    def burst(n: int) -> tuple[int, bool]:
        total = 0
        for _ in range(n):
            got = read_into(buf)
            if not got:
                return total, True
            total += got
        return total, False

    return drain_with(length, burst, size, window, stream=True)


def recv_exact(recv: Callable[[], bytes], first: bytes, size: int) -> bytes:
    """Complete a short stream read; returns fewer than ``size`` bytes only at EOF."""
    parts = [first]
    have = len(first)
    while have < size:
        chunk = recv()
        if not chunk:
            break
        parts.append(chunk[: size - have])
        have += len(chunk)
    return b"".join(parts)


def handshake_child(side: Side) -> Side:
    """Child half of the hello/go exchange that proves both directions work."""
    side.send(HELLO)
    got = side.receiver(1)()
    if got != GO:
        raise RuntimeError(f"handshake: expected {GO!r}, got {got[:16]!r}")
    return side


def handshake_parent(side: Side) -> Side:
    """Parent half of the hello/go exchange."""
    got = side.receiver(1)()
    if got != HELLO:
        raise RuntimeError(f"handshake: expected {HELLO!r}, got {got[:16]!r}")
    side.send(GO)
    return side


# A link is built before the fork and yields one opener per side.
Opener = Callable[[], Side]
LinkMaker = Callable[[Ctx, int], tuple[Opener, Opener]]


def round_trip_case(make: LinkMaker, size: int = 64) -> Callable[[Ctx], Values]:
    """A blocking ping-pong: the parent sends ``size`` bytes, the child echoes them."""

    def run(ctx: Ctx) -> Values:
        parent_open, child_open = make(ctx, size)

        def child() -> None:
            side = child_open()
            recv = side.receiver(size)
            send = side.sender()
            stream = side.stream
            while True:
                data = recv()
                if len(data) != size:
                    if not (stream and data):
                        break
                    data = recv_exact(recv, data, size)
                    if len(data) != size:
                        break
                send(data)
            side.close()

        proc = ctx.spawn(child)
        side = parent_open()
        ctx.close_later(side)
        lat = _ping(side, bytes(size), size, ctx.warmup_ns, ctx.measure_ns)
        side.end_of_data()
        proc.join()
        return latency_values(lat)

    return run


def _ping(side: Side, msg: bytes, size: int, warmup_ns: int, measure_ns: int) -> array[int]:
    send = side.sender()
    recv = side.receiver(size)
    stream = side.stream
    perf = time.perf_counter_ns
    lat: array[int] = array("q")
    record = lat.append
    for phase_ns, keep in ((warmup_ns, False), (measure_ns, True)):
        end = perf() + phase_ns
        while True:
            t0 = perf()
            send(msg)
            data = recv()
            if len(data) != size:
                if stream and data:
                    data = recv_exact(recv, data, size)
                if len(data) != size:
                    raise RuntimeError(f"round trip: got {len(data)} bytes, not {size}")
            t1 = perf()
            if keep:
                record(t1 - t0)
            if t1 >= end:
                break
    return lat


def oneway_case(make: LinkMaker, size: int) -> Callable[[Ctx], Values]:
    """One-way throughput: the child sends ``size``-byte messages, the parent counts.

    The receiver owns the window: it warms up, measures for the case's budget, then
    writes "stop" on a side pipe. The sender sends for at least warm-up plus budget
    (no system call on its hot path until then), then checks the pipe once per batch,
    stops and marks the end of data (EOF or an END message; on a lossy link the END
    repeats until the receiver acknowledges it on the same pipe).
    """

    def run(ctx: Ctx) -> Values:
        ctl_r, ctl_w = os.pipe()  # parent -> child: "stop", then "your END arrived"
        ctx.own_fd(ctl_r, ctl_w)
        parent_open, child_open = make(ctx, size)

        def stopped() -> bool:
            if select.select([ctl_r], [], [], 0)[0]:
                os.read(ctl_r, 1)
                return True
            return False

        def child() -> dict[str, Any]:
            side = child_open()
            sent = side.blast(b"\x5a" * size, SendWindow(ctx.warmup_ns + ctx.measure_ns, stopped))
            if side.lossy:
                while True:
                    side.send(END)
                    if select.select([ctl_r], [], [], 0.002)[0]:
                        break
            else:
                side.end_of_data()
            side.close()
            return {"sent": sent}

        proc = ctx.spawn(child)
        side = parent_open()
        ctx.close_later(side)
        window = RecvWindow(ctx.warmup_ns, ctx.measure_ns, lambda: _poke(ctl_w))
        count, ns = side.drain(size, window)
        if side.lossy:
            _poke(ctl_w)
        info = proc.join()
        if count <= 0 or ns <= 0:
            raise RuntimeError("no message arrived in the measuring window")
        rate = count * 1e9 / ns
        values = {
            "rate": Quantity(rate, "msg/s"),
            "bandwidth": Quantity(rate * size / 1e6, "MB/s"),
            "messages": Quantity(count, "count"),
            "elapsed": Quantity(ns / 1e9, "s"),
            "message_size": Quantity(size, "B"),
        }
        if side.lossy and isinstance(info.get("sent"), int):
            values["sent_total"] = Quantity(info["sent"], "count")
        return values

    return run


def _poke(fd: int) -> None:
    os.write(fd, b"!")


def latency_values(lat: Sequence[int]) -> Values:
    """Percentiles (nearest rank) of per-iteration latencies in ns, reported in µs."""
    if not lat:
        raise RuntimeError("no round trip was measured")
    ordered = sorted(lat)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1e3

    return {
        "p50": Quantity(pct(0.50), "us"),
        "p90": Quantity(pct(0.90), "us"),
        "p99": Quantity(pct(0.99), "us"),
        "p999": Quantity(pct(0.999), "us"),
        "min": Quantity(ordered[0] / 1e3, "us"),
        "max": Quantity(ordered[-1] / 1e3, "us"),
        "mean": Quantity(sum(ordered) / n / 1e3, "us"),
        "iterations": Quantity(n, "count"),
    }


# --- cases and results --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """One measurement: an implementation, a transport and a metric.

    ``impl`` is ``raw``, ``mp``, ``buzon-spin0`` or ``buzon``; ``metric`` is ``rt64``
    (64 B round trip), ``oneway64`` or ``oneway1m`` (one-way throughput).
    """

    impl: str
    transport: str
    metric: str
    run: Callable[[Ctx], Values] = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.impl}/{self.transport}/{self.metric}"


@dataclass(slots=True)
class Result:
    case: Case
    status: Status
    values: Values = field(default_factory=dict)
    note: str = ""
    wall: float = 0.0
    rounds: list[Values] = field(default_factory=list)  # per round, when repeated

    def value(self, name: str) -> float | None:
        if self.status != "ok":
            return None
        q = self.values.get(name)
        return None if q is None else q.value


def combine(results: Sequence[Result]) -> Result:
    """One result from several rounds of a case: the median of every value.

    A round that failed makes the combined result fail too (with the other rounds'
    medians kept for the record), so a flaky case is never hidden by a good round.
    """
    if len(results) == 1:
        return results[0]
    first = results[0]
    ok = [r for r in results if r.status == "ok"]
    bad = [r for r in results if r.status != "ok"]
    values: Values = {}
    for name, q in ok[0].values.items() if ok else ():
        samples = [r.values[name].value for r in ok if name in r.values]
        values[name] = Quantity(statistics.median(samples), q.unit)
    status: Status = "ok"
    note = ""
    if bad:
        status = "error" if any(r.status == "error" for r in bad) else bad[0].status
        note = bad[0].note
        if ok:
            note = f"{len(bad)} of {len(results)} rounds: {note}"
    return Result(
        first.case,
        status,
        values,
        note=note,
        wall=sum(r.wall for r in results),
        rounds=[r.values for r in results],
    )


def run_case(case: Case, config: Config, tmpdir: str, seq: int) -> Result:
    """Run one case; every failure becomes a result, except KeyboardInterrupt."""
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if config.pin is not None:
                stack.callback(os.sched_setaffinity, 0, os.sched_getaffinity(0))
                os.sched_setaffinity(0, {config.pin[0]})
            values = case.run(Ctx(config, tmpdir, seq, stack))
        return Result(case, "ok", values, wall=time.perf_counter() - t0)
    except NotApplicable as exc:
        return Result(case, "n/a", note=str(exc), wall=time.perf_counter() - t0)
    except Skipped as exc:
        return Result(case, "skipped", note=str(exc), wall=time.perf_counter() - t0)
    except Exception as exc:
        if _signalled:  # Ctrl-C reached the peer first and the case failed of it
            raise KeyboardInterrupt from exc
        note = f"{type(exc).__name__}: {exc}".strip()
        return Result(case, "error", note=note, wall=time.perf_counter() - t0)


def choose_cpus() -> tuple[int, int] | None:
    """Two CPUs for parent and child: distinct cores when the topology says which."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(allowed) < 2:
        return None
    first = allowed[0]
    siblings = {first}
    path = f"/sys/devices/system/cpu/cpu{first}/topology/thread_siblings_list"
    with contextlib.suppress(OSError, ValueError), open(path, encoding="ascii") as f:
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            siblings.update(range(int(lo), int(hi or lo) + 1))
    others = [cpu for cpu in allowed if cpu not in siblings] or allowed[1:]
    return first, others[0]


def load_average() -> float | None:
    """The one-minute load average, or None where the OS does not say."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class Progress:
    """``[k/N] case`` on stderr: rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None):
        self._stream = stream if stream is not None else sys.stderr
        self._total = total
        self._enabled = enabled
        self._tty = enabled and self._stream.isatty()
        self._width = len(str(total))

    def start(self, k: int, case_id: str) -> None:
        if not self._enabled:
            return
        line = f"[{k:>{self._width}}/{self._total}] {case_id}"
        if self._tty:
            self._stream.write("\r" + line + "\x1b[K")
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so ``kill`` cleans up like Ctrl-C does, and
    remember either signal: Ctrl-C reaches the whole process group, so a case's peer may
    die of it before this process is interrupted, and that case's failure is then the
    interruption (:func:`run_case`), not an error of the case."""

    def handler(signum: int, frame: FrameType | None) -> None:
        _signalled.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, handler)
    old_int = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


_signalled: list[int] = []  # SIGINT/SIGTERM seen while cases ran
