"""``shm:NAME`` channels beyond the conformance suite: lifecycle, peer death, leftovers."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import buzon
from buzon import aio, shm
from buzon.address import parse_address
from buzon.errors import EndOfChannel, MessageTooLarge, Timeout

T = 10.0


def _segments() -> set[str]:
    return {s.name for s in shm.list_segments()}


@pytest.fixture
def pair() -> Iterator[tuple[Any, Any]]:
    with buzon.listen("shm:tp") as lst:
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        a = buzon.connect("shm:tp", timeout=T)
        t.join(T)
        b = box[0]
        try:
            yield a, b
        finally:
            a.close()
            b.close()


def test_address() -> None:
    addr = parse_address("shm:jobs")
    assert addr.scheme == "shm" and addr.private and str(addr) == "shm:jobs"
    assert addr.fs_path("/r").endswith("/r/jobs.shm")


def test_nothing_in_dev_shm_once_attached(pair: tuple[Any, Any]) -> None:
    a, b = pair
    assert _segments() == set()  # both ends mapped the rings, the names are gone
    a.send({"n": 1})
    assert b.recv(T) == {"n": 1}
    props = a.properties
    assert props.transport == "shm" and props.connection_oriented and props.local
    assert a.peer.pid == os.getpid()


def test_too_large_keeps_channel_usable(pair: tuple[Any, Any]) -> None:
    a, b = pair
    with pytest.raises(MessageTooLarge):
        a.send_bytes(b"x" * (a._core.max_frame + 1))
    a.send_bytes(b"ok")
    assert b.recv_bytes(T) == b"ok"


def test_messages_larger_than_the_ring_go_out_of_line(pair: tuple[Any, Any]) -> None:
    import numpy as np

    a, b = pair
    ring = a._core.transport.ring_max
    big = os.urandom(ring + 12345)
    for size in (ring, ring + 1, len(big)):
        a.send_bytes(big[:size], timeout=T)  # the ring holds the reference, not the bytes
        assert b.recv_bytes(T) == big[:size]
    arr = np.arange(3 * ring // 8, dtype="f8")
    b.send(arr, timeout=T)
    got = a.recv(T)
    assert got.dtype == arr.dtype and np.array_equal(got, arr)
    a.send_bytes(b"small after big")
    assert b.recv_bytes(T) == b"small after big"
    a.send_bytes(b"x")  # lets a drop its handles on the blocks b has taken
    assert b.recv_bytes(T) == b"x"
    assert _segments() == set()


def test_unread_out_of_line_messages_are_removed_on_close() -> None:
    with buzon.listen("shm:unread") as lst:
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        a = buzon.connect("shm:unread", timeout=T)
        t.join(T)
        b = box[0]
        a.send_bytes(b"y" * (a._core.transport.ring_max + 1), timeout=T)
        assert len(_segments()) == 1
        a.close()
        b.close()  # never read it: its block goes with the channel
    assert _segments() == set()


def _child_sends_then_dies(lst_addr: str, count: int) -> None:
    ch = buzon.connect(lst_addr, timeout=T)
    for i in range(count):
        ch.send(i)
    os.kill(os.getpid(), signal.SIGKILL)


def test_peer_killed_gives_every_message_then_end_of_channel() -> None:
    with buzon.listen("shm:dies") as lst:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _child_sends_then_dies("shm:dies", 50)
            finally:
                os._exit(1)
        ch = lst.accept(timeout=T)
        try:
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status)
            assert [ch.recv(T) for _ in range(50)] == list(range(50))
            with pytest.raises(EndOfChannel):
                ch.recv(T)
        finally:
            ch.close()
    assert _segments() == set()


def test_writer_blocked_on_a_full_ring_wakes_when_the_reader_dies() -> None:
    with buzon.listen("shm:full") as lst:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: connect, say so, never read
            try:
                os.close(r)
                ch = buzon.connect("shm:full", timeout=T)
                os.write(w, b"1")
                signal.pause()
                ch.close()
            finally:
                os._exit(1)
        os.close(w)
        ch = lst.accept(timeout=T)
        try:
            assert os.read(r, 1) == b"1"
            os.close(r)
            big = b"z" * 100_000
            while True:
                try:
                    ch.send_bytes(big, timeout=0)
                except Timeout:
                    break
                except buzon.Full:
                    break
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            with pytest.raises(EndOfChannel):
                ch.send_bytes(big, timeout=T)  # not a Timeout: the death woke us
        finally:
            ch.close()


async def _aio_round_trip() -> Any:
    lst = aio.listen("shm:aio")
    try:
        acc = asyncio.ensure_future(lst.accept(timeout=T))
        a = await aio.connect("shm:aio", timeout=T)
        b = await acc
        try:
            waiter = asyncio.ensure_future(b.recv(T))
            await asyncio.sleep(0)  # b now waits on its fd in the loop
            await a.send({"hi": [1, 2]})
            got = await waiter
            await b.send(got)
            return await a.recv(T)
        finally:
            await a.aclose()
            await b.aclose()
    finally:
        lst.close()


def test_asyncio_wakes_through_the_fd() -> None:
    assert asyncio.run(_aio_round_trip()) == {"hi": [1, 2]}


def test_listener_close_leaves_nothing(runtime_dir: str) -> None:
    lst = buzon.listen("shm:gone")
    assert os.path.exists(os.path.join(runtime_dir, "gone.shm"))
    lst.close()
    assert not os.path.exists(os.path.join(runtime_dir, "gone.shm"))
    assert _segments() == set()


def test_an_end_shared_with_a_forked_child_stays_open_until_both_close() -> None:
    """As serve(mode="process") does: fork per client, the parent closes its copy."""
    with buzon.listen("shm:fork") as lst:
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        client = buzon.connect("shm:fork", timeout=T)
        t.join(T)
        served = box[0]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: echo until the client closes
            code = 1
            try:
                client.close()  # the client lives in "another process": drop our copy
                for msg in served:
                    served.send({"pid": os.getpid(), "msg": msg})
                code = 0
            finally:
                os._exit(code)
        served.close()  # the parent's copy only: the child still serves
        try:
            for i in range(3):
                client.send(i)
                reply = client.recv(T)
                assert reply == {"pid": pid, "msg": i}
        finally:
            client.close()  # the child's loop ends with EndOfChannel
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
