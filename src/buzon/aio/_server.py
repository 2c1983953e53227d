"""The asyncio concurrent server: one task per client (``mode="async"``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..address import serve_address
from ..errors import BuzonError, ChannelClosed
from ._channel import Channel
from ._open import Listener, listen

__all__ = ["Server", "serve"]

log = logging.getLogger("buzon.server")

AsyncHandler = Callable[[Channel], Awaitable[Any]]


class Server:
    """Accept on ``url`` and run ``await handler(channel)`` in a task per client.

    ``await server.serve_forever()`` runs until :meth:`shutdown` (or cancellation);
    shutdown stops accepting, removes the endpoint, gives running handlers ``grace``
    seconds and then cancels them. Handshakes run concurrently in the listener's accept
    engine and take no handler slot; at most ``max_clients`` handlers run at once, and
    a client whose handshake completes beyond that is refused with the reason
    (``max_clients``) and counted in ``refused`` (as :class:`buzon.Server`).
    """

    def __init__(
        self,
        url: str,
        handler: AsyncHandler,
        *,
        max_clients: int = 256,
        grace: float = 5.0,
        **options: Any,
    ) -> None:
        addr = serve_address(url, options)  # name:NAME serves unix:NAME
        self.handler = handler
        self.max_clients = max_clients
        self.grace = grace
        self.served = 0
        self.refused = 0
        self.failed = 0
        self._listener: Listener = listen(addr, **options)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # serve_forever's
        self._stopping = False  # shutdown() asked (kept if serve_forever has not begun)

    @property
    def address(self) -> Any:
        return self._listener.address

    @property
    def active(self) -> int:
        return len(self._tasks)

    def shutdown(self) -> None:
        """Ask :meth:`serve_forever` to stop: at once if it runs; if it has not begun
        yet, it returns at once when it does (the request is kept). Safe from the
        loop's thread and from any other (through the loop)."""
        self._stopping = True
        stop, loop = self._stop, self._loop
        if stop is None or loop is None:
            return  # serve_forever sees _stopping when it begins
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop or not loop.is_running():
            stop.set()
        else:
            loop.call_soon_threadsafe(stop.set)

    async def serve_forever(self) -> None:
        """Accept and serve clients until :meth:`shutdown` (or cancellation)."""
        self._loop = asyncio.get_running_loop()
        self._stop = stop = asyncio.Event()
        if self._stopping:  # shutdown() came first: stop before serving anyone
            stop.set()
        stopper = asyncio.ensure_future(stop.wait())
        self._listener._set_admit(self._admit)
        try:
            while not stop.is_set():
                accept = asyncio.ensure_future(self._listener.accept(None))
                done, _ = await asyncio.wait({accept, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if accept not in done:
                    accept.cancel()
                    break
                try:
                    ch = accept.result()
                except BuzonError:
                    continue
                self.served += 1
                task = asyncio.ensure_future(self._client(ch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            stopper.cancel()
            self._listener.close()
            if self._tasks:
                _, pending = await asyncio.wait(set(self._tasks), timeout=self.grace)
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=1.0)

    def _admit(self) -> str | None:
        """Asked as a handshake is about to succeed: a reason to refuse, or None."""
        if len(self._tasks) + self._listener._queued < self.max_clients:
            return None
        self.refused += 1
        return f"the server is at capacity (max_clients={self.max_clients}); try again later"

    async def _client(self, ch: Channel) -> None:
        try:
            async with ch:
                await self.handler(ch)
        except ChannelClosed:
            pass
        except Exception:
            self.failed += 1
            log.exception("handler failed for %r", ch)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()


async def serve(url: str, handler: AsyncHandler, **options: Any) -> None:
    """Serve until cancelled (or the server is shut down)."""
    server = Server(url, handler, **options)
    await server.serve_forever()
