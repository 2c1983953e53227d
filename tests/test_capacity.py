"""Capacity and receipts beyond the conformance checks: agreement, refusals, and the
credit state machines on their own (sans-IO, seeded)."""

from __future__ import annotations

import os
import random
import threading

import pytest

import buzon
from buzon.protocol.credit import (
    UNLIMITED,
    RecvFlow,
    SendFlow,
    check_capacity,
    decode_credit,
    encode_credit,
)
from buzon.protocol.frames import FrameDecoder, Kind


def _pair(
    url: str, server: dict[str, object], client: dict[str, object], accept_timeout: float = 5
) -> tuple[object, object]:
    lst = buzon.listen(url, **server)
    box: list[object] = []
    errors: list[BaseException] = []

    def accept() -> None:
        try:
            box.append(lst.accept(timeout=accept_timeout))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=accept)
    t.start()
    try:
        con = buzon.connect(str(lst.address), timeout=5, **client)
    except BaseException:
        t.join(10)
        lst.close()
        raise
    t.join(10)
    lst.close()
    if errors:
        con.close()
        raise errors[0]
    return con, box[0]


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("unix:capmismatch", {}),
        ("tcp://127.0.0.1:0", {}),
        ("udp://127.0.0.1:0", {"reliable": True}),  # message links run the handshake too
        ("shm:capmismatch", {}),
        ("seqpacket:capmismatch", {}),
    ],
)
def test_both_ends_must_agree(url: str, extra: dict[str, object]) -> None:
    # (the listener refuses the peer and waits for another: let its accept give up soon)
    with pytest.raises(buzon.HandshakeError, match="capacity mismatch"):
        _pair(url, {"capacity": 2, **extra}, {"capacity": 3, **extra}, 0.3)
    with pytest.raises(buzon.HandshakeError, match="capacity mismatch"):
        _pair(url, {"capacity": None, **extra}, {"capacity": 0, **extra}, 0.3)
    con, acc = _pair(url, {"capacity": 1, **extra}, dict(extra))  # one states it: both use it
    with con, acc:  # type: ignore[attr-defined]
        assert con.capacity == acc.capacity == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("url", ["unix:capadopt", "tcp://127.0.0.1:0", "seqpacket:capadopt"])
def test_one_end_states_it_and_both_use_it(url: str) -> None:
    con, acc = _pair(url, {"capacity": 1}, {})
    with con, acc:  # type: ignore[attr-defined]
        assert con.capacity == 1 and acc.capacity == 1  # type: ignore[attr-defined]
        con.send_nowait("x")  # type: ignore[attr-defined]
        with pytest.raises(buzon.Full, match="capacity=1"):
            con.send_nowait("y")  # type: ignore[attr-defined]
    con, acc = _pair(url, {}, {"capacity": 0})
    with con, acc:  # type: ignore[attr-defined]
        assert acc.capacity == 0  # type: ignore[attr-defined]
        with pytest.raises(buzon.Full, match="no receiver is waiting"):
            acc.send_nowait("nobody waits")  # type: ignore[attr-defined]


def test_default_is_the_transport_buffer() -> None:
    a, b = buzon.pipe()
    with a, b:
        assert a.capacity == -1


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("udp://127.0.0.1:0", "reliable=True"),
        ("unixgram:capx", "reliable=True"),
        ("mq:/buzon-capx", r"private name \(mq:NAME\)"),
    ],
)
def test_links_that_cannot_carry_credits_refuse_clearly(url: str, reason: str) -> None:
    with pytest.raises(buzon.UnsupportedOperation, match=reason):
        buzon.listen(url, capacity=0 if url.startswith("mq") else 4)


def test_refusals_are_clear() -> None:
    with pytest.raises(buzon.UnsupportedOperation, match="framing"):
        buzon.pipe(raw=True, capacity=2)
    with pytest.raises(ValueError, match="capacity"):
        buzon.pipe(capacity=-5)
    with pytest.raises(TypeError, match="capacity"):
        buzon.pipe(capacity=1.5)  # type: ignore[arg-type]
    # receipts need a reverse path too
    r, w = buzon.pipe(duplex=False)
    with r, w, pytest.raises(buzon.UnsupportedOperation, match="simplex"):
        w.send_async("x")


def test_unbounded_fifo_and_queue_never_wait() -> None:
    with buzon.listen("fifo:capnone", capacity=None) as lst:
        w = buzon.connect(str(lst.address), capacity=None, timeout=5)
        r = lst.accept(timeout=5)
        with r, w:
            for _ in range(40):  # 2.6 MiB into a 64 KiB pipe
                w.send_bytes_nowait(b"f" * 65536)
            assert w.statistics().queued_bytes > 0
            t = threading.Thread(target=w.flush, args=(10,))
            t.start()
            got = [r.recv_bytes(timeout=5) for _ in range(40)]
            t.join(10)
            assert all(len(x) == 65536 for x in got)


def test_a_peer_that_ignores_its_credit_is_a_protocol_error() -> None:
    flow = RecvFlow(0)  # rendezvous: nothing may come before an offer
    with pytest.raises(buzon.ProtocolError, match="allowed 0"):
        flow.on_take(False, False)
    send = SendFlow(2)
    with pytest.raises(buzon.ProtocolError, match="taken of 0 sent"):
        send.on_credit(1, 3)
    send.sent = 2
    with pytest.raises(buzon.ProtocolError, match="capacity is 2"):
        send.on_credit(1, 10)


