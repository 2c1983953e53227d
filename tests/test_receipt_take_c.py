"""A receiver's receipt bookkeeping in C (protocol/_pop.c): the take of a message a
stream read already brought (``ChannelCore._pop``, the reference) and the blocking
``recv_bytes`` with a message in hand (``Head``) count receipt-asking takes without a
Python frame, with the same numbers, statistics and acknowledgements as the Python
path; and a receiver that closes with takes still unacknowledged reports them first."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import buzon
from _pairs import stream_pair
from buzon import _channel
from buzon._channel import ChannelCore
from buzon.errors import BuzonError, Undelivered

try:
    from buzon.protocol import _pop as _pop_c
except ImportError:  # pragma: no cover - a build without the extension
    _pop_c = None  # type: ignore[assignment]

T = 10.0
MSG = b"r" * 64


@pytest.fixture(params=["pipe", "unix", "tcp"])
def ends(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[Any, Any]]:
    a, b = stream_pair(request.param, tmp_path)
    with a, b:
        yield a, b


def _reference(monkeypatch: pytest.MonkeyPatch, *channels: Any) -> None:
    """The Python path: ChannelCore._pop and the class's recv_bytes."""
    monkeypatch.setattr(_channel, "_pop", ChannelCore._pop, raising=False)
    for ch in channels:
        ch.__dict__.pop("recv_bytes", None)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Any] = getattr(ChannelCore, name)

    def spy(self: Any, *args: Any) -> Any:
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(ChannelCore, name, spy)
    return calls


def _flow_state(ch: Any) -> tuple[int, int, int, bool]:
    rflow = ch._core.rflow
    return rflow.taken, rflow.reported, rflow.unreported, rflow.report_due


def test_a_busy_receivers_receipted_takes_run_no_python_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pipe holding 600 receipted messages: the receiver's takes are counted in C;
    Python runs only for the acknowledgement every REPORT_EVERY takes (on 19dfd8e
    ChannelCore._pop ran once per message)."""
    a, b = buzon.pipe()
    with a, b:
        receipts = [a.send_bytes_async(MSG) for _ in range(600)]
        pops = _spy(monkeypatch, "_pop")
        took = _spy(monkeypatch, "_took")
        for _ in range(600):
            assert b.recv_bytes(timeout=T) == MSG
        assert pops == []
        assert len(took) <= 600 // 255 + 3
        for r in receipts:
            r.wait(timeout=T)
            assert r.delivered()
        assert b.statistics().messages_received == 600


@pytest.mark.parametrize("n", [255, 256, 257, 511, 512, 513])
def test_receipts_complete_across_a_batch_boundary_as_the_python_path(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything sent before the receiver reads (deterministic reads): the C path and
    the reference give the same statistics, flow state and acknowledgements."""
    seen = []
    for reference in (False, True):
        a, b = buzon.pipe()
        with a, b:
            if reference:
                _reference(monkeypatch, a, b)
            receipts = [a.send_bytes_async(MSG) for _ in range(n)]
            for _ in range(n):
                assert b.recv_bytes(timeout=T) == MSG
            for r in receipts:
                r.wait(timeout=T)
                assert r.delivered()
                assert r.delivered()
            seen.append((b.statistics(), _flow_state(b), b._core.taken, a.statistics()))
        monkeypatch.undo()
    assert seen[0] == seen[1]
    stats, (taken, reported, unreported, due), core_taken, _ = seen[0]
    assert stats.messages_received == taken == reported == core_taken == n
    assert (unreported, due) == (0, False)


def test_mixed_plain_and_receipted_messages_number_as_the_python_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = []
    for reference in (False, True):
        a, b = buzon.pipe()
        with a, b:
            if reference:
                _reference(monkeypatch, a, b)
            receipts = []
            for i in range(700):
                if i % 3 == 0:
                    a.send_bytes(MSG)
                else:
                    receipts.append((i + 1, a.send_bytes_async(MSG)))
            assert [num for num, _ in receipts] == [r.number for _, r in receipts]
            got = [b.recv_bytes(timeout=T) for _ in range(400)]
            assert got == [MSG] * 400
            state = _flow_state(b)
            # take the rest with recv (objects: the stripped flags decode as raw bytes)
            rest = [b.recv(timeout=T) for _ in range(300)]
            assert rest == [MSG] * 300
            for _, r in receipts:
                r.wait(timeout=T)
                assert r.delivered()
            seen.append((state, _flow_state(b), b.statistics(), a.statistics()))
        monkeypatch.undo()
    assert seen[0] == seen[1]
    assert seen[0][1][:2] == (700, 700)


