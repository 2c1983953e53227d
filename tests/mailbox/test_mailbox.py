"""Mailboxes (``buzon.mailbox``): the contracts, each written as the hostile case first.

Processes are forked (the mailbox is found by name, as an unrelated process would) or
spawned (the mailbox passed as an argument); every wait is bounded by ``T``.
"""

from __future__ import annotations

import ast
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _mb_helpers import exit_code, fork, reap

import buzon
from buzon import (
    Empty,
    EndOfChannel,
    EndpointInUse,
    Full,
    NoSuchEndpoint,
    Timeout,
)

T = 10.0  # generous bound on every wait


# ---- lifecycle ---------------------------------------------------------------------


def test_open_or_create_then_attach_to_the_same_mailbox() -> None:
    a = buzon.mailbox("jobs", capacity=8)
    b = buzon.mailbox("jobs")
    try:
        assert a.created and not b.created
        assert (b.capacity, b.policy) == (8, "any")
        a.send("x")
        assert b.recv(T) == "x"
    finally:
        b.close()
        a.remove()


def test_create_true_refuses_an_existing_mailbox_and_false_an_absent_one() -> None:
    with pytest.raises(NoSuchEndpoint):
        buzon.mailbox("jobs", create=False)
    box = buzon.mailbox("jobs", create=True)
    try:
        with pytest.raises(EndpointInUse):
            buzon.mailbox("jobs", create=True)
        buzon.mailbox("jobs", create=False).close()
    finally:
        box.remove()
    with pytest.raises(NoSuchEndpoint):
        buzon.mailbox("jobs", create=False)


@pytest.mark.parametrize(
    ("kw", "bad"),
    [
        ({"capacity": 8}, {"capacity": 9}),
        ({"capacity": 8}, {"capacity": None}),
        ({"capacity": None}, {"capacity": 0}),
        ({"capacity": 0}, {"capacity": 1}),
        ({"policy": "any"}, {"policy": "exclusive"}),
        ({"policy": "exclusive"}, {"policy": "any"}),
        ({"policy": "broadcast"}, {"policy": "round_robin"}),
        ({"policy": "round_robin"}, {}),
    ],
)
def test_opening_with_another_capacity_or_policy_raises(
    kw: dict[str, object], bad: dict[str, object]
) -> None:
    box = buzon.mailbox("jobs", **kw)  # type: ignore[arg-type]
    try:
        if not bad:  # leaving them out takes what it has
            buzon.mailbox("jobs").close()
            bad = {"policy": "any"}
        with pytest.raises(EndpointInUse, match="exists with"):
            buzon.mailbox("jobs", **bad)  # type: ignore[arg-type]
    finally:
        box.remove()


def test_bad_arguments_are_refused_with_typed_errors() -> None:
    with pytest.raises(ValueError, match="capacity"):
        buzon.mailbox("jobs", capacity=-1)
    with pytest.raises(ValueError, match="policy"):
        buzon.mailbox("jobs", policy="lifo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rendezvous"):
        buzon.mailbox("jobs", policy="broadcast", capacity=0)
    with pytest.raises(buzon.AddressError):
        buzon.mailbox("a/b")
    with pytest.raises(buzon.AddressError):
        buzon.mailbox("x" * 65)


def test_a_leftover_mailbox_from_a_previous_run_is_never_a_surprise() -> None:
    def previous_run() -> None:
        box = buzon.mailbox("jobs", capacity=4)
        box.send("old-job")
        box.close()  # exits without remove(): the mailbox stays, like a POSIX queue

    assert exit_code(fork(previous_run)) == 0
    with pytest.raises(EndpointInUse):
        buzon.mailbox("jobs", create=True)  # a fresh start says so
    box = buzon.mailbox("jobs")
    try:
        assert not box.created and len(box) == 1  # an open says what it found
        assert box.recv_nowait() == "old-job"
    finally:
        box.remove()
    fresh = buzon.mailbox("jobs", create=True)
    try:
        with pytest.raises(Empty):
            fresh.recv_nowait()
    finally:
        fresh.remove()


