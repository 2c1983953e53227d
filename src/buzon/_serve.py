"""``buzon.serve``: one entry point for the three concurrent-server modes.

It lives above both drivers because ``mode="async"`` needs the asyncio one and the
others the blocking one; neither driver imports the other.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["serve"]


def serve(url: str, handler: Callable[[Any], Any], *, mode: str = "thread", **options: Any) -> None:
    """Serve ``url`` until SIGINT/SIGTERM, running ``handler(channel)`` per client.

    ``mode="thread"``: a thread per client; ``"process"``: a forked process per client
    (reaped as it exits); ``"async"``: ``handler`` is a coroutine function taking a
    :class:`buzon.aio.Channel`, one task per client on a fresh event loop. For control
    from code (stop on demand, counters), use :class:`buzon.Server` or
    :class:`buzon.aio.Server` directly.
    """
    if mode == "async":
        import asyncio

        from .aio import Server as AsyncServer

        async def main() -> None:
            server = AsyncServer(url, handler, **options)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, server.shutdown)
            try:
                await server.serve_forever()
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

        asyncio.run(main())
        return
    from .sync import Server

    server = Server(url, handler, mode=mode, **options)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: server.shutdown())
    try:
        server.serve_forever()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
