"""The shared-memory issue's peers, measured by the same harness and loops as buzon.

Each peer is used the way its documentation recommends for speed, moving raw bytes
(no pickling where the library lets us avoid it), and its rows are skipped with
"not installed" when the library is missing (``make bench`` installs them all:
``pip install -e '.[bench]'``).

==========================  ===============================================================
rows                        link
==========================  ===============================================================
``zmq/pair-ipc``            pyzmq ``PAIR`` sockets over ``ipc://`` (a path in the run's
                            temporary dir); ``send``/``recv`` of ``bytes``; 1 MiB messages
                            are sent with ``copy=False`` and received with ``recv_into``
``faster-fifo/queue``       two ``faster_fifo.Queue`` (one per direction) made before the
                            fork, raw bytes (``dumps``/``loads`` that do not pickle);
                            ``faster-fifo-batch``: ``put_many``/``get_many``, 64 per call
``iceoryx2/pubsub``         two iceoryx2 publish-subscribe services of ``Slice[c_uint8]``
                            (one per direction), no overflow, ``RetryUntilDelivered``; the
                            publisher loans a sample and fills it (``memmove``), the
                            subscriber copies the payload out and spins on ``receive()``
                            (iceoryx2's receive never blocks; waiting on its events is
                            slower than spinning, which is how it is fastest)
``mp/Queue``                two ``multiprocessing.Queue`` (bounded: 1000 items, 64 for
                            1 MiB, so the feeder thread cannot queue seconds of backlog)
==========================  ===============================================================

Every peer object that needs a process of its own (a ZeroMQ context, an iceoryx2
node) is made after the fork, on each side.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from ._harness import (
    Case,
    Ctx,
    Opener,
    RecvWindow,
    SendWindow,
    Side,
    Skipped,
    drain_into,
    drain_with,
    handshake_child,
    handshake_parent,
)
from ._raw import cases_for

__all__ = [
    "PEERS",
    "IoxNode",
    "NotInstalled",
    "ZmqSide",
    "fifo_queue",
    "iox_receive",
    "iox_send",
    "need",
    "not_installed_reason",
    "peer_cases",
]

# (import name, distribution) of every peer; numpy is needed by the numpy64m rows only
PEERS = {
    "zmq": "pyzmq",
    "faster_fifo": "faster-fifo",
    "iceoryx2": "iceoryx2",
    "numpy": "numpy",
    # the RPC peers (_rpcpeers.py); msgpack: the bare loop against Neovim
    "Pyro5": "Pyro5",
    "rpyc": "rpyc",
    "grpc": "grpcio",
    "msgpack": "msgpack",
}
_WAIT = 3600.0  # faster-fifo blocks at most this long (its default is 10 s)
_BIG = 1 << 16


class NotInstalled(Skipped):
    """A peer library is missing: its rows are reported as not installed."""


def need(module: str) -> Any:
    """Import a peer library, or raise :class:`NotInstalled` naming how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        dist = PEERS.get(module, module)
        raise NotInstalled(
            f"not installed: {dist} (pip install -e '.[bench]', or make bench)"
        ) from None


# --- pyzmq --------------------------------------------------------------------


class ZmqSide(Side):
    """A connected ``PAIR`` socket and its own context.

    ``lossy``: when the sender disconnects, messages still queued in the receiver's pipe
    can be dropped (seen here about once in 15 short runs: the end mark never came), so
    the sender repeats its end mark until the receiver acknowledges it on the side pipe,
    as for UDP, and only then closes.
    """

    lossy = True

    def __init__(self, zmq: Any, url: str, bind: bool, size: int, hwm: int = 0):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PAIR)
        if hwm:  # big messages: a short queue, or the END waits behind gigabytes
            self._sock.setsockopt(zmq.SNDHWM, hwm)
            self._sock.setsockopt(zmq.RCVHWM, hwm)
        # the child's END must get out before its context ends; the parent drops leftovers
        self._sock.setsockopt(zmq.LINGER, 0 if bind else 5000)
        if bind:
            self._sock.bind(url)
        else:
            self._sock.connect(url)
        self._size = size

    @property
    def socket(self) -> Any:
        return self._sock

    def sender(self) -> Callable[[bytes], object]:
        if self._size >= _BIG:  # large messages: pyzmq's zero-copy send
            return functools.partial(self._sock.send, copy=False)
        return self._sock.send  # type: ignore[no-any-return]

    def receiver(self, size: int) -> Callable[[], bytes]:
        return self._sock.recv  # type: ignore[no-any-return]

    def drain(self, size: int, window: RecvWindow) -> tuple[float, int]:
        if size >= _BIG:
            return drain_into(self._sock.recv_into, size, window)
        return super().drain(size, window)

    def close(self) -> None:
        if not self._ctx.closed:
            self._sock.close()
            self._ctx.term()


