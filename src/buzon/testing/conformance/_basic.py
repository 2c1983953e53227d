"""The channel contract (checks 1-13): every transport, both drivers."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ...errors import (
    ChannelClosed,
    Empty,
    EndOfChannel,
    Full,
    MessageTooLarge,
    Timeout,
    UnsupportedOperation,
)
from ._harness import NotApplicable, Pair, T, expect, gather

SAMPLES: list[Any] = [
    {"frame": 1, "name": "ñandú", "ok": True, "none": None, "f": 1.5},
    [1, [2, [3, [4]]], "x" * 1000],
    "text",
    12345678901234,
    -1,
    0.25,
    None,
    True,
    b"\x00\x01binary\xff",
    b"y" * 5000,
    {"nested": {"list": [b"z" * 2000, {"deep": [None, 1.0]}]}},
]


async def check_roundtrip(p: Pair) -> None:
    """(1) An object sent arrives equal, with its type, both ways of a duplex link."""
    for obj in SAMPLES:
        await p.a.send(obj, T)
        got = await p.b.recv(T)
        assert got == obj and type(got) is type(obj), (obj, got)
        if p.duplex:
            await p.b.send(obj, T)
            back = await p.a.recv(T)
            assert back == obj and type(back) is type(obj)


def _large(p: Pair) -> int:
    props = p.a.properties
    if props.max_message is not None:
        return int(props.max_message) - 64  # room for the frame header
    return 1 << 20


async def check_bytes(p: Pair) -> None:
    """(2) send_bytes/recv_bytes carry empty, small and large payloads unchanged (the
    large one while the receiver reads: it does not fit a kernel buffer)."""
    big = os.urandom(_large(p))
    for payload in (b"", b"x", os.urandom(100), big):
        _, got = await gather(p.a.send_bytes(payload, T), p.b.recv_bytes(T))
        assert got == payload, (len(got), len(payload))


async def check_order(p: Pair) -> None:
    """(3) Ordered links keep the order; on any link what arrives is intact."""
    n, batch = 200, 8  # a POSIX queue and a Unix datagram socket hold 10 by default
    got: list[int] = []
    for start in range(0, n, batch):
        for i in range(start, start + batch):
            await p.a.send({"i": i, "pad": "p" * (i % 7)}, T)
        for _ in range(batch):
            got.append((await p.b.recv(T))["i"])
    if p.a.properties.ordered:
        assert got == list(range(n))
    else:
        assert sorted(got) == sorted(set(got)) and set(got) <= set(range(n))


async def check_nonblocking(p: Pair) -> None:
    """(4) recv_nowait on an empty channel raises Empty; recv(timeout) raises Timeout
    (a TimeoutError) after about the timeout."""
    with expect(Empty):
        p.b.recv_nowait()
    start = time.monotonic()
    with expect(Timeout) as caught:
        await p.b.recv(0.05)
    assert isinstance(caught.value, TimeoutError)
    assert time.monotonic() - start >= 0.04


async def check_backpressure(p: Pair) -> None:
    """(5) send_nowait raises Full when the link is full; everything accepted before
    arrives whole and in order, and nothing else."""
    if not p.a.properties.reliable:
        raise NotApplicable("a lossy link may drop instead of pushing back")
    payload = b"q" * 1000
    sent = 0
    try:
        while sent < 200_000:
            p.a.send_nowait({"n": sent, "p": payload})
            sent += 1
    except Full:
        pass
    else:
        raise AssertionError("200000 KiB-sized messages never filled the link")

    async def drain() -> list[Any]:
        return [await p.b.recv(T) for _ in range(sent)]

    # a message accepted by send_nowait may still be partly in the sender's buffer;
    # the sender's next operation (here: flush, at the same time) completes it
    _, got = await gather(p.a.flush(T), drain())
    for i, msg in enumerate(got):
        assert msg["n"] == i and msg["p"] == payload
    with expect(Empty):
        p.b.recv_nowait()  # a message arrived that was never accepted


async def check_end_of_channel(p: Pair) -> None:
    """(6) After the sender closes, the receiver gets every message, then
    EndOfChannel; iteration stops there."""
    if not p.a.properties.connection_oriented:
        raise NotApplicable("connectionless: no end to report")
    for i in range(5):
        await p.a.send(i, T)
    await p.a.close()
    assert await p.b.drain() == [0, 1, 2, 3, 4]
    with expect(EndOfChannel):
        await p.b.recv(T)


async def check_closed(p: Pair) -> None:
    """(7) Any operation on a closed channel raises ChannelClosed; close is idempotent."""
    await p.b.close()
    await p.b.close()
    with expect(ChannelClosed):
        await p.b.recv(T)
    with expect(ChannelClosed):
        p.b.recv_nowait()
    if p.duplex:
        with expect(ChannelClosed):
            await p.b.send(1, T)


async def check_too_large(p: Pair) -> None:
    """(8) A message over max_frame (or the link's unit) raises MessageTooLarge before
    anything is written; the channel stays usable."""
    limit = p.a.properties.max_message
    size = (limit + 1) if limit is not None else (2 << 20)
    with expect(MessageTooLarge):
        # streams hit the frame cap (the pair has max_frame just over 1 MiB),
        # message transports their own unit
        await p.a.send_bytes(b"x" * size, T)
    await p.a.send("still usable", T)
    assert await p.b.recv(T) == "still usable"


async def check_direction(p: Pair) -> None:
    """(9) The receive end of a simplex link refuses to send."""
    if p.duplex:
        raise NotApplicable("a duplex link: both ends send")
    with expect(UnsupportedOperation):
        await p.b.send("nope", T)


async def check_wait(p: Pair) -> None:
    """(10) wait returns the channel when a message is ready and [] on timeout."""
    assert await p.wait([p.b], 0.05) == []
    await p.a.send("ready", T)
    assert await p.wait([p.b], T) == [p.b]
    assert p.b.recv_nowait() == "ready"


async def check_statistics(p: Pair) -> None:
    """(11) Counters account for every message sent and received."""
    before_a = p.a.statistics().messages_sent
    before_b = p.b.statistics().messages_received
    for i in range(10):
        await p.a.send(i, T)
    for _ in range(10):
        await p.b.recv(T)
    assert p.a.statistics().messages_sent - before_a == 10
    assert p.b.statistics().messages_received - before_b == 10


async def check_numpy(p: Pair) -> None:
    """(12) Arrays round-trip (dtype, shape, values) out of band."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        raise NotApplicable("numpy is not installed") from None
    limit = p.a.properties.max_message
    n = 1000 if limit is not None else 300_000
    arrays: list[Any] = [
        np.arange(n, dtype=np.float64).reshape(-1, 10),
        np.zeros((3, 4, 5), dtype=np.int16),
        np.array([1, 2, 3], dtype=np.uint8),
        np.ones(7, dtype=np.complex64)[::2],  # not contiguous
    ]
    for arr in arrays:
        _, got = await gather(p.a.send({"a": arr}, T), p.b.recv(T))
        got = got["a"]
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert (got == arr).all()


async def check_processes(p: Pair) -> None:
    """(13) A message crosses a real fork: parent to child and back. The child uses the
    end it inherited with the blocking driver (an event loop does not survive a fork;
    the end's state does): in the asyncio driver the parent's end stays an asyncio one."""
    pid = os.fork()
    if pid == 0:  # child: receive, answer; never returns into the test
        code = 1
        try:
            from ... import Channel

            ch = p.b.ch if p.sync else Channel(p.b.ch._core)
            msg = ch.recv(T)
            if p.duplex:
                ch.send({"child": os.getpid(), "got": msg}, T)
            code = 0 if msg == {"from": "parent"} else 2
        finally:
            os._exit(code)
    try:
        await p.a.send({"from": "parent"}, T)
        if p.duplex:
            reply = await p.a.recv(T)
            assert reply == {"child": pid, "got": {"from": "parent"}}
    finally:
        _, status = await asyncio.get_running_loop().run_in_executor(
            p.threads.pool, os.waitpid, pid, 0
        )
    assert os.waitstatus_to_exitcode(status) == 0
