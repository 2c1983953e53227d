"""The blocking server speaks msgpack-rpc (``buzon.rpc.Server(..., wire="msgpack-rpc")``):
answered by the blocking client, the asyncio client and a real Neovim as the client;
bad input is answered (or ends only its own connection) and the server keeps serving."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import msgspec
import pytest
from _rpc_helpers import serving
from test_rpc_msgpack import EMBED, needs_nvim

from buzon import rpc
from buzon.aio import rpc as arpc
from buzon.errors import RemoteError, UnsupportedOperation


def _calc(ran: list[str]) -> rpc.Service:
    svc = rpc.Service("calc")

    @svc.method
    def add(a: int, b: int) -> int:
        ran.append("add")
        return a + b

    @svc.method
    def fails(why: str) -> None:
        raise ValueError(why)

    @svc.method
    def note(line: str) -> None:
        ran.append(f"note {line}")

    return svc


def test_a_blocking_msgpack_rpc_server_answers_the_blocking_client() -> None:
    ran: list[str] = []
    with serving("unix:mpsrv", _calc(ran), wire="msgpack-rpc") as srv:
        assert srv.wire == "msgpack-rpc"
        with rpc.connect(srv.address, wire="msgpack-rpc", timeout=10) as c:
            assert [c.add(i, 1) for i in range(5)] == [1, 2, 3, 4, 5]
            with pytest.raises(RemoteError, match="no method 'nope'"):
                c.call("nope")
            with pytest.raises(RemoteError, match="ValueError: boom"):
                c.fails("boom")
            with pytest.raises(RemoteError, match="invalid arguments"):
                c.add(1, "x")
            assert c.add(2, 3) == 5  # the connection goes on after the errors
        # a second client, while the first one is gone
        with rpc.connect(srv.address, wire="msgpack-rpc", timeout=10) as c:
            assert c.add(20, 22) == 42
    assert ran.count("add") == 7


def test_a_blocking_msgpack_rpc_server_answers_the_asyncio_client() -> None:
    ran: list[str] = []
    with serving("unix:mpsrv2", _calc(ran), wire="msgpack-rpc") as srv:

        async def main() -> list[Any]:
            s = await arpc.connect(srv.address, wire="msgpack-rpc", timeout=10)
            async with s:
                got = list(await asyncio.gather(*(s.add(i, i) for i in range(20))))
                with pytest.raises(RemoteError, match="no method"):
                    await s.call("missing")
                await s.notify("note", "hi")
                got.append(await s.add(1, 1))
                return got

        assert asyncio.run(main()) == [2 * i for i in range(20)] + [2]
    assert "note hi" in ran


def test_mode_process_serves_msgpack_rpc() -> None:
    with serving("unix:mpsrv3", _calc([]), wire="msgpack-rpc", mode="process") as srv:
        for _ in range(2):
            with rpc.connect(srv.address, wire="msgpack-rpc", timeout=10) as c:
                assert c.add(2, 3) == 5


def test_msgpack_rpc_is_at_most_once() -> None:
    with pytest.raises(UnsupportedOperation, match="at-most-once"):
        rpc.Server("unix:mpsrv4", _calc([]), wire="msgpack-rpc", semantics="exactly_once")


def _recv(s: socket.socket, dec: msgspec.msgpack.Decoder[Any]) -> Any:
    from buzon.rpc._msgpack import object_end

    buf = b""
    while (end := object_end(buf)) < 0:
        data = s.recv(65536)
        assert data, "the server closed the connection"
        buf += data
    assert end == len(buf)
    return dec.decode(buf)


def test_bad_input_is_answered_and_the_server_keeps_serving() -> None:
    ran: list[str] = []
    enc, dec = msgspec.msgpack.encode, msgspec.msgpack.Decoder()
    with serving("unix:mpbad", _calc(ran), wire="msgpack-rpc") as srv:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(srv.address.fs_path())
            s.settimeout(10)
            for request, why in (
                ([0, 1, "__class__", []], "no method"),
                ([0, 2, "add", [1, "x"]], "invalid arguments"),
                ([0, 3, "add", "notalist"], "params must be an array"),
                ([0, 4], "invalid request"),
            ):
                s.sendall(enc(request))
                answer = _recv(s, dec)
                assert answer[0] == 1 and answer[1] == request[1] and why in answer[2], answer
            s.sendall(enc("not a message") + enc([7, 7]) + enc([0, 5, "add", [2, 3]]))
            assert _recv(s, dec) == [1, 5, None, 5]
            assert srv.errors == 6  # counted before each answer (and the two unanswered)
            s.sendall(b"\xc1")  # starts no msgpack object: the stream cannot go on
            assert s.recv(100) == b""
        finally:
            s.close()
        # the server goes on serving other (and new) connections
        with rpc.connect(srv.address, wire="msgpack-rpc", timeout=10) as c:
            assert c.add(1, 2) == 3
    assert ran == ["add", "add"]


@needs_nvim
def test_neovim_is_a_client_of_the_blocking_msgpack_rpc_server() -> None:
    ran: list[str] = []
    with serving("unix:mpnvim", _calc(ran), wire="msgpack-rpc") as srv:
        path = srv.address.fs_path()
        nv = rpc.connect_process(EMBED, wire="msgpack-rpc", timeout=30)
        try:
            chan = nv.nvim_eval(f"sockconnect('pipe', '{path}', {{'rpc': v:true}})")
            assert isinstance(chan, int) and chan > 0
            assert nv.nvim_eval(f"rpcrequest({chan}, 'add', 2, 3)") == 5
            with pytest.raises(RemoteError, match="no method 'nope'"):
                nv.nvim_eval(f"rpcrequest({chan}, 'nope')")
            with pytest.raises(RemoteError, match="ValueError: kaputt"):
                nv.nvim_eval(f"rpcrequest({chan}, 'fails', 'kaputt')")
            nv.nvim_eval(f"rpcnotify({chan}, 'note', 'from nvim')")
            assert nv.nvim_eval(f"rpcrequest({chan}, 'add', 40, 2)") == 42
            nv.nvim_eval(f"chanclose({chan})")
        finally:
            nv.close()
    assert sorted(ran) == ["add", "add", "note from nvim"]  # a notification has no order


@pytest.mark.parametrize("wire", ["msgpack-rpc", "jsonrpc"])
def test_a_stream_wire_connection_runs_at_most_max_in_flight_requests(wire: str) -> None:
    """A peer pipelining requests to a slow method gets OVERLOADED beyond the server's
    ``max_in_flight`` (not a thread each); the admitted ones finish, the server goes on."""
    import threading

    svc = rpc.Service("slow")
    release, running = threading.Event(), []

    @svc.method
    def hold(i: int) -> int:
        running.append(i)
        release.wait(30)
        return i

    dec = msgspec.msgpack.Decoder()
    with serving("unix:mpbound", svc, wire=wire, max_in_flight=2) as srv:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(srv.address.fs_path())
            s.settimeout(10)
            for i in range(5):
                if wire == "msgpack-rpc":
                    s.sendall(msgspec.msgpack.encode([0, i, "hold", [i]]))
                else:
                    body = msgspec.json.encode(
                        {"jsonrpc": "2.0", "id": i, "method": "hold", "params": [i]}
                    )
                    s.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            answers: list[Any] = []
            buf = b""
            while len(answers) < 3:  # the three refused ones come first: two still hold
                buf += s.recv(65536)
                if wire == "msgpack-rpc":
                    from buzon.rpc._msgpack import object_end

                    while (end := object_end(buf)) > 0:
                        answers.append(dec.decode(buf[:end]))
                        buf = buf[end:]
                else:
                    while b"\r\n\r\n" in buf:
                        head, rest = buf.split(b"\r\n\r\n", 1)
                        n = int(head.split(b":")[1])
                        if len(rest) < n:
                            break
                        answers.append(msgspec.json.decode(rest[:n]))
                        buf = rest[n:]
            assert len(answers) == 3
            for a in answers:
                text = str(a[2]) if wire == "msgpack-rpc" else a["error"]["message"]
                assert "over 2 requests in flight" in text, a
            assert sorted(running) == [0, 1]
            release.set()
        finally:
            s.close()
        with rpc.connect(srv.address, wire=wire, timeout=10) as c:
            release.set()
            assert c.hold(7) == 7


def test_a_stream_session_reuses_its_worker_threads_and_ends_the_idle_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The peer's requests run on worker threads kept for the next request (not a
    thread started per request); a worker idle for ``_WORKER_IDLE`` ends."""
    import threading
    import time

    from buzon.rpc._msgpack import _StreamSession

    monkeypatch.setattr(_StreamSession, "_WORKER_IDLE", 0.3, raising=False)
    svc = rpc.Service("who")
    threads: list[threading.Thread] = []

    @svc.method
    def me() -> str:
        threads.append(threading.current_thread())
        return threading.current_thread().name

    with (
        serving("unix:mpreuse", svc, wire="msgpack-rpc") as srv,
        rpc.connect(srv.address, wire="msgpack-rpc", timeout=10) as c,
    ):
        for _ in range(30):
            assert c.me() == "buzon-rpc-stream-call"
        assert len(set(threads)) <= 2, len(set(threads))  # one, or two at a hand-over
        end = time.monotonic() + 30
        while any(t.is_alive() for t in threads):
            assert time.monotonic() < end, "idle workers did not end"
            time.sleep(0.05)
        assert c.me() == "buzon-rpc-stream-call"  # a new worker after they ended