def zmq_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    zmq = need("zmq")
    url = "ipc://" + ctx.path("zmq.ipc")

    def parent() -> Side:
        side = ZmqSide(zmq, url, True, size)
        ctx.close_later(side)
        return handshake_parent(side)

    def child() -> Side:
        return handshake_child(ZmqSide(zmq, url, False, size))

    return parent, child


# --- faster-fifo --------------------------------------------------------------


def fifo_queue(ff: Any, nbytes: int, views: bool = False) -> Any:
    """A faster-fifo queue of raw bytes: ``dumps`` passes them through, ``loads`` copies
    them out of the queue's receive buffer (a memoryview it reuses), or with ``views``
    returns that memoryview, valid until the next ``get`` (for ``recv_into``)."""
    return ff.Queue(max_size_bytes=nbytes, loads=_identity if views else bytes, dumps=_identity)


def _identity(data: Any) -> Any:
    return data


class FifoSide(Side):
    """Two faster-fifo queues; ``batch``: 64 messages per ``put_many``/``get_many``."""

    def __init__(self, rq: Any, wq: Any, batch: bool = False):
        self._rq = rq
        self._wq = wq
        self._batch = batch

    def sender(self) -> Callable[[bytes], object]:
        return functools.partial(self._wq.put, block=True, timeout=_WAIT)

    def receiver(self, size: int) -> Callable[[], bytes]:
        return functools.partial(self._rq.get, True, _WAIT)

    def blast(self, msg: bytes, window: SendWindow) -> int:
        if not self._batch:
            return super().blast(msg, window)
        put_many = self._wq.put_many
        group = [msg] * 64
        perf = time.perf_counter_ns
        deadline = perf() + window.min_ns
        sent = 0
        while True:
            put_many(group, True, _WAIT)
            sent += 64
            if perf() >= deadline and window.stopped():
                return sent

    def drain(self, size: int, window: RecvWindow) -> tuple[float, int]:
        if size >= _BIG:  # one copy, into the caller's buffer (like recv_bytes_into)
            get = functools.partial(self._rq.get, True, _WAIT)

            def recv_into(buf: bytearray) -> int:
                view = get()
                n = len(view)
                buf[:n] = view
                return n

            return drain_into(recv_into, size, window)
        if not self._batch:
            return super().drain(size, window)
        get_many = functools.partial(self._rq.get_many, True, _WAIT, 64)
        pending: list[bytes] = []

        def length() -> int:
            if not pending:
                pending.extend(reversed(get_many()))
            return len(pending.pop())

        def burst(n: int) -> tuple[int, bool]:
            got = list(reversed(pending)) if pending else get_many()
            pending.clear()
            for i, item in enumerate(got):
                if len(item) != size:
                    return i, True
            return len(got), False

        return drain_with(length, burst, size, window)


