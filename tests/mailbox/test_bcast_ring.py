"""The shared broadcast ring (``buzon._bcast``, src/buzon/_bcast.c) of broadcast
mailboxes: against a Python model of its rule (hypothesis), a sender killed while
writing (a dead lock holder, and a SIGKILL stress across processes), a scribbled
segment, and ``buzon ls`` counting dropped messages apart from taken ones."""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import buzon
from buzon._bcast import HEADER, Bcast
from buzon._mailbox import describe
from buzon.errors import Empty, EndOfChannel, ProtocolError

T = 10.0
_PAYLOAD = 64


@pytest.fixture
def ring_path() -> Iterator[str]:
    path = f"/dev/shm/buzon-test-bcast-{os.getpid()}-{time.monotonic_ns()}"
    yield path
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _make(path: str, limit: int, payload: int = _PAYLOAD) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        Bcast(fd, True, limit, payload, None, None, payload - 40, 0).close()
    finally:
        os.close(fd)


def _open(path: str) -> Bcast:
    fd = os.open(path, os.O_RDWR)
    try:
        return Bcast(fd, False, 0, 0, None, None, _PAYLOAD - 40, 0)
    finally:
        os.close(fd)


class Model:
    """The rule in a few lines: message n is the n-th put; a receiver attached at head h
    gets the messages from h on, except that one more than ``limit`` behind loses the
    oldest (counted as dropped)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.log: list[bytes] = []
        self.cursor: dict[int, int] = {}
        self.dropped: dict[int, int] = {}

    def put(self, data: bytes) -> None:
        self.log.append(data)

    def attach(self, r: int) -> None:
        self.cursor[r] = len(self.log)
        self.dropped[r] = 0

    def take(self, r: int) -> bytes | None:
        c, head = self.cursor[r], len(self.log)
        if c >= head:
            return None
        if head - c > self.limit:
            self.dropped[r] += head - self.limit - c
            c = head - self.limit
        self.cursor[r] = c + 1
        return self.log[c]


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.binary(min_size=0, max_size=_PAYLOAD)),
        st.tuples(st.just("take"), st.integers(0, 2)),
        st.tuples(st.just("attach"), st.integers(0, 2)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(limit=st.sampled_from([1, 2, 3, 4, 5, 8, 13]), ops=_ops)
def test_the_ring_keeps_the_models_rule(limit: int, ops: list[tuple[str, object]]) -> None:
    path = f"/dev/shm/buzon-test-bcast-h-{os.getpid()}"
    _make(path, limit)
    try:
        ring = _open(path)
        model = Model(limit)
        try:
            for op, arg in ops:
                if op == "put":
                    assert isinstance(arg, bytes)
                    model.put(arg)
                    assert ring.put(arg, False) is None
                elif op == "attach":
                    assert isinstance(arg, int)
                    model.attach(arg)
                    ring.attach(arg)
                else:
                    assert isinstance(arg, int)
                    if arg not in model.cursor:
                        continue
                    want = model.take(arg)
                    if want is None:
                        with pytest.raises(Empty):
                            ring.take(arg, 0)
                    else:
                        assert ring.take(arg, 0) == want
                    state, _pid, reached, taken, dropped, depth = ring.entry(arg)
                    assert ring.cursor(arg)[3] == model.cursor[arg]  # (taken at once)
                    assert (state, dropped) == (1, model.dropped[arg])
                    assert depth == min(limit, len(model.log) - model.cursor[arg])
                    assert reached - taken - dropped == len(model.log) - model.cursor[arg]
            assert ring.info()["head"] == len(model.log)
        finally:
            ring.close()
    finally:
        os.unlink(path)


def test_a_reused_out_of_line_slot_hands_its_record_back(ring_path: str) -> None:
    _make(ring_path, 2)  # two slots
    ring = _open(ring_path)
    try:
        assert ring.put(b"\x00OOLfirst", True) is None
        assert ring.put(b"plain", False) is None
        assert ring.put(b"third", False) == b"\x00OOLfirst"  # slot 0 again: hand it back
        assert ring.out_of_line() == []
        ring.put(b"\x00OOLlast", True)
        assert ring.out_of_line() == [b"\x00OOLlast"]
    finally:
        ring.close()


def _lock_word(path: str) -> tuple[int, mmap.mmap]:
    """The whole segment mapped, to scribble on it as another process could."""
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, os.fstat(fd).st_size)
    return fd, m


def test_a_sender_that_died_holding_the_lock_leaves_no_torn_message(ring_path: str) -> None:
    # a sender killed mid-send: the lock holds its (dead) pid and the slot it was
    # writing is half written with seq 0, head not moved. Receivers never see it; the
    # next sender takes the lock over and writes that slot again.
    _make(ring_path, 4)
    ring = _open(ring_path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that is dead now
    fd, m = _lock_word(ring_path)
    try:
        ring.attach(0)
        ring.put(b"before", False)
        struct.pack_into("<I", m, 128, pid)  # the lock, held by the dead sender
        slot = HEADER + 1 * ((16 + _PAYLOAD + 7) & ~7)  # message 1's slot, half written
        struct.pack_into("<QII", m, slot, 0, 10, 0)
        m[slot + 16 : slot + 26] = b"TORNTORNTO"
        assert ring.take(0, 0) == b"before"
        with pytest.raises(Empty):
            ring.take(0, 0)  # the half-written record is not there
        assert ring.put(b"after", False) is None  # takes the dead sender's lock over
        assert ring.take(0, 0) == b"after"
        assert struct.unpack_from("<I", m, 128)[0] == 0  # and let it go
    finally:
        m.close()
        os.close(fd)
        ring.close()


def test_a_scribbled_segment_is_a_protocol_error(ring_path: str) -> None:
    _make(ring_path, 4)
    ring = _open(ring_path)
    fd, m = _lock_word(ring_path)
    try:
        ring.attach(0)
        ring.put(b"fine", False)
        slot = HEADER
        struct.pack_into("<I", m, slot + 8, 1 << 30)  # a record longer than its slot
        with pytest.raises(ProtocolError):
            ring.take(0, 0)
        struct.pack_into("<Q", m, 0, 0)  # the magic
        with pytest.raises(ProtocolError):
            _open(ring_path)
        struct.pack_into("<Q", m, 1024, 1 << 40)  # entry 0's cursor past the head
        with pytest.raises(ProtocolError):
            ring.take(0, 0)
    finally:
        m.close()
        os.close(fd)
        ring.close()


def test_shutdown_ends_a_waiting_receiver(ring_path: str) -> None:
    _make(ring_path, 4)
    ring = _open(ring_path)
    try:
        ring.attach(0)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            time.sleep(0.2)
            _open(ring_path).shutdown()
            os._exit(0)
        with pytest.raises(EndOfChannel):
            ring.take(0, T)
        os.waitpid(pid, 0)
    finally:
        ring.close()


def _message(n: int) -> bytes:
    """A self-checking record: its number, then a digest of it."""
    head = struct.pack("<Q", n)
    return head + hashlib.blake2b(head, digest_size=32).digest()


def test_senders_killed_mid_send_never_leave_a_torn_message(ring_path: str) -> None:
    # three receivers read while senders are SIGKILLed at random points of their loop
    # (each new sender takes a dead one's lock over): every record a receiver gets is
    # whole, and each receiver's records come in the order they were written
    _make(ring_path, 16)
    r, w = os.pipe()
    readers = []
    for k in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                ring = _open(ring_path)
                ring.attach(k)
                os.write(w, b"r")
                got, last = 0, -1
                while True:
                    data = ring.take(k, T)
                    if data == b"end":
                        break
                    n = struct.unpack_from("<Q", data)[0]
                    if data != _message(n) or n <= last:
                        os.write(w, b"T")  # torn, or out of order
                        break
                    last, got = n, got + 1
                code = 0 if got > 0 else 3
            finally:
                os._exit(code)
        readers.append(pid)
    for _ in readers:
        assert os.read(r, 1) == b"r"
    counter = _open(ring_path)  # numbers the messages across senders: the head itself
    try:
        end = time.monotonic() + 1.5
        kills = 0
        # 1.5 s and at least 11 kills: under load (or ASan) a fork-and-kill round can
        # take 0.3 s, and 1.5 s alone once gave 5 kills
        while time.monotonic() < end or kills <= 10:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                ring = _open(ring_path)
                while True:
                    ring.put(_message(ring.info()["head"]), False)
            time.sleep(0.002 + (kills % 7) * 0.001)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            kills += 1
        counter.put(b"end", False)
        for _ in range(100):  # a lapped receiver may have lost one end mark
            time.sleep(0.01)
            counter.put(b"end", False)
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in readers]
    finally:
        counter.close()
    os.close(w)
    torn = os.read(r, 16)
    os.close(r)
    assert torn == b"" and codes == [0, 0, 0]


def test_ls_counts_dropped_messages_apart_from_taken_ones() -> None:
    # the overflow rule's drops are not takes (they showed as taken before the shared
    # ring: the sender took them out of a full backlog)
    box = buzon.mailbox("news", capacity=2, policy="broadcast")
    rx = buzon.mailbox("news")
    try:
        with pytest.raises(Empty):
            rx.recv_nowait()  # attached
        for i in range(5):
            box.send(i)
        assert [rx.recv(T), rx.recv(T)] == [3, 4]
        state = describe(box._ring.name, box.path)
        assert " 5 sent, 2 taken, 0 lost, 3 dropped" in state, state
        assert "depth=0," in state, state
        assert box.statistics()["dropped"] == 3
        box.send_async(b"general way")  # (a receipt record: counted once too)
        assert box.statistics()["sent"] == 6
    finally:
        rx.close()
        box.remove()


def test_a_closed_or_killed_receiver_holds_no_sender_back() -> None:
    box = buzon.mailbox("news", capacity=4, policy="broadcast")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        b = buzon.mailbox("news")
        try:
            b.recv_nowait()
        except Empty:
            pass
        os.write(w, b"r")
        time.sleep(60)
        os._exit(0)
    assert os.read(r, 1) == b"r"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    closed = buzon.mailbox("news")
    live = buzon.mailbox("news")
    try:
        for b in (closed, live):
            with pytest.raises(Empty):
                b.recv_nowait()
        closed.close()
        for i in range(100):  # never waits, whoever is behind
            box.send_nowait(i)
        assert [live.recv(T) for _ in range(4)] == [96, 97, 98, 99]
        state = describe(box._ring.name, box.path)
        assert f"pid {os.getpid()}," in state and str(pid) not in state, state
    finally:
        os.close(r)
        os.close(w)
        live.close()
        box.remove()


def test_an_attached_receivers_recv_is_one_call_that_hands_the_rest_on() -> None:
    # once attached, recv is Bcast.next (one C call); a timeout, a record the general
    # way decodes (out of line), a forked child and a closed mailbox go the Python way
    tx = buzon.mailbox("news", capacity=8, policy="broadcast", max_inline=128)
    rx = buzon.mailbox("news")
    try:
        with pytest.raises(Empty):
            rx.recv_nowait()  # attached
        assert rx.recv == rx._bc.ring.next  # type: ignore[union-attr]
        tx.send(b"small")
        tx.send(b"L" * 1000)  # out of line
        tx.send({"k": [1, 2]})
        assert rx.recv() == b"small"
        assert rx.recv(None) == b"L" * 1000
        assert rx.recv(timeout=T) == {"k": [1, 2]}
        with pytest.raises(buzon.Timeout):
            rx.recv(0.05)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                with pytest.raises(Empty):
                    rx.recv_nowait()  # the child attaches on its own
                os.write(w, b"r")
                code = 0 if rx.recv() == b"to both" else 2
            finally:
                os._exit(code)
        assert os.read(r, 1) == b"r"
        tx.send(b"to both")
        assert rx.recv() == b"to both"
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        os.close(r)
        os.close(w)
        recv = rx.recv
        rx.close()
        assert "recv" not in vars(rx)
        with pytest.raises(buzon.ChannelClosed):
            recv()
        with pytest.raises(buzon.ChannelClosed):
            rx.recv()
    finally:
        rx.close()
        tx.remove()


def test_close_from_another_thread_ends_a_waiting_receive() -> None:
    import threading

    tx = buzon.mailbox("news", capacity=8, policy="broadcast")
    rx = buzon.mailbox("news")
    got: list[BaseException] = []
    try:
        with pytest.raises(Empty):
            rx.recv_nowait()  # attached

        def waits() -> None:
            try:
                rx.recv()
            except BaseException as exc:  # what ended it is the answer
                got.append(exc)

        t = threading.Thread(target=waits)
        t.start()
        time.sleep(0.2)  # asleep in the ring (the GIL released)
        rx.close()
        t.join(T)
        assert not t.is_alive()
        assert len(got) == 1 and isinstance(got[0], buzon.ChannelClosed), got
        tx.send(b"after")  # the ring is fine for the others
    finally:
        rx.close()
        tx.remove()


def test_a_scribbled_senders_lock_is_taken_over_or_a_protocol_error(ring_path: str) -> None:
    _make(ring_path, 4)
    ring = _open(ring_path)
    fd, m = _lock_word(ring_path)
    try:
        ring.attach(0)
        struct.pack_into("<I", m, 128, 0xFFFFFFFF)  # no pid at all: taken over
        assert ring.put(b"one", False) is None
        struct.pack_into("<I", m, 128, os.getppid())  # a live process that never lets go
        with pytest.raises(ProtocolError, match="held the senders' lock"):
            ring.put(b"two", False)  # (after 2 s: never a hang)
        struct.pack_into("<I", m, 128, 0)
        assert ring.put(b"three", False) is None
        assert [ring.take(0, 0), ring.take(0, 0)] == [b"one", b"three"]
    finally:
        m.close()
        os.close(fd)
        ring.close()


def test_clean_keeps_a_broadcast_mailbox_in_use_and_removes_a_forsaken_one() -> None:
    from buzon._mailbox import keeps
    from buzon.shm import clean_segments

    def ours() -> set[str]:
        return {n for n in os.listdir("/dev/shm") if n.startswith(f"buzon-{os.getuid()}-")}

    before = ours()
    tx = buzon.mailbox("cl", capacity=8, policy="broadcast")
    rx = buzon.mailbox("cl")
    with pytest.raises(Empty):
        rx.recv_nowait()  # attached
    tx.send(b"x" * 2000)  # out of line: a block of its own
    made = ours() - before
    assert len(made) == 3  # the mailbox's ring, its broadcast ring, the block
    rx.close()  # only a sender left: its broadcast ring is in use all the same
    assert not clean_segments(grace=0.0, keep=keeps)
    assert ours() - before == made
    tx.close()  # nobody: everything goes (the block once its mailbox is gone)
    clean_segments(grace=0.0, keep=keeps)
    clean_segments(grace=0.0, keep=keeps)
    assert ours() - before == set()
    buzon.mailbox("cl").remove()  # (its name and FIFOs: a new one made and removed)


def test_ls_names_the_broadcast_ring(capsys: pytest.CaptureFixture[str]) -> None:
    # the broadcast ring has no ring header of its own: ls says whose it is
    from buzon import cli

    tx = buzon.mailbox("lsb", capacity=8, policy="broadcast")
    try:
        assert cli.main(["ls"]) == 0
        out = capsys.readouterr().out
        assert "shm-bcast" in out and "broadcast ring of" in out
        assert "shm-unknown" not in out
    finally:
        tx.remove()


@settings(max_examples=100, deadline=None)
@given(limit=st.sampled_from([1, 2, 3, 5, 8]), ops=_ops)
def test_a_deferred_take_moves_the_cursor_only_on_commit(
    limit: int, ops: list[tuple[str, object]]
) -> None:
    """take(entry, t, True) leaves the cursor on the record until commit() (or the
    next take), so a receipt's acknowledgement is written before its receiver's
    cursor says the message was read; put(..., True) numbers each message."""
    path = f"/dev/shm/buzon-test-bcast-d-{os.getpid()}"
    _make(path, limit)
    try:
        ring = _open(path)
        model = Model(limit)
        try:
            for op, arg in ops:
                if op == "put":
                    assert isinstance(arg, bytes)
                    model.put(arg)
                    assert ring.put(arg, False, True) == (len(model.log) - 1, None)
                elif op == "attach":
                    assert isinstance(arg, int)
                    ring.commit()
                    model.attach(arg)
                    ring.attach(arg)
                else:
                    assert isinstance(arg, int)
                    if arg not in model.cursor:
                        continue
                    before = model.cursor[arg]
                    want = model.take(arg)
                    if want is None:
                        with pytest.raises(Empty):
                            ring.take(arg, 0, True)
                        continue
                    assert ring.take(arg, 0, True) == want
                    state, pid, start, cursor = ring.cursor(arg)
                    # the record's own position (a lap moved the cursor up to it)
                    assert (state, pid) == (1, os.getpid())
                    assert max(before, len(model.log) - limit) == cursor == model.cursor[arg] - 1
                    ring.commit()
                    assert ring.cursor(arg)[3] == model.cursor[arg]
                    assert start <= cursor
        finally:
            ring.close()
    finally:
        os.unlink(path)
