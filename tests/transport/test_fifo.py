"""``fifo:`` channels with hostile and concurrent writers (contract 4f of issue 9).

One bad or partial write must not poison the FIFO for the other writers; several
writers (processes) get their messages through whole and in their order, messages
larger than ``PIPE_BUF`` included, also when one of them is killed mid-message.
``raw=True`` moves bytes as they are and ends, like ``cat``, when the last writer closes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import buzon
import buzon.aio
from buzon.errors import EndOfChannel, Timeout

LIMIT = 30.0
SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")

pytestmark = pytest.mark.fd_check


@pytest.fixture
def fifo(runtime_dir: str) -> Iterator[tuple[str, buzon.Channel]]:
    path = os.path.join(runtime_dir, "t.fifo")
    with buzon.listen(f"fifo:{path}") as listener, listener.accept(LIMIT) as ch:
        yield path, ch


def _raw_write(path: str, data: bytes) -> None:
    """What a shell (or a writer of another protocol) does to the FIFO."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "bad",
    [
        b"\x01\x01\x00\x00\x05",  # 5 bytes of a frame header: a writer killed mid-frame
        os.urandom(3000),
        b"hello from a shell\n",
        b"\xf1\xf0\xb0\x7a" + b"\x01\x03\xa0\x0f" + bytes(16),  # looks like an envelope
    ],
    ids=["partial-frame", "random", "text", "false-envelope"],
)
def test_bad_bytes_do_not_poison_the_fifo(
    fifo: tuple[str, buzon.Channel], bad: bytes, fd_leak_check: None
) -> None:
    path, reader = fifo
    with buzon.connect(f"fifo:{path}", timeout=LIMIT) as writer:
        writer.send("before")
        _raw_write(path, bad)
        writer.send("after")
        writer.send_bytes(b"y" * 100)
        assert reader.recv(LIMIT) == "before"
        assert reader.recv(LIMIT) == "after"
        assert reader.recv_bytes(LIMIT) == b"y" * 100
        # and again: the channel stays usable after more garbage
        _raw_write(path, bad)
        writer.send({"n": 2})
        assert reader.recv(LIMIT) == {"n": 2}
    assert reader.statistics().rejected_frames >= 2
    assert reader.statistics().messages_received == 4


_WRITER = r"""
import hashlib, os, random, sys
import buzon
path, name = sys.argv[1], sys.argv[2]
count, seed, big = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
with buzon.connect(f"fifo:{path}", timeout=30) as ch:
    print("connected", flush=True)
    for i in range(count):
        body = rng.randbytes(rng.randrange(big))
        sha = hashlib.sha256(body).hexdigest()
        ch.send({"w": name, "i": i, "sha": sha, "body": body}, timeout=60)
    print("done", flush=True)
    if len(sys.argv) > 6:  # then one message too big to go through before we are killed
        ch.send_bytes(b"z" * int(sys.argv[6]), timeout=60)
"""


def _writer(
    path: str, name: str, count: int, seed: int, big: int, *extra: str
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, path, name, str(count), str(seed), str(big), *extra],
        env=env,
        stdout=subprocess.PIPE,
    )


def _check(got: list[dict[str, object]], writers: dict[str, int]) -> None:
    per: dict[str, list[int]] = {name: [] for name in writers}
    for msg in got:
        body = msg["body"]
        assert isinstance(body, bytes)
        assert hashlib.sha256(body).hexdigest() == msg["sha"], "a message arrived damaged"
        per[str(msg["w"])].append(int(msg["i"]))  # type: ignore[call-overload]
    for name, count in writers.items():
        assert per[name] == list(range(count)), f"writer {name}: {per[name]}"


def test_several_writers_large_messages_whole_and_in_order(
    fifo: tuple[str, buzon.Channel],
) -> None:
    """Four processes write messages of up to 150 KB (far over PIPE_BUF) at once."""
    path, reader = fifo
    writers = {"a": 25, "b": 25, "c": 25, "d": 25}
    procs = [_writer(path, w, n, seed, 150_000) for seed, (w, n) in enumerate(writers.items())]
    try:
        got = [reader.recv(LIMIT) for _ in range(sum(writers.values()))]
        for p in procs:
            assert p.wait(LIMIT) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=LIMIT)
    _check(got, writers)
    assert reader.statistics().rejected_frames == 0