def test_a_receiver_that_only_ever_blocks_still_acknowledges(ends: tuple[Any, Any]) -> None:
    """Each message is sent when the receiver already sleeps in recv: its receipt must
    complete without any further call of the receiver."""
    a, b = ends
    got: list[bytes] = []

    def receive() -> None:
        for _ in range(40):
            got.append(b.recv_bytes(timeout=T))

    t = threading.Thread(target=receive)
    t.start()
    try:
        for _ in range(40):
            r = a.send_bytes_async(MSG)
            r.wait(timeout=T)
            assert r.delivered()
    finally:
        t.join(T)
    assert got == [MSG] * 40


def test_a_receiver_behind_its_sender_acknowledges_everything(ends: tuple[Any, Any]) -> None:
    """A sender far ahead (the receiver's reads bring many messages, taken in C) and
    a receiver in another thread: every receipt completes, the counts agree."""
    a, b = ends
    n = 3000

    def receive() -> None:
        for _ in range(n):
            b.recv_bytes(timeout=T)

    t = threading.Thread(target=receive)
    t.start()
    try:
        receipts = [a.send_bytes_async(MSG, timeout=T) for _ in range(n)]
        receipts[-1].wait(timeout=T)
        assert all(r.delivered() for r in receipts)
    finally:
        t.join(T)
    assert b.statistics().messages_received == n
    assert b._core.rflow.taken == b._core.rflow.reported == n


@pytest.mark.parametrize("scheme", ["pipe", "unix"])
def test_a_receiver_closing_with_takes_unacknowledged_reports_them(
    scheme: str, tmp_path: Any
) -> None:
    """It took 5 of 10 (more in hand: not acknowledged yet) and closes: the 5 it took
    are delivered, the other 5 fail (on 19dfd8e all 10 failed with Undelivered)."""
    a, b = stream_pair(scheme, tmp_path)
    with a:
        receipts = [a.send_bytes_async(MSG) for _ in range(10)]
        for _ in range(5):
            assert b.recv_bytes(timeout=T) == MSG
        assert b._core.rflow.report_due
        b.close()
        for r in receipts[:5]:
            r.wait(timeout=T)
            assert r.delivered()
        for r in receipts[5:]:
            with pytest.raises(Undelivered):
                r.wait(timeout=T)


def test_an_asyncio_receiver_closing_with_takes_unacknowledged_reports_them(
    tmp_path: Any,
) -> None:
    a, b = stream_pair("unix", tmp_path)
    b.close()  # a's peer: only its address is needed
    a.close()
    lst = buzon.listen(f"unix:{tmp_path}/aio")

    async def main() -> None:
        from buzon import aio

        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        try:
            reader = await aio.connect(str(lst.address), timeout=T)
        finally:
            t.join(T)
        sender = box[0]
        with sender:
            receipts = [sender.send_bytes_async(MSG) for _ in range(10)]
            for _ in range(5):
                assert await reader.recv_bytes(timeout=T) == MSG
            await reader.aclose()
            for r in receipts[:5]:
                r.wait(timeout=T)
                assert r.delivered()
            for r in receipts[5:]:
                with pytest.raises(Undelivered):
                    r.wait(timeout=T)

    try:
        asyncio.run(main())
    finally:
        lst.close()


def test_a_killed_receiver_fails_the_pending_receipts(tmp_path: Any) -> None:
    """The receiver takes some messages and is killed: no receipt waits for ever."""
    a, b = buzon.pipe()
    receipts = [a.send_bytes_async(MSG) for _ in range(20)]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            a.close()
            for _ in range(7):
                b.recv_bytes(timeout=T)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    b.close()
    try:
        outcomes = []
        for r in receipts:
            try:
                r.wait(timeout=T)
                outcomes.append(r.delivered())
            except BuzonError as exc:
                outcomes.append(type(exc).__name__)
        assert all(o is True or o == "Undelivered" for o in outcomes), outcomes
        assert outcomes[7:] == ["Undelivered"] * 13
    finally:
        os.waitpid(pid, 0)
        a.close()


def test_an_asyncio_receiver_against_a_blocking_sender(tmp_path: Any) -> None:
    """The asyncio driver takes through the same core (the C _pop): a blocking sender's
    receipts complete and the counts agree."""
    lst = buzon.listen(f"unix:{tmp_path}/x")
    n = 1000

    async def main() -> None:
        from buzon import aio

        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        try:
            reader = await aio.connect(str(lst.address), timeout=T)
        finally:
            t.join(T)
        sender = box[0]
        receipts: list[Any] = []
        s = threading.Thread(
            target=lambda: receipts.extend(
                sender.send_bytes_async(MSG, timeout=T) for _ in range(n)
            )
        )
        s.start()
        try:
            for _ in range(n):
                assert await reader.recv_bytes(timeout=T) == MSG
        finally:
            s.join(T)
        assert len(receipts) == n
        for r in receipts:
            r.wait(timeout=T)
            assert r.delivered()
        assert reader.statistics().messages_received == n
        await reader.aclose()
        sender.close()

    try:
        asyncio.run(main())
    finally:
        lst.close()


