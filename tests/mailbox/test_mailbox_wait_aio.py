"""Mailboxes everywhere a channel goes: ``buzon.wait``, ``buzon.aio.wait`` and the
asyncio twin (``buzon.aio.mailbox``), with senders in other processes and threads."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import buzon
from buzon import Empty, EndOfChannel, Timeout

T = 10.0


def _send_later(obj: object, delay: float = 0.1) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            time.sleep(delay)
            with buzon.mailbox("jobs") as b:
                b.send(obj, timeout=T)
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pid: int) -> None:
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_wait_returns_a_mailbox_when_a_message_arrives_from_another_process() -> None:
    box = buzon.mailbox("jobs")
    a, b = buzon.pipe()
    try:
        assert buzon.wait([box, b], timeout=0.05) == []
        pid = _send_later("hello")
        assert buzon.wait([box, b], timeout=T) == [box]
        _reap(pid)
        assert box.recv_nowait() == "hello"
        a.send("on the pipe")
        assert buzon.wait([box, b], timeout=T) == [b]
    finally:
        a.close()
        b.close()
        box.remove()


def test_wait_on_many_mailboxes_and_the_end_of_a_removed_one() -> None:
    box = buzon.mailbox("jobs")
    other = buzon.mailbox("other")
    timer = threading.Timer(0.1, lambda: buzon.mailbox("other").remove())
    try:
        timer.start()
        assert buzon.wait([box, other], timeout=T) == [other]
        with pytest.raises(EndOfChannel):
            other.recv_nowait()
    finally:
        timer.join(T)
        other.close()
        box.remove()


async def test_aio_recv_wakes_for_a_sender_in_another_process() -> None:
    box = buzon.aio.mailbox("jobs", capacity=4)
    try:
        with pytest.raises(Timeout):
            await box.recv(timeout=0.05)
        pid = _send_later({"job": 1})
        m = await box.recv_message(timeout=T)
        _reap(pid)
        assert m.body == {"job": 1} and m.sender.pid == pid
    finally:
        box.remove()


async def test_aio_send_waits_for_room_and_receipts_name_the_receiver() -> None:
    box = buzon.aio.mailbox("jobs", capacity=1)
    try:
        await box.send(1)
        with pytest.raises(Timeout):
            await box.send(2, timeout=0.05)
        task = asyncio.ensure_future(box.send_async(2, timeout=T))
        await asyncio.sleep(0.05)
        assert await box.recv(timeout=T) == 1
        receipt = await task
        assert await box.recv(timeout=T) == 2
        assert (await receipt.wait(T)).pid == os.getpid()
        assert len(box) == 0 and box.capacity == 1
    finally:
        box.remove()


async def test_aio_rendezvous_returns_once_taken() -> None:
    box = buzon.aio.mailbox("jobs", capacity=0)
    try:
        with pytest.raises(Timeout):
            await box.send("nobody", timeout=0.05)
        with pytest.raises(buzon.Empty):
            box.recv_nowait()  # withdrawn: no receiver ever sees it
        sent = asyncio.ensure_future(box.send("hand-over", timeout=T))
        await asyncio.sleep(0.05)
        assert not sent.done()  # (not asserted on time: a slow loop only delays it)
        assert await box.recv(timeout=T) == "hand-over"
        await asyncio.wait_for(sent, T)
    finally:
        box.remove()


async def test_a_cancelled_aio_recv_takes_nothing() -> None:
    box = buzon.aio.mailbox("jobs")
    try:
        task = asyncio.ensure_future(box.recv())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        box.send_nowait("after")
        assert box.recv_nowait() == "after"
        with pytest.raises(Empty):
            box.recv_nowait()
    finally:
        box.remove()


async def test_aio_wait_takes_mailboxes() -> None:
    box = buzon.aio.mailbox("jobs")
    try:
        assert await buzon.aio.wait([box], timeout=0.05) == []
        pid = _send_later("x")
        assert await buzon.aio.wait([box], timeout=T) == [box]
        _reap(pid)
        assert await box.recv(timeout=T) == "x"
    finally:
        box.remove()


async def test_aio_tasks_and_a_thread_share_a_mailbox() -> None:
    box = buzon.aio.mailbox("jobs", capacity=8)
    got: list[int] = []

    async def consume() -> None:
        while (item := await box.recv(timeout=T)) is not None:
            got.append(item)

    def produce() -> None:
        with buzon.mailbox("jobs") as b:
            for i in range(200):
                b.send(i, timeout=T)
            for _ in range(3):
                b.send(None, timeout=T)

    t = threading.Thread(target=produce)
    t.start()
    await asyncio.wait_for(asyncio.gather(*(consume() for _ in range(3))), T * 3)
    t.join(T)
    box.remove()
    assert sorted(got) == list(range(200))


async def test_aio_broadcast_and_round_robin_receivers() -> None:
    news = buzon.aio.mailbox("news", policy="broadcast")
    a, b = buzon.aio.mailbox("news"), buzon.aio.mailbox("news")
    rr = buzon.aio.mailbox("rr", policy="round_robin")
    c, d = buzon.aio.mailbox("rr"), buzon.aio.mailbox("rr")
    try:
        for x in (a, b, c, d):
            with pytest.raises(Empty):
                x.recv_nowait()  # attach
        tasks = [asyncio.ensure_future(x.recv(timeout=T)) for x in (a, b)]
        await asyncio.sleep(0.05)
        await news.send("to all")
        assert await asyncio.gather(*tasks) == ["to all", "to all"]
        await rr.send(1)
        await rr.send(2)
        assert sorted([await c.recv(timeout=T), await d.recv(timeout=T)]) == [1, 2]
    finally:
        for x in (a, b, c, d):
            x.close()
        news.remove()
        rr.remove()
