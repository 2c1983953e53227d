"""The mailbox hot path (``MailboxCore`` in protocol/_frames.c): one C call per send,
receive or broadcast of a common record, and the general way for everything else."""

from __future__ import annotations

import os

import numpy as np
import pytest

import buzon
from buzon._mailbox import MailboxReceipt
from buzon.errors import CodecError
from buzon.protocol._frames import MailboxCore, mailbox_send

T = 10.0


def test_the_hot_path_and_the_general_path_draw_ids_from_one_sequence() -> None:
    box = buzon.mailbox("jobs")
    try:
        box.send(b"fast")  # C
        receipt = box.send_async(b"general")  # Python (receipt)
        box.send({"fast": 1})  # C, msgpack
        box.send(np.arange(3))  # the codec's hook: general
        ids = [box.recv_message(T).id for _ in range(4)]
        assert ids == sorted(set(ids)) and len(ids) == 4
        assert receipt.id == ids[1]
    finally:
        box.remove()


def test_what_the_hookless_encoder_refuses_goes_the_general_way() -> None:
    box = buzon.mailbox("jobs", capacity=16)
    try:
        small, big = np.arange(4.0), np.arange(512.0)  # inline and out of band
        items = [small, {"a": big}, np.float64(2.5), bytearray(2000), "x" * 5000]
        for item in items:
            box.send(item)
        got = [box.recv(T) for _ in items]
        assert np.array_equal(got[0], small) and np.array_equal(got[1]["a"], big)
        assert got[2:] == [2.5, bytes(2000), "x" * 5000]
        with pytest.raises(CodecError):
            box.send(object())  # refused by both ways, with the codec's typed error
        assert box.qsize() == 0  # and nothing went
    finally:
        box.remove()


def test_a_forked_child_sends_with_its_own_pid() -> None:
    box = buzon.mailbox("jobs")
    try:
        box.send(b"parent")  # the pid is cached from here on
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                box.send(b"child")
                box.send({"child": True})
                code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        senders = [box.recv_message(T).sender.pid for _ in range(3)]
        assert senders == [os.getpid(), pid, pid]
    finally:
        box.remove()


def test_statistics_count_what_the_hot_path_moved() -> None:
    box = buzon.mailbox("jobs")
    try:
        for item in (b"a", {"b": 1}, [1, 2]):
            box.send(item)
        assert [box.recv(T) for _ in range(3)] == [b"a", {"b": 1}, [1, 2]]
        stats = box.statistics()
        assert (stats["sent"], stats["received"]) == (3, 3)
    finally:
        box.remove()


def test_a_common_record_with_a_bad_body_is_a_codec_error_and_the_mailbox_goes_on() -> None:
    box = buzon.mailbox("jobs")
    try:
        mailbox_send(box._ring, b"\xc1", 1, 1, os.getuid(), T)  # 0xc1: never msgpack
        with pytest.raises(CodecError):
            box.recv(T)
        box.send({"fine": 1})
        assert box.recv(T) == {"fine": 1}
    finally:
        box.remove()


def test_broadcast_through_the_hot_path_keeps_the_overflow_rule() -> None:
    tx = buzon.mailbox("news", capacity=2, policy="broadcast")
    rx = [buzon.mailbox("news") for _ in range(2)]
    try:
        for r in rx:
            with pytest.raises(buzon.Empty):
                r.recv_nowait()  # attached
        for i in range(5):
            tx.send({"n": i})
        for r in rx:
            assert [r.recv(T)["n"] for _ in range(2)] == [3, 4]  # the oldest were dropped
        assert tx.statistics()["dropped"] == 6
    finally:
        for r in rx:
            r.close()
        tx.remove()


