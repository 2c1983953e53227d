"""The shared-memory issue's two bulk cases: ``numpy64m`` and ``4p4c``.

``numpy64m``: a 64 MiB ``float64`` array goes from the child to the parent, again and
again, through the one-way loop of :func:`~._harness.oneway_case` (the receiver owns
the window; GB/s = arrays in the window x 64 MiB / its length). The sender's array is
the case's message seen as ``float64``; the receiver ends up with a numpy array over
the data (its own copy, or a view valid until it lets go) and reads its first and
last element. The rows:

=============================  ============================================================
``buzon-loan/shm``             ring level, zero copy: ``Ring.reserve(n)``, the loan filled
                               as a numpy array (``np.copyto``, the one write), ``commit``;
                               the reader ``recv_view()``, ``np.frombuffer``, ``release``
``buzon/shm``                  a ``shm:`` channel: ``send(array)`` / ``recv()``, whatever
                               the channel does for arrays today
``iceoryx2/pubsub``            ``loan_slice_uninit(n)`` filled as a numpy array, ``send``;
                               the subscriber's sample seen as an array, then dropped
``zmq/pair-ipc``               ``send(array, copy=False)``; ``recv(copy=False)``, the frame
                               seen as an array
``mp/Pipe``                    pickle protocol 5 with out-of-band buffers: the pickle,
                               then the raw buffer (``send_bytes``), read with
                               ``recv_bytes_into`` into a fresh array
``faster-fifo/queue``          a 160 MiB queue, ``dumps=ndarray.tobytes``,
                               ``loads`` = a copy out of the queue's buffer
=============================  ============================================================

``4p4c``: 4 producer and 4 consumer processes (not pinned: 8 processes on however many
CPUs there are) share one queue of 64 B messages. Producers send for the warm-up plus
the measuring time; each consumer counts what it gets and notes the time of its first
and last message; when the producers are done the parent puts one end mark per
consumer. msg/s = all messages / (last message anywhere - first message anywhere), the
clock being the system-wide monotonic one. Rows: ``buzon/BoundedBuffer``
(1024 slots of 64 B), ``mp/Queue`` (maxsize 1024) and ``faster-fifo/queue`` (1 MB, raw
bytes).
"""

from __future__ import annotations

import abc
import ctypes
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable
from typing import Any

from ._buzon import api
from ._harness import (
    END,
    Case,
    Ctx,
    Opener,
    Quantity,
    RecvWindow,
    SendWindow,
    Side,
    Values,
    drain_with,
    oneway_case,
)
from ._peers import IoxNode, ZmqSide, fifo_queue, iox_receive, iox_send, need

__all__ = ["NUMPY_BYTES", "bulk_cases", "many_case"]

NUMPY_BYTES = 64 << 20  # module-level so tests can make it small (read at run time)
_MSG = 64
_DTYPE = "<f8"
_TIMEOUT = 10.0


def _array(np: Any, msg: bytes) -> Any:
    return np.frombuffer(msg, _DTYPE)


def _touch(arr: Any) -> int:
    """Read the array's ends (the receiver uses what it got); return its byte size."""
    if arr.size:
        float(arr[0] + arr[-1])
    return int(arr.nbytes)


class _ArraySide(Side, abc.ABC):
    """One-way array sides: ``put(array)`` per message, ``take()`` returns a byte count
    (1 for the end mark); ``mark(b)`` sends a control message."""

    @abc.abstractmethod
    def put(self, arr: Any) -> None: ...

    @abc.abstractmethod
    def take(self) -> int: ...

    @abc.abstractmethod
    def mark(self, data: bytes) -> None: ...

    def send(self, data: bytes) -> None:
        self.mark(data)

    def blast(self, msg: bytes, window: SendWindow) -> int:
        arr = _array(need("numpy"), msg)
        put = self.put
        perf = time.perf_counter_ns
        deadline = perf() + window.min_ns
        sent = 0
        while True:
            put(arr)
            sent += 1
            if perf() >= deadline and window.stopped():
                return sent

    def drain(self, size: int, window: RecvWindow) -> tuple[float, int]:
        take = self.take

        def burst(n: int) -> tuple[int, bool]:
            for i in range(n):
                if take() != size:
                    return i, True
            return n, False

        return drain_with(take, burst, size, window)


