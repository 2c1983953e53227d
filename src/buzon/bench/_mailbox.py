"""The mailbox rows of issue 10 (``buzon.mailbox``, ``send_to``/``recv_from``).

=================================  ========================================================
rows                               what is measured
=================================  ========================================================
``buzon/mailbox/4p4c``             4 producer x 4 consumer processes over one mailbox
                                   (capacity 1024, policy ``"any"``), 64 B ``bytes``:
                                   the loop and the msg/s of ``_bulk.many_case``, beside
                                   the BoundedBuffer, mp.Queue and faster-fifo rows
``buzon-receipts/mailbox/4p4c``    the same with ``send_async``: each producer keeps up to
                                   256 receipts open and reads the oldest's ``.receiver``
                                   (a ``PeerInfo``) when it has more; target: >= 50% of the
                                   plain row
``IMPL/…/4p4c-dict``               4 x 4 with ``{"id": 12345, "name": "sensor-7",
                                   "value": 3.25}``, each with its default serializer:
                                   the mailbox's codec, mp.Queue's pickle, faster-fifo's
                                   pickle
``buzon-direct/inbox/rt64``        64 B round trip with ``buzon.send_to(pid, b)`` and
                                   ``buzon.recv_from(pid)`` (both processes' inboxes),
                                   the harness's pinned ping-pong; compared with the
                                   ``buzon/shm/rt64`` row (target: <= 2x)
``buzon/mailbox/bcast4``           1 sender, 4 receiver processes of a ``"broadcast"``
                                   mailbox (backlog 1024 each: a full one drops its
                                   oldest), 64 B; msg/s delivered to each receiver over
                                   its own window (first to last message); ``rate`` is
                                   the slowest receiver's, ``mean_rate`` the mean
=================================  ========================================================

Many-process rows are not pinned (8 or 5 processes on however many CPUs there are);
the round trip is pinned like every other round trip. Peers that are not installed
give "not installed" rows (``make bench`` installs faster-fifo).
"""

from __future__ import annotations

import abc
import collections
import functools
import multiprocessing
import os
import select
import time
from collections.abc import Callable
from typing import Any

from ._bulk import _Queue, many_case
from ._harness import (
    END,
    GO,
    HELLO,
    Case,
    Ctx,
    Opener,
    Quantity,
    Side,
    Values,
    round_trip_case,
)
from ._peers import need

__all__ = ["DICT", "mailbox_cases"]

_MSG = 64
_CAPACITY = 1024
_TIMEOUT = 10.0
_RECEIPTS_OPEN = 256
DICT = {"id": 12345, "name": "sensor-7", "value": 3.25}
"""The small Python object of the ``4p4c-dict`` rows."""


def _buzon() -> Any:
    import buzon

    return buzon


# --- 4 x 4, 64 B: _bulk.many_case over a mailbox ----------------------------------------


class _Mailbox(_Queue):
    """A mailbox as a 4p4c queue (``put`` = ``send``, ``get`` = ``recv``)."""

    def __init__(self, ctx: Ctx, policy: str = "any"):
        self._name = ctx.name("-mbox")
        self._box = _buzon().mailbox(self._name, capacity=_CAPACITY, policy=policy, create=True)
        ctx.stack.callback(self._box.remove)
        self.put = self._box.send  # type: ignore[method-assign]
        self.get = self._box.recv  # type: ignore[method-assign]

    def attach(self) -> None:
        self._box = _buzon().mailbox(self._name)
        self.put = self._box.send  # type: ignore[method-assign]
        self.get = self._box.recv  # type: ignore[method-assign]

    def put(self, data: bytes) -> None:
        self._box.send(data)

    def get(self) -> bytes:
        return self._box.recv()  # type: ignore[no-any-return]

    def finish(self) -> None:
        self._box.close()


class _MailboxReceipts(_Mailbox):
    """``send_async``; the producer reads each receipt's ``.receiver`` (up to 256 open)."""

    def attach(self) -> None:
        super().attach()
        self._open: collections.deque[Any] = collections.deque()
        self._pid = os.getpid()
        self.put = self._put_async  # type: ignore[method-assign]

    def _put_async(self, data: bytes) -> None:
        pending = self._open
        pending.append(self._box.send_async(data))
        if len(pending) > _RECEIPTS_OPEN:
            who = pending.popleft().wait(_TIMEOUT)
            if who.pid <= 0 or who.pid == self._pid:  # (_check, inline: once per message)
                raise RuntimeError(f"a receipt named {who!r}, not a consumer")

    def _check(self, who: Any) -> None:
        if who.pid <= 0 or who.pid == self._pid:
            raise RuntimeError(f"a receipt named {who!r}, not a consumer")

    def finish(self) -> None:
        if getattr(self, "_pid", 0) == os.getpid():
            while self._open:
                self._check(self._open.popleft().wait(_TIMEOUT))
        super().finish()


# --- 4 x 4, a dict of three fields ----------------------------------------------------------


