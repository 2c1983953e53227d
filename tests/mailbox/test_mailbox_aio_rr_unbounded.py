"""An asyncio round_robin mailbox of ``capacity=None`` waits for room as the blocking
one does (``Mailbox._put_round_robin``: until a receiver's backlog has room for this
record), woken by the take, never by a timer; the wait ends with its ``timeout`` or a
cancellation, and then nothing of it is delivered. On a7ee4e5 ``await box.send`` raised
``Full`` at once (the blocking ``send`` waited).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import buzon

T = 10.0
SLOW = 60.0  # the fallback slice: a waiter that missed its wake-up hits T first
LOOKS = 4  # at most this many tries of a woken wait


def _count(obj: Any, name: str) -> list[int]:
    calls = [0]
    real: Callable[..., Any] = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def _fill(box: buzon.aio.AioMailbox, item: bytes) -> int:
    n = 0
    while True:
        try:
            box.send_nowait(item)
        except buzon.Full:
            return n
        n += 1


def test_a_full_unbounded_round_robin_send_waits_for_room() -> None:
    async def main() -> None:
        box = buzon.aio.mailbox("aiorrnone", capacity=None, policy="round_robin", max_bytes=65536)
        box.sync._wait_slice = SLOW
        rx = buzon.mailbox("aiorrnone")
        try:
            rx._rx()  # attached: its backlog takes the messages
            small, big = b"s" * 100, b"B" * 1000  # both inline (max_inline 1024)
            n = _fill(box, small)
            assert n > 0
            assert rx.recv(T) == small  # room for a small record now, not for a big one
            with pytest.raises(buzon.Full):
                box.send_nowait(big)
            assert box.sync._fan is not None
            looks = _count(box.sync._fan, "round_robin")

            def drain() -> None:
                time.sleep(0.2)
                for _ in range(20):
                    rx.recv(T)

            t = threading.Thread(target=drain)
            t.start()
            try:
                await asyncio.wait_for(box.send(big), T)
            finally:
                t.join(T)
            assert looks[0] <= LOOKS, f"{looks[0]} looks: it polled"
            while rx.recv(T) != big:
                pass
        finally:
            rx.close()
            box.remove()

    asyncio.run(main())


def test_a_waiting_unbounded_round_robin_send_times_out_or_is_cancelled_delivering_nothing() -> (
    None
):
    async def main() -> None:
        box = buzon.aio.mailbox("aiorrnone2", capacity=None, policy="round_robin", max_bytes=65536)
        rx = buzon.mailbox("aiorrnone2")
        try:
            rx._rx()
            n = _fill(box, b"o" * 500)
            with pytest.raises(buzon.Timeout):
                await box.send(b"t" * 500, timeout=0.2)
            with pytest.raises(asyncio.TimeoutError):  # a cancellation
                await asyncio.wait_for(box.send(b"c" * 2_000_000), 0.2)  # out of line
            got = [rx.recv(T) for _ in range(n)]
            assert got == [b"o" * 500] * n
            with pytest.raises(buzon.Empty):
                rx.recv_nowait()
            await box.send(b"after", timeout=T)  # room again
            assert rx.recv(T) == b"after"
        finally:
            rx.close()
            box.remove()

    asyncio.run(main())