# --- buzon: ring loans and shm: channels --------------------------------------


class _LoanSide(_ArraySide):
    def __init__(self, ring: Any):
        self._ring = ring
        self._np = need("numpy")

    def put(self, arr: Any) -> None:
        loan = self._ring.reserve(arr.nbytes)
        self._np.copyto(self._np.frombuffer(loan, _DTYPE), arr)
        loan.commit()

    def take(self) -> int:
        loan = self._ring.recv_view()
        n = len(loan)
        if n != 1:
            n = _touch(self._np.frombuffer(loan, _DTYPE))
        loan.release()
        return n

    def mark(self, data: bytes) -> None:
        self._ring.send(data)

    def close(self) -> None:
        self._ring.close()


def _loan_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    from .. import shm

    need("numpy")
    capacity = 1 << 16
    while capacity < 2 * (size + 4096):  # two arrays in flight
        capacity <<= 1
    ring = shm.create_ring(capacity, label="bench")
    ctx.stack.callback(shm.remove_segment, ring.name)
    ctx.close_later(ring)
    name = ring.name

    def parent() -> Side:
        return _LoanSide(ring)

    def child() -> Side:
        return _LoanSide(shm.attach_ring(name))

    return parent, child


class _ChannelSide(_ArraySide):
    def __init__(self, ch: Any):
        self._ch = ch

    def put(self, arr: Any) -> None:
        self._ch.send(arr)

    def take(self) -> int:
        got = self._ch.recv()
        return len(got) if isinstance(got, bytes) else _touch(got)

    def mark(self, data: bytes) -> None:
        self._ch.send(data)

    def close(self) -> None:
        self._ch.close()


def _channel_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    need("numpy")
    bz = api()
    options = {"max_frame": size + (1 << 20)}  # the array and its frame header
    lst = bz.listen(f"shm:{ctx.name()}", **options)
    ctx.close_later(lst)
    address = str(lst.address)

    def parent() -> Side:
        ch = lst.accept(timeout=_TIMEOUT)
        ctx.close_later(ch)
        return _ChannelSide(ch)

    def child() -> Side:
        return _ChannelSide(bz.connect(address, timeout=_TIMEOUT, **options))

    return parent, child


# --- peers ----------------------------------------------------------------------


class _IoxArraySide(_ArraySide):
    def __init__(self, node: IoxNode, pub: Any, sub: Any):
        self._node = node
        self._pub = pub
        self._sub = sub
        self._np = need("numpy")

    def put(self, arr: Any) -> None:
        n = arr.nbytes
        sample = self._pub.loan_slice_uninit(n)
        dest = (ctypes.c_uint8 * n).from_address(sample.payload_ptr)
        self._np.copyto(self._np.frombuffer(dest, _DTYPE), arr)
        del dest
        sample.assume_init().send()

    def take(self) -> int:
        sample = iox_receive(self._sub)
        payload = sample.payload()
        n = int(payload.number_of_elements)
        if n != 1:
            view = (ctypes.c_uint8 * n).from_address(payload.data_ptr)
            n = _touch(self._np.frombuffer(view, _DTYPE))
            del view
        sample.delete()
        return n

    def mark(self, data: bytes) -> None:
        if self._pub is not None:
            iox_send(self._pub, data)

    def close(self) -> None:
        self._node.close()


def _iox_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    need("iceoryx2")
    need("numpy")
    name = f"buzon-bench/{os.getpid()}/{ctx.seq}/numpy"

    def parent() -> Side:
        node = IoxNode()
        ctx.close_later(node)
        sub = node.subscriber(node.service(name, 2), 2)
        return _IoxArraySide(node, None, sub)

    def child() -> Side:
        node = IoxNode()
        try:
            svc = node.service(name, 2)
            pub = node.publisher(svc, size)
            node.wait_for_subscriber(svc, pub)
        except BaseException:
            node.close()
            raise
        return _IoxArraySide(node, pub, None)

    return parent, child


