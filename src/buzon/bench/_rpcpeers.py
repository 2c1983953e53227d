"""The RPC issue's peers: ``add(a, b)`` through Pyro5, RPyC and grpcio, and msgpack-rpc
to Neovim, each measured by the same loop as the ``buzon.rpc`` rows (``_rpc.py``).

One client calls, one call at a time; the server runs in another process. The peers
are the optional group ``bench`` (``make bench``, or ``pip install -e '.[bench]'``); a
missing one gives a "not installed" row, a missing ``nvim`` (``.ci/run`` installs it)
a skipped row.

===========================  ==========================================================
row                          how
===========================  ==========================================================
``pyro5/unix``               a ``Pyro5.api.Daemon`` on a Unix socket (``unixsocket=``),
                             its default thread-pool server; the client's serializer is
                             ``marshal`` (Pyro5's fastest); one ``Proxy``, bound once
``pyro5-default/unix``       the same with Pyro5's default configuration (the client's
                             serializer ``serpent``): the call a user who sets nothing
                             makes
``rpyc/unix``                ``rpyc.ThreadedServer(socket_path=)`` with a service whose
                             ``exposed_add`` adds; ``unix_connect``; the netref of
                             ``root.add`` is looked up once
``rpyc-default/unix``        the same, each call written ``conn.root.add(a, b)`` as in
                             RPyC's documentation (the lookup of ``add`` on the root
                             netref is a request of its own)
``grpcio/unix``              ``grpc.server`` (4 worker threads) on ``unix:PATH``, the
                             method ``/calc.Calc/Add`` registered with a generic handler
                             (no ``.proto`` compile step): request and reply are packed
                             with ``struct`` (cheaper than protobuf). gRPC does not
                             survive a fork once it started, so the client runs in a
                             forked child of its own (on the parent's CPU) and the
                             parent never imports grpc
``buzon-msgpack-rpc/nvim``   ``buzon.rpc.connect("unix:PATH", wire="msgpack-rpc")`` to
                             ``nvim --headless --clean -n --listen PATH`` (on the
                             child's CPU, as the other servers), calling
                             ``nvim_call_function("BuzonAdd", [a, b])`` (a Vim function
                             defined once); value ``bare``: the same requests from a
                             bare loop (a socket, ``msgspec`` encoding, ``msgpack``'s
                             streaming ``Unpacker``) against the same nvim, alternated
                             with buzon's in four slices of the measured window
===========================  ==========================================================
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from ._harness import Case, Ctx, Quantity, Skipped, Values
from ._peers import need
from ._rpc import measure_calls

__all__ = ["rpc_peer_cases"]

# the peers are imported through need()/_module() (typed Any): mypy checks this file
# whether they are installed or not

_CONNECT = 30.0  # seconds to wait for a server to come up


def _module(name: str) -> Any:
    """A submodule of a peer whose package :func:`need` found."""
    return importlib.import_module(name)


def _retry(connect: Callable[[], Any]) -> Any:
    """``connect()`` until the child's server has bound (or ``_CONNECT`` passes)."""
    deadline = time.monotonic() + _CONNECT
    while True:
        try:
            return connect()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# --- Pyro5 --------------------------------------------------------------------------


def _pyro5(ctx: Ctx, serializer: str | None = "marshal") -> Values:
    """``serializer``: the client's (``marshal``, Pyro5's fastest), or None: Pyro5's
    default configuration (``serpent``), as a user who sets nothing gets."""
    pyro5 = need("Pyro5")
    path = ctx.path("pyro")

    def child() -> None:
        api = _module("Pyro5.api")
        stopped = threading.Event()

        @api.expose
        class Calc:
            def add(self, a: int, b: int) -> int:
                return a + b

            def stop(self) -> None:
                stopped.set()

        daemon = api.Daemon(unixsocket=path)
        daemon.register(Calc(), "calc")
        threading.Thread(target=daemon.requestLoop, daemon=True).start()
        stopped.wait(600)
        time.sleep(0.05)  # the reply to stop() goes out first
        daemon.shutdown()

    proc = ctx.spawn(child)
    api = _module("Pyro5.api")
    before = pyro5.config.SERIALIZER
    if serializer is not None:
        pyro5.config.SERIALIZER = serializer  # marshal: Pyro5's fastest serializer

    def connect() -> Any:
        proxy = api.Proxy(f"PYRO:calc@./u:{path}")
        proxy._pyroBind()
        return proxy

    try:
        proxy = _retry(connect)
        try:
            values = measure_calls(ctx, proxy.add)
            proxy.stop()
        finally:
            proxy._pyroRelease()
    finally:
        pyro5.config.SERIALIZER = before  # the next row gets its own configuration
    proc.join()
    return values


