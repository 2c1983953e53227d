"""buzon.aio.rpc: the asyncio client and server, and both mixed with the blocking ones."""

from __future__ import annotations

import asyncio
import threading
from typing import Protocol

import pytest
from _rpc_helpers import Recorder, calc_service

import buzon
from buzon import rpc
from buzon.aio import rpc as arpc
from buzon.errors import DeadlineExceeded, RemoteError


class AsyncCalc(Protocol):
    async def add(self, a: int, b: int) -> int: ...


def _async_service(log: list[str]) -> rpc.Service:
    svc = rpc.Service("acalc")

    @svc.method
    async def add(a: int, b: int) -> int:
        return a + b

    @svc.method
    async def nap(value: int, seconds: float) -> int:
        await asyncio.sleep(seconds)
        log.append(f"done {value}")
        return value

    @svc.method
    async def forever(name: str) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            log.append(f"cancelled {name}")
            raise
        return "woke"

    @svc.method
    def plain(a: int) -> int:
        return a * 2

    return svc


async def test_async_client_and_server() -> None:
    log: list[str] = []
    srv = arpc.Server("unix:acalc", _async_service(log))
    serving_task = asyncio.create_task(srv.serve_forever())
    try:
        calc = await arpc.connect(srv.address, AsyncCalc, timeout=10)
        assert await calc.add(2, 3) == 5
        client = await arpc.connect(srv.address, timeout=10)
        async with client:
            assert await client.plain(21) == 42
            with pytest.raises(RemoteError) as info:
                await client.call("add", 1, "x")
            assert info.value.code == RemoteError.INVALID_PARAMS
            with pytest.raises(RemoteError) as info:
                await client.call("__class__")
            assert info.value.code == RemoteError.METHOD_NOT_FOUND
            # many in flight, replies out of order
            tasks = [client.call_async("nap", i, 0.05 * (4 - i)) for i in range(4)]
            assert await asyncio.gather(*tasks) == [0, 1, 2, 3]
            assert log[0] == "done 3" and log[-1] == "done 0"
            # a deadline: DeadlineExceeded here, CancelledError in the handler
            with rpc.deadline(0.2), pytest.raises(DeadlineExceeded):
                await client.forever("dl")
            for _ in range(200):
                if "cancelled dl" in log:
                    break
                await asyncio.sleep(0.01)
            assert "cancelled dl" in log
            # cancelling the caller's task cancels the call on the server
            task = client.call_async("forever", "task")
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if "cancelled task" in log:
                    break
                await asyncio.sleep(0.01)
            assert "cancelled task" in log
            assert await client.add(1, 1) == 2
        await calc.aclose()  # type: ignore[attr-defined]
    finally:
        srv.shutdown()
        await serving_task


async def test_async_client_against_the_threaded_server() -> None:
    rec = Recorder()
    srv = rpc.Server("unix:mixed", calc_service(rec), grace=2.0)
    t = threading.Thread(target=srv.serve_forever)
    t.start()
    try:
        client = await arpc.connect(srv.address, timeout=10)
        async with client:
            assert await client.add(4, 5) == 9
            with pytest.raises(RemoteError, match="raised ValueError"):
                await client.fails("x")
    finally:
        srv.shutdown()
        await asyncio.to_thread(t.join, 15)


def test_blocking_client_against_the_async_server() -> None:
    log: list[str] = []
    ready = threading.Event()
    box: dict[str, object] = {}

    def serve() -> None:
        async def main() -> None:
            srv = arpc.Server("unix:asrv", _async_service(log))
            box["srv"], box["loop"] = srv, asyncio.get_running_loop()
            ready.set()
            await srv.serve_forever()

        asyncio.run(main())

    t = threading.Thread(target=serve)
    t.start()
    assert ready.wait(10)
    srv = box["srv"]
    assert isinstance(srv, arpc.Server)
    try:
        with rpc.connect(srv.address, timeout=10) as c:
            assert c.add(1, 2) == 3
            assert [c.call_async("nap", i, 0.01).result(10) for i in range(3)] == [0, 1, 2]
    finally:
        loop = box["loop"]
        assert isinstance(loop, asyncio.AbstractEventLoop)
        loop.call_soon_threadsafe(srv.shutdown)
        t.join(15)


def test_the_blocking_server_points_to_the_async_one() -> None:
    with pytest.raises(buzon.UnsupportedOperation, match=r"buzon\.aio\.rpc"):
        rpc.Server("unix:x", calc_service(Recorder()), mode="async")


def test_serve_mode_async_runs_until_sigterm(runtime_dir: str) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    path = os.path.join(runtime_dir, "aserve")
    code = (
        "import buzon\n"
        "svc = buzon.rpc.Service('s')\n"
        "@svc.method\n"
        "async def add(a: int, b: int) -> int:\n"
        "    return a + b\n"
        f"buzon.rpc.serve('unix:{path}', svc, mode='async')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        with rpc.connect(f"unix:{path}", timeout=10) as c:
            assert c.add(20, 22) == 42
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
