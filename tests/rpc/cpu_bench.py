"""CPU per call of add(a, b), one call at a time, two processes, and the floor.

Usage: python tests/rpc/cpu_bench.py [CALLS] [CASE,CASE...]

For each case a server process is forked, the client in this process calls ``add(i,
1)`` CALLS times (after a warm-up), and the CPU both processes spent in that window is
read from ``/proc/PID/stat`` (the client's with ``time.process_time``): microseconds
per call, client, server and their sum. CPU per call is what to compare on a loaded
machine, where calls/s swing with the load; the quiet-run calls/s are the bench rows.

Cases (a blocking Unix socket unless named otherwise):
  floor      a bare Python loop: msgspec ``[id, a, b]`` -> ``[id, a + b]``, one send and
             one recv a side, nothing else (the least any Python RPC spends on a call)
  managers   multiprocessing.managers (pickle)
  pyro5      Pyro5 with ``marshal`` (its fastest serializer); pyro5def: its default
  rpyc       RPyC, the ``root.add`` netref bound once; rpycdef: ``conn.root.add(...)``
  rpc0       buzon.rpc over unix:, ``spin=0``; rpceo0: the same, exactly_once
  shm0       buzon.rpc over shm:, ``spin=0``
To compare two versions of buzon, run it with ``PYTHONPATH=OTHER/src`` (each case
imports buzon from there) and alternate the runs.
(A measuring script, not part of the test suite.)
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

_DIR = tempfile.mkdtemp()
_TICK = os.sysconf("SC_CLK_TCK")

Call = Callable[[int, int], Any]


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, all threads


def _run(
    calls: int, server: Callable[[], None], connect: Callable[[], tuple[Call, Callable[[], Any]]]
) -> tuple[float, float]:
    pid = os.fork()
    if pid == 0:
        try:
            server()
        finally:
            os._exit(0)
    end = time.monotonic() + 30
    while True:
        try:
            call, close = connect()
            break
        except Exception:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)
    try:
        for i in range(min(2000, calls)):
            call(i, 1)
        c0, s0 = time.process_time(), _proc_cpu(pid)
        for i in range(calls):
            if call(i, 1) != i + 1:
                raise RuntimeError("add returned a wrong sum")
        c1, s1 = time.process_time(), _proc_cpu(pid)
    finally:
        close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return (c1 - c0) / calls * 1e6, (s1 - s0) / calls * 1e6


def _floor(calls: int) -> tuple[float, float]:
    import msgspec

    enc, dec = msgspec.msgpack.encode, msgspec.msgpack.decode
    path = os.path.join(_DIR, "floor.sock")

    def server() -> None:
        ls = socket.socket(socket.AF_UNIX)
        ls.bind(path)
        ls.listen()
        conn, _ = ls.accept()
        while True:
            msg = conn.recv(4096)
            if not msg:
                return
            call_id, a, b = dec(msg)
            conn.sendall(enc([call_id, a + b]))

    def connect() -> tuple[Call, Callable[[], Any]]:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        ids = [0]

        def call(a: int, b: int) -> Any:
            ids[0] += 1
            sock.sendall(enc([ids[0], a, b]))
            return dec(sock.recv(4096))[1]

        return call, sock.close

    return _run(calls, server, connect)


class _Calc:
    def add(self, a: int, b: int) -> int:
        return a + b


def _managers(calls: int) -> tuple[float, float]:
    from multiprocessing.managers import BaseManager

    class Manager(BaseManager):
        pass

    Manager.register("Calc", _Calc)
    path = os.path.join(_DIR, "mgr.sock")

    def server() -> None:
        Manager(address=path, authkey=b"k").get_server().serve_forever()  # type: ignore[no-untyped-call]

    def connect() -> tuple[Call, Callable[[], Any]]:
        m = Manager(address=path, authkey=b"k")
        m.connect()
        calc: Any = m.Calc()  # type: ignore[attr-defined]
        return calc.add, lambda: None

    return _run(calls, server, connect)


def _pyro5(calls: int, serializer: str) -> tuple[float, float]:
    import importlib

    pyro5: Any = importlib.import_module("Pyro5")
    importlib.import_module("Pyro5.api")
    path = os.path.join(_DIR, f"pyro-{serializer}.sock")

    def server() -> None:
        @pyro5.api.expose  # type: ignore[misc]
        class Calc:
            def add(self, a: int, b: int) -> int:
                return a + b

        daemon = pyro5.api.Daemon(unixsocket=path)
        daemon.register(Calc(), "calc")
        daemon.requestLoop()

    def connect() -> tuple[Call, Callable[[], Any]]:
        pyro5.config.SERIALIZER = serializer
        proxy = pyro5.api.Proxy(f"PYRO:calc@./u:{path}")
        proxy._pyroBind()
        return proxy.add, proxy._pyroRelease

    return _run(calls, server, connect)


def _rpyc(calls: int, bound: bool) -> tuple[float, float]:
    import importlib

    mod: Any = importlib.import_module("rpyc")
    importlib.import_module("rpyc.utils.factory")
    importlib.import_module("rpyc.utils.server")
    path = os.path.join(_DIR, f"rpyc-{bound}.sock")

    def server() -> None:
        def exposed_add(self: object, a: int, b: int) -> int:
            return a + b

        service = type("CalcService", (mod.Service,), {"exposed_add": exposed_add})
        mod.utils.server.ThreadedServer(service, socket_path=path).start()

    def connect() -> tuple[Call, Callable[[], Any]]:
        conn = mod.utils.factory.unix_connect(path)
        if bound:
            return conn.root.add, conn.close
        return (lambda a, b: conn.root.add(a, b)), conn.close

    return _run(calls, server, connect)


def _buzon(calls: int, scheme: str, **options: Any) -> tuple[float, float]:
    import buzon

    name = f"cpubench{os.getpid()}{len(options)}"
    url = f"unix:{os.path.join(_DIR, name)}.sock" if scheme == "unix" else f"shm:{name}"

    def server() -> None:
        svc = buzon.rpc.Service("calc")

        @svc.method
        def add(a: int, b: int) -> int:
            return a + b

        buzon.rpc.Server(url, svc, **options).serve_forever()

    def connect() -> tuple[Call, Callable[[], Any]]:
        client: Any = buzon.rpc.connect(url, timeout=30, **options)
        return client.add, client.close

    return _run(calls, server, connect)


CASES: dict[str, Callable[[int], tuple[float, float]]] = {
    "floor": _floor,
    "managers": _managers,
    "pyro5": lambda n: _pyro5(n, "marshal"),
    "pyro5def": lambda n: _pyro5(n, "serpent"),
    "rpyc": lambda n: _rpyc(n, True),
    "rpycdef": lambda n: _rpyc(n, False),
    "rpc0": lambda n: _buzon(n, "unix", spin=0.0),
    "rpceo0": lambda n: _buzon(n, "unix", spin=0.0, semantics="exactly_once"),
    "shm0": lambda n: _buzon(n, "shm", spin=0.0),
}


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    print("case,client_us,server_us,total_us")
    for name in names:
        client, server = CASES[name](calls)
        print(f"{name},{client:.1f},{server:.1f},{client + server:.1f}", flush=True)


if __name__ == "__main__":
    main()
