"""buzon's asyncio driver (``buzon.aio``), measured like the blocking rows.

``buzon-aio/TRANSPORT/rt64``: the 64 B round trip between two event loops, one per
process. The child runs an asyncio echo loop (``await ch.recv_bytes()`` then ``await
ch.send_bytes(data)``), the parent an asyncio ping loop timing each round trip; both
with the default ``spin`` (``buzon-aio-spin0``, shm only: ``spin=0``, every receive
that finds the ring empty waits in the event loop at once). This is the driver's own
cost: the wait goes through the event loop (``loop.add_reader`` on the channel's read
fd) instead of ``poll``.

``buzon-aio/TRANSPORT/oneway64``: the child sends 64 B messages with ``await
ch.send_bytes``, the parent receives with ``await ch.recv_bytes`` and counts them in
the same window as the blocking rows (the end of data is one short message).

The listener (``shm:``, ``unix:``) is bound in the parent before the fork; the child
connects inside its own event loop. ``pipe`` is a ``buzon.aio.pipe()`` pair made
before the fork. Every channel is closed before the loop ends.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

from ._harness import END, GO, HELLO, Case, Ctx, Quantity, Values, latency_values

__all__ = ["AIO_TRANSPORTS", "aio_cases"]

AIO_TRANSPORTS = ("pipe", "unix", "shm")
_TIMEOUT = 10.0


class _Link:
    """What both processes need to open their end: a pipe pair, or a listener's URL."""

    def __init__(self, ctx: Ctx, transport: str, options: dict[str, Any]) -> None:
        from .. import aio

        self.transport = transport
        self.options = options
        self.pair: tuple[Any, Any] | None = None
        self.listener: Any = None
        if transport == "pipe":
            self.pair = aio.pipe(**options)
            for ch in self.pair:
                ctx.close_later(ch)
        else:
            self.listener = aio.listen(f"{transport}:{ctx.name()}", **options)
            ctx.close_later(self.listener)
            self.url = str(self.listener.address)

    async def parent(self) -> Any:
        if self.pair is not None:
            return self.pair[0]
        ch = await self.listener.accept(timeout=_TIMEOUT)
        got = await ch.recv_bytes(timeout=_TIMEOUT)
        if got != HELLO:
            raise RuntimeError(f"handshake: expected {HELLO!r}, got {got[:16]!r}")
        await ch.send_bytes(GO)
        return ch

    async def child(self) -> Any:
        from .. import aio

        if self.pair is not None:
            return self.pair[1]
        ch = await aio.connect(self.url, timeout=_TIMEOUT, **self.options)
        await ch.send_bytes(HELLO)
        got = await ch.recv_bytes(timeout=_TIMEOUT)
        if got != GO:
            raise RuntimeError(f"handshake: expected {GO!r}, got {got[:16]!r}")
        return ch


def _in_loop(body: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``body`` in a fresh event loop (the child inherits no running loop)."""
    return asyncio.run(body())  # type: ignore[arg-type]


def _round_trip(transport: str, options: dict[str, Any], size: int = 64) -> Callable[[Ctx], Values]:
    def run(ctx: Ctx) -> Values:
        link = _Link(ctx, transport, options)

        async def echo() -> None:
            ch = await link.child()
            recv, send = ch.recv_bytes, ch.send_bytes
            try:
                while True:
                    data = await recv()
                    if len(data) != size:
                        break
                    await send(data)
            finally:
                await ch.aclose()

        async def ping() -> array[int]:
            ch = await link.parent()
            recv, send = ch.recv_bytes, ch.send_bytes
            perf = time.perf_counter_ns
            msg = bytes(size)
            lat: array[int] = array("q")
            record = lat.append
            try:
                for phase_ns, keep in ((ctx.warmup_ns, False), (ctx.measure_ns, True)):
                    end = perf() + phase_ns
                    while True:
                        t0 = perf()
                        await send(msg)
                        data = await recv(timeout=_TIMEOUT)
                        t1 = perf()
                        if len(data) != size:
                            raise RuntimeError(f"round trip: got {len(data)} bytes, not {size}")
                        if keep:
                            record(t1 - t0)
                        if t1 >= end:
                            break
                await send(END)
            finally:
                await ch.aclose()
            return lat

        proc = ctx.spawn(lambda: _in_loop(echo))
        lat = _in_loop(ping)
        proc.join()
        return latency_values(lat)

    return run


def _one_way(transport: str, size: int = 64) -> Callable[[Ctx], Values]:
    def run(ctx: Ctx) -> Values:
        ctl_r, ctl_w = os.pipe()  # parent -> child: "stop"
        ctx.own_fd(ctl_r, ctl_w)
        link = _Link(ctx, transport, {})

        async def blast() -> dict[str, Any]:
            ch = await link.child()
            send = ch.send_bytes
            msg = b"\x5a" * size
            perf = time.perf_counter_ns
            deadline = perf() + ctx.warmup_ns + ctx.measure_ns
            sent = 0
            try:
                while True:
                    for _ in range(64):
                        await send(msg)
                    sent += 64
                    if perf() >= deadline and select.select([ctl_r], [], [], 0)[0]:
                        break
                await send(END)
            finally:
                await ch.aclose()
            return {"sent": sent}

        async def drain() -> tuple[int, int]:
            ch = await link.parent()
            recv = ch.recv_bytes
            perf = time.perf_counter_ns
            count = 0
            try:
                end = perf() + ctx.warmup_ns
                while perf() < end:
                    for _ in range(64):
                        await recv(timeout=_TIMEOUT)
                t0 = perf()
                end = t0 + ctx.measure_ns
                while True:
                    for _ in range(64):
                        await recv(timeout=_TIMEOUT)
                    count += 64
                    t1 = perf()
                    if t1 >= end:
                        break
                os.write(ctl_w, b"!")
                while len(await recv(timeout=_TIMEOUT)) == size:
                    pass
            finally:
                await ch.aclose()
            return count, t1 - t0

        proc = ctx.spawn(lambda: _in_loop(blast))
        count, ns = _in_loop(drain)
        proc.join()
        rate = count * 1e9 / ns
        return {
            "rate": Quantity(rate, "msg/s"),
            "bandwidth": Quantity(rate * size / 1e6, "MB/s"),
            "messages": Quantity(count, "count"),
            "elapsed": Quantity(ns / 1e9, "s"),
            "message_size": Quantity(size, "B"),
        }

    return run


def aio_cases(transport: str) -> list[Case]:
    """The asyncio driver's rows for one transport (none where it is not measured)."""
    if transport not in AIO_TRANSPORTS:
        return []
    cases = [
        Case("buzon-aio", transport, "rt64", _round_trip(transport, {})),
        Case("buzon-aio", transport, "oneway64", _one_way(transport)),
    ]
    if transport == "shm":  # the only ring the asyncio driver spins on
        spin0 = Case("buzon-aio-spin0", transport, "rt64", _round_trip(transport, {"spin": 0.0}))
        cases.insert(0, spin0)
    return cases
