"""A broadcast receipt whose message some receiver lost (its backlog dropped it, the
overflow rule, or it closed before taking it) still resolves: ``receivers`` names those
who took it, ``lost`` counts the other copies, ``wait`` returns the first receiver (or
raises ``Undelivered`` when every copy was lost), and no waiter hangs."""

from __future__ import annotations

import asyncio
import os

import pytest

import buzon
from buzon.errors import Undelivered

T = 10.0


def _box(name: str, backlog: int = 4) -> tuple[buzon.Mailbox, buzon.Mailbox, buzon.Mailbox]:
    tx = buzon.mailbox(name, capacity=backlog, policy="broadcast")
    rx1, rx2 = buzon.mailbox(name), buzon.mailbox(name)
    for rx in (rx1, rx2):
        with pytest.raises(buzon.Empty):
            rx.recv_nowait()  # attached from now on
    return tx, rx1, rx2


def test_a_copy_the_backlog_dropped_resolves_the_receipt_with_those_who_took_it() -> None:
    tx, rx1, rx2 = _box("bcl-drop")
    try:
        receipt = tx.send_async(b"m0")
        assert receipt.expected == 2
        assert rx1.recv(T) == b"m0"
        for i in range(8):  # rx2 falls 9 behind a backlog of 4: m0 is gone for it
            tx.send(b"later %d" % i)
        assert rx2.recv(T) != b"m0"
        assert rx2.statistics()["dropped"] >= 1
        assert receipt.wait(T).pid == os.getpid()
        assert receipt.done()
        assert [p.pid for p in receipt.receivers] == [os.getpid()]
        assert receipt.lost == 1
    finally:
        for box in (rx1, rx2):
            box.close()
        tx.remove()


def test_a_receipt_whose_every_copy_was_dropped_is_undelivered() -> None:
    tx, rx1, rx2 = _box("bcl-all")
    try:
        receipt = tx.send_async(b"m0")
        for i in range(8):
            tx.send(b"later %d" % i)
        assert rx1.recv(T) != b"m0" and rx2.recv(T) != b"m0"
        with pytest.raises(Undelivered, match="lost"):
            receipt.wait(T)
        assert receipt.done() and receipt.receivers == [] and receipt.lost == 2
    finally:
        for box in (rx1, rx2):
            box.close()
        tx.remove()


def test_a_receiver_that_closes_before_taking_its_copy_lost_it() -> None:
    tx, rx1, rx2 = _box("bcl-close")
    try:
        receipt = tx.send_async(b"m0")
        rx2.close()
        assert not receipt.done()  # rx1 has not taken it yet
        assert rx1.recv(T) == b"m0"
        assert receipt.wait(T).pid == os.getpid()
        assert receipt.lost == 1
    finally:
        rx1.close()
        tx.remove()


def test_asyncio_waits_for_a_receipt_with_a_dropped_copy() -> None:
    name = "bcl-aio"
    tx, rx1, rx2 = _box(name)

    async def main() -> int:
        atx = buzon.aio.mailbox(name)
        try:
            receipt = await atx.send_async(b"m0")
            waiter = asyncio.ensure_future(receipt.wait(T))
            await asyncio.sleep(0.01)
            assert rx1.recv(T) == b"m0"
            for i in range(8):
                tx.send(b"later %d" % i)
            assert rx2.recv(T) != b"m0"
            return (await waiter).pid
        finally:
            atx.close()

    try:
        assert asyncio.run(main()) == os.getpid()
    finally:
        for box in (rx1, rx2):
            box.close()
        tx.remove()
