"""``ring_size=``: the size of a ``shm:`` channel's rings, a listener option."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import buzon
from buzon import aio, shm
from buzon.testing.conformance import (
    CAPACITY_CHECKS,
    CHECKS,
    DRIVERS,
    PAIR_OPTIONS,
    NotApplicable,
    Pair,
    run_check,
)
from buzon.transport import shm as shm_transport

T = 10.0
SMALL = 4096  # the smallest ring: everything above 4080 bytes goes out of line


def _notes_size(ch: Any) -> int:
    notes: str = ch.properties.notes
    return int(notes.split("rings of ")[1].split(" bytes")[0])


def _sync_pair(url: str, **listen_options: Any) -> tuple[Any, Any, Any]:
    lst = buzon.listen(url, **listen_options)
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
    t.start()
    try:
        a = buzon.connect(url, timeout=T)
    finally:
        t.join(T)
    return lst, a, box[0]


@pytest.mark.parametrize("size", [SMALL, 1 << 16, 1 << 20])
def test_both_ends_get_rings_of_the_listeners_size(size: int) -> None:
    lst, a, b = _sync_pair("shm:sized", ring_size=size)
    try:
        for ch in (a, b):
            assert _notes_size(ch) == size
            assert ch._core.transport.ring_max == size - 16
        fits, spills = b"f" * (size - 16), b"s" * (size - 15)
        for msg in (fits, spills, b"after"):  # the largest record, then out of line
            a.send_bytes(msg, timeout=T)
            assert b.recv_bytes(T) == msg
            b.send_bytes(msg, timeout=T)
            assert a.recv_bytes(T) == msg
        a.send_bytes(b"x")  # lets a drop its handles on the blocks b has taken
        assert b.recv_bytes(T) == b"x"
        b.send_bytes(b"x")
        assert a.recv_bytes(T) == b"x"
    finally:
        a.close()
        b.close()
        lst.close()
    assert shm.list_segments() == []


def test_the_default_is_capacity_read_when_the_listener_is_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lst, a, b = _sync_pair("shm:default")
    try:
        assert _notes_size(a) == _notes_size(b) == shm_transport.CAPACITY
    finally:
        a.close()
        b.close()
        lst.close()
    monkeypatch.setattr(shm_transport, "CAPACITY", 1 << 16)
    lst, a, b = _sync_pair("shm:default")
    try:
        assert _notes_size(a) == 1 << 16
    finally:
        a.close()
        b.close()
        lst.close()


def test_each_listener_has_its_own_size() -> None:
    small = _sync_pair("shm:small", ring_size=SMALL)
    large = _sync_pair("shm:large", ring_size=1 << 18)
    try:
        assert _notes_size(small[1]) == SMALL
        assert _notes_size(large[1]) == 1 << 18
    finally:
        for lst, a, b in (small, large):
            a.close()
            b.close()
            lst.close()


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (3, ValueError),
        (6000, ValueError),  # not a power of two
        (2048, ValueError),  # below 4 KiB
        (2 << 30, ValueError),  # above 1 GiB
        (0, ValueError),
        (-4096, ValueError),
        (True, TypeError),
        (4096.0, TypeError),
        ("4096", TypeError),
    ],
)
def test_invalid_sizes_are_refused_before_binding(
    value: Any, error: type[Exception], runtime_dir: str
) -> None:
    import os

    with pytest.raises(error, match="ring_size"):
        buzon.listen("shm:bad", ring_size=value)
    with pytest.raises(error, match="ring_size"):
        aio.listen("shm:bad", ring_size=value)
    with pytest.raises(error, match="ring_size"):
        buzon.Server("shm:bad", lambda ch: None, ring_size=value)
    assert not os.path.exists(os.path.join(runtime_dir, "bad.shm"))


def test_the_limits_are_accepted() -> None:
    for size in (shm_transport.MIN_RING_SIZE, shm_transport.MAX_RING_SIZE):
        assert shm_transport.check_ring_size(size) == size
        buzon.listen("shm:edge", ring_size=size).close()


def test_connect_refuses_it_the_listener_chooses() -> None:
    with buzon.listen("shm:conn", ring_size=SMALL):
        with pytest.raises(buzon.UnsupportedOperation, match="listener option"):
            buzon.connect("shm:conn", timeout=T, ring_size=SMALL)

        async def main() -> None:
            with pytest.raises(buzon.UnsupportedOperation, match="listener option"):
                await aio.connect("shm:conn", timeout=T, ring_size=SMALL)

        asyncio.run(main())


@pytest.mark.parametrize(
    "url", ["unix:r", "tcp://127.0.0.1:0", "udp://127.0.0.1:0", "fifo:r", "mq:r", "unixgram:r"]
)
def test_other_transports_refuse_it(url: str) -> None:
    with pytest.raises(buzon.UnsupportedOperation, match="shm:"):
        buzon.listen(url, ring_size=SMALL)
    with pytest.raises(buzon.UnsupportedOperation, match="shm:"):
        aio.listen(url, ring_size=SMALL)
    with pytest.raises(buzon.UnsupportedOperation, match="shm:"):
        buzon.connect(url, timeout=T, ring_size=SMALL)


def test_asyncio_listener_and_server_take_it() -> None:
    async def handler(ch: aio.Channel) -> None:
        async for msg in ch:
            await ch.send_bytes(msg)

    async def main() -> None:
        server = aio.Server("shm:asized", handler, ring_size=SMALL)
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0)
        try:
            c = await aio.connect("shm:asized", timeout=T)
            try:
                assert _notes_size(c) == SMALL
                for n in (10, SMALL - 16, SMALL * 3):
                    await c.send_bytes(b"z" * n)
                    assert await c.recv_bytes(timeout=T) == b"z" * n
            finally:
                await c.aclose()
        finally:
            server.shutdown()
            await asyncio.wait_for(task, T)

    asyncio.run(main())


def test_thread_server_takes_it() -> None:
    server = buzon.Server("shm:tsized", lambda ch: ch.send(ch.recv()), ring_size=SMALL)
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    try:
        with buzon.connect("shm:tsized", timeout=T) as c:
            assert _notes_size(c) == SMALL
            c.send("x" * 10000)
            assert c.recv(timeout=T) == "x" * 10000
    finally:
        server.shutdown()
        runner.join(T)


# The whole channel contract on the smallest ring: most messages go out of line, and
# the ring wraps around all the time.


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("driver", DRIVERS)
def test_conformance_on_the_smallest_ring(driver: str, check: str) -> None:
    async def sized(pair: Pair) -> None:
        assert _notes_size(pair.a.ch) == SMALL
        await CHECKS[check](pair)

    options = PAIR_OPTIONS.get(check, {})
    try:
        run_check(sized, "shm", driver, {"ring_size": SMALL}, **options)
    except NotApplicable as exc:
        pytest.skip(f"not applicable: {exc}")


@pytest.mark.parametrize("check", list(CAPACITY_CHECKS))
@pytest.mark.parametrize("driver", DRIVERS)
def test_capacity_on_the_smallest_ring(driver: str, check: str) -> None:
    run, options = CAPACITY_CHECKS[check]
    run_check(run, "shm", driver, {"ring_size": SMALL}, **options)
