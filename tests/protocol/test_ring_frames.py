"""The frame format's C speedup for shared-memory rings (``buzon.protocol._frames``):
a plain DATA frame in or out of one ring record in one call, byte for byte what
``protocol/frames.py`` writes and reads, reaching the ring only through the core's C
API (the ring itself moves opaque records and has no frame calls)."""

from __future__ import annotations

import os
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest

import buzon
from buzon import _core, shm
from buzon.errors import ChannelClosed, EndOfChannel
from buzon.protocol import _frames
from buzon.protocol.frames import HEADER, Kind, encode_frame, parse_frame

RingFrames = _frames.RingFrames


@pytest.fixture
def ring() -> Iterator[_core.Ring]:
    r = shm.create_ring(1 << 16)
    try:
        yield r
    finally:
        r.close()
        shm.remove_segment(r.name)


def test_the_ring_has_no_frame_calls() -> None:
    """The frame calls left buzon._core.Ring: it moves records, never frames."""
    for name in ("try_send_frame", "try_send_frames", "try_recv_frame", "stop_frames"):
        assert not hasattr(_core.Ring, name), name
    assert not hasattr(_core.Ring, "frame_counts")
    assert type(_core._RING_API).__name__ == "PyCapsule"


def test_the_frames_module_lives_in_protocol() -> None:
    assert _frames.__name__ == "buzon.protocol._frames"
    assert _frames.__file__ is not None and "/protocol/" in _frames.__file__
    assert HEADER.size == _frames.HEADER_SIZE


def test_only_rings_are_taken() -> None:
    with pytest.raises(TypeError):
        RingFrames(b"not a ring")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RingFrames()  # type: ignore[call-arg]


