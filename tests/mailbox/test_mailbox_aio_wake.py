"""The asyncio mailbox waits are woken by the ring, not by a timer.

Waiting for room, for an acknowledgement (receipt, rendezvous), for the holder of an
exclusive mailbox and (``send_to``) for room in another process's inbox: each test sets
the fallback slice to 60 s, so a waiter that missed its wake-up would hit the test's
10 s bound, and counts how often the waiter looked (a polling waiter looks dozens of
times while it waits 0.2 s; a woken one twice or three times). Each failed on 60416ea,
which polled every 0.5-20 ms.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import buzon

T = 10.0
SLOW = 60.0  # the fallback slice: never reached in these tests
LOOKS = 4  # at most this many tries of a woken wait


def _count(obj: Any, name: str) -> list[int]:
    """Count calls of ``obj.name`` (an instance attribute shadowing the method)."""
    calls = [0]
    real: Callable[..., Any] = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def _later(fn: Callable[[], object], delay: float = 0.2) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), fn()))
    t.start()
    return t


def test_a_sender_waiting_for_room_is_woken_by_the_take() -> None:
    async def main() -> None:
        box = buzon.aio.mailbox("room", capacity=1)
        rx = buzon.mailbox("room")
        box.sync._wait_slice = SLOW
        try:
            await box.send("first")
            tries = _count(box.sync, "_send")
            t = _later(lambda: rx.recv(T))
            await asyncio.wait_for(box.send("second"), T)
            t.join(T)
            assert tries[0] <= LOOKS, f"{tries[0]} tries: it polled"
            assert rx.recv(T) == "second"
        finally:
            rx.close()
            box.remove()

    asyncio.run(main())


def test_a_round_robin_sender_waiting_for_room_or_a_receiver_is_woken() -> None:
    async def main() -> None:
        box = buzon.aio.mailbox("rrroom", capacity=1, policy="round_robin")
        box.sync._wait_slice = SLOW
        rx = buzon.mailbox("rrroom")
        try:
            tries = _count(box.sync, "_send")
            t = _later(rx._rx)  # attaches (as a recv does)
            await asyncio.wait_for(box.send("first"), T)  # no receiver yet: waits for one
            t.join(T)
            assert tries[0] <= LOOKS, f"{tries[0]} tries: it polled"
            tries[0] = 0
            t = _later(lambda: rx.recv(T))  # its backlog (capacity 1) is full: room
            await asyncio.wait_for(box.send("second"), T)
            t.join(T)
            assert tries[0] <= LOOKS, f"{tries[0]} tries: it polled"
            assert rx.recv(T) == "second"
        finally:
            rx.close()
            box.remove()

    asyncio.run(main())


def test_a_receipt_and_a_rendezvous_are_woken_by_the_acknowledgement() -> None:
    async def main() -> None:
        box = buzon.aio.mailbox("acks")
        rx = buzon.mailbox("acks")
        rdv = buzon.aio.mailbox("rdvw", capacity=0)
        rdv_rx = buzon.mailbox("rdvw")
        for b in (box, rdv):
            b.sync._wait_slice = SLOW
        try:
            receipt = await box.send_async("x")
            looks = _count(box.sync, "_ack_of")
            t = _later(lambda: rx.recv(T))
            assert (await asyncio.wait_for(receipt.wait(), T)).pid == os.getpid()
            t.join(T)
            assert looks[0] <= LOOKS, f"{looks[0]} looks: it polled"

            looks = _count(rdv.sync, "_ack_of")
            t = _later(lambda: rdv_rx.recv(T))
            await asyncio.wait_for(rdv.send("hand-over", timeout=T), T)
            t.join(T)
            assert looks[0] <= LOOKS, f"{looks[0]} looks: it polled"
        finally:
            rx.close()
            rdv_rx.close()
            box.remove()
            rdv.remove()

    asyncio.run(main())


@pytest.mark.parametrize("how", ["close", "kill"])
def test_a_receiver_waiting_for_the_exclusive_holder_is_woken_when_it_goes(how: str) -> None:
    box = buzon.mailbox("excl", policy="exclusive")
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: the holder
        code = 1
        try:
            with buzon.mailbox("excl") as holder:
                holder.recv(T)  # it holds the mailbox from now on
                os.write(w, b"h")
                os.read(go_r, 1)  # until the parent's receiver waits
                time.sleep(0.2)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.close(go_r)

    async def main() -> Any:
        rx = buzon.aio.mailbox("excl")
        rx.sync._wait_slice = SLOW
        try:
            box.send("taken by the holder")
            assert os.read(r, 1) == b"h"
            box.send("for the next holder")
            looks = _count(rx.sync, "_take")
            got = asyncio.ensure_future(rx.recv(timeout=T))
            await asyncio.sleep(0.05)  # (not asserted: a late waiter just takes over)
            os.write(go_w, b"g")
            if how == "kill":
                os.kill(pid, signal.SIGKILL)
            item = await asyncio.wait_for(got, T)
            assert looks[0] <= LOOKS, f"{looks[0]} looks: it polled"
            assert rx.holding()
            return item
        finally:
            rx.close()

    try:
        assert asyncio.run(main()) == "for the next holder"
    finally:
        os.close(r)
        os.close(go_w)
        status = os.waitpid(pid, 0)[1]
        box.remove()
    assert os.waitstatus_to_exitcode(status) == (0 if how == "close" else -signal.SIGKILL)


def test_send_to_a_full_inbox_is_woken_by_the_owner_taking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from buzon import _direct
    from buzon.aio import _direct as aio_direct

    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: the inbox's owner
        code = 1
        try:
            me = buzon.inbox()
            os.write(w, b"i")
            os.read(go_r, 1)
            time.sleep(0.2)
            me.recv(T)  # room for the parent's waiting send
            os.read(go_r, 1)  # the parent sent: now the inbox may go
            me.remove()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.close(go_r)

    async def main() -> None:
        assert os.read(r, 1) == b"i"
        target = _direct._target(pid)
        target.box._wait_slice = SLOW
        while True:  # fill its inbox
            try:
                buzon.send_to(pid, 0, timeout=0)
            except buzon.Full:
                break
        tries = [0]
        real = aio_direct._sync_send_to

        def counted(*args: Any) -> None:
            tries[0] += 1
            real(*args)

        monkeypatch.setattr(aio_direct, "_sync_send_to", counted)
        os.write(go_w, b"g")
        await asyncio.wait_for(buzon.aio.send_to(pid, "late"), T)
        os.write(go_w, b"d")
        assert tries[0] <= LOOKS, f"{tries[0]} tries: it polled"

    try:
        asyncio.run(main())
    finally:
        os.close(r)
        os.close(go_w)
        status = os.waitpid(pid, 0)[1]
        cached = _direct._targets.get(pid)
        if cached is not None:
            _direct._forget(cached)
    assert os.waitstatus_to_exitcode(status) == 0
