"""buzon.serve / buzon.Server: a thread, a process or a task per client."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

import buzon
from buzon import aio


def _echo_pid(ch: buzon.Channel) -> None:
    for msg in ch:
        ch.send({"pid": os.getpid(), "tid": threading.get_ident(), "msg": msg})


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("url", ["unix:srv", "tcp://127.0.0.1:0", "shm:srv"])
def test_server_serves_clients_concurrently(mode: str, url: str) -> None:
    server = buzon.Server(url, _echo_pid, mode=mode, grace=2.0)
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    try:
        clients = [buzon.connect(str(server.address), timeout=5) for _ in range(3)]
        # all three are connected at once: each must be served by its own worker
        for i, c in enumerate(clients):
            c.send(i)
        replies = [c.recv(timeout=5) for c in clients]
        assert [r["msg"] for r in replies] == [0, 1, 2]
        if mode == "process":
            pids = {r["pid"] for r in replies}
            assert len(pids) == 3 and os.getpid() not in pids
        else:
            assert {r["pid"] for r in replies} == {os.getpid()}
            assert len({r["tid"] for r in replies}) == 3
        for c in clients:
            c.close()
    finally:
        server.shutdown()
        runner.join(10)
    assert not runner.is_alive()
    assert server.served == 3
    assert server.active == 0
    if url.startswith(("unix:", "shm:")):
        assert not os.path.exists(server.address.fs_path())


def test_process_mode_reaps_children() -> None:
    server = buzon.Server("unix:reap", lambda ch: ch.send(os.getpid()), mode="process")
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    try:
        pids = []
        for _ in range(3):
            with buzon.connect("unix:reap", timeout=5) as c:
                pids.append(c.recv(timeout=5))
    finally:
        server.shutdown()
        runner.join(10)
    for pid in pids:  # reaped: no zombie is left for us to collect
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_shutdown_stops_a_blocked_thread_handler() -> None:
    started = threading.Event()

    def handler(ch: buzon.Channel) -> None:
        started.set()
        ch.recv()  # blocks until shutdown closes the channel

    server = buzon.Server("unix:stuck", handler, grace=0.2)
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    c = buzon.connect("unix:stuck", timeout=5)
    try:
        assert started.wait(5)
    finally:
        server.shutdown()
        runner.join(10)
        c.close()
    assert not runner.is_alive()


def test_handler_errors_are_counted_not_fatal() -> None:
    def handler(ch: buzon.Channel) -> None:
        if ch.recv(timeout=5) == "boom":
            raise RuntimeError("handler bug")
        ch.send("fine")

    server = buzon.Server("unix:errs", handler)
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    try:
        with buzon.connect("unix:errs", timeout=5) as c:
            c.send("boom")
            with pytest.raises(buzon.EndOfChannel):
                c.recv(timeout=5)
        with buzon.connect("unix:errs", timeout=5) as c:
            c.send("ok")
            assert c.recv(timeout=5) == "fine"
    finally:
        server.shutdown()
        runner.join(10)
    assert server.failed == 1


def test_max_clients_refuses_extra_connections() -> None:
    gate = threading.Event()

    def handler(ch: buzon.Channel) -> None:
        ch.send("in")
        gate.wait(5)

    server = buzon.Server("unix:cap", handler, max_clients=1)
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    try:
        first = buzon.connect("unix:cap", timeout=5)
        assert first.recv(timeout=5) == "in"
        with pytest.raises(buzon.BuzonError):
            second = buzon.connect("unix:cap", timeout=5)
            second.recv(timeout=5)
        gate.set()
        first.close()
    finally:
        gate.set()
        server.shutdown()
        runner.join(10)
    assert server.refused == 1


def test_serve_refuses_connectionless_addresses() -> None:
    with pytest.raises(buzon.UnsupportedOperation):
        buzon.Server("udp://127.0.0.1:0", lambda ch: None)
    with pytest.raises(ValueError):
        buzon.Server("unix:x", lambda ch: None, mode="fiber")


@pytest.mark.parametrize("url", ["unix:asrv", "shm:asrv"])
def test_async_server(url: str) -> None:
    async def handler(ch: aio.Channel) -> None:
        async for msg in ch:
            await ch.send(msg * 2)

    async def main() -> list[Any]:
        server = aio.Server(url, handler)
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0)
        clients = [await aio.connect(url, timeout=5) for _ in range(3)]
        for i, c in enumerate(clients):
            await c.send(i + 1)
        out = [await c.recv(timeout=5) for c in clients]
        for c in clients:
            await c.aclose()
        server.shutdown()
        await asyncio.wait_for(task, 10)
        assert server.served == 3
        return out

    assert asyncio.run(main()) == [2, 4, 6]


def test_async_server_shutdown_before_serve_forever_is_kept() -> None:
    """``shutdown()`` before ``serve_forever`` started (the task not yet run): the
    server must not start serving, and its endpoint goes."""

    async def handler(ch: aio.Channel) -> None:
        await ch.recv()

    async def main() -> None:
        server = aio.Server("unix:early", handler)
        task = asyncio.ensure_future(server.serve_forever())
        server.shutdown()  # before the task ran once
        done, _ = await asyncio.wait([task], timeout=10)
        if not done:
            task.cancel()
            await asyncio.wait([task], timeout=10)
            pytest.fail("shutdown() before serve_forever was lost: it serves on")
        task.result()
        with pytest.raises(buzon.ConnectError):
            await aio.connect("unix:early", timeout=0, retry=False)

    asyncio.run(main())


def test_async_server_shutdown_from_another_thread() -> None:
    async def handler(ch: aio.Channel) -> None:
        await ch.recv()

    async def main() -> None:
        server = aio.Server("unix:early2", handler)
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0.1)
        threading.Thread(target=server.shutdown).start()  # not the loop's thread
        done, _ = await asyncio.wait([task], timeout=10)
        if not done:
            task.cancel()
            await asyncio.wait([task], timeout=10)
            pytest.fail("shutdown() from another thread did not stop the server")

    asyncio.run(main())


def test_serve_function_runs_until_sigterm() -> None:
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import buzon\n"
        "buzon.serve('unix:sig', lambda ch: ch.send(ch.recv()), mode='process')\n"
        "print('clean exit')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=dict(os.environ)
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                c = buzon.connect("unix:sig", timeout=1)
                break
            except (buzon.NoSuchEndpoint, buzon.ConnectionRefused):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with c:
            c.send("ping")
            assert c.recv(timeout=5) == "ping"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert b"clean exit" in out