class _ObjQueue(abc.ABC):
    """``put(obj)``/``get()`` of Python objects; ``attach()`` in a child, ``finish()``."""

    def attach(self) -> None:  # noqa: B027 - optional hook
        """In the child that uses it (most queues need nothing)."""

    @abc.abstractmethod
    def put(self, obj: Any) -> None:
        """Put one object (waiting for room)."""

    @abc.abstractmethod
    def get(self) -> Any:
        """Take one object (waiting for one)."""

    def finish(self) -> None:  # noqa: B027 - optional hook
        """After the last use in a process (most queues need nothing)."""


class _MailboxObj(_ObjQueue):
    def __init__(self, ctx: Ctx):
        self._q = _Mailbox(ctx)

    def attach(self) -> None:
        self._q.attach()
        self.put = self._q.put  # type: ignore[method-assign,assignment]
        self.get = self._q.get  # type: ignore[method-assign]

    def put(self, obj: Any) -> None:
        self._q.put(obj)

    def get(self) -> Any:
        return self._q.get()

    def finish(self) -> None:
        self._q.finish()


class _MpQueueObj(_ObjQueue):
    def __init__(self, ctx: Ctx):
        self._q: Any = multiprocessing.Queue(_CAPACITY)
        ctx.stack.callback(self._release)

    def attach(self) -> None:
        self.put = self._q.put  # type: ignore[method-assign]
        self.get = self._q.get  # type: ignore[method-assign]

    def put(self, obj: Any) -> None:
        self._q.put(obj)

    def get(self) -> Any:
        return self._q.get()

    def finish(self) -> None:
        self._q.close()
        self._q.join_thread()

    def _release(self) -> None:  # the parent, at the end: its pipe now, not at some gc
        self.finish()
        for conn in (self._q._reader, self._q._writer):
            conn.close()


class _FasterFifoObj(_ObjQueue):
    def __init__(self, ctx: Ctx):
        self._q: Any = need("faster_fifo").Queue(max_size_bytes=1 << 20)  # pickle both ways

    def put(self, obj: Any) -> None:
        self._q.put(obj, True, _TIMEOUT)

    def get(self) -> Any:
        return self._q.get(True, 3600.0)


def many_objects_case(
    make: Callable[[Ctx], _ObjQueue], payload: Any, producers: int = 4, consumers: int = 4
) -> Callable[[Ctx], Values]:
    """``_bulk.many_case`` for Python objects: the end mark is the one ``bytes`` message."""

    def run(ctx: Ctx) -> Values:
        q = make(ctx)
        ctx.unpin()
        send_ns = ctx.warmup_ns + ctx.measure_ns

        def consumer() -> dict[str, Any]:
            q.attach()
            get = q.get
            perf = time.perf_counter_ns
            if type(get()) is bytes:
                return {"count": 0}
            first = last = perf()
            count = 1
            while True:
                for _ in range(32):
                    if type(get()) is bytes:
                        q.finish()
                        return {"count": count, "first": first, "last": last}
                    count += 1
                last = perf()

        def producer() -> dict[str, Any]:
            q.attach()
            put = q.put
            perf = time.perf_counter_ns
            deadline = perf() + send_ns
            sent = 0
            while perf() < deadline:
                for _ in range(64):
                    put(payload)
                sent += 64
            q.finish()
            return {"sent": sent}

        readers = [ctx.spawn(consumer) for _ in range(consumers)]
        writers = [ctx.spawn(producer) for _ in range(producers)]
        sent = sum(w.join(grace=ctx.config.limit)["sent"] for w in reversed(writers))
        q.attach()
        for _ in readers:
            q.put(END)
        got = [r.join(grace=ctx.config.limit) for r in reversed(readers)]
        q.finish()
        return _many_values(sent, got, producers + consumers)

    return run


def _many_values(sent: int, got: list[dict[str, Any]], processes: int) -> Values:
    count = sum(g["count"] for g in got)
    firsts = [g["first"] for g in got if g["count"]]
    lasts = [g["last"] for g in got if g["count"]]
    if count != sent:
        raise RuntimeError(f"{sent} messages sent, {count} received")
    ns = max(lasts) - min(firsts) if firsts else 0
    if ns <= 0:
        raise RuntimeError("no message arrived")
    return {
        "rate": Quantity(count * 1e9 / ns, "msg/s"),
        "messages": Quantity(count, "count"),
        "elapsed": Quantity(ns / 1e9, "s"),
        "processes": Quantity(processes, "count"),
    }


# --- send_to / recv_from round trip ----------------------------------------------------------


class _DirectSide(Side):
    """``send_to(peer)``/``recv_from(peer)``; the peer's pid comes from the hello."""

    def __init__(self, peer: int):
        self._bz = _buzon()
        self.peer = peer

    def sender(self) -> Callable[[bytes], object]:
        return functools.partial(self._bz.send_to, self.peer)

    def receiver(self, size: int) -> Callable[[], bytes]:
        return functools.partial(self._bz.recv_from, self.peer)

    def close(self) -> None:  # drop the cached target (the peer's inbox and pidfd)
        from .. import _direct

        target = _direct._targets.get(self.peer)
        if target is not None:
            _direct._forget(target)


class _ChildDirectSide(_DirectSide):
    def close(self) -> None:  # the child leaves with os._exit: no atexit removes its inbox
        self._bz.inbox().remove()


