"""On a Unix stream socket a send of at most 2 KiB is taken whole or not at all (Linux
queues it as one buffer: protocol/_writer.h whole_limit), so the C writer of small
frames (protocol/_stream.c SmallWriter) only checks that the driver's write lock is
free there, as on a pipe, instead of taking it; TCP, which may take part of any write,
still takes it. Threads that send frames of every size up to that bound, through the
smallest send buffer the kernel allows and a receiver that lags, get each frame
through whole and in order."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import buzon
from buzon.testing.conformance._harness import url_for

_stream = pytest.importorskip("buzon.protocol._stream")

T = 20.0
WHOLE = 2048  # _writer.h BUZON_COPY_MAX: whole_limit of a Unix stream socket


def _pair(kind: str) -> tuple[buzon.Channel, buzon.Channel]:
    lst = buzon.listen(url_for(kind))
    try:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        a = buzon.connect(str(lst.address), timeout=T)
        t.join(T)
        return a, box[0]
    finally:
        lst.close()


class CountingLock:
    """A write lock that counts how often the writer takes it (never held by another)."""

    def __init__(self) -> None:
        self.taken = 0
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self.taken += 1
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


@pytest.fixture(params=["unix", "tcp"])
def spied(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any, CountingLock, Any]]:
    a, b = _pair(request.param)
    lock = CountingLock()
    core = a._core
    sock = core._stream.sock
    parts: list[tuple[int, bytes, int]] = []

    def on_part(flags: int, data: bytes, n: int) -> int:
        parts.append((flags, data, n))
        raise AssertionError("a frame was taken in part")

    writer = _stream.SmallWriter(sock.fileno(), core, lock, 4096, on_part, True)
    try:
        yield request.param, writer, lock, b
    finally:
        a.close()
        b.close()
    assert not parts


def test_a_unix_socket_writes_small_frames_without_taking_the_lock(
    spied: tuple[str, Any, CountingLock, Any],
) -> None:
    kind, writer, lock, b = spied
    sizes = [0, 1, 64, 1000, WHOLE - 8]  # frames of 8 .. 2048 bytes
    for n in sizes:
        assert writer(b"x" * n) is True
    for n in sizes:
        assert b.recv_bytes(timeout=T) == b"x" * n
    if kind == "unix":
        assert lock.taken == 0  # found free (locked()), never taken
    else:
        assert lock.taken == len(sizes)  # TCP may take part of a write: the lock is taken
    assert writer(b"y" * (WHOLE - 7)) is True  # one byte over: taken on both
    assert lock.taken == (1 if kind == "unix" else len(sizes) + 1)
    assert b.recv_bytes(timeout=T) == b"y" * (WHOLE - 7)


def test_a_held_lock_stops_the_unix_writer(spied: tuple[str, Any, CountingLock, Any]) -> None:
    _kind, writer, lock, _b = spied
    assert lock._lock.acquire(False)
    try:
        assert writer(b"held") is False  # the general way waits for the lock
    finally:
        lock._lock.release()


@pytest.mark.parametrize("call", ["send_bytes", "send_bytes_async"])
def test_threads_on_the_smallest_send_buffer_keep_small_frames_whole(call: str) -> None:
    """Both small writers (SmallWriter and the receipts' ReceiptWriter, _credit.c)."""
    a, b = _pair("unix")
    with a, b:
        a._core._stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the minimum
        b._core._stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        threads, per = 8, 600
        errors: list[BaseException] = []
        send = getattr(a, call)
        start = threading.Event()

        def sender(i: int) -> None:
            try:
                start.wait(T)
                for k in range(per):
                    size = (k * 997 + i * 131) % (WHOLE - 16)  # frames of 16 .. 2048 bytes
                    send(struct.pack("<II", i, k) + bytes([65 + i]) * size)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        workers = [threading.Thread(target=sender, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        start.set()
        time.sleep(0.2)  # the receiver lags: the senders meet a full buffer (EAGAIN)
        seen = [0] * threads
        for _ in range(threads * per):
            msg = b.recv_bytes(timeout=T)
            i, k = struct.unpack_from("<II", msg)
            assert k == seen[i], f"thread {i}: message {k} came when {seen[i]} was due"
            assert msg[8:] == bytes([65 + i]) * (len(msg) - 8)  # whole, not torn
            seen[i] += 1
        for w in workers:
            w.join(T)
        assert not errors, errors
        assert seen == [per] * threads
        assert a.statistics().messages_sent == threads * per
