"""Receipts naming the receiver, written into the sender's acknowledgement table
(``send_async``'s hot path: protocol/_frames.c, "the acknowledgement table").

Every receipt must name the process that really took its message, for every policy,
with several receiver processes and sender threads; nothing may be lost when the table
refuses an acknowledgement (the ring takes it) or when a receiver dies. Receivers are
forked; every wait is bounded by ``T``.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
from collections.abc import Callable

import pytest
from _mb_helpers import fork, reap

import buzon
from buzon import Timeout
from buzon._mailbox import _ACKTAB_BYTES, _MAX_ACKS, MailboxReceipt

T = 10.0  # generous bound on every wait
_BUSY = 1 << 63


def _receiver(name: str, w: int) -> Callable[[], None]:
    """A receiver process: takes until None, then reports (its pid, what it took)."""

    def run() -> None:
        box = buzon.mailbox(name)
        took = []
        while (got := box.recv(T)) is not None:
            took.append(got)
        box.close()
        os.write(w, (json.dumps([os.getpid(), took]) + "\n").encode())

    return run


def _collect(r: int, n: int) -> dict[int, list[int]]:
    """(pid -> values) of n receivers' reports on pipe r."""
    data = b""
    while data.count(b"\n") < n:
        chunk = os.read(r, 1 << 16)
        assert chunk, "a receiver died without its report"
        data += chunk
    out: dict[int, list[int]] = {}
    for line in data.splitlines():
        pid, took = json.loads(line)
        out[pid] = took
    return out


