"""RPC cases: ``add(a, b)`` from this process to a server in the forked peer, one call
at a time, over a Unix socket: ``buzon.rpc`` against ``multiprocessing.managers``;
``buzon.rpc`` over ``shm:`` too, and with ``semantics="exactly_once"`` (the in-memory
completion table) over ``unix:``. The other libraries' rows are in ``_rpcpeers.py``.

Both report calls/s over the measured window (``rate``) and the per-call latency
percentiles. The server runs in the child; the parent connects (retrying until the
child has bound), warms up, measures, then asks the server to stop.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from collections.abc import Callable
from typing import Any

from ._harness import Case, Ctx, Quantity, Values, latency_values

__all__ = ["measure_calls", "rpc_cases"]


def measure_calls(ctx: Ctx, call: Callable[[int, int], int], share: float = 1.0) -> Values:
    """Call ``call(i, 1)`` in a loop (checking the sum): warm up, then measure for
    ``share`` of the case's window; calls/s (``rate``) and the latency percentiles."""
    perf = time.perf_counter_ns
    lat: array[int] = array("q")
    calls = 0
    start = 0
    for phase_ns, keep in ((ctx.warmup_ns, False), (int(ctx.measure_ns * share), True)):
        if keep:
            start = perf()
        end = perf() + phase_ns
        i = 0
        while True:
            t0 = perf()
            if call(i, 1) != i + 1:
                raise RuntimeError("add returned a wrong sum")
            t1 = perf()
            i += 1
            if keep:
                lat.append(t1 - t0)
                calls += 1
            if t1 >= end:
                break
    values = latency_values(lat)
    values["rate"] = Quantity(calls / ((perf() - start) / 1e9), "calls/s")
    return values


def _buzon_rpc(
    ctx: Ctx, spin: float | None = None, scheme: str = "unix", semantics: str = "at_most_once"
) -> Values:
    import buzon

    options: dict[str, Any] = {} if spin is None else {"spin": spin}
    if scheme == "unix":
        url = f"unix:{os.path.join(ctx.tmpdir, f'rpc{ctx.seq}.sock')}"
    else:
        url = f"{scheme}:{ctx.name('rpc')}"

    def child() -> None:
        svc = buzon.rpc.Service("calc")
        srv = buzon.rpc.Server(url, svc, grace=1.0, **options)

        @svc.method
        def add(a: int, b: int) -> int:
            return a + b

        @svc.method
        def stop() -> None:
            threading.Thread(target=srv.shutdown).start()

        srv.serve_forever()

    proc = ctx.spawn(child)
    client = buzon.rpc.connect(url, timeout=30, semantics=semantics, **options)
    try:
        values = measure_calls(ctx, client.add)
        client.notify("stop")
    finally:
        client.close()
    proc.join()
    return values


class _Calc:
    def add(self, a: int, b: int) -> int:
        return a + b


def _managers(ctx: Ctx) -> Values:
    from multiprocessing.managers import BaseManager

    path = os.path.join(ctx.tmpdir, f"mgr{ctx.seq}.sock")
    key = os.urandom(16)

    class _Manager(BaseManager):
        pass

    stopped = threading.Event()
    _Manager.register("Calc", _Calc)
    _Manager.register("stop", callable=stopped.set)

    def child() -> None:
        server = _Manager(address=path, authkey=key).get_server()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        stopped.wait(600)

    proc = ctx.spawn(child)
    deadline = time.monotonic() + 30
    manager: Any = _Manager(address=path, authkey=key)
    while True:
        try:
            manager.connect()
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    calc = manager.Calc()
    values = measure_calls(ctx, calc.add)
    del calc  # released while the server still runs
    try:
        manager.stop()  # the server stops while the proxy of stop's result is being made
    except (EOFError, OSError):
        pass
    proc.join()
    return values


def _socket_floor(ctx: Ctx) -> Values:
    """The floor of any Python RPC over a Unix socket: a blocking socket, ``[id, a,
    b]`` -> ``[id, a + b]`` encoded with msgspec (no framing, no checks, no
    dispatch), the server a bare loop in the child. Not a target: what the other
    rows are measured against when a target asks for more than this (docs)."""
    import socket

    import msgspec

    path = os.path.join(ctx.tmpdir, f"floor{ctx.seq}.sock")
    enc, dec = msgspec.msgpack.encode, msgspec.msgpack.decode
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def child() -> None:
        conn, _ = listener.accept()
        with conn:
            while True:
                msg = conn.recv(4096)
                if not msg:
                    return
                call_id, a, b = dec(msg)
                conn.sendall(enc([call_id, a + b]))

    proc = ctx.spawn(child)
    listener.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    ids = [0]

    def call(a: int, b: int) -> int:
        ids[0] += 1
        sock.sendall(enc([ids[0], a, b]))
        got = dec(sock.recv(4096))
        return int(got[1])

    try:
        values = measure_calls(ctx, call)
    finally:
        sock.close()
    proc.join()
    return values


def rpc_cases() -> list[Case]:
    """``add(a, b)`` calls/s over ``unix:``: buzon.rpc (with ``spin=0``: both ends
    block at once; with the default spin; exactly-once), then
    multiprocessing.managers; buzon.rpc over ``shm:``; the floor of any Python RPC
    over a Unix socket (a bare socket loop)."""
    return [
        Case("buzon-rpc-spin0", "unix", "rpcadd", lambda ctx: _buzon_rpc(ctx, 0.0)),
        Case("buzon-rpc", "unix", "rpcadd", _buzon_rpc),
        Case(
            "buzon-rpc-exactly-once",
            "unix",
            "rpcadd",
            lambda ctx: _buzon_rpc(ctx, semantics="exactly_once"),
        ),
        Case("mp-managers", "unix", "rpcadd", _managers),
        Case("buzon-rpc", "shm", "rpcadd", lambda ctx: _buzon_rpc(ctx, scheme="shm")),
        Case("socket-floor", "unix", "rpcadd", _socket_floor),
    ]