@pytest.mark.parametrize("codec", [0, 1, 2, 3, 7])
@pytest.mark.parametrize("size", [0, 1, 64, 4097, 60_000])
def test_what_it_writes_is_what_frames_py_encodes(ring: _core.Ring, codec: int, size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    frames = RingFrames(ring)
    assert frames.try_send_frame(body, codec)
    record = ring.try_recv()
    assert record == b"".join(encode_frame(Kind.DATA, codec, body))
    if codec <= 3:
        frame = parse_frame(record)
        assert (frame.kind, frame.codec, bytes(frame.body)) == (Kind.DATA, codec, body)


def test_what_frames_py_encodes_it_reads_plain(ring: _core.Ring) -> None:
    frames = RingFrames(ring)
    for codec in range(4):
        ring.try_send(b"".join(encode_frame(Kind.DATA, codec, b"payload %d" % codec)))
        assert frames.try_recv_frame(1 << 20) == (codec, b"payload %d" % codec)
    # anything else is the general path's: fields, a receipt, buffers, another kind
    others = [
        b"".join(encode_frame(Kind.DATA, 1, b"f", fields={1: b"12345678"})),
        b"".join(encode_frame(Kind.DATA, 1 | 0x08, b"r")),
        b"".join(bytes(b) for b in encode_frame(Kind.DATA, 0, b"b", [memoryview(b"buf")])),
        b"".join(encode_frame(Kind.CREDIT, 0, bytes(16))),
    ]
    for record in others:
        ring.try_send(record)
        assert frames.try_recv_frame(1 << 20) == (-1, record)
    assert frames.counts() == (0, 0, 4, sum(8 + len(b"payload 0") for _ in range(4)))


def test_ring_send_frames(ring: _core.Ring) -> None:
    small = shm.create_ring(1 << 12)
    try:
        frames = RingFrames(small)
        big = b"x" * 5000  # larger than the ring
        bodies: list[Any] = [b"a", b"b", [b"not", b"a buffer"], b"c", big, b"d"]
        assert frames.try_send_frames(bodies, 0, 0) == 2  # stops at the list
        assert frames.try_send_frames(bodies, 0, 3) == 4  # stops at the one too large
        assert frames.try_send_frames(bodies, 0, 5) == 6
        assert [frames.try_recv_frame(1 << 20) for _ in range(4)] == [
            (0, b"a"),
            (0, b"b"),
            (0, b"c"),
            (0, b"d"),
        ]
        fill = [b"y" * 1000] * 10
        assert 0 < frames.try_send_frames(fill, 0, 0) < 10  # until the ring is full
        assert frames.try_send_frames(tuple(fill), 0, 9) == 9  # still full
        with pytest.raises(TypeError):
            frames.try_send_frames(iter(fill), 0, 0)  # type: ignore[arg-type]
    finally:
        small.close()
        shm.remove_segment(small.name)


def test_ring_frame_calls(ring: _core.Ring) -> None:
    frames = RingFrames(ring)
    assert frames.ring is ring
    assert frames.try_recv_frame(1 << 20) is None
    assert ring.spin_wait(0.0005) is False  # nothing came: gave up, nothing armed
    assert frames.try_send_frame(b"body", 2)
    assert ring.spin_wait(1.0) is True  # already there: no wait
    assert frames.try_recv_frame(1 << 20) == (2, b"body")
    assert frames.try_send_frame(b"\x01\x01\x00\x00\x01\x00\x00\x00z", -1)  # a whole frame
    assert frames.try_recv_frame(1 << 20) == (0, b"z")
    ring.try_send(b"\x01\x01\x08\x00\x01\x00\x00\x00z")  # a receipt is asked: general
    assert frames.try_recv_frame(1 << 20) == (-1, b"\x01\x01\x08\x00\x01\x00\x00\x00z")
    ring.try_send(b"ref", 1)  # record flag 1 (out of line): general, flags kept
    assert frames.try_recv_frame(1 << 20) == (-2, b"ref")
    assert frames.try_send_frame(b"12345678", 0)
    assert frames.try_recv_frame(15) == (-1, b"\x01\x01\x00\x00\x08\x00\x00\x0012345678")
    ring.try_send(b"\x01")  # shorter than a header
    assert frames.try_recv_frame(1 << 20) == (-1, b"\x01")
    ring.try_send(b"")  # empty
    assert frames.try_recv_frame(1 << 20) == (-1, b"")
    with pytest.raises(ValueError):
        frames.try_send_frame(b"x", 256)
    with pytest.raises(ValueError):
        frames.try_send_frame(b"x", -2)
    with pytest.raises(TypeError):
        frames.try_send_frame("not a buffer", 0)  # type: ignore[arg-type]
    assert frames.try_send_frame(b"w", 0)
    frames.stop()  # for good: nothing more the fast way, in either direction
    assert not frames.try_send_frame(b"v", 0)
    assert frames.try_send_frames([b"v"], 0, 0) == 0
    assert frames.try_recv_frame(1 << 20) == (-1, b"\x01\x01\x00\x00\x01\x00\x00\x00w")
    assert frames.counts() == (4, 12 + 9 + 16 + 9, 2, 12 + 9)


def test_counts_are_per_object(ring: _core.Ring) -> None:
    tx, rx = RingFrames(ring), RingFrames(ring)
    assert tx.try_send_frame(b"abc", 1)
    assert rx.try_recv_frame(1 << 20) == (1, b"abc")
    assert tx.counts() == (1, 11, 0, 0) and rx.counts() == (0, 0, 1, 11)


def test_a_full_ring_sends_nothing_and_counts_nothing(ring: _core.Ring) -> None:
    frames = RingFrames(ring)
    sent = 0
    while frames.try_send_frame(b"q" * 1000, 0):
        sent += 1
    assert sent > 0 and frames.counts()[:2] == (sent, sent * 1008)
    assert not frames.try_send_frame(b"q" * 1000, 0)
    assert frames.counts()[:2] == (sent, sent * 1008)
    for _ in range(sent):
        assert frames.try_recv_frame(1 << 20) == (0, b"q" * 1000)
    assert frames.try_recv_frame(1 << 20) is None


def test_a_large_frame_is_copied_whole(ring: _core.Ring) -> None:
    """64 KiB and more are copied with the GIL released, both ways."""
    big = shm.create_ring(1 << 20)
    try:
        frames = RingFrames(big)
        body = bytes(range(256)) * 1024  # 256 KiB
        assert frames.try_send_frame(body, 1)
        assert frames.try_recv_frame(1 << 20) == (1, body)
    finally:
        big.close()
        shm.remove_segment(big.name)


def test_closed_and_shut_down_rings_raise_the_ring_errors(ring: _core.Ring) -> None:
    frames = RingFrames(ring)
    assert frames.try_send_frame(b"last", 0)
    ring.shutdown()
    with pytest.raises(EndOfChannel):
        frames.try_send_frame(b"more", 0)
    assert frames.try_recv_frame(1 << 20) == (0, b"last")  # drained first
    with pytest.raises(EndOfChannel):
        frames.try_recv_frame(1 << 20)
    other = shm.create_ring(1 << 12)
    name = other.name
    of = RingFrames(other)
    other.close()
    shm.remove_segment(name)
    with pytest.raises(ChannelClosed):
        of.try_send_frame(b"x", 0)
    with pytest.raises(ChannelClosed):
        of.try_recv_frame(1 << 20)


def test_a_close_from_another_thread_while_copying_is_safe() -> None:
    """A large copy releases the GIL; a close meanwhile waits for it (the core's busy
    count, which the C API keeps for its callers)."""
    r = shm.create_ring(1 << 22)
    name = r.name
    frames = RingFrames(r)
    body = b"m" * (3 << 20)
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                if frames.try_send_frame(body, 0):
                    frames.try_recv_frame(1 << 30)
            except ChannelClosed:
                return

    t = threading.Thread(target=hammer)
    t.start()
    try:
        for _ in range(1000):
            if frames.counts()[0] >= 2:
                break
            threading.Event().wait(0.001)
        r.close()
    finally:
        stop.set()
        t.join(10)
        shm.remove_segment(name)
    assert not t.is_alive()


def test_the_shm_hot_path_is_one_call_into_protocol_frames() -> None:
    """A shm: channel's small send and receive are each one C call, of RingFrames."""
    name = f"rf{os.getpid()}"
    with buzon.listen(f"shm:{name}") as lst:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        a = buzon.connect(f"shm:{name}", timeout=10)
        t.join(10)
        b = box[0]
        try:
            ops = a._core.transport.ring_ops
            assert ops is not None
            for call in (ops.send_frame, ops.send_frames, ops.recv_frame):
                assert type(call) is types.BuiltinMethodType
                assert isinstance(call.__self__, RingFrames)
            assert a._core.fast_send is ops.send_frame
            assert b._core.fast_recv is b._core.transport.ring_ops.recv_frame
            a.send_bytes(b"x" * 64)
            assert b.recv_bytes(timeout=10) == b"x" * 64
            assert ops.counts()[:2] == (1, 72)
        finally:
            a.close()
            b.close()
