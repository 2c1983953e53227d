"""``Channel._recv_parsed``: the channel's hook through which ``buzon.rpc`` takes its
common message apart in C. A whole frame is offered to the hook and, when taken,
counted as the channel counts a take; everything else (declined, several frames in
one read, a frame cut across reads, a ring's other records) comes as the channel's
own item, nothing lost or reordered. ``rpc._wire.recv`` reads through it and nothing
else of the channel's insides."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import buzon
from buzon.codec import Codec
from buzon.protocol import _rpc
from buzon.protocol.frames import Kind, encode_frame
from buzon.rpc import _wire as w
from buzon.sync import Channel

T = 10.0
URLS = ["unix:parsed", "shm:parsed"]


def _pair(url: str, **options: Any) -> tuple[Channel, Channel]:
    lst = buzon.listen(url, **options)
    try:
        box: list[Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        a = buzon.connect(url, timeout=T, **options)
        t.join(T)
        return a, box[0]
    finally:
        lst.close()


@pytest.fixture(params=[(u, s) for u in URLS for s in (0.0, 50e-6)], ids=str)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Channel, Channel]]:
    url, spin = request.param
    a, b = _pair(url, spin=spin)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _request(call_id: int, *args: Any) -> bytes:
    frame = _rpc.request("add", args, call_id, 250)
    assert frame is not None
    return frame


def _as_call(ch: Channel, item: Any) -> Any:
    """What rpc/_wire.recv makes of a ``_recv_parsed`` item."""
    if type(item) is tuple:
        return item[1] if item[0] == -1 else ch._core.item_object(item)
    return _rpc.parse_parts(item.fields, item.body)


def _big_request(call_id: int, *args: Any) -> bytes:
    """A request frame past protocol._rpc's small ones (the reference encoder's)."""
    codec, payload, _ = Codec().encode([w.REQUEST, "add", list(args)])
    fields = {w.MESSAGE_ID: w.id_field(call_id), w.DEADLINE: w.ms_field(0.25)}
    return b"".join(bytes(b) for b in encode_frame(Kind.DATA, codec, payload, fields=fields))


class _Hook:
    """``protocol._rpc.parse``, recording what it was offered (``decline``: return
    None, as for a message not of the common shape)."""

    def __init__(self, decline: bool = False) -> None:
        self.offered: list[bytes] = []
        self.decline = decline

    def __call__(self, data: Any, max_frame: int, n: int) -> Any:
        self.offered.append(bytes(memoryview(data)[:n]))
        return None if self.decline else _rpc.parse(data, max_frame, n)


def test_a_whole_frame_goes_to_the_hook_and_is_counted(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    frame = _request(7, 1, 2)
    before = b.statistics().messages_received, b.statistics().bytes_received
    took = threading.Semaphore(0)

    def sender() -> None:  # one at a time, each while the receiver waits (a round trip)
        for i in range(20):
            time.sleep(0.002)
            w.send_frame(a, _request(i, i, 2), T)
            took.acquire(timeout=T)

    t = threading.Thread(target=sender)
    t.start()
    hook = _Hook()
    got = []
    for _ in range(20):  # a stream's wait reads each frame whole
        got.append(b._recv_parsed(hook, T))
        took.release()
    t.join(T)
    for i in range(20, 40):  # a ring's record is there before the receive
        w.send_frame(a, _request(i, i, 2), T)
        got.append(b._recv_parsed(hook, T))
    parsed = [_as_call(b, g) for g in got]
    assert parsed == [(w.REQUEST, i, 250, "add", [i, 2]) for i in range(40)]
    assert hook.offered, "no whole frame was offered to the hook"
    assert all(m == frame[:8] + m[8:] and len(m) == len(frame) for m in hook.offered)
    assert b.statistics().messages_received - before[0] == 40
    assert b.statistics().bytes_received - before[1] == 40 * len(frame)


def test_a_declined_frame_comes_as_the_channel_item(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    for i in range(5):
        w.send_frame(a, _request(i, "x"), T)
        a.send({"plain": i})  # not an RPC message: decoded by the channel
    hook = _Hook(decline=True)
    items = [b._recv_parsed(hook, T) for _ in range(10)]
    assert all(not (type(it) is tuple and it[0] == -1) for it in items)
    bodies = [b._core.item_object(it) for it in items]  # type: ignore[arg-type]
    assert bodies == [x for i in range(5) for x in ([w.REQUEST, "add", ["x"]], {"plain": i})]


def test_several_frames_in_one_read_keep_their_order() -> None:
    a, b = _pair("unix:parsed2", spin=0.0)
    try:
        frames = [_request(i, i) for i in range(50)]
        a._send_encoded([b"".join(frames)], T)  # one write: reads bring several frames
        got = [w.recv(b, T) for _ in range(50)]
        assert got == [(w.REQUEST, i, 250, "add", [i]) for i in range(50)]
    finally:
        a.close()
        b.close()


def test_a_frame_cut_across_reads_arrives_whole() -> None:
    a, b = _pair("unix:parsed3", spin=0.0)
    try:
        frame = _request(9, "y" * 100, 3)
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(w.recv(b, T)))
        t.start()
        a._send_encoded([frame[:13]], T)  # the receiver reads part of the frame first
        time.sleep(0.1)
        a._send_encoded([frame[13:]], T)
        t.join(T)
        assert box == [(w.REQUEST, 9, 250, "add", ["y" * 100, 3])]
    finally:
        a.close()
        b.close()


def test_the_end_of_the_stream_is_not_offered() -> None:
    a, b = _pair("unix:parsed4", spin=0.0)
    try:
        a.close()
        hook = _Hook()
        with pytest.raises(buzon.errors.EndOfChannel):
            b._recv_parsed(hook, T)
        assert hook.offered == []
    finally:
        b.close()


@pytest.mark.parametrize("url", URLS)
def test_wire_recv_reads_only_through_the_channel_hook(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rpc/_wire.recv used to copy ten lines of the channel's receive (its ring calls,
    counters, locks): a rename there broke RPC silently. It now calls one method."""
    a, b = _pair(url + "5", spin=0.0)
    calls: list[float | None] = []
    inner = Channel._recv_parsed

    def counting(self: Channel, parse: Any, timeout: float | None) -> Any:
        calls.append(timeout)
        return inner(self, parse, timeout)

    monkeypatch.setattr(Channel, "_recv_parsed", counting)
    try:
        w.send_frame(a, _request(1, 1, 1), T)
        assert w.recv(b, T) == (w.REQUEST, 1, 250, "add", [1, 1])
        assert calls == [T]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("url", ["unix:parsed6", "shm:parsed6", "tcp://127.0.0.1:0"])