def test_writer_killed_mid_message(fifo: tuple[str, buzon.Channel]) -> None:
    """A writer killed in the middle of a 3 MB message (the FIFO is full, it waits for
    room) leaves part of it in the FIFO; the other writers' messages still arrive
    whole and in order, and the dead writer's unfinished message is never delivered."""
    path, reader = fifo
    victim = _writer(path, "v", 3, 99, 5_000, "3000000")
    try:
        assert victim.stdout is not None
        assert victim.stdout.readline() == b"connected\n"
        assert victim.stdout.readline() == b"done\n"
        time.sleep(0.3)  # let it fill the FIFO with the start of its big message
        victim.send_signal(signal.SIGKILL)  # our own child, by pid
        victim.wait(LIMIT)
        others = {"a": 20, "b": 20}
        procs = [_writer(path, n, c, s, 20_000) for s, (n, c) in enumerate(others.items())]
        try:
            got = [reader.recv(LIMIT) for _ in range(3 + 40)]
            for p in procs:
                assert p.wait(LIMIT) == 0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.communicate(timeout=LIMIT)
        _check(got, {"v": 3, **others})
        with pytest.raises(Timeout):
            reader.recv(0.2)  # nothing else: the big message is not delivered
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.communicate(timeout=LIMIT)


def test_timed_out_send_delivers_nothing(fifo: tuple[str, buzon.Channel]) -> None:
    """A send that raised Timeout half-way through a large message delivered nothing:
    the next message arrives, the cut one never does."""
    path, reader = fifo
    with buzon.connect(f"fifo:{path}", timeout=LIMIT) as writer:
        with pytest.raises(Timeout):
            writer.send_bytes(b"x" * 4_000_000, timeout=0.2)  # nobody reads: the FIFO fills
        done = threading.Event()

        def late() -> None:
            writer.send_bytes(b"next", timeout=LIMIT)
            done.set()

        t = threading.Thread(target=late)
        t.start()
        try:
            assert reader.recv_bytes(LIMIT) == b"next"
        finally:
            t.join(LIMIT)
        assert done.is_set()
        # the same bytes, sent again, go through once
        t = threading.Thread(target=writer.send_bytes, args=(b"x" * 4_000_000, LIMIT))
        t.start()
        try:
            assert reader.recv_bytes(LIMIT) == b"x" * 4_000_000
        finally:
            t.join(LIMIT)
    assert reader.statistics().rejected_frames == 1  # the unfinished message, dropped


def test_unfinished_message_of_a_closed_writer_is_dropped(
    fifo: tuple[str, buzon.Channel],
) -> None:
    path, reader = fifo
    writer = buzon.connect(f"fifo:{path}", timeout=LIMIT)
    with pytest.raises(Timeout):
        writer.send_bytes(b"x" * 4_000_000, timeout=0.2)
    writer.close()  # tells the reader (an ABORT piece) when the FIFO has room
    with buzon.connect(f"fifo:{path}", timeout=LIMIT) as other:
        t = threading.Thread(target=other.send, args=("hello",), kwargs={"timeout": LIMIT})
        t.start()
        try:
            assert reader.recv(LIMIT) == "hello"
        finally:
            t.join(LIMIT)
    with pytest.raises(Timeout):
        reader.recv(0.1)


def test_raw_moves_bytes_as_they_are_and_ends_like_cat(runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "raw.fifo")
    with buzon.listen(f"fifo:{path}", raw=True) as listener, listener.accept(LIMIT) as reader:
        with pytest.raises(Timeout):
            reader.recv_bytes(0.05)  # no writer yet: not the end
        data = bytes(range(256)) * 20
        with buzon.connect(f"fifo:{path}", raw=True, timeout=LIMIT) as writer:
            writer.send_bytes(data)
        got = b""
        with pytest.raises(EndOfChannel):
            while True:
                got += reader.recv_bytes(LIMIT)
        assert got == data  # no envelope, nothing added


def test_framed_reader_outlives_its_writers(fifo: tuple[str, buzon.Channel]) -> None:
    """Framed, the FIFO is a place writers come and go: the last one leaving is not
    the end of the channel."""
    path, reader = fifo
    for i in range(3):
        with buzon.connect(f"fifo:{path}", timeout=LIMIT) as writer:
            writer.send(i)
        assert reader.recv(LIMIT) == i
    with pytest.raises(Timeout):
        reader.recv(0.05)


def test_messages_read_ahead_are_not_stranded(fifo: tuple[str, buzon.Channel]) -> None:
    """A large message completes while the channel's buffer is full of others: what the
    reader holds back must still wake a receive once the writer has gone quiet."""
    path, reader = fifo
    with buzon.connect(f"fifo:{path}", timeout=LIMIT) as writer:
        items = [b"s" * 100, b"b" * 400_000, b"t" * 50] + [b"u" * 10] * 200
        t = threading.Thread(target=lambda: [writer.send_bytes(i, LIMIT) for i in items])
        t.start()
        try:
            t.join(5.0)  # everything fits in the FIFO (1 MiB): then nobody writes any more
            got = [reader.recv_bytes(5.0) for _ in items]
        finally:
            t.join(LIMIT)
        assert got == items