def test_remove_wakes_waiting_receivers_and_later_sends_fail() -> None:
    box = buzon.mailbox("jobs")
    other = buzon.mailbox("jobs")
    errors: list[BaseException] = []

    def receiver() -> None:
        try:
            other.recv(T)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=receiver)
    t.start()

    def in_child() -> None:
        with pytest.raises(EndOfChannel):
            buzon.mailbox("jobs").recv(T)

    pid = fork(in_child)
    time.sleep(0.2)  # let both block (not asserted: the outcome is the same if not)
    box.remove()
    t.join(T)
    assert not t.is_alive()
    assert exit_code(pid) == 0
    assert len(errors) == 1 and isinstance(errors[0], EndOfChannel)
    with pytest.raises(NoSuchEndpoint):
        other.send("late")
    other.close()
    assert not os.listdir(buzon._runtime.runtime_dir())  # the name is gone too


# ---- capacity -------------------------------------------------------------------------


def test_capacity_n_holds_n_then_full_or_timeout() -> None:
    box = buzon.mailbox("jobs", capacity=3)
    try:
        for i in range(3):
            box.send_nowait(i)
        with pytest.raises(Full, match="capacity=3"):
            box.send_nowait(3)
        with pytest.raises(Timeout):
            box.send(3, timeout=0.05)
        big = b"z" * 100_000  # out of line: counts as one message all the same
        assert box.recv() == 0
        box.send(big, timeout=T)
        assert [box.recv_nowait() for _ in range(3)] == [1, 2, big]
        with pytest.raises(Empty):
            box.recv_nowait()
        with pytest.raises(Timeout):
            box.recv(timeout=0.05)
    finally:
        box.remove()


def test_capacity_none_is_unbounded_up_to_a_named_byte_cap() -> None:
    box = buzon.mailbox("jobs", capacity=None, max_bytes=8192)
    try:
        n = 0
        with pytest.raises(Full, match="max_bytes"):
            while True:
                box.send(b"y" * 100)  # never blocks: raises at the cap
                n += 1
        assert n > 10
        assert [box.recv_nowait() for _ in range(n)] == [b"y" * 100] * n
    finally:
        box.remove()


def test_capacity_zero_send_returns_only_once_a_receiver_took_it() -> None:
    box = buzon.mailbox("jobs", capacity=0)
    try:
        with pytest.raises(Timeout, match="capacity=0"):
            box.send("nobody", timeout=0.1)  # no receiver: no return
        with pytest.raises(Empty):
            box.recv_nowait()  # withdrawn: no receiver ever sees it
        taken = threading.Event()

        def receiver() -> None:
            time.sleep(0.1)
            assert box.recv(T) == "hand-over"
            taken.set()

        t = threading.Thread(target=receiver)
        t.start()
        box.send("hand-over", timeout=T)
        assert taken.wait(T)  # set just after recv returned; send waited for it
        t.join(T)
    finally:
        box.remove()


def test_a_message_over_the_cap_names_the_parameter() -> None:
    box = buzon.mailbox("jobs", max_message=4096)
    try:
        with pytest.raises(buzon.MessageTooLarge, match="max_message="):
            box.send(b"q" * 10_000)
        with pytest.raises(Empty):
            box.recv_nowait()
    finally:
        box.remove()


# ---- who gets it, who sent it ------------------------------------------------------------


def test_n_senders_m_receivers_across_processes_each_message_once() -> None:
    senders, receivers, count = 3, 3, 300
    box = buzon.mailbox("jobs", capacity=16)
    r, w = os.pipe()

    def send(k: int) -> None:
        with buzon.mailbox("jobs") as b:
            for i in range(count):
                b.send((k, i), timeout=T)

    def receive() -> None:
        with buzon.mailbox("jobs") as b:
            got = []
            while True:
                item = b.recv(T)
                if item is None:
                    break
                got.append(item)
            os.write(w, repr(got).encode() + b"\n")

    rpids = [fork(receive) for _ in range(receivers)]
    spids = [fork(lambda k=k: send(k)) for k in range(senders)]  # type: ignore[misc]
    for pid in spids:
        assert exit_code(pid) == 0
    for _ in range(receivers):
        box.send(None, timeout=T)
    for pid in rpids:
        assert exit_code(pid) == 0
    os.close(w)
    with os.fdopen(r) as f:
        lists = [ast.literal_eval(line) for line in f]
    box.remove()
    seen = sorted(tuple(x) for lst in lists for x in lst)
    assert seen == [(k, i) for k in range(senders) for i in range(count)]
    for lst in lists:  # per sender, in order at each receiver
        for k in range(senders):
            mine = [i for q, i in lst if q == k]
            assert mine == sorted(mine)