def test_broadcast_hot_path_drops_an_out_of_line_oldest_with_its_block() -> None:
    # a full backlog whose oldest message is out of line (its own block segment): the C
    # overflow rule takes it and hands it back, and its block is removed (the fixture
    # finds no segment left)
    from buzon.shm._segment import SHM_DIR

    tx = buzon.mailbox("news", capacity=2, policy="broadcast", max_inline=64)
    rx = buzon.mailbox("news")
    try:
        with pytest.raises(buzon.Empty):
            rx.recv_nowait()  # attached
        tx.send(b"s")  # the hot path from here
        before = set(os.listdir(SHM_DIR))
        tx.send(b"L" * 1000)  # out of line (the general way): one block more
        tx.send(b"M" * 1000)  # drops b"s"
        assert len(set(os.listdir(SHM_DIR)) - before) == 2
        tx.send(b"t")  # C: drops the oldest, L's record, whose block goes
        assert len(set(os.listdir(SHM_DIR)) - before) == 1
        assert [rx.recv(T) for _ in range(2)] == [b"M" * 1000, b"t"]
        assert tx.statistics()["dropped"] == 2
    finally:
        rx.close()
        tx.remove()


def test_broadcast_hot_path_follows_receivers_that_come_and_go() -> None:
    # one write into the shared broadcast ring per message (Bcast.send); a receiver that
    # attaches starts at the head, one that leaves holds nobody back
    tx = buzon.mailbox("news", capacity=8, policy="broadcast")
    first, late = buzon.mailbox("news"), buzon.mailbox("news")
    try:
        with pytest.raises(buzon.Empty):
            first.recv_nowait()  # attached
        tx.send(b"one")  # reads the table: the hot path from here
        tx.send(b"two")
        assert tx._bc is not None and tx._bc.ring.send(b"x") is None  # (counted, like a send)
        with pytest.raises(buzon.Empty):
            late.recv_nowait()  # attaches after three messages
        tx.send(b"three")
        assert [first.recv(T) for _ in range(4)] == [b"one", b"two", b"x", b"three"]
        assert late.recv(T) == b"three"
        first.close()  # leaves: its backlog is gone, the next send must not look for it
        tx.send(b"four")
        assert late.recv(T) == b"four"
        assert tx.statistics()["sent"] == 5 and tx.statistics()["dropped"] == 0
        with pytest.raises(buzon.Empty):
            late.recv_nowait()
    finally:
        late.close()
        tx.remove()
    with pytest.raises(buzon.ChannelClosed):
        tx.send(b"after remove")


def test_bad_arguments_to_the_core_are_type_errors() -> None:
    box = buzon.mailbox("jobs")
    try:
        with pytest.raises(TypeError):
            MailboxCore(object(), None, None, 10, 0, False)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            box._core.recv(object(), 0)  # type: ignore[arg-type]
    finally:
        box.remove()


def test_recv_message_takes_common_records_with_their_fields_in_one_call() -> None:
    import time

    box = buzon.mailbox("jobs")
    try:
        before = time.time()
        box.send(b"raw")
        receipt = box.send_async({"general": 1})  # a receipt record: the general way
        box.send({"d": [1, 2]})
        mailbox_send(box._ring, b"\xc1", 1, 99, os.getuid(), T)  # a body that is no msgpack
        got = [box.recv_message(T) for _ in range(3)]
        assert [m.body for m in got] == [b"raw", {"general": 1}, {"d": [1, 2]}]
        assert [m.id for m in got] == [got[0].id, receipt.id, got[0].id + 2]
        assert {(m.sender.pid, m.sender.uid) for m in got} == {(os.getpid(), os.getuid())}
        assert all(before - 1 <= m.sent_at <= time.time() + 1 for m in got)
        assert receipt.wait(T).pid == os.getpid()
        with pytest.raises(CodecError):
            box.recv_message(T)
        assert box.statistics()["received"] == 4
    finally:
        box.remove()