# --- RPyC ---------------------------------------------------------------------------


def _rpyc(ctx: Ctx, bound: bool = True) -> Values:
    """``bound``: the netref of ``root.add`` looked up once; False: every call is
    ``conn.root.add(a, b)`` as written in RPyC's documentation (the attribute lookup
    is a request of its own)."""
    rpyc = need("rpyc")
    path = ctx.path("rpyc")

    def child() -> None:
        server_cls = _module("rpyc.utils.server").ThreadedServer
        stopped = threading.Event()

        def exposed_add(self: object, a: int, b: int) -> int:
            return a + b

        def exposed_stop(self: object) -> None:
            stopped.set()

        # the service class, made with type(): its base comes from need() (typed Any)
        service = type(
            "CalcService",
            (rpyc.Service,),
            {"exposed_add": exposed_add, "exposed_stop": exposed_stop},
        )

        server = server_cls(service, socket_path=path)
        threading.Thread(target=server.start, daemon=True).start()
        stopped.wait(600)
        time.sleep(0.05)
        server.close()

    proc = ctx.spawn(child)
    unix_connect = _module("rpyc.utils.factory").unix_connect
    conn = _retry(lambda: unix_connect(path))
    try:
        if bound:
            values = measure_calls(ctx, conn.root.add)
        else:
            values = measure_calls(ctx, lambda a, b: conn.root.add(a, b))
        conn.root.stop()
    finally:
        conn.close()
    proc.join()
    return values


# --- grpcio -------------------------------------------------------------------------

_PAIR = struct.Struct("<qq")
_ONE = struct.Struct("<q")
_ADD = "/calc.Calc/Add"
_STOP = "/calc.Calc/Stop"


def _grpcio(ctx: Ctx) -> Values:
    need("grpc")  # only to report "not installed": this process never starts grpc
    path = ctx.path("grpc")

    def server() -> None:
        from concurrent import futures

        grpc = need("grpc")
        stopped = threading.Event()

        def add(request: bytes, context: Any) -> bytes:
            a, b = _PAIR.unpack(request)
            return _ONE.pack(a + b)

        def stop(request: bytes, context: Any) -> bytes:
            stopped.set()
            return b""

        handler = grpc.method_handlers_generic_handler(
            "calc.Calc",
            {
                "Add": grpc.unary_unary_rpc_method_handler(add),
                "Stop": grpc.unary_unary_rpc_method_handler(stop),
            },
        )
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        srv.add_generic_rpc_handlers((handler,))
        srv.add_insecure_port(f"unix:{path}")
        srv.start()
        stopped.wait(600)
        srv.stop(0.5).wait()

    cpu = ctx.config.pin[0] if ctx.pinned and ctx.config.pin is not None else None

    def client() -> dict[str, Any]:
        grpc = need("grpc")

        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # the parent's CPU: one process per CPU
        with grpc.insecure_channel(f"unix:{path}") as channel:
            grpc.channel_ready_future(channel).result(timeout=_CONNECT)
            add_rpc = channel.unary_unary(_ADD)
            stop_rpc = channel.unary_unary(_STOP)

            def add(a: int, b: int) -> int:
                return int(_ONE.unpack(add_rpc(_PAIR.pack(a, b)))[0])

            values = measure_calls(ctx, add)
            stop_rpc(b"")
        return {name: [q.value, q.unit] for name, q in values.items()}

    srv = ctx.spawn(server)
    got = ctx.spawn(client).join()
    srv.join()
    return {name: Quantity(float(v), str(u)) for name, (v, u) in got.items()}