def test_whole_frames_sent_in_one_call_arrive_intact_through_partial_writes(url: str) -> None:
    """``Channel._send_frame`` writes a whole frame in one C call on a quiet stream
    (``small_send(frame, True)``); when the kernel takes only part of it (a full
    socket), the tail is kept and finished by the engine: every frame arrives, in
    order, and the counts are the frames' sizes."""
    lst = buzon.listen(url, spin=0.0)
    try:
        box: list[Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        a = buzon.connect(lst.address if url.startswith("tcp") else url, timeout=T, spin=0.0)
        t.join(T)
    finally:
        lst.close()
    b = box[0]
    size = [3900 + i % 50 for i in range(2000)]  # each frame <= PLAIN_MAX: the C write
    frames = [_big_request(i, "z" * size[i], i) for i in range(2000)]
    got: list[Any] = []

    def reader() -> None:
        for i in range(len(frames)):
            if i % 100 == 0:
                time.sleep(0.005)  # let the socket fill: some later writes are partial
            got.append(w.recv(b, T))

    try:
        before = a.statistics().bytes_sent, a.statistics().messages_sent
        r = threading.Thread(target=reader)
        r.start()
        for f in frames:
            a._send_frame(f, T)
        r.join(30)
        want = [[w.REQUEST, "add", ["z" * size[i], i]] for i in range(2000)]
        assert [w.as_message(*g)[0] for g in got] == want
        stats = a.statistics()
        assert stats.messages_sent - before[1] == len(frames)
        assert stats.bytes_sent - before[0] == sum(len(f) for f in frames)
    finally:
        a.close()
        b.close()