def test_threads_share_one_mailbox_object() -> None:
    box = buzon.mailbox("jobs", capacity=8)
    got: list[int] = []
    lock = threading.Lock()

    def consume() -> None:
        while (item := box.recv(T)) is not None:
            with lock:
                got.append(item)

    consumers = [threading.Thread(target=consume) for _ in range(3)]
    producers = [
        threading.Thread(target=lambda k=k: [box.send(k * 1000 + i, timeout=T) for i in range(200)])
        for k in range(3)
    ]
    for t in consumers + producers:
        t.start()
    for t in producers:
        t.join(T)
    for _ in consumers:
        box.send(None, timeout=T)
    for t in consumers:
        t.join(T)
    box.remove()
    assert sorted(got) == sorted(k * 1000 + i for k in range(3) for i in range(200))


def test_recv_message_names_the_sender_and_receipts_name_the_receiver() -> None:
    box = buzon.mailbox("jobs")
    r, w = os.pipe()

    def sender() -> None:
        with buzon.mailbox("jobs") as b:
            receipt = b.send_async({"job": 1})
            who = receipt.wait(T)
            os.write(w, f"{who.pid} {receipt.id}".encode())

    pid = fork(sender)
    m = box.recv_message(T)
    assert exit_code(pid) == 0
    os.close(w)
    answer = os.read(r, 100).decode().split()
    os.close(r)
    box.remove()
    assert m.body == {"job": 1} and m.sender.pid == pid and m.sender.uid == os.getuid()
    assert abs(m.sent_at - time.time()) < 60
    assert answer == [str(os.getpid()), str(m.id)]  # the sender learnt who took it


def test_a_receipt_is_not_done_before_a_receiver_takes_it() -> None:
    box = buzon.mailbox("jobs")
    try:
        receipt = box.send_async("x")
        assert not receipt.done() and receipt.receiver is None
        with pytest.raises(Timeout):
            receipt.wait(0.05)
        assert box.recv() == "x"
        assert receipt.wait(T).pid == os.getpid()
        assert receipt.done() and receipt.receiver is not None
    finally:
        box.remove()


# ---- crash safety -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 50_000])  # inline and out of line
@pytest.mark.parametrize("k", [buzon._core.F_LOCKED, buzon._core.F_MID_PAYLOAD])
def test_a_sender_killed_mid_send_leaves_no_torn_message(size: int, k: int) -> None:
    box = buzon.mailbox("jobs", capacity=4)

    def die() -> None:
        b = buzon.mailbox("jobs")
        b.send("before")
        buzon._core._set_fault(k)
        b.send(b"t" * size)

    status = reap(fork(die))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert box.recv(T) == "before"
    with pytest.raises(Empty):
        box.recv_nowait()
    for i in range(4):  # every place is usable again, the dead one included
        box.send(i, timeout=T)
    assert [box.recv_nowait() for _ in range(4)] == [0, 1, 2, 3]
    box.remove()
    # an out-of-line message's block whose sender died before the hand-over is nobody's:
    # `buzon clean` reclaims it (and nothing else is left)
    from buzon.shm._segment import clean_segments

    assert len(clean_segments(grace=0)) == (1 if size > 1000 else 0)


def test_a_receiver_killed_after_taking_loses_that_message_and_it_is_counted() -> None:
    box = buzon.mailbox("jobs", capacity=4)
    box.send("lost")
    box.send("kept")

    def die() -> None:
        b = buzon.mailbox("jobs")
        buzon._core._set_fault(buzon._core.F_COPIED)
        b.recv(T)

    status = reap(fork(die))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert box.recv(T) == "kept"  # at most once: "lost" is gone, nothing else
    with pytest.raises(Empty):
        box.recv_nowait()
    assert box.statistics()["abandoned"] == 1
    box.remove()


# ---- exclusive -----------------------------------------------------------------------------


