"""buzon.aio.rpc speaks the two standard wires: JSON-RPC 2.0 (the spec's section 7
answered exactly by the asyncio server, pylsp driven from asyncio) and msgpack-rpc
(Neovim driven from asyncio, embedded and over a Unix socket, calling us back)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from typing import Any

import pytest
from _rpc_aio_helpers import aio_serving, aio_serving_in_thread, until
from _rpc_helpers import Recorder, calc_service, serving
from test_rpc_jsonrpc import PYLSP, SECTION_7, FakePeer, needs_pylsp, spec_service
from test_rpc_msgpack import EMBED, needs_nvim

import buzon
from buzon import rpc
from buzon.aio import rpc as arpc
from buzon.errors import DeadlineExceeded, EndOfChannel, RemoteError


def _async_service(log: list[str]) -> rpc.Service:
    svc = rpc.Service("acalc")

    @svc.method
    async def add(a: int, b: int) -> int:
        return a + b

    @svc.method
    async def subtract(minuend: int, subtrahend: int) -> int:
        return minuend - subtrahend

    @svc.method
    async def forever(name: str) -> str:
        ctx = rpc.context()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            log.append(f"cancelled {name} {ctx.cancelled}")
            raise
        return "woke"

    @svc.method
    def log_line(line: str) -> None:
        log.append(line)

    return svc


# -- JSON-RPC ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected"), [c[1:] for c in SECTION_7], ids=[c[0] for c in SECTION_7]
)
def test_the_async_jsonrpc_server_answers_every_spec_example_exactly(
    sent: str, expected: Any
) -> None:
    with aio_serving_in_thread("unix:ajspec", spec_service([]), wire="jsonrpc") as srv:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(srv.address.fs_path())
            peer = FakePeer(s)
            peer.send_body(sent)
            peer.send({"jsonrpc": "2.0", "method": "ping", "id": "after"})
            first = peer.recv()
            pong = {"jsonrpc": "2.0", "result": "pong", "id": "after"}
            if expected is None:
                assert first == pong
                return
            second = peer.recv()
            assert pong in (first, second)
            answer = second if first == pong else first
            if isinstance(expected, list):
                assert sorted(answer, key=json.dumps) == sorted(expected, key=json.dumps)
            else:
                assert answer == expected
        finally:
            s.close()


async def test_async_jsonrpc_client_and_server_both_ways_and_cancel() -> None:
    log: list[str] = []
    async with aio_serving("unix:ajrpc", _async_service(log), wire="jsonrpc") as srv:
        ls = await arpc.connect(srv.address, wire="jsonrpc", timeout=10)
        async with ls:
            assert await ls.call("add", 2, 3) == 5  # positional
            assert await ls.call("subtract", minuend=42, subtrahend=23) == 19  # named
            assert await ls.subtract(23, 42) == -19
            with pytest.raises(RemoteError) as info:
                await ls.call("nope")
            assert info.value.code == -32601
            with pytest.raises(RemoteError) as info:
                await ls.call("add", 1, "x")
            assert info.value.code == -32602
            with pytest.raises(RemoteError) as info:
                await ls.call("__class__")
            assert info.value.code == -32601
            await ls.notify("log_line", "hello")
            assert await until(lambda: "hello" in log)
            out = await ls.call_batch([("add", [1, 2]), ("nope", None), ("add", [3, 4])])
            assert out[0] == 3 and out[2] == 7
            assert isinstance(out[1], RemoteError) and out[1].code == -32601
            # a deadline sends $/cancelRequest: the handler's task is cancelled and its
            # context says so
            with rpc.deadline(0.2), pytest.raises(DeadlineExceeded, match="cancel sent"):
                await ls.call("forever", "dl")
            assert await until(lambda: "cancelled dl True" in log)
            # so does cancelling the caller's task
            task = asyncio.create_task(ls.call("forever", "task"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await until(lambda: "cancelled task True" in log)
            assert await ls.add(1, 1) == 2
        with pytest.raises(buzon.ChannelClosed):
            await ls.call("add", 1, 2)


async def test_async_jsonrpc_client_against_the_blocking_server() -> None:
    with serving("unix:bjrpc", calc_service(Recorder()), wire="jsonrpc") as srv:
        ls = await arpc.connect(srv.address, wire="jsonrpc", timeout=10)
        try:
            assert await ls.call("add", 20, 22) == 42
            with pytest.raises(RemoteError, match="raised ValueError"):
                await ls.call("fails", "x")
        finally:
            await arpc.close(ls)


def test_the_blocking_jsonrpc_client_against_the_async_server() -> None:
    with (
        aio_serving_in_thread("unix:bajrpc", _async_service([]), wire="jsonrpc") as srv,
        rpc.connect(srv.address, wire="jsonrpc", timeout=10) as ls,
    ):
        assert ls.call("add", 1, 2) == 3
        assert ls.call_batch([("add", [1, 1]), ("subtract", {"minuend": 5, "subtrahend": 2})]) == [
            2,
            3,
        ]


@needs_pylsp
async def test_pylsp_from_asyncio_initialize_unknown_method_shutdown_exit() -> None:
    assert PYLSP is not None
    ls = await arpc.connect_process([PYLSP], wire="jsonrpc", timeout=60)
    try:
        result = await ls.call("initialize", processId=os.getpid(), rootUri=None, capabilities={})
        assert isinstance(result["capabilities"], dict) and result["capabilities"]
        await ls.notify("initialized")
        with pytest.raises(RemoteError) as info:
            await ls.call("buzon/noSuchMethod", x=1)
        assert info.value.code == -32601
        assert await ls.call("shutdown") is None
        await ls.notify("exit")
        proc = ls._stream.proc
        assert await asyncio.wait_for(proc.wait(), 30) == 0  # pylsp exits after exit
    finally:
        await ls.aclose()


# -- msgpack-rpc -------------------------------------------------------------------------


def _calc(ran: list[str]) -> rpc.Service:
    svc = rpc.Service("calc")

    @svc.method
    async def add(a: int, b: int) -> int:
        ran.append("add")
        return a + b

    return svc


async def test_async_msgpack_rpc_client_and_server() -> None:
    log: list[str] = []
    async with aio_serving("unix:ampk", _async_service(log), wire="msgpack-rpc") as srv:
        s = await arpc.connect(srv.address, wire="msgpack-rpc", timeout=10)
        async with s:
            assert await s.add(2, 3) == 5
            with pytest.raises(RemoteError, match="no method"):
                await s.call("__class__")
            with pytest.raises(RemoteError, match="invalid arguments"):
                await s.call("add", 1, "x")
            await s.notify("log_line", "n")
            assert await until(lambda: "n" in log)
            # many in flight on one connection
            assert await asyncio.gather(*(s.add(i, i) for i in range(20))) == [
                2 * i for i in range(20)
            ]
            with rpc.deadline(0.2), pytest.raises(DeadlineExceeded):
                await s.forever("x")


async def test_a_lost_msgpack_peer_fails_the_calls_in_flight() -> None:
    log: list[str] = []
    async with aio_serving("unix:ampk2", _async_service(log), wire="msgpack-rpc", grace=0.1) as srv:
        s = await arpc.connect(srv.address, wire="msgpack-rpc", timeout=10)
        task = asyncio.create_task(s.forever("lost"))
        await asyncio.sleep(0.1)
        srv.shutdown()
        with pytest.raises(EndOfChannel, match="may or may not have run"):
            await asyncio.wait_for(task, 20)
        await s.aclose()


@needs_nvim
async def test_neovim_embedded_from_asyncio_evaluates_reports_errors_and_calls_back() -> None:
    ran: list[str] = []
    nv = await arpc.connect_process(EMBED, wire="msgpack-rpc", handler=_calc(ran), timeout=30)
    try:
        assert await nv.nvim_eval("1+1") == 2
        with pytest.raises(RemoteError) as info:
            await nv.nvim_eval("no_such_variable")
        assert "E121" in info.value.message and info.value.code == 0
        # nvim asks us for add(2, 3) while our call waits: answered by a coroutine
        assert await nv.nvim_eval('rpcrequest(1, "add", 2, 3)') == 5
        assert ran == ["add"]
        with pytest.raises(RemoteError, match="no method '__class__'"):
            await nv.nvim_eval('rpcrequest(1, "__class__")')
        with pytest.raises(RemoteError, match="invalid arguments"):
            await nv.nvim_eval('rpcrequest(1, "add", 2, "x")')
        assert ran == ["add"]
    finally:
        await nv.aclose()
    assert nv._stream.proc.returncode is not None  # the child was waited for


@needs_nvim
async def test_neovim_on_a_unix_socket_from_asyncio(runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "nvim.sock")
    proc = await asyncio.create_subprocess_exec(
        "nvim",
        "--headless",
        "--clean",
        "-n",
        "--listen",
        path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "nvim did not listen"
            await asyncio.sleep(0.02)
        ran: list[str] = []
        nv = await arpc.connect(f"unix:{path}", wire="msgpack-rpc", handler=_calc(ran), timeout=30)
        async with nv:
            assert await nv.nvim_eval("6*7") == 42
            channel = (await nv.call("nvim_get_api_info"))[0]
            assert await nv.nvim_eval(f'rpcrequest({channel}, "add", 20, 3)') == 23
            with rpc.deadline(0.3), pytest.raises(DeadlineExceeded):
                await nv.nvim_eval("execute('sleep 3')")
        assert ran == ["add"]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


# -- bad input ---------------------------------------------------------------------------


def test_the_async_jsonrpc_server_refuses_hostile_bodies_and_goes_on() -> None:
    with aio_serving_in_thread("unix:ajbad", spec_service([]), wire="jsonrpc") as srv:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(srv.address.fs_path())
            peer = FakePeer(s)
            for junk in (b"{not json", b"[" * 100000, b'"\xff"'):
                peer.send_body(junk)
                answer = peer.recv()
                assert answer["error"]["code"] == -32700 and answer["id"] is None
            peer.send({"jsonrpc": "2.0", "method": "ping", "id": 1})
            assert peer.recv() == {"jsonrpc": "2.0", "result": "pong", "id": 1}
            # a frame announcing 4 GiB: refused from its header, the connection closed
            s.sendall(b"Content-Length: 4294967296\r\n\r\n")
            assert s.recv(100) == b""
        finally:
            s.close()
        assert srv.errors >= 3


def test_the_async_msgpack_rpc_server_refuses_bad_requests_and_a_malformed_stream() -> None:
    import msgspec

    ran: list[str] = []
    with aio_serving_in_thread("unix:ampbad", _calc(ran), wire="msgpack-rpc") as srv:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(srv.address.fs_path())
            s.settimeout(10)
            dec = msgspec.msgpack.Decoder()
            for request, why in (
                ([0, 1, "__class__", []], "no method"),
                ([0, 2, "add", [1, "x"]], "invalid arguments"),
                ([0, 3, "add", "notalist"], "params must be an array"),
                ([0, 4], "invalid request"),
            ):
                s.sendall(msgspec.msgpack.encode(request))
                answer = dec.decode(s.recv(65536))
                assert answer[0] == 1 and answer[1] == request[1] and why in answer[2], answer
            s.sendall(msgspec.msgpack.encode([0, 5, "add", [2, 3]]))
            assert dec.decode(s.recv(65536)) == [1, 5, None, 5]
            s.sendall(b"\xc1")  # starts no msgpack object: the stream cannot go on
            assert s.recv(100) == b""
        finally:
            s.close()
    assert ran == ["add"]