class _ZmqArraySide(_ArraySide):
    lossy = True  # see ZmqSide

    def __init__(self, side: Any):
        self._side = side
        self._sock = side.socket
        self._np = need("numpy")

    def put(self, arr: Any) -> None:
        self._sock.send(arr, copy=False)

    def take(self) -> int:
        frame = self._sock.recv(copy=False)
        buf = frame.buffer
        return len(buf) if len(buf) == 1 else _touch(self._np.frombuffer(buf, _DTYPE))

    def mark(self, data: bytes) -> None:
        self._sock.send(data)

    def close(self) -> None:
        self._side.close()


def _zmq_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    zmq = need("zmq")
    need("numpy")
    url = "ipc://" + ctx.path("zmq-np.ipc")

    def parent() -> Side:
        side = _ZmqArraySide(ZmqSide(zmq, url, True, size, hwm=2))
        ctx.close_later(side)
        return side

    def child() -> Side:
        return _ZmqArraySide(ZmqSide(zmq, url, False, size, hwm=2))

    return parent, child


class _PipeArraySide(_ArraySide):
    def __init__(self, conn: Any, size: int):
        self._conn = conn
        self._size = size
        self._np = need("numpy")

    def put(self, arr: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []
        head = pickle.dumps(arr, protocol=5, buffer_callback=buffers.append)
        self._conn.send_bytes(head)
        for buf in buffers:
            self._conn.send_bytes(buf.raw())

    def take(self) -> int:
        head = self._conn.recv_bytes()
        if len(head) == 1:
            return 1
        # the pickle refers to one out-of-band buffer: read it into a fresh array
        dest = self._np.empty(self._size // 8, _DTYPE)
        self._conn.recv_bytes_into(dest)
        return _touch(pickle.loads(head, buffers=[dest]))

    def mark(self, data: bytes) -> None:
        self._conn.send_bytes(data)

    def close(self) -> None:
        self._conn.close()


def _pipe_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    need("numpy")
    a, b = multiprocessing.Pipe()
    ctx.close_later(a)
    ctx.close_later(b)

    def parent() -> Side:
        b.close()
        return _PipeArraySide(a, size)

    def child() -> Side:
        a.close()
        return _PipeArraySide(b, size)

    return parent, child


class _FifoArraySide(_ArraySide):
    def __init__(self, q: Any):
        self._q = q
        self._np = need("numpy")

    def put(self, arr: Any) -> None:
        self._q.put(arr, True, _TIMEOUT)

    def take(self) -> int:
        got = self._q.get(True, _TIMEOUT)
        return len(got) if isinstance(got, bytes) else _touch(got)

    def mark(self, data: bytes) -> None:
        self._q.put(data, True, _TIMEOUT)


def _fifo_link(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
    ff = need("faster_fifo")
    np = need("numpy")

    def dumps(obj: Any) -> bytes:  # faster-fifo takes bytes only
        return obj if isinstance(obj, bytes) else obj.tobytes()

    def loads(view: memoryview) -> Any:  # a 1-byte message is the end mark
        if len(view) == 1:
            return bytes(view)
        return np.frombuffer(view, _DTYPE).copy()  # the queue reuses its buffer

    q = ff.Queue(max_size_bytes=2 * size + (32 << 20), loads=loads, dumps=dumps)

    def side() -> Side:
        return _FifoArraySide(q)

    return side, side


def _numpy_case(make: Callable[[Ctx, int], tuple[Opener, Opener]]) -> Callable[[Ctx], Values]:
    def run(ctx: Ctx) -> Values:
        values = oneway_case(make, NUMPY_BYTES)(ctx)
        gbs = values["bandwidth"].value / 1e3
        return {**values, "gbps": Quantity(gbs, "GB/s")}

    return run


# --- 4 producers x 4 consumers ------------------------------------------------


class _Queue(abc.ABC):
    """What a 4p4c row needs: ``put``/``get`` (blocking) in any process, ``attach()`` in
    a child before use, ``finish()`` before a producer returns."""

    def attach(self) -> None:  # noqa: B027 - optional hook
        pass

    @abc.abstractmethod
    def put(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def get(self) -> bytes: ...

    def finish(self) -> None:  # noqa: B027 - optional hook
        pass


class _Bounded(_Queue):
    def __init__(self, ctx: Ctx):
        from .. import BoundedBuffer

        self._name = ctx.name("-bbuf")
        self._bb = BoundedBuffer(self._name, 1024, _MSG)
        ctx.stack.callback(self._bb.remove)
        ctx.close_later(self._bb)

    def attach(self) -> None:
        from .. import BoundedBuffer

        self._bb = BoundedBuffer(self._name)

    def put(self, data: bytes) -> None:
        self._bb.put(data)

    def get(self) -> bytes:
        return self._bb.get()

    def finish(self) -> None:
        self._bb.close()


class _MpQueue(_Queue):
    def __init__(self, ctx: Ctx):
        self._q: Any = multiprocessing.Queue(1024)
        ctx.stack.callback(self.finish)

    def put(self, data: bytes) -> None:
        self._q.put(data)

    def get(self) -> bytes:
        return self._q.get()  # type: ignore[no-any-return]

    def finish(self) -> None:
        self._q.close()
        self._q.join_thread()


class _FasterFifo(_Queue):
    def __init__(self, ctx: Ctx):
        self._q = fifo_queue(need("faster_fifo"), 1 << 20)

    def put(self, data: bytes) -> None:
        self._q.put(data, True, _TIMEOUT)

    def get(self) -> bytes:
        return self._q.get(True, 3600.0)  # type: ignore[no-any-return]


def many_case(
    make: Callable[[Ctx], _Queue], producers: int = 4, consumers: int = 4
) -> Callable[[Ctx], Values]:
    """N producers x M consumers over one queue; total msg/s (see the module docstring)."""

    def run(ctx: Ctx) -> Values:
        q = make(ctx)
        ctx.unpin()
        send_ns = ctx.warmup_ns + ctx.measure_ns

        def consumer() -> dict[str, Any]:
            q.attach()
            get = q.get
            perf = time.perf_counter_ns
            if len(get()) != _MSG:
                return {"count": 0}
            first = last = perf()
            count = 1
            while True:
                for _ in range(32):
                    if len(get()) != _MSG:
                        q.finish()
                        return {"count": count, "first": first, "last": last}
                    count += 1
                last = perf()

        def producer() -> dict[str, Any]:
            q.attach()
            put = q.put
            msg = b"\x5a" * _MSG
            perf = time.perf_counter_ns
            deadline = perf() + send_ns
            sent = 0
            while perf() < deadline:
                for _ in range(64):
                    put(msg)
                sent += 64
            q.finish()
            return {"sent": sent}

        readers = [ctx.spawn(consumer) for _ in range(consumers)]
        writers = [ctx.spawn(producer) for _ in range(producers)]
        # join in reverse order of creation: each child's watchdog restores the SIGUSR1
        # handler that was installed before its own
        sent = sum(w.join(grace=ctx.config.limit)["sent"] for w in reversed(writers))
        for _ in readers:
            q.put(END)
        got = [r.join(grace=ctx.config.limit) for r in reversed(readers)]
        q.finish()
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
            "processes": Quantity(producers + consumers, "count"),
        }

    return run


def bulk_cases() -> list[Case]:
    """numpy64m rows (buzon first), then 4p4c rows."""
    numpy = [
        ("buzon-loan", "shm", _loan_link),
        ("buzon", "shm", _channel_link),
        ("iceoryx2", "pubsub", _iox_link),
        ("zmq", "pair-ipc", _zmq_link),
        ("mp", "Pipe", _pipe_link),
        ("faster-fifo", "queue", _fifo_link),
    ]
    many: list[tuple[str, str, Callable[[Ctx], _Queue]]] = [
        ("buzon", "BoundedBuffer", _Bounded),
        ("mp", "Queue", _MpQueue),
        ("faster-fifo", "queue", _FasterFifo),
    ]
    cases = [Case(i, t, "numpy64m", _numpy_case(make)) for i, t, make in numpy]
    cases += [Case(i, t, "4p4c", many_case(make)) for i, t, make in many]
    return cases