def test_exclusive_holder_death_hands_over_and_loses_nothing_untaken() -> None:
    box = buzon.mailbox("jobs", policy="exclusive", capacity=16)
    r, w = os.pipe()

    def holder() -> None:
        b = buzon.mailbox("jobs")
        assert b.recv(T) == 0
        os.write(w, b"h")
        time.sleep(60)  # holds the mailbox until killed

    hpid = fork(holder)
    box.send(0)
    assert os.read(r, 1) == b"h"
    for i in range(1, 6):
        box.send(i)
    other = buzon.mailbox("jobs")
    with pytest.raises(Timeout, match="held"):
        other.recv(timeout=0.2)  # someone else holds it
    os.kill(hpid, signal.SIGKILL)
    reap(hpid)
    assert [other.recv(T) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert other.holding()
    os.close(r)
    os.close(w)
    other.close()
    box.remove()


# ---- passing to children -------------------------------------------------------------------


_PASS = """
import multiprocessing, os, sys
import buzon

def child(box):
    box.send(("from", os.getpid()), timeout=10)
    box.close()

if __name__ == "__main__":
    box = buzon.mailbox("jobs")
    p = multiprocessing.get_context(sys.argv[1]).Process(target=child, args=(box,))
    p.start()
    p.join(30)
    print(p.pid, p.exitcode)
    box.close()
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_mailbox_passes_to_spawn_and_forkserver_children(method: str, tmp_path: Path) -> None:
    # in a separate interpreter: the forkserver and spawn's helpers stay out of this one
    script = tmp_path / "pass.py"
    script.write_text(_PASS)
    box = buzon.mailbox("jobs")
    try:
        out = subprocess.run(
            [sys.executable, str(script), method], capture_output=True, text=True, timeout=60
        )
        pid, code = out.stdout.split()
        assert code == "0", out.stderr
        assert box.recv(T) == ["from", int(pid)]
    finally:
        box.remove()


# ---- buzon ls / buzon clean ------------------------------------------------------------------


def _age_everything(rdir: str) -> None:
    """Make every segment and runtime-dir entry look older than clean's grace."""
    old = time.time() - 60
    for d in ("/dev/shm", rdir):
        for name in os.listdir(d):
            os.utime(os.path.join(d, name), (old, old))


def _leave_a_mailbox(messages: list[object]) -> None:
    def previous_run() -> None:
        box = buzon.mailbox("jobs", capacity=4)
        for m in messages:
            box.send(m)
        box.close()

    assert exit_code(fork(previous_run)) == 0


def test_clean_keeps_an_unused_mailbox_with_messages_unless_forced(runtime_dir: str) -> None:
    from buzon._forensics import clean, ls_rows

    _leave_a_mailbox(["kept", b"b" * 50_000])  # one inline, one out of line
    _age_everything(runtime_dir)
    # nobody uses it, but it holds messages: it stays (its wake-up FIFOs, which every
    # open makes again, go)
    assert sorted(r.path for r in clean(runtime_dir)) == [
        f"{runtime_dir}/jobs.mbox.room",
        f"{runtime_dir}/jobs.mbox.wake",
    ]
    (row,) = [r for r in ls_rows(runtime_dir) if r[0] == "mailbox:jobs"]
    assert row[1] == "mailbox" and "policy=any capacity=4 depth=2" in row[3]
    assert "no live users" in row[3]
    removed = clean(runtime_dir, force=True)
    assert len(removed) == 3  # the mailbox, its out-of-line block, its name
    assert not os.listdir(runtime_dir)
    with pytest.raises(NoSuchEndpoint):
        buzon.mailbox("jobs", create=False)


def test_clean_removes_an_unused_empty_mailbox(runtime_dir: str) -> None:
    from buzon._forensics import clean

    _leave_a_mailbox([])
    box = buzon.mailbox("jobs")
    _age_everything(runtime_dir)
    assert clean(runtime_dir) == []  # in use: stays
    box.close()
    assert len(clean(runtime_dir)) == 4  # unused and empty: segment, name, FIFOs go
    assert not os.listdir(runtime_dir)


def test_clean_keeps_the_block_of_an_out_of_line_message_waiting_in_a_live_mailbox(
    runtime_dir: str,
) -> None:
    from buzon._forensics import clean

    box = buzon.mailbox("jobs")
    box.send(b"w" * 50_000)  # its block is held by nobody while it waits
    _age_everything(runtime_dir)
    assert clean(runtime_dir) == []
    assert box.recv(T) == b"w" * 50_000
    box.remove()


# ---- the wire format -------------------------------------------------------------------------


@pytest.mark.parametrize("obj", [b"x" * 64, {"a": [1, 2.5, "z"]}, None, "é" * 300])
def test_the_fast_frame_is_the_frame_of_protocol_frames(obj: object) -> None:
    from buzon.protocol.frames import Field, Kind, encode_frame, parse_frame

    box = buzon.mailbox("jobs")
    try:
        head, body = box._encode(obj, 7, None)
        pid, uid, ns = struct.unpack_from("<IIxxQ", head, 22)
        fields = {
            Field.MESSAGE_ID: (7).to_bytes(8, "little"),
            Field.SENDER: struct.pack("<II", pid, uid),
            Field.SENT_AT: ns.to_bytes(8, "little"),
        }
        general = b"".join(encode_frame(Kind.DATA, head[2] & 7, body, fields=fields))
        assert head + body == general
        frame = parse_frame(general)
        assert frame.fields == fields
        # and the receiver's fast and general paths agree
        assert box._decode(general) == (obj, 7, pid, uid, ns)
        with_reply = b"".join(box._encode(obj, 8, "buzon-0-x"))  # general path (REPLY_TO)
        assert box._decode(with_reply)[:4] == (obj, 8, os.getpid(), os.getuid())
        assert box.statistics()["acks_dropped"] == 1  # no such ring: nobody to tell
    finally:
        box.remove()


def test_a_scribbled_record_is_a_protocol_error_and_the_mailbox_goes_on() -> None:
    box = buzon.mailbox("jobs")
    try:
        box._ring.send(b"\x01garbage")  # another process of this user wrote nonsense
        box._ring.send(b"\x01\x01\x21\x00" + b"\xff" * 40)
        with pytest.raises(buzon.ProtocolError):
            box.recv_nowait()
        with pytest.raises(buzon.ProtocolError):
            box.recv_nowait()
        box.send("fine")
        assert box.recv_nowait() == "fine"
    finally:
        box.remove()


def test_a_receipt_of_a_message_discarded_by_remove_is_undelivered_not_a_hang() -> None:
    box = buzon.mailbox("jobs")
    receipt = box.send_async("never taken")
    buzon.mailbox("jobs").remove()  # another object (process) destroys it
    with pytest.raises(buzon.Undelivered):
        receipt.wait()  # no timeout: must not wait for ever
    box.close()


def test_rendezvous_send_to_a_removed_mailbox_fails_instead_of_hanging() -> None:
    box = buzon.mailbox("jobs", capacity=0)
    timer = threading.Timer(0.1, lambda: buzon.mailbox("jobs").remove())
    timer.start()
    with pytest.raises(buzon.Undelivered):
        box.send("nobody takes it")  # no timeout
    timer.join(T)
    box.close()


def test_bytes_and_other_objects_come_back_as_they_went() -> None:
    box = buzon.mailbox("jobs", capacity=16)
    try:
        items: list[object] = [b"raw", b"", bytearray(b"ba"), {"k": b"v"}, [1, "two"], 3.5]
        for item in items:
            box.send(item)
        got = [box.recv_nowait() for _ in range(3)] + [box.recv_message(T).body for _ in range(3)]
        assert got == [b"raw", b"", b"ba", {"k": b"v"}, [1, "two"], 3.5]
        assert [type(x) for x in got[:3]] == [bytes, bytes, bytes]
    finally:
        box.remove()


def test_exclusive_holder_closing_hands_over_to_a_blocked_waiter() -> None:
    box = buzon.mailbox("jobs", policy="exclusive")
    holder = buzon.mailbox("jobs")
    waiter = buzon.mailbox("jobs")
    got: list[object] = []
    try:
        box.send(1)
        assert holder.recv(T) == 1 and holder.holding()
        box.send(2)
        t = threading.Thread(target=lambda: got.append(waiter.recv(T)))
        t.start()
        time.sleep(0.2)  # (not asserted: if it has not blocked yet, it takes over at once)
        assert got == []  # the holder has not closed: the waiter does not get 2
        holder.close()
        t.join(T)
        assert got == [2] and waiter.holding()
    finally:
        waiter.close()
        box.remove()


def test_a_name_that_leads_to_another_kind_of_segment_is_a_protocol_error(
    runtime_dir: str,
) -> None:
    ring = buzon.shm.create_ring(4096, label="shm:other a>b")
    try:
        with open(os.path.join(runtime_dir, "jobs.mbox"), "w") as f:
            f.write(ring.name)  # scribbled: a mailbox name naming another ring
        os.chmod(os.path.join(runtime_dir, "jobs.mbox"), 0o600)
        with pytest.raises(buzon.ProtocolError, match="not a buzon mailbox"):
            buzon.mailbox("jobs")
        with pytest.raises(buzon.ProtocolError, match="not a buzon mailbox"):
            buzon.BoundedBuffer("jobs")
        ring.send(b"ok")  # the other object is unaffected
        assert ring.recv(T) == b"ok"
    finally:
        ring.close()
        buzon.shm.remove_segment(ring.name)


def test_everything_a_mailbox_makes_is_0600_and_its_own(runtime_dir: str) -> None:
    import stat

    before = set(os.listdir("/dev/shm"))  # other programs' files there are not ours
    box = buzon.mailbox("jobs", policy="broadcast")
    attach = buzon.mailbox("jobs")
    with pytest.raises(Empty):
        attach.recv_nowait()  # a receiver: its backlog ring and the receiver table exist
    try:
        made = [os.path.join(runtime_dir, n) for n in os.listdir(runtime_dir)]
        made += [
            os.path.join("/dev/shm", n)
            for n in set(os.listdir("/dev/shm")) - before
            if n.startswith(f"buzon-{os.getuid()}-")
        ]
        assert len(made) >= 5  # name, FIFO, ring, receiver table, backlog
        for path in made:
            st = os.lstat(path)
            assert stat.S_IMODE(st.st_mode) == 0o600, path
            assert st.st_uid == os.getuid()
    finally:
        attach.close()
        box.remove()


def test_the_c_hot_path_writes_the_frame_of_protocol_frames_and_checks_what_it_takes() -> None:
    from buzon.protocol._frames import mailbox_recv, mailbox_send
    from buzon.protocol.frames import Field, parse_frame

    box = buzon.mailbox("jobs")
    try:
        box.send(b"raw bytes")  # protocol._frames.mailbox_send
        box.send({"an": "object"})
        for body, codec in ((b"raw bytes", 0), (b"\x81\xa2an\xa6object", 1)):
            frame = parse_frame(box._ring.recv_nowait())
            assert (bytes(frame.body), frame.codec, frame.receipt) == (body, codec, False)
            assert frame.fields is not None and set(frame.fields) == {1, 2, 6}
            assert frame.fields[Field.SENDER] == struct.pack("<II", os.getpid(), os.getuid())
            assert abs(struct.unpack("<Q", frame.fields[Field.SENT_AT])[0] / 1e9 - time.time()) < 60
        good = b"".join(box._encode("x", 9, None))
        box._ring.send(good)
        assert mailbox_recv(box._ring, 1.0) == (1, good[40:])  # protocol._frames.mailbox_recv
        liar = bytearray(good)
        liar[4] += 1  # the body length disagrees with the record: not the fast path
        box._ring.send(bytes(liar))
        assert mailbox_recv(box._ring, 1.0) == bytes(liar)
        box._ring.send(bytes(liar))
        with pytest.raises(buzon.ProtocolError):
            box.recv(T)
        with pytest.raises(Empty):
            mailbox_recv(box._ring, 0)
        with pytest.raises(TypeError):
            mailbox_recv(object(), 0)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            mailbox_send(object(), b"x", 0, 1, 0, 0)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            mailbox_send(box._ring, b"x", 8, 1, 0, 0)  # a codec is 0-7
        # a wait releases the GIL: the thread that sends runs while recv waits
        later = threading.Timer(0.05, mailbox_send, (box._ring, bytearray(b"late"), 0, 7, 0, T))
        later.start()
        assert mailbox_recv(box._ring, T) == (0, b"late")
        later.join()
    finally:
        box.remove()
