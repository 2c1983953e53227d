"""``send_nowait`` on a stream hands a message over whole or not at all.

A ``send_bytes_nowait`` the kernel took only in part kept the frame's tail in user
space until the sender's next call: the receiver, mid-frame, waited meanwhile (found
by sockblk, present on 66a2333 and a7ee4e5). Now a nowait whose frame fits the
kernel's buffer but not its free room raises :class:`~buzon.Full` before writing
anything; and a frame larger than the whole buffer (which no kernel write can take at
once) goes only onto an empty link, its tail written by every later call on the
channel, a nowait that raises ``Full`` included (a nowait retry loop with a capacity
never wrote it before: the receiver could not take the message, so no credit came).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import buzon

T = 20.0  # a failure, never a hang


def _pair(kind: str, **kw: object) -> tuple[buzon.Channel, buzon.Channel]:
    if kind == "pipe":
        return buzon.pipe(**kw)  # type: ignore[arg-type]
    lst = buzon.listen(kind, **kw)  # type: ignore[arg-type]
    try:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        a = buzon.connect(lst.address if kind.startswith("tcp") else kind, timeout=T, **kw)  # type: ignore[arg-type]
        t.join(T)
        return a, box[0]
    finally:
        lst.close()


@pytest.fixture(params=["pipe", "unix:nowaitwhole", "tcp://127.0.0.1:0"])
def pair(
    request: pytest.FixtureRequest, runtime_dir: str
) -> Iterator[tuple[buzon.Channel, buzon.Channel]]:
    a, b = _pair(request.param)  # the default capacity: the kernel buffer
    with a, b:
        yield a, b


def test_a_nowait_until_full_keeps_nothing_back(pair: tuple[buzon.Channel, buzon.Channel]) -> None:
    """Fill the link with nowaits of messages a quarter of the kernel's buffer: every
    one accepted went whole to the kernel (nothing in user space), so the receiver
    reads them all while the sender does nothing more."""
    a, b = pair
    size = 48_000  # under a quarter of a pipe (64 KiB pages: 61 KiB) / unix socket buffer
    sent = 0
    while sent < 2000:
        msg = sent.to_bytes(4, "little") * (size // 4)
        try:
            a.send_bytes_nowait(msg)
        except buzon.Full:
            break
        sent += 1
        assert a.statistics().queued_bytes == 0, f"message {sent - 1} was kept in part"
    assert 0 < sent < 2000
    for i in range(sent):  # the sender makes no call meanwhile
        got = b.recv_bytes(timeout=T)
        assert got == i.to_bytes(4, "little") * (size // 4)
    with pytest.raises(buzon.Empty):
        b.recv_bytes_nowait()
    a.send_bytes_nowait(b"after")  # room again
    assert b.recv_bytes(timeout=T) == b"after"


def test_a_nowait_full_writes_an_earlier_tail(runtime_dir: str) -> None:
    """capacity=1 on unix, messages larger than the socket's whole buffer: the first
    nowait goes in part; a retry loop of nowaits (each raising Full: no credit) must
    write its tail, or the receiver never takes it and no credit ever comes."""
    a, b = _pair("unix:nowaittail", capacity=1)
    with a, b:
        big = 700_000  # more than a unix socket buffer (208 KiB) holds
        got: list[object] = []

        def drain() -> None:
            try:
                for _ in range(3):
                    got.append(len(b.recv_bytes(timeout=T)))
            except BaseException as exc:  # reported below
                got.append(exc)

        reader = threading.Thread(target=drain)
        reader.start()
        try:
            for i in range(3):
                end = time.monotonic() + T
                while True:
                    try:
                        a.send_bytes_nowait(bytes([i]) * big)
                        break
                    except buzon.Full:
                        assert time.monotonic() < end, f"message {i}: Full for {T} s"
                        time.sleep(0.001)
            # the last one's tail: no later call writes it (larger than the buffer,
            # it cannot go whole); flush() is the documented way
            a.flush(timeout=T)
        finally:
            reader.join(T)
        assert got == [big, big, big]


async def test_asyncio_nowait_until_full_keeps_nothing_back() -> None:
    a, b = buzon.aio.pipe()
    try:
        sent = 0
        while sent < 100:
            try:
                a.send_bytes_nowait(bytes([sent]) * 30_000)  # a few fit the pipe
            except buzon.Full:
                break
            sent += 1
            assert a.statistics().queued_bytes == 0, f"message {sent - 1} was kept in part"
        assert 0 < sent < 100
        for i in range(sent):
            assert await b.recv_bytes(timeout=T) == bytes([i]) * 30_000
    finally:
        await a.aclose()
        await b.aclose()