def test_send_many_gathers_and_keeps_order(fifo: tuple[str, buzon.Channel]) -> None:
    """send_many gathers small messages into writes of up to PIPE_BUF bytes (each still
    atomic); mixed with large ones, everything arrives whole and in order."""
    path, reader = fifo
    items = [i.to_bytes(4, "big") * (1 + i % 7) for i in range(3000)]
    items[1500] = b"L" * 100_000
    with buzon.connect(f"fifo:{path}", timeout=LIMIT) as writer:
        t = threading.Thread(target=writer.send_bytes_many, args=(items, LIMIT))
        t.start()
        try:
            got = [reader.recv_bytes(LIMIT) for _ in items]
        finally:
            t.join(LIMIT)
    assert got == items
    assert reader.statistics().rejected_frames == 0


def test_close_writes_what_send_many_gathered(fifo: tuple[str, buzon.Channel]) -> None:
    """Messages send_many accepted are written by close even if the FIFO was full."""
    path, reader = fifo
    writer = buzon.connect(f"fifo:{path}", timeout=LIMIT)
    big = b"F" * 200_000
    sent = 0
    with pytest.raises(Timeout):
        while True:  # fill the FIFO
            writer.send_bytes(big, timeout=0.1)
            sent += 1
    small = [b"%d" % i for i in range(50)]
    done = threading.Event()

    def finish() -> None:
        writer.send_bytes_many(small, LIMIT)
        writer.close()
        done.set()

    t = threading.Thread(target=finish)
    t.start()
    try:
        got = [reader.recv_bytes(LIMIT) for _ in range(sent + len(small))]
    finally:
        t.join(LIMIT)
    assert done.is_set()
    assert got == [big] * sent + small


def test_writer_takes_a_batch_in_one_call(fifo: tuple[str, buzon.Channel]) -> None:
    """FifoWriter.send_messages (``sends_batches``): whole messages in order, as many
    as fit, in writes of up to PIPE_BUF bytes; it stops at a message of several pieces."""
    from buzon.transport.base import TransportOptions
    from buzon.transport.fifo import FifoConnector, FifoWriter

    path, reader = fifo
    connector = FifoConnector(buzon.parse_address(f"fifo:{path}"), TransportOptions())
    writer = connector.step()
    assert isinstance(writer, FifoWriter) and writer.sends_batches
    try:
        frames = [[_plain_frame(p)] for p in (b"a", b"bc")]
        assert writer.send_messages(frames * 100) == (200, 100 * 9 + 100 * 10)
        big = [[_plain_frame(b"B" * 5000)]]
        assert writer.send_messages(frames + big + frames, 1) == (2, 10)
        assert writer.send_messages(frames + big + frames, 2) == (2, 0)
        assert writer.held_bytes == 0
    finally:
        writer.close()
    assert [reader.recv_bytes(LIMIT) for _ in range(201)] == [b"a", b"bc"] * 100 + [b"bc"]


def _plain_frame(payload: bytes) -> bytes:
    return b"\x01\x01\x00\x00" + len(payload).to_bytes(4, "little") + payload