def fifo_link(batch: bool = False) -> Callable[[Ctx, int], tuple[Opener, Opener]]:
    def make(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
        ff = need("faster_fifo")
        nbytes = max(1 << 20, 64 * size)  # room for 64 messages (the default is 1 MB)
        up = fifo_queue(ff, nbytes, views=size >= _BIG)  # child -> parent
        down = fifo_queue(ff, max(1 << 20, 16 * size))  # echoes and control messages

        def parent() -> Side:
            return handshake_parent(FifoSide(up, down, batch))

        def child() -> Side:
            return handshake_child(FifoSide(down, up, batch))

        return parent, child

    return make


# --- iceoryx2 -----------------------------------------------------------------


class IoxNode:
    """An iceoryx2 node of this process with its publish-subscribe services.

    Signal handling is off (the harness owns SIGINT/SIGTERM). :meth:`close` drops every
    port and the node explicitly: a forked child leaves with ``os._exit``, which runs no
    destructor, and a node never dropped is a dead node whose files stay behind.
    """

    def __init__(self) -> None:
        self.iox = iox = need("iceoryx2")
        iox.set_log_level(iox.LogLevel.Error)
        self._ports: list[Any] = []
        self._services: list[Any] = []
        self.node = (
            iox.NodeBuilder.new()
            .signal_handling_mode(iox.SignalHandlingMode.Disabled)
            .create(iox.ServiceType.Ipc)
        )

    def service(self, name: str, buffer: int) -> Any:
        iox = self.iox
        svc = (
            self.node.service_builder(iox.ServiceName.new(name))
            .publish_subscribe(iox.Slice[ctypes.c_uint8])
            .enable_safe_overflow(False)
            .subscriber_max_buffer_size(buffer)
            .history_size(0)
            .max_publishers(1)
            .max_subscribers(1)
            .open_or_create()
        )
        self._services.append(svc)
        return svc

    def publisher(self, svc: Any, max_len: int) -> Any:
        iox = self.iox
        pub = (
            svc.publisher_builder()
            .initial_max_slice_len(max_len)
            .backpressure_strategy(iox.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        self._ports.append(pub)
        return pub

    def subscriber(self, svc: Any, buffer: int) -> Any:
        sub = svc.subscriber_builder().buffer_size(buffer).create()
        self._ports.append(sub)
        return sub

    @staticmethod
    def wait_for_subscriber(svc: Any, pub: Any, limit: float = 10.0) -> None:
        deadline = time.monotonic() + limit
        while svc.dynamic_config.number_of_subscribers < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("iceoryx2: the peer's subscriber never appeared")
            time.sleep(0.0005)
        pub.update_connections()

    def close(self) -> None:
        while self._ports:
            with contextlib.suppress(Exception):
                self._ports.pop().delete()
        self._services.clear()
        self.__dict__.pop("node", None)
        gc.collect()


def iox_send(pub: Any, data: bytes) -> None:
    """Loan a sample of ``len(data)`` bytes, fill it, send it."""
    sample = pub.loan_slice_uninit(len(data))
    ctypes.memmove(sample.payload_ptr, data, len(data))
    sample.assume_init().send()


def iox_receive(sub: Any) -> Any:
    """Spin until a sample arrives."""
    receive = sub.receive
    while True:
        sample = receive()
        if sample is not None:
            return sample


class IoxSide(Side):
    """A publisher to the peer and a subscriber from it."""

    def __init__(self, node: IoxNode, pub: Any, sub: Any):
        self._node = node
        self._pub = pub
        self._sub = sub

    def sender(self) -> Callable[[bytes], object]:
        return functools.partial(iox_send, self._pub)

    def receiver(self, size: int) -> Callable[[], bytes]:
        receive = self._sub.receive
        string_at = ctypes.string_at

        def recv() -> bytes:
            while True:
                sample = receive()
                if sample is not None:
                    payload = sample.payload()
                    data = string_at(payload.data_ptr, payload.number_of_elements)
                    sample.delete()
                    return data

        return recv

    def drain(self, size: int, window: RecvWindow) -> tuple[float, int]:
        if size < _BIG:
            return super().drain(size, window)
        buf = bytearray(size)
        dest = ctypes.addressof((ctypes.c_char * size).from_buffer(buf))
        sub = self._sub

        def recv_into(_: bytearray) -> int:
            sample = iox_receive(sub)
            payload = sample.payload()
            n = payload.number_of_elements
            ctypes.memmove(dest, payload.data_ptr, min(n, size))
            sample.delete()
            return int(n)

        return drain_into(recv_into, size, window)

    def close(self) -> None:
        self._node.close()


def iox_link(buffer: int = 64) -> Callable[[Ctx, int], tuple[Opener, Opener]]:
    """Two services, ``up`` (child to parent) and ``down``; ``buffer`` samples each."""

    def make(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
        need("iceoryx2")
        base = f"buzon-bench/{os.getpid()}/{ctx.seq}"

        def open_side(tx: str, rx: str) -> Side:
            node = IoxNode()
            try:
                out = node.service(tx, buffer)
                pub = node.publisher(out, max(size, 64))
                sub = node.subscriber(node.service(rx, buffer), buffer)
                node.wait_for_subscriber(out, pub)
            except BaseException:
                node.close()
                raise
            return IoxSide(node, pub, sub)

        def parent() -> Side:
            side = open_side(base + "/down", base + "/up")
            ctx.close_later(side)
            return handshake_parent(side)

        def child() -> Side:
            return handshake_child(open_side(base + "/up", base + "/down"))

        return parent, child

    return make


# --- multiprocessing.Queue ----------------------------------------------------


class MpQueueSide(Side):
    """Two ``multiprocessing.Queue``; :meth:`close` flushes this side's feeder thread."""

    def __init__(self, rq: Any, wq: Any):
        self._rq = rq
        self._wq = wq

    def sender(self) -> Callable[[bytes], object]:
        return self._wq.put  # type: ignore[no-any-return]

    def receiver(self, size: int) -> Callable[[], bytes]:
        return self._rq.get  # type: ignore[no-any-return]

    def close(self) -> None:
        for q in (self._wq, self._rq):
            q.close()
            q.join_thread()


def mp_queue_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    items = 64 if size >= _BIG else 1000
    up: Any = multiprocessing.Queue(items)
    down: Any = multiprocessing.Queue(items)

    def parent() -> Side:
        side = MpQueueSide(up, down)
        ctx.close_later(side)
        return handshake_parent(side)

    def child() -> Side:
        return handshake_child(MpQueueSide(down, up))

    return parent, child


def peer_cases() -> list[Case]:
    """rt64, oneway64 and oneway1m of every peer, in report order."""
    cases = cases_for("iceoryx2", "pubsub", iox_link())
    cases += cases_for("zmq", "pair-ipc", zmq_link)
    cases += cases_for("faster-fifo", "queue", fifo_link())
    batched = cases_for("faster-fifo-batch", "queue", fifo_link(batch=True))
    cases += [c for c in batched if c.metric == "oneway64"]
    cases += cases_for("mp", "Queue", mp_queue_link)
    return cases


def not_installed_reason(module: str) -> str | None:
    """Why a peer's rows will be skipped, or None when it imports."""
    try:
        need(module)
    except NotInstalled as exc:
        return str(exc)
    return None