def test_a_blocking_receiver_against_an_asyncio_sender(tmp_path: Any) -> None:
    lst = buzon.listen(f"unix:{tmp_path}/y")
    n = 1000

    async def main() -> None:
        from buzon import aio

        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        try:
            sender = await aio.connect(str(lst.address), timeout=T)
        finally:
            t.join(T)
        reader = box[0]
        got: list[bytes] = []
        r = threading.Thread(
            target=lambda: got.extend(reader.recv_bytes(timeout=T) for _ in range(n))
        )
        r.start()
        try:
            receipts = [await sender.send_bytes_async(MSG) for _ in range(n)]
            for rc in receipts:
                await asyncio.wait_for(_await(rc), T)
        finally:
            await asyncio.to_thread(r.join, T)
        assert got == [MSG] * n
        assert reader.statistics().messages_received == n
        reader.close()
        await sender.aclose()

    try:
        asyncio.run(main())
    finally:
        lst.close()


async def _await(receipt: Any) -> None:
    await receipt


def test_a_frame_among_receipted_messages_goes_the_python_way() -> None:
    """A message that is not a plain small frame (a big one, chunked: a Frame) between
    receipted ones: taken through ChannelCore._take, counted once."""
    a, b = buzon.pipe()
    with a, b:
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.extend(b.recv_bytes(timeout=T) for _ in range(7)))
        first = [a.send_bytes_async(MSG) for _ in range(3)]
        t.start()
        try:
            a.send_bytes(b"x" * 70_000, timeout=T)
            last = [a.send_bytes_async(MSG) for _ in range(3)]
        finally:
            t.join(T)
        assert got == [MSG] * 3 + [b"x" * 70_000] + [MSG] * 3
        for r in first + last:
            r.wait(timeout=T)
            assert r.delivered()
        assert b.statistics().messages_received == 7
        assert b._core.rflow.taken == 7


@pytest.mark.skipif(_pop_c is None, reason="protocol/_pop.c is not built")
def test_pop_checks_its_arguments() -> None:
    with pytest.raises(TypeError):
        _pop_c.pop(1)  # type: ignore[call-arg]
    a, b = buzon.pipe()
    with a, b:
        head = b.recv_bytes
        assert isinstance(head, _pop_c.Head)
        a.send_bytes(b"x")
        assert head(T) == b"x"  # a timeout argument: the method's way
        a.send_bytes(b"y")
        assert head(timeout=T) == b"y"
    with pytest.raises(BuzonError):
        head()  # closed


def test_a_receiver_that_caught_up_with_a_busy_stream_watches_before_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last message in hand of a batch of several: before it acknowledges, the
    receiver watches the link (``receipt_linger``); a message that comes meanwhile
    joins the batch (no CREDIT yet), and a watch that sees nothing answers. On
    19dfd8e every catch-up wrote a CREDIT (a receiver that keeps up with a TCP
    sender wrote one per 10-20 messages, each a write and the sender's kernel work)."""
    a, b = buzon.pipe()
    with a, b:
        real = b._core.receipt_watch
        assert real is not None
        watches: list[bool] = []
        receipts = [a.send_bytes_async(MSG) for _ in range(3)]

        def watch() -> bool:
            if not watches:  # the sender's next message comes while the receiver watches
                receipts.append(a.send_bytes_async(MSG))
            watches.append(True)
            return bool(real())

        monkeypatch.setattr(b._core, "receipt_watch", watch)
        for _ in range(3):
            assert b.recv_bytes(timeout=T) == MSG
        assert len(watches) == 1
        assert b.statistics().credits_sent == 0  # the 4th joined the batch
        assert b.recv_bytes(timeout=T) == MSG
        assert len(watches) == 2  # the last watch saw a message come: watch again
        assert b.statistics().credits_sent == 1  # nothing came: answered
        for r in receipts:
            r.wait(timeout=T)
            assert r.delivered()


@pytest.mark.parametrize("spin", [None, 0.0])
def test_a_lone_receipted_message_is_answered_at_once(
    spin: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender that waits for each receipt: the receiver answers each take at once,
    without watching the link (and a spin=0 channel never watches)."""
    a, b = buzon.pipe() if spin is None else buzon.pipe(spin=spin)
    with a, b:
        watches: list[bool] = []
        real = b._core.receipt_watch
        assert (real is not None) == (spin is None)
        if real is not None:
            monkeypatch.setattr(b._core, "receipt_watch", lambda: watches.append(True) or real())
        for i in range(5):
            r = a.send_bytes_async(MSG)
            assert b.recv_bytes(timeout=T) == MSG
            assert b.statistics().credits_sent == i + 1
            r.wait(timeout=T)
            assert r.delivered()
        assert watches == []