def test_send_many_hands_the_batch_to_the_transport(
    fifo: tuple[str, buzon.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """send_many passes the whole batch to a transport that takes batches (a declared
    capability): a few writes of up to PIPE_BUF bytes, not one call per message, and
    the statistics count every message and byte."""
    from buzon.transport.fifo import PIPE_BUF, FifoWriter

    calls: list[int] = []
    real = FifoWriter.send_messages

    def spy(self: FifoWriter, messages: Any, start: int = 0) -> tuple[int, int]:
        calls.append(start)
        return real(self, messages, start)

    monkeypatch.setattr(FifoWriter, "send_messages", spy)
    path, reader = fifo
    items = [b"%06d" % i for i in range(2000)]
    with buzon.connect(f"fifo:{path}", timeout=LIMIT) as writer:
        written: list[int] = []
        wfd = writer._core.transport.write_fileno()
        real_write = os.write

        def counting_write(fd: int, data: Any) -> int:
            if fd == wfd:
                written.append(len(data))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", counting_write)
        assert writer.send_bytes_many(items, LIMIT) == len(items)
        monkeypatch.setattr(os, "write", real_write)
        stats = writer.statistics()
    assert calls == [0]  # the FIFO had room for all of it: one call
    assert len(written) <= 2000 * (32 + 8 + 6) // PIPE_BUF + 1
    assert max(written) <= PIPE_BUF
    assert stats.messages_sent == 2000 and stats.bytes_sent == 2000 * (8 + 6)
    assert [reader.recv_bytes(LIMIT) for _ in items] == items
    assert reader.statistics().rejected_frames == 0


def test_send_many_from_several_writers_with_garbage(fifo: tuple[str, buzon.Channel]) -> None:
    """Three writers send batches of small and large messages at once while a fourth
    writes garbage: each writer's messages arrive whole and in its order."""
    path, reader = fifo
    names = ("a", "b", "c")

    def batch(name: str, k: int) -> list[bytes]:
        out = [f"{name}{k}:{i}".encode() * (1 + i % 5) for i in range(300)]
        out[100] = name.encode() * 70_000  # several pieces, between small ones
        return out

    def write(name: str) -> None:
        with buzon.connect(f"fifo:{path}", timeout=LIMIT) as ch:
            for k in range(4):
                ch.send_bytes_many(batch(name, k), LIMIT)

    def garbage() -> None:  # between the writers' pieces, whenever the FIFO has room
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            done = 0
            deadline = time.monotonic() + LIMIT
            while done < 5 and time.monotonic() < deadline:
                try:
                    os.write(fd, b"\xf1\xf0\xb0\x7a garbage " * 20)
                    done += 1
                except BlockingIOError:
                    time.sleep(0.001)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=write, args=(n,)) for n in names]
    threads.append(threading.Thread(target=garbage))
    for t in threads:
        t.start()
    try:
        got = [reader.recv_bytes(LIMIT) for _ in range(3 * 4 * 300)]
    finally:
        for t in threads:
            t.join(LIMIT)
    for name in names:
        mine = [g for g in got if g.startswith(name.encode())]
        assert mine == [m for k in range(4) for m in batch(name, k)]
    with pytest.raises(Timeout):  # and nothing else: the garbage is skipped
        reader.recv_bytes(0.05)
    # Garbage that a writer's large piece was cut around goes with that piece (counted
    # in cut_pieces; the piece is sent again whole), so whether the concurrent garbage
    # shows in rejected_frames depends on timing. Garbage between whole pieces always
    # does: once the next good envelope ends its run.
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"\xf1\xf0\xb0\x7a garbage " * 20)
    finally:
        os.close(fd)
    with buzon.connect(f"fifo:{path}", timeout=LIMIT) as ch:
        ch.send_bytes(b"after", LIMIT)
    assert reader.recv_bytes(LIMIT) == b"after"
    assert reader.statistics().rejected_frames >= 1


def test_aio_send_many_on_a_fifo(fifo: tuple[str, buzon.Channel]) -> None:
    """The asyncio driver hands batches over the same way."""
    import asyncio

    path, reader = fifo
    items = [b"%d" % i for i in range(3000)]
    items[1000] = b"L" * 300_000

    async def main() -> None:
        ch = await buzon.aio.connect(f"fifo:{path}", timeout=LIMIT)
        try:
            assert await ch.send_bytes_many(items, LIMIT) == len(items)
            assert ch.statistics().messages_sent == len(items)
        finally:
            await ch.aclose()

    t = threading.Thread(target=asyncio.run, args=(main(),))
    t.start()
    try:
        got = [reader.recv_bytes(LIMIT) for _ in items]
    finally:
        t.join(LIMIT)
    assert got == items


def test_reader_without_the_c_module(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C speedup the reader does everything in Python (the reference):
    same messages, same counts."""
    import buzon.protocol.fifo as envelope

    monkeypatch.setattr(envelope, "_c", None)
    path = os.path.join(runtime_dir, "py.fifo")
    items = [b"a" * n for n in (0, 5, 100, 5000, 300_000, 7)]
    with buzon.listen(f"fifo:{path}") as listener, listener.accept(LIMIT) as reader:
        assert reader._core.transport.reassembler.scan is None  # type: ignore[attr-defined]
        with buzon.connect(f"fifo:{path}", timeout=LIMIT) as writer:
            writer.send_bytes(items[0])
            _raw_write(path, b"garbage")
            t = threading.Thread(target=writer.send_bytes_many, args=(items[1:], LIMIT))
            t.start()
            try:
                got = [reader.recv_bytes(LIMIT) for _ in items]
            finally:
                t.join(LIMIT)
        assert got == items
        assert reader.statistics().rejected_frames == 1
