"""A receipt's wait is an engine operation run by its channel's own driver.

``await receipt`` on a *blocking* channel waits without a thread (on f43dbb5 it ran
``receipt.wait`` in a worker thread: ``asyncio.to_thread``), also while another thread
of the program is receiving on that channel; and ``Receipt`` calls no driver-specific
hook of the channel."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest

import buzon
from _pairs import url_pair
from buzon._channel import Receipt

T = 10.0


def _threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.ident is not None}


@pytest.mark.parametrize("receiving_thread", [False, True], ids=["idle", "receiving"])
def test_await_on_a_blocking_channels_receipt_starts_no_thread(receiving_thread: bool) -> None:
    a, b = buzon.pipe()
    with a, b:
        got: list[object] = []
        start = threading.Event()

        def receive() -> None:
            start.wait(T)
            got.append(b.recv(timeout=T))

        reader = threading.Thread(target=receive)
        reader.start()
        helper: threading.Thread | None = None
        if receiving_thread:  # a's own receiving thread: it reads the CREDITs
            helper = threading.Thread(target=lambda: got.append(a.recv(timeout=T)))
            helper.start()

        async def main() -> None:
            receipt = a.send_async("hello")
            before = _threads()
            waiting = asyncio.ensure_future(_await(receipt))
            await asyncio.sleep(0.05)
            started = _threads() - before
            start.set()
            await asyncio.wait_for(waiting, T)
            assert receipt.delivered()
            assert not started, "await receipt started a thread"

        asyncio.run(main())
        reader.join(T)
        if helper is not None:
            b.send("to a's receiving thread", timeout=T)
            helper.join(T)
        assert got[0] == "hello"


async def _await(receipt: Receipt) -> None:
    await receipt


def test_receipt_calls_no_driver_hook() -> None:
    source = inspect.getsource(Receipt)
    assert "_receipt_" not in source


@pytest.mark.parametrize("kind", ["pipe", "unix"])
def test_a_receipt_ended_by_its_own_close_says_the_fate_is_unknown(kind: str) -> None:
    """The sender closes with a receipt pending: the receipt fails (nothing can be
    read any more), yet the receiver, alive, still takes the message; so the error
    must not claim it was not delivered."""
    a, b = url_pair("pipe" if kind == "pipe" else "unix:receipt-own-close")
    with b:
        receipt = a.send_bytes_async(b"late")
        a.close()
        with pytest.raises(buzon.Undelivered, match="fate is unknown"):
            receipt.wait(timeout=10)
        assert b.recv_bytes(timeout=10) == b"late"  # it was delivered after all