@pytest.mark.parametrize("wire", ["msgpack-rpc", "jsonrpc"])
def test_a_closed_connection_ends_its_idle_session_workers_at_once(
    monkeypatch: pytest.MonkeyPatch, wire: str
) -> None:
    """When the connection ends (the client closes it), the server session's idle
    worker threads end at once, not after ``_WORKER_IDLE`` (60 s here: the test's
    10 s bound catches a worker that waits it out)."""
    import threading
    import time

    from buzon.rpc._msgpack import _StreamSession

    monkeypatch.setattr(_StreamSession, "_WORKER_IDLE", 60.0, raising=False)
    svc = rpc.Service("who")
    threads: list[threading.Thread] = []
    release = threading.Event()

    @svc.method
    def me() -> str:
        threads.append(threading.current_thread())
        return threading.current_thread().name

    @svc.method
    def hold() -> int:
        threads.append(threading.current_thread())
        release.wait(10)
        return 1

    with serving("unix:mpidle", svc, wire=wire) as srv:
        with rpc.connect(srv.address, wire=wire, timeout=10) as c:
            holding = threading.Thread(target=c.hold)
            holding.start()  # one worker busy, then others for the calls below
            while not threads:
                time.sleep(0.01)
            for _ in range(5):
                c.me()
            release.set()
            holding.join(10)
        end = time.monotonic() + 10
        while any(t.is_alive() for t in threads):
            assert time.monotonic() < end, "idle workers outlived their connection"
            time.sleep(0.02)


