"""``buzon.wait([...])`` and ``buzon.aio.wait([...])`` wake when one of the objects
they wait on is closed by another thread (task): the closed object is returned as
ready (its next operation raises :class:`ChannelClosed`), promptly, on every
transport; the closed object's fds are released only after the waiter left them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

import buzon
from buzon import aio
from buzon.errors import ChannelClosed
from buzon.testing.conformance._harness import url_for

pytestmark = pytest.mark.fd_check

KINDS = ["pipe", "unix", "tcp", "unixgram", "mq", "fifo", "shm"]
JOIN = 10.0  # generous: only a waiter that never wakes gets near it


def _pair(kind: str) -> tuple[buzon.Channel, buzon.Channel]:
    if kind == "pipe":
        return buzon.pipe()
    lst = buzon.listen(url_for(kind))
    try:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        a = buzon.connect(str(lst.address), timeout=10)
        t.join(10)
        b = box[0]
        if not b.properties.connection_oriented:  # datagrams: introduce the client
            a.send_bytes(b"hello", timeout=10)
            assert b.recv_bytes(timeout=10) == b"hello"
        return a, b
    finally:
        lst.close()


def _waiting(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # the test looks at it
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(0.2)  # time to get into its wait (no assertion on how long)
    assert t.is_alive(), "wait did not wait"
    return t, out


@pytest.mark.parametrize("kind", KINDS)
def test_close_from_another_thread_wakes_buzon_wait(kind: str) -> None:
    a, b = _pair(kind)
    other_a, other_b = buzon.pipe()
    try:
        t, out = _waiting(lambda: buzon.wait([other_b, b]))
        b.close()
        t.join(JOIN)
        assert not t.is_alive(), "close() did not wake buzon.wait"
        assert out == [[b]], out
        with pytest.raises(ChannelClosed):
            b.recv_nowait()
    finally:
        for ch in (a, b, other_a, other_b):
            ch.close()


def test_a_listener_closed_from_another_thread_wakes_buzon_wait() -> None:
    lst = buzon.listen(url_for("unix"))
    a, b = buzon.pipe()
    try:
        t, out = _waiting(lambda: buzon.wait([b, lst], timeout=60))
        lst.close()
        t.join(JOIN)
        assert not t.is_alive(), "close() did not wake buzon.wait"
        assert out == [[lst]], out
        with pytest.raises(ChannelClosed):
            lst.accept(timeout=0)
    finally:
        lst.close()
        a.close()
        b.close()


def test_buzon_wait_on_an_object_already_closed_returns_it() -> None:
    a, b = buzon.pipe()
    other_a, other_b = buzon.pipe()
    b.close()
    try:
        assert buzon.wait([other_b, b], timeout=JOIN) == [b]
    finally:
        for ch in (a, other_a, other_b):
            ch.close()


async def _aio_pair(kind: str) -> tuple[aio.Channel, aio.Channel]:
    if kind == "pipe":
        return aio.pipe()
    lst = aio.listen(url_for(kind))
    try:
        accepting = asyncio.ensure_future(lst.accept(timeout=10))
        a = await aio.connect(str(lst.address), timeout=10)
        b = await asyncio.wait_for(accepting, 10)
        if not b.properties.connection_oriented:
            await a.send_bytes(b"hello", timeout=10)
            assert await b.recv_bytes(timeout=10) == b"hello"
        return a, b
    finally:
        lst.close()


async def _aio_waiting(objects: list[Any]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(aio.wait(objects, timeout=60))
    await asyncio.sleep(0.2)
    assert not task.done(), "wait did not wait"
    return task


async def _result(task: asyncio.Task[Any]) -> Any:
    done, _ = await asyncio.wait([task], timeout=JOIN)
    if not done:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pytest.fail("close() did not wake buzon.aio.wait")
    return task.result()


@pytest.mark.parametrize("how", ["close", "aclose"])
@pytest.mark.parametrize("kind", [*KINDS, "udp"])
async def test_close_in_another_task_wakes_aio_wait(kind: str, how: str) -> None:
    a, b = await _aio_pair(kind)
    other_a, other_b = aio.pipe()
    try:
        task = await _aio_waiting([other_b, b])
        if how == "close":
            b.close()
        else:
            await b.aclose()
        assert await _result(task) == [b]
        with pytest.raises(ChannelClosed):
            b.recv_nowait()
    finally:
        for ch in (a, b, other_a, other_b):
            ch.close()
        await asyncio.sleep(0.05)


async def test_a_listener_closed_in_another_task_wakes_aio_wait() -> None:
    lst = aio.listen(url_for("unix"))
    a, b = aio.pipe()
    try:
        task = await _aio_waiting([b, lst])
        lst.close()
        assert await _result(task) == [lst]
    finally:
        lst.close()
        a.close()
        b.close()


async def test_a_mailbox_closed_in_another_task_wakes_aio_wait() -> None:
    box = aio.mailbox("waitclose", capacity=4)
    box.sync._wait_slice = 60.0  # the fallback slice: a missed wake-up hits JOIN
    a, b = aio.pipe()
    try:
        task = await _aio_waiting([b, box])
        box.close()
        assert await _result(task) == [box]
    finally:
        box.remove()
        a.close()
        b.close()


def test_a_mailbox_closed_from_another_thread_wakes_buzon_wait() -> None:
    box = buzon.mailbox("waitclose", capacity=4)
    box._wait_slice = 60.0  # the fallback slice: a missed wake-up hits JOIN
    a, b = buzon.pipe()
    try:
        t, out = _waiting(lambda: buzon.wait([b, box], timeout=60))
        box.close()
        t.join(JOIN)
        assert not t.is_alive(), "close() did not wake buzon.wait"
        assert out == [[box]], out
    finally:
        box.remove()
        a.close()
        b.close()