def test_credit_frame_is_its_byte_table() -> None:
    frame = encode_credit(3, 7, blocked=True)
    assert frame[:4] == bytes([1, Kind.CREDIT, 0x08, 0]) and len(frame) == 24
    assert decode_credit(frame[8:]) == (3, 7)
    dec = FrameDecoder()
    dec.feed(frame + encode_credit(1, UNLIMITED))
    assert not dec.frames
    # a run of CREDITs is one entry: the latest counts, and "blocked" if any said so
    assert list(dec.control) == [(8, encode_credit(1, UNLIMITED)[8:])]
    with pytest.raises(buzon.FrameError):
        decode_credit(b"short")
    assert check_capacity(None) is None and check_capacity(0) == 0


@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 8, None])
def test_credit_state_machines_under_random_schedules(capacity: int | None) -> None:
    """Both flows, a FIFO link each way, and a scheduler picking what happens next:
    never more than N untaken, never a deadlock, every message taken in order."""
    for seed in range(150):
        rng = random.Random(seed)
        send, recv = SendFlow(capacity), RecvFlow(capacity)
        forward: list[int] = []  # message numbers in flight
        backward: list[bytes] = []  # CREDIT frames in flight
        buffered: list[int] = []  # arrived at the receiver, not taken
        taken: list[int] = []
        total = 40
        waiting = False
        for _ in range(50000):
            if len(taken) == total:
                break
            choices = ["recv_wait", "deliver", "credit", "take", "timeout"]
            if send.sendable() and send.sent < total:
                choices.append("send")
            op = rng.choice(choices)
            if op == "send":
                forward.append(send.on_sent())
            elif op == "deliver" and forward:
                buffered.append(forward.pop(0))
            elif op == "credit" and backward:
                body = backward.pop(0)[8:]
                send.on_credit(*decode_credit(body))
            elif op == "take" and buffered:
                n = buffered.pop(0)
                taken.append(n)
                waiting = False
                out = recv.on_take(False, bool(buffered))
                if out:
                    backward.append(out)
            elif op == "recv_wait" and not buffered and not waiting:
                waiting = True
                out = recv.before_wait()
                if out:
                    backward.append(out)
            elif op == "timeout" and waiting:
                waiting = False
                out = recv.on_wait_end()
                if out:
                    backward.append(out)
            if capacity is not None:
                untaken = send.sent - len(taken)
                # a withdrawn offer may leave one message in flight (documented)
                assert untaken <= max(capacity, 1), (seed, untaken)
        assert taken == list(range(1, len(taken) + 1)), seed
        assert len(taken) == total, (seed, len(taken))  # no deadlock: all went through


@pytest.mark.parametrize("scheme", ["fifo", "mq"])
def test_simplex_endpoints_agree_through_their_credit_pool(scheme: str) -> None:
    """The listener's pool names its capacity: a connector stating another is refused,
    one stating none adopts it; closing the listener removes the pool."""
    from buzon._runtime import runtime_dir

    with buzon.listen(f"{scheme}:capagree", capacity=0) as lst:
        pools = [f for f in os.listdir(runtime_dir()) if f.startswith("capagree") and "cap0" in f]
        assert pools, "the rendezvous pools exist beside the endpoint"
        with pytest.raises(buzon.HandshakeError, match="capacity mismatch"):
            buzon.connect(str(lst.address), timeout=5, capacity=3)
        w = buzon.connect(str(lst.address), timeout=5)
        r = lst.accept(timeout=5)
        with w, r:
            assert w.capacity == 0 and r.capacity == 0
            with pytest.raises(buzon.Full, match="no receiver is waiting"):
                w.send_nowait("nobody waits")
    assert not [f for f in os.listdir(runtime_dir()) if f.startswith("capagree")]


def test_a_queue_capacity_is_its_maxmsg() -> None:
    with buzon.listen("mq:capmax", capacity=3) as lst:
        with pytest.raises(buzon.HandshakeError, match="holds 3 messages"):
            buzon.connect(str(lst.address), timeout=5, capacity=5)
        w = buzon.connect(str(lst.address), timeout=5, capacity=3)
        r = lst.accept(timeout=5)
        with w, r:
            for i in range(3):
                w.send_nowait(i)
            with pytest.raises(buzon.Full):
                w.send_nowait(3)
            assert [r.recv(timeout=5) for _ in range(3)] == [0, 1, 2]


def test_a_dead_fifo_listeners_pool_is_replaced() -> None:
    """A listener killed with SIGKILL leaves its FIFO and pool; the next one reclaims
    both and starts with fresh credits."""
    import signal

    from buzon._runtime import runtime_dir

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        buzon.listen("fifo:capdead", capacity=2)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert any(f.startswith("capdead") and "cap2" in f for f in os.listdir(runtime_dir()))
    with buzon.listen("fifo:capdead", capacity=5) as lst:
        w = buzon.connect(str(lst.address), timeout=5)
        r = lst.accept(timeout=5)
        with w, r:
            assert w.capacity == 5
            for i in range(5):
                w.send_nowait(i)
            with pytest.raises(buzon.Full):
                w.send_nowait(5)
    assert not [f for f in os.listdir(runtime_dir()) if f.startswith("capdead")]