def _stream_answers(
    s: socket.socket, wire: str, n: int, buf: bytes = b""
) -> tuple[list[Any], bytes]:
    """Read ``n`` answers of ``wire`` from the raw socket ``s``."""
    from buzon.rpc._msgpack import object_end

    answers: list[Any] = []
    while len(answers) < n:
        if wire == "msgpack-rpc":
            while len(answers) < n and (end := object_end(buf)) > 0:
                answers.append(msgspec.msgpack.decode(buf[:end]))
                buf = buf[end:]
        else:
            while len(answers) < n and b"\r\n\r\n" in buf:
                head, rest = buf.split(b"\r\n\r\n", 1)
                size = int(head.split(b":")[1])
                if len(rest) < size:
                    break
                answers.append(msgspec.json.decode(rest[:size]))
                buf = rest[size:]
        if len(answers) < n:
            got = s.recv(65536)
            assert got, "the server closed the connection"
            buf += got
    return answers, buf


def _stream_request(wire: str, i: int, batch: bool = False) -> bytes:
    if wire == "msgpack-rpc":
        return msgspec.msgpack.encode([0, i, "hold", [i]])
    one = {"jsonrpc": "2.0", "id": i, "method": "hold", "params": [i]}
    body = msgspec.json.encode([one] if batch else one)
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


@pytest.mark.parametrize("driver", ["blocking", "asyncio"])
@pytest.mark.parametrize("wire", ["msgpack-rpc", "jsonrpc"])
def test_an_overloaded_refusal_counts_the_same_in_both_servers(wire: str, driver: str) -> None:
    """Beyond ``max_in_flight`` a request is refused with OVERLOADED (a JSON-RPC batch
    too: one error response, id null): each refusal is an error *and* a call served
    (a response went out), in the blocking and the asyncio server alike."""
    import threading

    from _rpc_aio_helpers import aio_serving_in_thread

    svc = rpc.Service("slow")
    release, running = threading.Event(), []

    if driver == "blocking":

        @svc.method
        def hold(i: int) -> int:
            running.append(i)
            release.wait(30)
            return i

    else:  # the asyncio server runs a plain method on its loop: this one awaits

        @svc.method
        async def hold(i: int) -> int:
            running.append(i)
            await asyncio.to_thread(release.wait, 30)
            return i

    serve = serving if driver == "blocking" else aio_serving_in_thread
    with serve("unix:mpcount", svc, wire=wire, max_in_flight=2) as srv:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(srv.address.fs_path())
            s.settimeout(10)
            s.sendall(_stream_request(wire, 0) + _stream_request(wire, 1))
            end = time.monotonic() + 10
            while len(running) < 2:
                assert time.monotonic() < end, "the two admitted calls did not start"
                time.sleep(0.01)
            refused = 3 if wire == "msgpack-rpc" else 2
            s.sendall(b"".join(_stream_request(wire, 2 + k) for k in range(refused)))
            if wire == "jsonrpc":
                s.sendall(_stream_request(wire, 9, batch=True))
            answers, buf = _stream_answers(s, wire, 3)
            for a in answers:
                text = str(a[2]) if wire == "msgpack-rpc" else a["error"]["message"]
                assert "requests in flight" in text, a
            if wire == "jsonrpc":
                assert answers[-1]["id"] is None  # the refused batch
            release.set()
            answers, _ = _stream_answers(s, wire, 2, buf)
            end = time.monotonic() + 10
            while srv.calls < 5:
                assert time.monotonic() < end, f"calls served: {srv.calls}"
                time.sleep(0.01)
            assert (srv.calls, srv.errors) == (5, 3)
        finally:
            release.set()
            s.close()
