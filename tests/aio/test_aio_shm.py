"""The asyncio driver on a ``shm:`` ring: a receive that may be awaiting an answer (the
channel sent something since its last receive) spins on the ring, bounded by ``spin``
and the timeout, before it waits in the event loop; any other receive waits at once."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import buzon
from buzon import aio


@pytest.fixture
async def shm_pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Any]]:
    """(asyncio end, blocking end in a thread's hands) of one ``shm:`` channel."""
    spin = getattr(request, "param", 5.0)
    url = f"shm:aio-spin-{os.getpid()}-{id(request)}"
    with aio.listen(url, spin=spin) as lst:
        peer: list[Any] = []
        t = threading.Thread(target=lambda: peer.append(buzon.connect(url, timeout=10)))
        t.start()
        ch = await lst.accept(timeout=10)
        while t.is_alive():
            await asyncio.sleep(0.001)
        t.join()
    try:
        yield ch, peer[0]
    finally:
        await ch.aclose()
        peer[0].close()


def _count_readers(loop: asyncio.AbstractEventLoop) -> list[int]:
    added: list[int] = []
    original = loop.add_reader

    def add_reader(fd: Any, callback: Any, *args: Any) -> None:
        added.append(fd)
        original(fd, callback, *args)

    loop.add_reader = add_reader  # type: ignore[method-assign]
    return added


async def test_an_answer_arriving_while_recv_spins_is_taken_without_the_loop(
    shm_pair: tuple[Any, Any],
) -> None:
    ch, peer = shm_pair
    added = _count_readers(asyncio.get_running_loop())

    def answer() -> None:
        question = peer.recv_bytes(timeout=10)
        time.sleep(0.02)  # recv is spinning by now (spin=5 s, GIL released)
        peer.send_bytes(question.upper())

    t = threading.Thread(target=answer)
    t.start()
    try:
        await ch.send_bytes(b"ping")
        assert await ch.recv_bytes(timeout=10) == b"PING"
    finally:
        t.join()
    assert ch.fileno() not in added  # no add_reader: the spin found it


async def test_a_receive_that_sent_nothing_waits_in_the_loop_at_once(
    shm_pair: tuple[Any, Any],
) -> None:
    ch, peer = shm_pair
    spun: list[float] = []
    ch._core.fast_spin = lambda seconds: spun.append(seconds) or False
    for i in range(3):  # a stream received only: nothing to spin for
        task = asyncio.ensure_future(ch.recv(timeout=10))
        await asyncio.sleep(0.01)
        peer.send(i)
        assert await task == i
    assert spun == []
    await ch.send("question")
    assert peer.recv(timeout=10) == "question"
    with pytest.raises(buzon.Timeout):
        await ch.recv(timeout=0.01)  # this one spins (bounded by its timeout)
    with pytest.raises(buzon.Timeout):
        await ch.recv(timeout=0.01)  # and the next does not: nothing sent since
    assert len(spun) == 1


async def test_the_spin_is_bounded_by_the_timeout(shm_pair: tuple[Any, Any]) -> None:
    ch, _ = shm_pair
    core = ch._core
    spun: list[float] = []
    spin = core.fast_spin

    def recording(seconds: float) -> bool:
        spun.append(seconds)
        return bool(spin(seconds))

    core.fast_spin = recording
    await ch.send_bytes(b"a question")
    with pytest.raises(buzon.Timeout):
        await ch.recv_bytes(timeout=0.01)
    await ch.send_bytes(b"another")
    with pytest.raises(buzon.Timeout):
        await ch.recv(timeout=0)
    assert spun and max(spun) <= 0.01  # never the channel's 5 s


@pytest.mark.parametrize("shm_pair", [0.0], indirect=True)
async def test_spin_0_waits_in_the_loop_at_once(shm_pair: tuple[Any, Any]) -> None:
    ch, peer = shm_pair
    core = ch._core
    spun: list[float] = []
    core.fast_spin = lambda seconds: spun.append(seconds) or False
    await ch.send("question")
    task = asyncio.ensure_future(ch.recv(timeout=10))
    await asyncio.sleep(0.01)
    peer.send("hello")
    assert await task == "hello"
    assert spun == []
    assert peer.recv(timeout=10) == "question"
