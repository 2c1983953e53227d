"""``buzon ls`` lists RPC servers with their counters (rpc/_publish.py): what a live
server did, calls in flight, a killed server shown dead and removed by ``buzon clean``,
nothing left behind by a server that stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from _rpc_helpers import serving

from buzon import _forensics, rpc
from buzon.errors import RemoteError
from buzon.rpc import _publish


def _svc(started: threading.Event, release: threading.Event) -> rpc.Service:
    svc = rpc.Service("calc")

    @svc.method
    def add(a: int, b: int) -> int:
        return a + b

    @svc.method
    def slow() -> str:
        started.set()
        release.wait(30)
        return "done"

    return svc


def _rpc_rows(rdir: str) -> list[tuple[str, ...]]:
    return [r for r in _forensics.ls_rows(rdir) if r[1] == "rpc"]


def _wait_for(pred: Any, what: str) -> None:
    end = time.monotonic() + 30
    while not pred():
        assert time.monotonic() < end, what
        time.sleep(0.01)


@pytest.mark.fd_check  # the file, its lock and its mapping go with the server
def test_ls_shows_a_server_with_its_calls_in_flight_and_errors(runtime_dir: str) -> None:
    started, release = threading.Event(), threading.Event()
    with serving("unix:calc", _svc(started, release), name="calc-pub") as srv:
        c = rpc.connect(srv.address)
        try:
            assert [c.call("add", i, 1) for i in range(5)] == [1, 2, 3, 4, 5]
            try:
                c.call("nope")
            except RemoteError:
                pass
            fut = c.call_async("slow")
            assert started.wait(30)
            # a reply is counted just after it is sent: the caller may be first
            _wait_for(lambda: "6 calls" in _rpc_rows(runtime_dir)[0][3], "6 calls")
            (row,) = _rpc_rows(runtime_dir)
            label, _, mode, state, path = row
            assert label == "name:calc-pub" and mode == "0600"
            assert state.startswith(f"live (pid {os.getpid()}, service calc, name calc-pub")
            assert "wire buzon, at_most_once" in state and str(srv.address) in state
            assert "6 calls served, 1 in flight, 1 errors" in state, state
            assert os.path.dirname(path) == os.path.join(runtime_dir, "rpc.d")
            release.set()
            assert fut.result(30) == "done"
            _wait_for(lambda: "0 in flight" in _rpc_rows(runtime_dir)[0][3], "in flight")
            assert "7 calls served" in _rpc_rows(runtime_dir)[0][3]
            assert srv.calls == 7 and srv.errors == 1  # the attributes are the counters
        finally:
            c.close()
    # stopped serving: its file is gone, and the directory with the last one
    assert _rpc_rows(runtime_dir) == []
    assert not os.path.exists(os.path.join(runtime_dir, "rpc.d"))


def test_the_cli_lists_the_server(runtime_dir: str) -> None:
    started, release = threading.Event(), threading.Event()
    with serving("unix:calc", _svc(started, release)) as srv:
        c = rpc.connect(srv.address)
        try:
            c.call("add", 1, 2)
        finally:
            c.close()
        _wait_for(lambda: srv.calls == 1, "the call counted")
        out = subprocess.run(
            [sys.executable, "-m", "buzon", "ls"], capture_output=True, text=True, timeout=60
        ).stdout
    line = next(x for x in out.splitlines() if " rpc " in x)
    assert line.startswith(str(srv.address)), line
    assert "service calc" in line and "1 calls served, 0 in flight, 0 errors" in line


_SERVER = """
import sys
from buzon import rpc
svc = rpc.Service("calc")
@svc.method
def add(a: int, b: int) -> int:
    return a + b
