"""Shared pieces of the asyncio RPC tests: an asyncio server on a loop of its own."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from buzon.aio import rpc as arpc


@contextmanager
def aio_serving_in_thread(url: str, service: Any, **options: Any) -> Iterator[arpc.Server]:
    """A ``buzon.aio.rpc.Server`` on its own event loop in a thread, for blocking peers."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        async def main() -> None:
            srv = arpc.Server(url, service, grace=2.0, **options)
            box["srv"], box["loop"] = srv, asyncio.get_running_loop()
            ready.set()
            await srv.serve_forever()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the test, not lost in the thread
            box["error"] = exc
            ready.set()

    t = threading.Thread(target=run, name="test-aio-rpc-server")
    t.start()
    assert ready.wait(10)
    if "error" in box:
        t.join(5)
        raise box["error"]
    try:
        yield box["srv"]
    finally:
        box["loop"].call_soon_threadsafe(box["srv"].shutdown)
        t.join(15)
        assert not t.is_alive()


@asynccontextmanager
async def aio_serving(url: str, service: Any, **options: Any) -> AsyncIterator[arpc.Server]:
    """A ``buzon.aio.rpc.Server`` on the test's own loop for the block."""
    options.setdefault("grace", 2.0)
    srv = arpc.Server(url, service, **options)
    task = asyncio.create_task(srv.serve_forever())
    try:
        yield srv
    finally:
        srv.shutdown()
        await asyncio.wait_for(task, 15)


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it is true or ``timeout`` passes (a generous bound)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()
