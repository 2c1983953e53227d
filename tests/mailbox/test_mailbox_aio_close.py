"""An asyncio mailbox's ``close()`` ends a ``recv`` or a ``send`` pending in another
task of the same loop at once with :class:`ChannelClosed` (the fallback slice is set
to 60 s: a wait that is not woken by the close hits the test's 10 s bound)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import buzon
from buzon.errors import ChannelClosed

T = 10.0
SLOW = 60.0  # the fallback slice: never reached in these tests


async def _ends_closed(coro: Any, close: Any) -> None:
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0.2)  # time to get into its wait (no assertion on how long)
    assert not task.done(), "the call did not wait"
    close()
    done, _ = await asyncio.wait([task], timeout=T)
    if not done:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pytest.fail("close() did not end the pending call")
    with pytest.raises(ChannelClosed):
        task.result()


@pytest.mark.parametrize("policy", ["any", "exclusive", "round_robin", "broadcast"])
def test_close_ends_a_recv_pending_in_another_task(policy: str) -> None:
    async def main() -> None:
        box = buzon.aio.mailbox("aclose", capacity=4, policy=policy)  # type: ignore[arg-type]
        box.sync._wait_slice = SLOW
        try:
            await _ends_closed(box.recv(), box.close)
            with pytest.raises(ChannelClosed):
                await box.recv(timeout=0)
        finally:
            box.remove()

    asyncio.run(main())


def test_close_ends_a_send_waiting_for_room() -> None:
    async def main() -> None:
        box = buzon.aio.mailbox("aclose", capacity=1)
        box.sync._wait_slice = SLOW
        try:
            await box.send("first")
            await _ends_closed(box.send("second"), box.close)
        finally:
            box.remove()

    asyncio.run(main())


def test_closing_the_blocking_object_ends_the_wait_too() -> None:
    async def main() -> None:
        box = buzon.aio.mailbox("aclose", capacity=4)
        box.sync._wait_slice = SLOW
        try:
            await _ends_closed(box.recv(), box.sync.close)
        finally:
            box.remove()

    asyncio.run(main())