def test_the_message_the_core_makes_is_the_dataclass_the_general_way_makes() -> None:
    import dataclasses

    from buzon._mailbox import Message, _peer

    box = buzon.mailbox("jobs")
    try:
        box.send(b"a")  # C
        box.send(np.arange(2))  # the general way
        fast, general = box.recv_message(T), box.recv_message(T)
        assert type(fast) is Message and type(general) is Message
        assert fast.sender is general.sender is _peer(os.getpid(), os.getuid())
        assert fast == Message(b"a", fast.id, fast.sender, fast.sent_at)
        assert dataclasses.replace(fast, body=b"b").body == b"b"
        assert repr(fast).startswith("Message(body=b'a', id=")
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.body = b"c"  # type: ignore[misc]
        with pytest.raises(TypeError):
            box._core.set_message(int, _peer)  # a type without the four slots
        with pytest.raises(TypeError):
            box._core.recv_from(box._ring, T)  # type: ignore[call-arg]
    finally:
        box.remove()


@pytest.mark.parametrize("way", ["table", "ring"])
def test_receipts_read_in_any_order_each_get_their_own_acknowledgement(way: str) -> None:
    # the hot path's receipts: each acknowledgement in the sender's table, read in any
    # order. The general way's: take_ack (C) reads the acknowledgement ring until the
    # wanted one comes; the others wait in the dict for their receipts, whatever order
    # those are read in
    box = buzon.mailbox("jobs")
    try:
        if way == "table":
            receipts = [box.send_async(i) for i in range(6)]
        else:
            receipts = [MailboxReceipt(box, box._send(i, T, False, True)) for i in range(6)]
        assert [box.recv(T) for _ in range(6)] == list(range(6))
        assert receipts[4].wait(T).pid == os.getpid()  # ring: reads 0-3 into the dict
        assert box._acks is not None
        if way == "table":
            assert box._acked == {} and box._acks.info()["committed"] == 0
        else:
            assert sorted(box._acked) == [r.id for r in receipts[:4]]
        assert receipts[4].done() and receipts[2].done() and receipts[0].receiver is not None
        assert [r.wait(T).pid for r in (receipts[5], receipts[3], receipts[1])] == [os.getpid()] * 3
        assert box._acked == {}
        assert box._acks is not None
        box._acks.send(b"not an acknowledgement")  # skipped, not a crash
        late = box.send_async(b"x")
        assert box.recv(T) == b"x"
        assert late.wait(T).pid == os.getpid()
        with pytest.raises(TypeError):
            box._core.take_ack(box._acks, 1, [])  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            box._core.take_ack(object(), 1, {})  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            box._core.send_async(b"x", T, b"ring")  # type: ignore[call-arg]
    finally:
        box.remove()


def test_a_receipt_whose_lock_is_held_waits_the_general_way() -> None:
    # receipt_ready (C) only tries the mailbox's lock for an acknowledgement in the
    # ring (the general way's receipts): held by another thread (a receipt waiting the
    # general way, a close), the receipt waits for it instead. One in the sender's table
    # (send_async's hot path) needs no lock.
    import threading

    box = buzon.mailbox("jobs")
    try:
        receipt = MailboxReceipt(box, box._send(b"x", T, False, True))
        tabled = box.send_async(b"y")
        assert box.recv(T) == b"x" and box.recv(T) == b"y"
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with box._lock:
                held.set()
                release.wait(T)

        t = threading.Thread(target=hold)
        t.start()
        assert held.wait(T)
        assert box._core.receipt_ready(receipt) is None  # the lock is not free
        assert box._core.receipt_ready(tabled).pid == os.getpid()  # (no lock needed)
        threading.Timer(0.05, release.set).start()
        assert receipt.wait(T).pid == os.getpid()  # the general way, after the holder
        t.join(T)
        assert receipt.receivers == [receipt.receiver]
        assert box._core.receipt_ready(receipt) is None  # taken already: nothing to read
    finally:
        box.remove()


