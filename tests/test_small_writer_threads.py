"""The C writers of small frames (protocol/_stream.c SmallWriter, protocol/_credit.c
ReceiptWriter) write without taking the driver's write lock when they find it free
(_writer.h lock_held: they keep the GIL and run no Python code until the write), and
take it only around a partial write's Python callback. These tests hold them to the
lock's rules: several threads sending plain and receipted messages of every small size
under back-pressure (the kernel buffer full: EAGAIN, partial writes finished by the
engine) deliver every frame whole, each thread's in its order, with right counts and
receipt numbers; and a writer that finds the lock held writes nothing."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

import buzon
from _pairs import stream_pair

T = 20.0
pytest.importorskip("buzon.protocol._stream")
pytest.importorskip("buzon.protocol._credit")


@pytest.fixture(params=["pipe", "unix", "tcp"])
def ends(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[tuple]:
    a, b = stream_pair(request.param, tmp_path, T)
    with a, b:
        yield a, b


def _small_buffers(a: buzon.Channel, b: buzon.Channel) -> None:
    """A unix socket: small kernel buffers, so that the kernel takes frames in part
    (it cuts a send into pieces of half the send buffer: the writer's partial-write
    path, under the lock). (TCP takes frames in part with its own buffers; small ones
    make it crawl.)"""
    for ch, opt in ((a, socket.SO_SNDBUF), (b, socket.SO_RCVBUF)):
        sock = getattr(ch._core._stream, "sock", None)
        if sock is not None and sock.family == socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4096)


def test_threads_under_back_pressure_keep_every_frame_whole_and_in_order(ends: tuple) -> None:
    a, b = ends
    _small_buffers(a, b)
    threads, per = 6, 1000
    receipts: list[list[buzon.Receipt]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Event()

    def sender(i: int) -> None:
        rng = random.Random(i)
        try:
            start.wait(T)
            for k in range(per):
                # every small size, up to the C writers' limit (a stack copy up to 2 KiB,
                # a two-part write above): the header says who and which
                body = struct.pack("<II", i, k) + bytes([65 + i]) * rng.randrange(0, 4080)
                if k % 3 == 0:
                    receipts[i].append(a.send_bytes_async(body))
                else:
                    a.send_bytes(body)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=sender, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.set()
    time.sleep(0.3)  # the receiver reads nothing yet: the senders meet a full buffer
    seen = [0] * threads
    total = 0
    for _ in range(threads * per):
        msg = b.recv_bytes(timeout=T)
        i, k = struct.unpack_from("<II", msg)
        assert k == seen[i], f"thread {i}: message {k} came when {seen[i]} was due"
        assert msg[8:] == bytes([65 + i]) * (len(msg) - 8)  # whole, not torn
        seen[i] += 1
        total += len(msg)
    for w in workers:
        w.join(T)
    assert not errors, errors
    assert seen == [per] * threads
    stats = a.statistics()
    assert stats.messages_sent == threads * per
    assert stats.bytes_sent == total + 8 * threads * per
    numbers = sorted(r.number for rs in receipts for r in rs)
    assert len(set(numbers)) == len(numbers)  # each receipted send has its own number
    for rs in receipts:
        assert [r.number for r in rs] == sorted(r.number for r in rs)
        rs[-1].wait(timeout=T)
        assert all(r.delivered() for r in rs)


def test_a_writer_that_finds_the_lock_held_writes_nothing(ends: tuple) -> None:
    """Another thread holds the write lock: the C writers leave the send to the general
    way (which waits for the lock), and nothing reaches the kernel before it is free."""
    a, b = ends
    core = a._core
    small = core.small_send
    assert small is not None
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with a._wlock:
            held.set()
            release.wait(T)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(T)
        assert small(b"plain") is False  # not written: the caller goes the general way
        done: list[object] = []
        sender = threading.Thread(target=lambda: done.append(a.send_bytes_async(b"receipted")))
        sender.start()
        time.sleep(0.1)
        assert not done  # the general way waits for the lock
        assert a.statistics().messages_sent == 0
    finally:
        release.set()
        t.join(T)
    sender.join(T)
    assert done and isinstance(done[0], buzon.Receipt)
    assert b.recv_bytes(timeout=T) == b"receipted"
    assert a.statistics().messages_sent == 1
