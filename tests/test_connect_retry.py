"""Contract 4h: ``connect(url, timeout=T)`` keeps trying until T for an endpoint that
is not there yet, on every transport and in both drivers; ``retry=False`` fails fast
with the cause; and the deadline raises :class:`buzon.Timeout` naming the cause."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import buzon
from buzon import aio

pytestmark = pytest.mark.fd_check

T = 10.0
LATE = 0.3  # the listener appears this long after connect started


def _free_port(kind: int) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


# (url factory, listen/connect options)
CASES: dict[str, tuple[Callable[[], str], dict[str, Any]]] = {
    "unix": (lambda: "unix:late", {}),
    "tcp": (lambda: f"tcp://127.0.0.1:{_free_port(socket.SOCK_STREAM)}", {}),
    "fifo": (lambda: "fifo:late", {}),
    "mq": (lambda: "mq:late", {}),
    "unixgram-reliable": (lambda: "unixgram:late", {"reliable": True}),
    "udp-reliable": (
        lambda: f"udp://127.0.0.1:{_free_port(socket.SOCK_DGRAM)}",
        {"reliable": True},
    ),
    "shm": (lambda: "shm:late", {}),
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    make, options = CASES[request.param]
    return make(), options


def _late_listener(url: str, options: dict[str, Any], got: list[object]) -> threading.Thread:
    """A thread that binds ``url`` only after LATE seconds, then takes one message."""

    def run() -> None:
        time.sleep(LATE)
        try:
            with buzon.listen(url, **options) as lst, lst.accept(timeout=T) as ch:
                got.append(ch.recv(timeout=T))
        except buzon.BuzonError as exc:  # pragma: no cover - reported by the assert
            got.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_connect_waits_for_a_late_endpoint(case: tuple[str, dict[str, Any]]) -> None:
    url, options = case
    got: list[object] = []
    t = _late_listener(url, options, got)
    try:
        with buzon.connect(url, timeout=T, **options) as ch:
            ch.send("late but there")
            ch.flush(T)
    finally:
        t.join(T)
    assert got == ["late but there"]


def test_aio_connect_waits_for_a_late_endpoint(case: tuple[str, dict[str, Any]]) -> None:
    url, options = case
    got: list[object] = []
    t = _late_listener(url, options, got)

    async def main() -> None:
        ch = await aio.connect(url, timeout=T, **options)
        try:
            await ch.send("late but there")
            await ch.flush(T)
        finally:
            await ch.aclose()

    try:
        asyncio.run(main())
    finally:
        t.join(T)
    assert got == ["late but there"]


@pytest.mark.parametrize("url", ["unix:absent", "fifo:absent", "mq:absent", "shm:absent"])
def test_retry_false_fails_fast_with_the_cause(url: str) -> None:
    with pytest.raises(buzon.NoSuchEndpoint):
        buzon.connect(url, timeout=T, retry=False)

    async def main() -> None:
        with pytest.raises(buzon.NoSuchEndpoint):
            await aio.connect(url, timeout=T, retry=False)

    asyncio.run(main())
    port = _free_port(socket.SOCK_STREAM)
    with pytest.raises(buzon.ConnectionRefused):
        buzon.connect(f"tcp://127.0.0.1:{port}", timeout=T, retry=False)


def test_a_fifo_nobody_reads_is_refused_without_retry(runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "lonely.fifo")
    os.mkfifo(path, 0o600)
    with pytest.raises(buzon.ConnectionRefused, match="no process reads"):
        buzon.connect(f"fifo:{path}", timeout=T, retry=False)


@pytest.mark.parametrize("url", ["unix:absent", "fifo:absent", "tcp://127.0.0.1:{port}"])
def test_the_deadline_raises_timeout_naming_the_cause(url: str) -> None:
    url = url.format(port=_free_port(socket.SOCK_STREAM))
    with pytest.raises(buzon.Timeout, match="timed out: ") as info:
        buzon.connect(url, timeout=0.2)
    assert isinstance(info.value.__cause__, buzon.ConnectError)

    async def main() -> None:
        with pytest.raises(buzon.Timeout, match="timed out: "):
            await aio.connect(url, timeout=0.2)

    asyncio.run(main())