def test_a_waiting_receipt_sees_others_acknowledgements_come_first() -> None:
    # the general way (wait_ack, C) waits on the ring: the acknowledgements of later
    # receipts come first and go into the table, then the waited one's
    import threading

    box = buzon.mailbox("jobs")
    rx = buzon.mailbox("jobs")
    try:
        receipts = [box.send_async(i) for i in range(4)]
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(receipts[3].wait(T)))
        t.start()  # waits (nothing acknowledged yet): the general way, on the ring
        assert [rx.recv(T) for _ in range(4)] == [0, 1, 2, 3]
        t.join(T)
        assert got == [receipts[3].receiver] and receipts[3].receiver is not None
        assert [r.wait(T).pid for r in receipts[:3]] == [os.getpid()] * 3
        assert box._acked == {}
    finally:
        rx.close()
        box.remove()


def test_a_forked_child_reads_its_own_receipts_not_its_parents_ring() -> None:
    box = buzon.mailbox("jobs")
    try:
        first = box.send_async(b"parent")  # the parent's acknowledgement ring
        assert box.recv(T) == b"parent"
        assert first.wait(T).pid == os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                mine = box.send_async(b"child")  # a ring of its own (receipt_ready: not ours)
                assert box.recv(T) == b"child"
                code = 0 if mine.wait(T).pid == os.getpid() else 2
                box.close()  # removes the child's acknowledgement ring
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        again = box.send_async(b"parent again")
        assert box.recv(T) == b"parent again"
        assert again.wait(T).pid == os.getpid()
    finally:
        box.remove()


def test_receipt_records_go_the_hot_path_and_name_the_receiver_across_processes() -> None:
    box = buzon.mailbox("jobs")
    try:
        receipts = [box.send_async({"job": i}) for i in range(50)]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                rx = buzon.mailbox("jobs")
                assert [rx.recv(T)["job"] for _ in range(50)] == list(range(50))
                # the first acknowledgement attached the sender's ring, the others went in C
                assert rx._core.received == 49 and rx.statistics()["acks_dropped"] == 0
                rx.close()
                code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        who = {(r.wait(T).pid, r.wait(T).uid) for r in receipts}
        assert who == {(pid, os.getuid())}
        assert len({r.id for r in receipts}) == 50
    finally:
        box.remove()


def test_a_receipt_record_with_a_bad_body_is_acknowledged_once_and_a_codec_error() -> None:
    box = buzon.mailbox("jobs")
    try:
        first = box.send_async(b"first")
        box.recv(T)  # the first acknowledgement attaches the ring: the hot path acks next
        assert first.wait(T).pid == os.getpid()
        frame = b"".join(box._encode({"x": 1}, 4242, box._ack_ring().name))
        body = b"\x81\xa1x\x01"
        assert frame.endswith(body)
        box._ring.send(frame[: -len(body)] + b"\xc1" * len(body))  # a receipt record, bad body
        with pytest.raises(CodecError):
            box.recv(T)
        assert box._ack_of(4242, T) is not None
        assert box._ack_of(4242, 0.05) is None  # once, not twice
        box.send("fine")
        assert box.recv(T) == "fine"
    finally:
        box.remove()


def test_an_acknowledgement_that_finds_its_ring_full_for_a_moment_is_not_lost() -> None:
    import threading

    from buzon._mailbox import _ACK

    box = buzon.mailbox("jobs")
    try:
        for way in ("python", "c"):  # the first ack attaches the ring (Python), then C
            receipt = box.send_async(way)
            acks = box._ack_ring()
            fillers = 0
            while acks.try_send(_ACK.pack(0, 1, 1)):  # full, as under a burst of acks
                fillers += 1

            def drain(ring: object, n: int) -> None:  # the fillers only (before the ack)
                for _ in range(n):
                    ring.recv(T)  # type: ignore[attr-defined]

            # room comes back while the ack waits
            later = threading.Timer(0.01, drain, (acks, fillers))
            later.start()
            assert box.recv(T) == way
            later.join(T)
            assert receipt.wait(T).pid == os.getpid(), way
        assert box.statistics()["acks_dropped"] == 0
    finally:
        box.remove()