def _direct_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    bz = _buzon()
    box = bz.inbox()  # the parent's, before the fork: the child's hello has somewhere to go
    ctx.stack.callback(box.remove)
    parent_pid = os.getpid()

    def parent() -> Side:
        hello = bz.inbox().recv_message(_TIMEOUT)
        if hello.body != HELLO:
            raise RuntimeError(f"handshake: expected {HELLO!r}, got {hello.body!r}")
        side = _DirectSide(hello.sender.pid)
        bz.send_to(side.peer, GO)
        return side

    def child() -> Side:
        bz.inbox()  # the child's own (a forked child never uses its parent's)
        bz.send_to(parent_pid, HELLO)
        got = bz.recv_from(parent_pid, _TIMEOUT)
        if got != GO:
            raise RuntimeError(f"handshake: expected {GO!r}, got {got!r}")
        return _ChildDirectSide(parent_pid)

    return parent, child


# --- broadcast, 1 sender -> 4 receivers --------------------------------------------------------


def broadcast_case(receivers: int = 4) -> Callable[[Ctx], Values]:
    """1 sender, ``receivers`` receiver processes of a broadcast mailbox (see the module
    docstring): per-receiver msg/s; ``rate`` is the slowest receiver's."""

    def run(ctx: Ctx) -> Values:
        bz = _buzon()
        from ..errors import Empty

        name = ctx.name("-bcast")
        box = bz.mailbox(name, capacity=_CAPACITY, policy="broadcast", create=True)
        ctx.stack.callback(box.remove)
        ready_r, ready_w = os.pipe()
        ctx.own_fd(ready_r, ready_w)
        ctx.unpin()
        send_ns = ctx.warmup_ns + ctx.measure_ns

        def receiver() -> dict[str, Any]:
            rx = bz.mailbox(name)
            try:
                rx.recv_nowait()  # attaches this receiver (its backlog), then Empty
            except Empty:
                pass
            os.write(ready_w, b"r")
            recv = rx.recv
            perf = time.perf_counter_ns
            if len(recv()) != _MSG:
                rx.close()
                return {"count": 0}
            first = last = perf()
            count = 1
            while True:
                for _ in range(32):
                    if len(recv()) != _MSG:
                        rx.close()
                        return {"count": count, "first": first, "last": last}
                    count += 1
                last = perf()

        def sender() -> dict[str, Any]:
            tx = bz.mailbox(name)
            seen = 0
            while seen < receivers:  # every receiver attached before the first message
                if not select.select([ready_r], [], [], _TIMEOUT)[0]:
                    raise RuntimeError("the receivers did not attach")
                seen += len(os.read(ready_r, receivers - seen))
            send = tx.send
            msg = b"\x5a" * _MSG
            perf = time.perf_counter_ns
            deadline = perf() + send_ns
            sent = 0
            while perf() < deadline:
                for _ in range(64):
                    send(msg)
                sent += 64
            send(END)
            dropped = tx.statistics()["dropped"]
            tx.close()
            return {"sent": sent, "dropped": dropped}

        readers = [ctx.spawn(receiver) for _ in range(receivers)]
        writer = ctx.spawn(sender)
        info = writer.join(grace=ctx.config.limit)
        # the overflow rule may have cost a slow receiver its end mark: repeat it
        deadline = time.monotonic() + ctx.config.limit
        while not all(r._reap(os.WNOHANG) for r in readers) and time.monotonic() < deadline:
            box.send(END)
            time.sleep(0.02)
        got = [r.join(grace=ctx.config.limit) for r in reversed(readers)]
        rates = []
        for g in got:
            ns = g["last"] - g["first"] if g["count"] else 0
            if ns <= 0:
                raise RuntimeError("a receiver got no message")
            rates.append(g["count"] * 1e9 / ns)
        total = sum(g["count"] for g in got)
        return {
            "rate": Quantity(min(rates), "msg/s"),
            "mean_rate": Quantity(sum(rates) / len(rates), "msg/s"),
            "sent": Quantity(info["sent"], "count"),
            "delivered": Quantity(total, "count"),
            "dropped": Quantity(info["dropped"], "count"),
            "receivers": Quantity(receivers, "count"),
        }

    return run


def mailbox_cases() -> list[Case]:
    """The mailbox rows, in report order (see the module docstring)."""
    dict_rows: list[tuple[str, str, Callable[[Ctx], _ObjQueue]]] = [
        ("buzon", "mailbox", _MailboxObj),
        ("mp", "Queue", _MpQueueObj),
        ("faster-fifo", "queue", _FasterFifoObj),
    ]
    return [
        Case("buzon", "mailbox", "4p4c", many_case(_Mailbox)),
        Case("buzon-receipts", "mailbox", "4p4c", many_case(_MailboxReceipts)),
        *(Case(i, t, "4p4c-dict", many_objects_case(m, DICT)) for i, t, m in dict_rows),
        Case("buzon-direct", "inbox", "rt64", round_trip_case(_direct_link)),
        Case("buzon", "mailbox", "bcast4", broadcast_case()),
    ]