@pytest.mark.parametrize("policy", ["any", "exclusive", "round_robin", "broadcast"])
def test_every_receipt_names_the_process_that_took_its_message(policy: str) -> None:
    # 3 receiver processes, 2 sender threads sharing one mailbox object (one table):
    # each receipt names the pid that reported taking that very message
    # (a broadcast backlog that overflows drops its oldest: room for every message)
    capacity = 1024 if policy == "broadcast" else 64
    box = buzon.mailbox("jobs", capacity=capacity, policy=policy)  # type: ignore[arg-type]
    r, w = os.pipe()
    pids = [fork(_receiver("jobs", w)) for _ in range(3)]
    os.close(w)
    try:
        if policy == "broadcast":  # every receiver attached before the first message
            deadline = time.monotonic() + T
            while box._bc is None or box._bc.receivers() < 3:
                assert time.monotonic() < deadline, "the receivers never attached"
                threading.Event().wait(0.01)
        receipts: dict[int, MailboxReceipt] = {}

        def send(first: int) -> None:
            for v in range(first, first + 300):
                receipts[v] = box.send_async(v, timeout=T)

        threads = [threading.Thread(target=send, args=(k * 1000,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        named = {v: rc.wait(T) for v, rc in receipts.items()}  # all resolve
        while pids:
            try:  # an end mark for each receiver still there (round_robin: while
                box.send(None, timeout=0.05)  # one is attached)
            except (Timeout, buzon.Full):
                pass
            threading.Event().wait(0.01)
            for p in list(pids):
                done, status = os.waitpid(p, os.WNOHANG)
                if done:
                    pids.remove(p)
                    assert status == 0
        took = _collect(r, 3)
        for v, rc in receipts.items():
            takers = {pid for pid, vals in took.items() if v in vals}
            if policy == "broadcast":
                assert {p.pid for p in rc.receivers} == takers == set(took)
            else:
                assert takers == {named[v].pid}, (v, takers, named[v])
            assert named[v].uid == os.getuid()
    finally:
        for p in pids:
            os.kill(p, signal.SIGKILL)
            reap(p)
        os.close(r)
        box.remove()


def test_the_receiver_writes_the_senders_table_not_its_ring() -> None:
    # the hot path's acknowledgements are stores into the sender's table: its ring gets
    # no record while the sender does not wait (the old way: one record per message)
    box = buzon.mailbox("jobs", capacity=256)
    r, w = os.pipe()
    pid = fork(_receiver("jobs", w))
    os.close(w)
    try:
        receipts = [box.send_async(i, timeout=T) for i in range(200)]
        box.send(None, timeout=T)
        took = _collect(r, 1)
        assert took == {pid: list(range(200))}
        assert box._acks is not None and box._acks.info()["committed"] == 0
        assert [rc.wait(T).pid for rc in receipts] == [pid] * 200
        assert [rc.receivers for rc in receipts[:2]] == [[rc.receiver] for rc in receipts[:2]]
        assert box.statistics()["acks_dropped"] == 0
    finally:
        reap(pid)
        os.close(r)
        box.remove()


def test_a_waiting_sender_is_woken_by_a_doorbell_for_its_message_only() -> None:
    # a sender waiting for message 2 gets one ring record (the doorbell) for it; the
    # acknowledgement of message 1, taken while it waits, is a table store only
    box = buzon.mailbox("jobs")
    first, second = box.send_async("one"), box.send_async("two")
    go_r, go_w = os.pipe()

    def late() -> None:
        b = buzon.mailbox("jobs")
        os.read(go_r, 1)
        assert b.recv(T) == "one" and b.recv(T) == "two"
        b.close()

    pid = fork(late)
    try:
        threading.Timer(0.1, os.write, (go_w, b"g")).start()
        who = second.wait(T)  # asleep on the ring until the doorbell
        assert who.pid == pid and first.wait(T).pid == pid
        assert box._acks is not None and box._acks.info()["committed"] == 1
    finally:
        assert reap(pid) == 0
        os.close(go_r)
        os.close(go_w)
        box.remove()


def test_a_receiver_killed_mid_take_loses_that_message_only() -> None:
    # at most once: the receiver dies after claiming its 4th message (before its
    # acknowledgement): that receipt never resolves; the 3 it took name it, and the rest
    # go to the next receiver, whose receipts name that one
    box = buzon.mailbox("jobs", capacity=16)
    receipts = [box.send_async(i) for i in range(8)]

    def die() -> None:
        b = buzon.mailbox("jobs")
        assert [b.recv(T) for _ in range(3)] == [0, 1, 2]
        buzon._core._set_fault(buzon._core.F_COPIED)
        b.recv(T)

    dead = fork(die)
    status = reap(dead)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    r, w = os.pipe()
    alive = fork(_receiver("jobs", w))
    os.close(w)
    try:
        box.send(None)
        assert _collect(r, 1) == {alive: [4, 5, 6, 7]}
        assert [rc.wait(T).pid for rc in receipts[:3]] == [dead] * 3
        assert [rc.wait(T).pid for rc in receipts[4:]] == [alive] * 4
        with pytest.raises(Timeout):
            receipts[3].wait(0.05)
        assert box.statistics()["abandoned"] == 1
    finally:
        reap(alive)
        os.close(r)
        box.remove()


def _entry(box: buzon.Mailbox, message_id: int) -> tuple[memoryview, int]:
    assert box._acktab is not None
    view = memoryview(box._acktab)
    assert len(view) >= _ACKTAB_BYTES
    return view, 64 + 16 * (message_id % _MAX_ACKS)


@pytest.mark.parametrize("scribble", [_BUSY | 10**15, 10**15, _BUSY])
def test_an_entry_the_table_refuses_goes_through_the_ring(scribble: int) -> None:
    # an entry holding a later id (another receipt 65536 behind, a receiver killed while
    # writing it, or scribbled by another process of the user) refuses the
    # acknowledgement: it goes into the ring instead, and the receipt still resolves
    box = buzon.mailbox("jobs")
    rx = buzon.mailbox("jobs")
    try:
        receipt = box.send_async("x")
        view, at = _entry(box, receipt.id)
        struct.pack_into("<Q", view, at, scribble)
        view.release()
        assert rx.recv(T) == "x"
        assert box._acks is not None
        refused = (scribble & ~_BUSY) >= receipt.id
        assert box._acks.info()["committed"] == (1 if refused else 0)
        assert receipt.wait(T).pid == os.getpid()
    finally:
        rx.close()
        box.remove()


def test_an_acknowledgement_overwritten_by_one_65536_later_is_a_timeout_not_a_wrong_name() -> None:
    # the table keeps the latest of message ids that share an entry: a receipt left
    # unread that long is never resolved with another message's receiver
    box = buzon.mailbox("jobs")
    rx = buzon.mailbox("jobs")
    try:
        receipt = box.send_async("x")
        assert rx.recv(T) == "x"
        view, at = _entry(box, receipt.id)
        struct.pack_into("<QII", view, at, receipt.id + _MAX_ACKS, 1, 2)  # a later one
        view.release()
        with pytest.raises(Timeout):
            receipt.wait(0.05)
        assert receipt.receiver is None and not receipt.done()
    finally:
        rx.close()
        box.remove()


def test_a_receipt_made_by_hand_and_its_wait_arguments() -> None:
    box = buzon.mailbox("jobs")
    try:
        message_id = box._send("x", T, False, True)  # the general way's receipt
        receipt = MailboxReceipt(box, message_id)
        assert repr(receipt) == f"<MailboxReceipt id={message_id} receivers=[]>"
        assert box.recv(T) == "x"
        assert receipt.wait(timeout=T).pid == os.getpid()
        assert receipt.wait().pid == os.getpid()  # resolved: no wait
        assert repr(receipt).endswith(f"receivers=[{receipt.receiver!r}]>")
        with pytest.raises(TypeError):
            receipt.wait(T, T)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            receipt.wait(deadline=T)  # type: ignore[call-arg]
        with pytest.raises(ValueError):
            MailboxReceipt(box, 1, -1)
        nobody = MailboxReceipt(box, 99, 0)
        with pytest.raises(buzon.Undelivered):
            nobody.wait(T)
    finally:
        box.remove()


def test_send_async_without_a_python_frame_keeps_the_mailboxs_errors() -> None:
    # each object's send_async is its core's receipt_send (C): the errors, keywords and
    # the general way are those of Mailbox.send_async
    import numpy as np

    box = buzon.mailbox("jobs", capacity=1)
    rx = buzon.mailbox("jobs")
    try:
        assert type(box.send_async).__name__ == "builtin_function_or_method"
        first = box.send_async(b"a", timeout=T)
        with pytest.raises(buzon.Full, match="capacity=1"):
            box.send_async(b"b", 0)
        with pytest.raises(buzon.Timeout):
            box.send_async(b"b", timeout=0.05)
        with pytest.raises(TypeError):
            box.send_async(b"b", deadline=1)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            box.send_async()  # type: ignore[call-arg]
        assert rx.recv(T) == b"a" and first.wait(T).pid == os.getpid()
        array = box.send_async(np.arange(3))  # the codec's hook: the general way
        assert list(rx.recv(T)) == [0, 1, 2] and array.wait(T).pid == os.getpid()
        assert buzon.Mailbox.send_async(box, "by the class").id > array.id
        assert rx.recv(T) == "by the class"
        box.close()
        with pytest.raises(buzon.ChannelClosed):
            box.send_async(b"closed")
    finally:
        rx.remove()
    gone = buzon.mailbox("jobs")
    buzon.mailbox("jobs").remove()
    try:
        with pytest.raises(buzon.NoSuchEndpoint):
            gone.send_async(b"removed")
    finally:
        gone.close()


def test_a_reply_to_naming_a_block_of_another_kind_is_never_written() -> None:
    # a receipt record whose '#' name leads to a block that is no acknowledgement table
    # (a scribbled REPLY_TO): the message is delivered, the acknowledgement dropped and
    # counted, the block left as it was
    from buzon import _core
    from buzon.shm._segment import create_ring, remove_segment

    box = buzon.mailbox("jobs")
    rx = buzon.mailbox("jobs")
    ring = create_ring(4096, label="not an ack ring")
    block = _core.Block.create(ring.name + "t", _ACKTAB_BYTES, b'{"kind": "other"}', 4)
    try:
        reply = b"#" + ring.name.encode()
        assert box._core.send_async(b"x", T, reply, box) is not None
        assert rx.recv(T) == b"x"
        assert rx.statistics()["acks_dropped"] == 1
        view = memoryview(block)
        assert not any(view[:4096])
        view.release()
    finally:
        block.close()
        ring.close()
        remove_segment(ring.name + "t")
        remove_segment(ring.name)
        rx.close()
        box.remove()
