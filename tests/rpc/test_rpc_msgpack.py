"""wire="msgpack-rpc": the spec's framing, and Neovim as the peer nobody here wrote."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest

import buzon
from buzon import rpc
from buzon.errors import FrameError, FrameTooLarge, RemoteError
from buzon.rpc._msgpack import MsgpackRpcClient, _ChannelStream, object_end

NVIM = shutil.which("nvim")
needs_nvim = pytest.mark.skipif(
    NVIM is None, reason="Neovim (nvim) is not installed; .ci/run installs it with apt-get"
)
EMBED = ["nvim", "--headless", "--embed", "--clean", "-n"]


def _service(ran: list[str]) -> rpc.Service:
    svc = rpc.Service("calc")

    @svc.method
    def add(a: int, b: int) -> int:
        ran.append("add")
        return a + b

    return svc


# -- framing -----------------------------------------------------------------------------

SAMPLES = [
    None,
    True,
    0,
    -1,
    -33,
    127,
    255,
    70000,
    2**40,
    -(2**40),
    1.5,
    "",
    "x" * 31,
    "y" * 300,
    "z" * 70000,
    b"b" * 10,
    b"b" * 300,
    [],
    [1, [2, [3, {"a": [None, 1.0]}]]],
    {"k" * 40: list(range(20))},
    list(range(70000)),
    msgspec.msgpack.Ext(1, b"\x01"),
    msgspec.msgpack.Ext(2, b"\x01" * 300),
]


@pytest.mark.parametrize("value", SAMPLES, ids=range(len(SAMPLES)))
def test_object_end_finds_every_kind_of_object_and_waits_for_the_rest(value: object) -> None:
    data = msgspec.msgpack.encode(value) + b"\x01\x02"
    end = len(data) - 2
    assert object_end(data) == end
    for cut in {c for c in (1, end // 2, end - 1) if 0 < c < end}:
        assert object_end(data[:cut]) == -1


def test_object_end_refuses_junk_and_huge_announcements_without_allocating() -> None:
    with pytest.raises(FrameError, match="0xc1"):
        object_end(b"\x91\xc1")
    with pytest.raises(FrameTooLarge, match="items"):
        object_end(b"\xdd\xff\xff\xff\xff")  # array32 of 4 billion items, 5 bytes sent
    with pytest.raises(FrameTooLarge, match="over"):
        object_end(b"\xdb\xff\xff\xff\xff")  # a 4 GiB string: refused from its header
    assert object_end(b"\xdb\x00\x00\x10\x00") == -1  # 1 MiB announced: may still come


# -- a peer written in the test: malformed input -------------------------------------


@pytest.fixture
def fake_peer() -> Iterator[tuple[MsgpackRpcClient, socket.socket, list[str]]]:
    ours, theirs = socket.socketpair()
    ran: list[str] = []

    class _SockStream(_ChannelStream):
        def __init__(self, s: socket.socket) -> None:
            self.s = s

        def read(self, timeout: float) -> bytes | None:
            self.s.settimeout(timeout)
            try:
                return self.s.recv(65536)
            except TimeoutError:
                return None
            except OSError:
                return b""

        def write(self, data: bytes) -> None:
            self.s.sendall(data)

        def close(self) -> None:
            self.s.close()

    client = MsgpackRpcClient(_SockStream(ours), _service(ran), timeout=10)
    try:
        yield client, theirs, ran
    finally:
        client.close()
        theirs.close()


def _read_message(s: socket.socket) -> object:
    buf = b""
    s.settimeout(10)
    while (end := object_end(buf)) < 0:
        buf += s.recv(65536)
    return msgspec.msgpack.decode(buf[:end])


def test_the_peers_bad_requests_get_error_responses_and_nothing_runs(
    fake_peer: tuple[MsgpackRpcClient, socket.socket, list[str]],
) -> None:
    client, peer, ran = fake_peer
    enc = msgspec.msgpack.encode
    peer.sendall(enc([0, 1, "__class__", []]))
    assert _read_message(peer) == [1, 1, "no method '__class__' in service 'calc'", None]
    peer.sendall(enc([0, 2, "add", [1, "2"]]))
    reply = _read_message(peer)
    assert isinstance(reply, list) and reply[:2] == [1, 2] and "invalid arguments" in reply[2]
    peer.sendall(enc([0, 3, "add", "not an array"]))
    assert _read_message(peer)[:2] == [1, 3]  # type: ignore[index]
    peer.sendall(enc("not a message") + enc([7, 7]) + enc([0, 4]))  # the last: no method
    assert _read_message(peer)[:2] == [1, 4]  # type: ignore[index]
    peer.sendall(enc([0, 5, "add", [2, 3]]))
    assert _read_message(peer) == [1, 5, None, 5]
    assert ran == ["add"]
    assert client.errors >= 5


def test_a_malformed_stream_ends_the_session_and_fails_calls_in_flight(
    fake_peer: tuple[MsgpackRpcClient, socket.socket, list[str]],
) -> None:
    client, peer, _ = fake_peer
    box: list[BaseException] = []

    def call() -> None:
        try:
            client.call("anything")
        except BaseException as exc:
            box.append(exc)

    t = threading.Thread(target=call)
    t.start()
    assert _read_message(peer)[2] == "anything"  # type: ignore[index]
    peer.sendall(b"\xc1")  # no msgpack object starts with this byte
    t.join(10)
    assert len(box) == 1 and isinstance(box[0], buzon.BuzonError)
    assert "0xc1" in str(box[0])
    with pytest.raises(buzon.BuzonError):
        client.call("again")


# -- Neovim ----------------------------------------------------------------------------


@needs_nvim
def test_neovim_embedded_evaluates_reports_errors_and_calls_us_back() -> None:
    ran: list[str] = []
    nv = rpc.connect_process(EMBED, wire="msgpack-rpc", handler=_service(ran), timeout=30)
    try:
        assert nv.nvim_eval("1+1") == 2
        with pytest.raises(RemoteError) as info:
            nv.nvim_eval("no_such_variable")
        assert "E121" in info.value.message and info.value.code == 0  # nvim: [type, message]
        # a request in the other direction, on the same connection, while our call waits
        assert nv.nvim_eval('rpcrequest(1, "add", 2, 3)') == 5
        assert ran == ["add"]
        with pytest.raises(RemoteError, match="no method '__class__'"):
            nv.nvim_eval('rpcrequest(1, "__class__")')
        with pytest.raises(RemoteError, match="invalid arguments"):
            nv.nvim_eval('rpcrequest(1, "add", 2, "x")')
        assert ran == ["add"]
        assert nv.call("nvim_eval", "[1, 'a', {'k': v:true}]") == [1, "a", {"k": True}]
    finally:
        nv.close()
    proc = nv._stream.proc  # type: ignore[attr-defined]
    assert proc.returncode is not None  # the child was waited for


@needs_nvim
def test_neovim_listening_on_a_unix_socket(runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "nvim.sock")
    proc = subprocess.Popen(
        ["nvim", "--headless", "--clean", "-n", "--listen", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "nvim did not listen"
            time.sleep(0.02)
        ran: list[str] = []
        with rpc.connect(
            f"unix:{path}", wire="msgpack-rpc", handler=_service(ran), timeout=30
        ) as nv:
            assert nv.nvim_eval("6*7") == 42
            channel = nv.call("nvim_get_api_info")[0]
            assert nv.nvim_eval(f'rpcrequest({channel}, "add", 20, 3)') == 23
            with pytest.raises(RemoteError, match="E121"):
                nv.nvim_eval("no_such_variable")
            with rpc.deadline(0.3), pytest.raises(buzon.DeadlineExceeded):
                nv.nvim_eval("execute('sleep 3')")
        assert ran == ["add"]
    finally:
        proc.terminate()
        proc.wait(10)