# --- Neovim -------------------------------------------------------------------------

_ADD_FN = "function! BuzonAdd(a, b)\n  return a:a + a:b\nendfunction"


class _Bare:
    """A bare msgpack-rpc client: one socket, encode, send, read until the response."""

    def __init__(self, path: str) -> None:
        import msgspec

        msgpack = need("msgpack")

        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()  # nvim is not listening yet: _retry tries again
            raise
        self._encode = msgspec.msgpack.Encoder().encode
        self._unpacker = msgpack.Unpacker()
        self._id = 0

    def call(self, method: str, params: list[Any]) -> Any:
        self._id += 1
        self._sock.sendall(self._encode([0, self._id, method, params]))
        unpacker = self._unpacker
        while True:
            for msg in unpacker:
                if msg[0] == 1 and msg[1] == self._id:
                    if msg[2] is not None:
                        raise RuntimeError(f"nvim: {msg[2]}")
                    return msg[3]
            data = self._sock.recv(65536)
            if not data:
                raise EOFError("nvim closed the connection")
            unpacker.feed(data)

    def close(self) -> None:
        self._sock.close()


def _nvim(ctx: Ctx) -> Values:
    import buzon

    nvim = shutil.which("nvim")
    if nvim is None:
        raise Skipped("nvim not found (apt-get install neovim; .ci/run installs it)")
    need("msgpack")
    path = ctx.path("nvim")
    proc = subprocess.Popen(
        [nvim, "--headless", "--clean", "-n", "--listen", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if ctx.pinned and ctx.config.pin is not None:  # nvim is the server: the child's CPU
        with contextlib.suppress(OSError):
            os.sched_setaffinity(proc.pid, {ctx.config.pin[1]})
    try:
        bare = _retry(lambda: _Bare(path))
        ctx.close_later(bare)
        bare.call("nvim_exec", [_ADD_FN, False])
        client = buzon.rpc.connect(f"unix:{path}", wire="msgpack-rpc", timeout=30)
        ctx.close_later(client)

        def via_buzon(a: int, b: int) -> int:
            return client.call("nvim_call_function", "BuzonAdd", [a, b])  # type: ignore[no-any-return]

        def via_bare(a: int, b: int) -> int:
            return bare.call("nvim_call_function", ["BuzonAdd", [a, b]])  # type: ignore[no-any-return]

        # alternate: bare, buzon, bare, buzon, each a quarter... of the window twice
        rates: dict[str, list[float]] = {"bare": [], "buzon": []}
        kept: Values = {}
        for name, fn in (("bare", via_bare), ("buzon", via_buzon)) * 2:
            values = measure_calls(ctx, fn, share=0.5)
            rates[name].append(values["rate"].value)
            if name == "buzon":
                kept = values
        kept["rate"] = Quantity(sum(rates["buzon"]) / 2, "calls/s")
        kept["bare"] = Quantity(sum(rates["bare"]) / 2, "calls/s")
        return kept
    finally:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def rpc_peer_cases() -> list[Case]:
    """``add(a, b)`` calls/s through the peers (Pyro5, RPyC, grpcio over ``unix:``) and
    msgpack-rpc to Neovim (buzon's client; value ``bare``: a bare loop)."""
    return [
        Case("pyro5", "unix", "rpcadd", _pyro5),
        Case("pyro5-default", "unix", "rpcadd", lambda ctx: _pyro5(ctx, None)),
        Case("rpyc", "unix", "rpcadd", _rpyc),
        Case("rpyc-default", "unix", "rpcadd", lambda ctx: _rpyc(ctx, False)),
        Case("grpcio", "unix", "rpcadd", _grpcio),
        Case("buzon-msgpack-rpc", "nvim", "rpcadd", _nvim),
    ]