srv = rpc.Server("unix:killed", svc)
print("ready", flush=True)
srv.serve_forever()
"""


def test_a_killed_server_is_shown_dead_and_cleaned(runtime_dir: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        c = rpc.connect("unix:killed")
        try:
            assert c.call("add", 2, 3) == 5
        finally:
            c.close()
        _wait_for(lambda: "1 calls served" in _rpc_rows(runtime_dir)[0][3], "the call counted")
        (row,) = _rpc_rows(runtime_dir)
        assert row[3].startswith(f"live (pid {proc.pid},")
        # not removable while it lives
        assert all("rpc.d" not in r.path for r in _forensics.clean(runtime_dir, dry_run=True))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    (row,) = _rpc_rows(runtime_dir)
    assert row[3].startswith(f"dead (pid {proc.pid},") and "1 calls served" in row[3]
    removed = [r for r in _forensics.clean(runtime_dir) if "rpc.d" in r.path]
    assert [r.path for r in removed] == [row[4]]
    assert removed[0].why == "the counters of an RPC server that died"
    assert _rpc_rows(runtime_dir) == []
    assert not os.path.exists(os.path.join(runtime_dir, "rpc.d"))


def test_a_child_forked_by_the_server_does_not_keep_it_alive(runtime_dir: str) -> None:
    pub = _publish.Publication()
    pub.publish({"instance": "f" * 32, "service": "s", "address": "unix:x", "pid": 1})
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: adds to the shared counters, holds no lock
            try:
                pub.counters[_publish.CALLS] += 3
                os.close(w)
                os.read(r, 1)
            finally:
                os._exit(0)
        os.close(r)
        try:
            _wait_for(lambda: pub.counters[_publish.CALLS] == 3, "the child's calls")
            (got,) = _publish.read_all(runtime_dir)
            assert got.live and got.calls == 3
            # the owner's lock is what says live: gone with this process's descriptor,
            # even though the child still runs
            os.close(pub._fd)
            pub._fd = -1
            (got,) = _publish.read_all(runtime_dir)
            assert not got.live
        finally:
            os.close(w)
            os.waitpid(pid, 0)
    finally:
        assert pub.path is not None
        os.unlink(pub.path)
        pub.close()


def test_mode_process_children_count_in_the_published_counters(runtime_dir: str) -> None:
    started, release = threading.Event(), threading.Event()
    with serving("unix:calc", _svc(started, release), mode="process") as srv:
        for _ in range(2):
            c = rpc.connect(srv.address)
            try:
                assert c.call("add", 1, 1) == 2
            finally:
                c.close()
        _wait_for(lambda: srv.calls == 2, "the children's calls")
        (row,) = _rpc_rows(runtime_dir)
        assert "2 calls served, 0 in flight" in row[3]


def test_scribbled_files_are_skipped_and_never_crash_ls(runtime_dir: str) -> None:
    d = os.path.join(runtime_dir, "rpc.d")
    os.mkdir(d, 0o700)
    for name, data in (
        ("1-a.rpc", b""),
        ("2-b.rpc", b"BZRP" + b"\xff" * 60),
        ("3-c.rpc", b"BZRP\x01\x00\x00\x00\x05\x00\x00\x00" + bytes(52) + b"notjs"),
        ("4-d.rpc", b"XXXX" + bytes(60)),
    ):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    assert _rpc_rows(runtime_dir) == []
    buzon_ls = _forensics.ls_rows(runtime_dir)
    assert all(r[1] != "rpc" for r in buzon_ls)


@pytest.mark.fd_check
def test_an_asyncio_server_is_listed_too(runtime_dir: str) -> None:
    import asyncio

    from buzon.aio import rpc as arpc

    svc = rpc.Service("acalc")

    @svc.method
    async def add(a: int, b: int) -> int:
        return a + b

    async def main() -> None:
        srv = arpc.Server("unix:acalc", svc, name="acalc-pub")
        task = asyncio.create_task(srv.serve_forever())
        try:
            c = await arpc.connect(srv.address, timeout=10)
            async with c:
                assert [await c.add(i, 1) for i in range(3)] == [1, 2, 3]
            for _ in range(3000):  # a reply is counted just after it is sent
                if srv.calls == 3:
                    break
                await asyncio.sleep(0.01)
            (row,) = _rpc_rows(runtime_dir)
            assert row[0] == "name:acalc-pub"
            assert "service acalc" in row[3] and "3 calls served, 0 in flight" in row[3]
        finally:
            srv.shutdown()
            await asyncio.wait_for(task, 15)

    asyncio.run(main())
    assert _rpc_rows(runtime_dir) == []  # its file went with the server


# -- the stream wires: their sessions count calls served and in flight too ---------------


def _raw_call(wire: str, s: Any, msgid: int, method: str, params: list[Any]) -> None:
    import msgspec

    if wire == "msgpack-rpc":
        s.sendall(msgspec.msgpack.encode([0, msgid, method, params]))
    else:
        body = msgspec.json.encode(
            {"jsonrpc": "2.0", "id": msgid, "method": method, "params": params}
        )
        s.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _stream_wire_counts(
    runtime_dir: str, srv: Any, wire: str, started: threading.Event, release: threading.Event
) -> None:
    """Through a raw socket: 3 adds, an unknown method, a slow call held in flight."""
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(srv.address.fs_path())
        for i in range(3):
            _raw_call(wire, s, i + 1, "add", [i, 1])
        _raw_call(wire, s, 4, "nope", [])
        _raw_call(wire, s, 5, "slow", [])
        assert started.wait(30)
        _wait_for(lambda: "4 calls" in _rpc_rows(runtime_dir)[0][3], "4 calls")
        (row,) = _rpc_rows(runtime_dir)
        assert f"wire {wire}" in row[3]
        assert "4 calls served, 1 in flight, 1 errors" in row[3], row[3]
        assert srv.in_flight == 1
        release.set()
        _wait_for(lambda: "0 in flight" in _rpc_rows(runtime_dir)[0][3], "in flight")
        assert "5 calls served" in _rpc_rows(runtime_dir)[0][3]
        assert srv.calls == 5 and srv.errors == 1  # the attributes are the counters
        assert srv.in_flight == 0
    finally:
        s.close()


@pytest.mark.parametrize("wire", ["msgpack-rpc", "jsonrpc"])
def test_a_blocking_stream_wire_server_counts_calls_served_and_in_flight(
    runtime_dir: str, wire: str
) -> None:
    started, release = threading.Event(), threading.Event()
    with serving("unix:swcalc", _svc(started, release), wire=wire) as srv:
        _stream_wire_counts(runtime_dir, srv, wire, started, release)


@pytest.mark.parametrize("wire", ["msgpack-rpc", "jsonrpc"])
def test_an_asyncio_stream_wire_server_counts_calls_served_and_in_flight(
    runtime_dir: str, wire: str
) -> None:
    from _rpc_aio_helpers import aio_serving_in_thread

    started, release = threading.Event(), threading.Event()
    svc = rpc.Service("calc")

    @svc.method
    def add(a: int, b: int) -> int:
        return a + b

    @svc.method
    async def slow() -> str:
        import asyncio

        started.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return "done"

    with aio_serving_in_thread("unix:aswcalc", svc, wire=wire) as srv:
        _stream_wire_counts(runtime_dir, srv, wire, started, release)


def test_a_stream_session_as_a_client_counts_its_own_answers() -> None:
    """A client's session answers the peer's requests: it counts in its own
    (private) counters, never in a server's."""
    import socket

    from buzon.rpc._msgpack import MsgpackRpcClient

    ours, theirs = socket.socketpair()
    svc = rpc.Service("calc")

    @svc.method
    def add(a: int, b: int) -> int:
        return a + b

    class _Sock:
        def read(self, timeout: float) -> bytes | None:
            ours.settimeout(timeout)
            try:
                return ours.recv(65536)
            except TimeoutError:
                return None

        def write(self, data: bytes) -> None:
            ours.sendall(data)

        def close(self) -> None:
            ours.close()

    import msgspec

    session = MsgpackRpcClient(_Sock(), svc, 10)  # type: ignore[arg-type]
    try:
        theirs.sendall(msgspec.msgpack.encode([0, 1, "add", [1, 2]]))
        theirs.settimeout(10)
        assert msgspec.msgpack.decode(theirs.recv(100)) == [1, 1, None, 3]
        theirs.sendall(msgspec.msgpack.encode([0, 2, "nope", []]))
        assert msgspec.msgpack.decode(theirs.recv(100))[:2] == [1, 2]
        assert session.errors == 1
        # a response is counted just after it is sent: the peer may be first
        _wait_for(lambda: session._pub.counters[_publish.CALLS] == 2, "2 calls served")
    finally:
        session.close()
        theirs.close()
