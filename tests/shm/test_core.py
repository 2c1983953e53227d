"""The C core: buzon._core.Ring, in one process and across forked processes.

Cross-process tests use ``os.fork`` and ``os._exit`` (no interpreter teardown in the
children); every child is reaped by pid, and every failure bound is a timeout, never a
wall-clock assertion.
"""

from __future__ import annotations

import errno
import os
import pickle
import secrets
import signal
import struct
from collections.abc import Callable, Iterator

import pytest

from buzon import _core
from buzon.errors import (
    ChannelClosed,
    Empty,
    EndOfChannel,
    Full,
    MessageTooLarge,
    ProtocolError,
    Timeout,
)

T = 10.0  # failure bound for anything that should be quick


def seg_name() -> str:
    return f"/buzon-{os.getuid()}-t{secrets.token_hex(8)}"


@pytest.fixture
def name() -> Iterator[str]:
    n = seg_name()
    yield n
    try:
        _core.unlink(n)
    except FileNotFoundError:
        pass


@pytest.fixture
def ring(name: str) -> Iterator[_core.Ring]:
    r = _core.Ring.create(name, 1 << 16)
    yield r
    r.close()


def fork(fn: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return status


# ---- one process ---------------------------------------------------------------------


def test_create_is_private_and_exclusive(name: str, ring: _core.Ring) -> None:
    st = os.stat("/dev/shm" + name)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_size == _core.HEADER_SIZE + ring.capacity
    with pytest.raises(FileExistsError):
        _core.Ring.create(name, 1 << 16)


def test_round_trip_and_vectored(ring: _core.Ring) -> None:
    ring.send(b"hello")
    ring.send([b"a", bytearray(b"bc"), memoryview(b"def")])
    ring.send(b"")
    assert ring.recv() == b"hello"
    assert ring.recv_nowait() == b"abcdef"
    assert ring.try_recv() == b""
    assert ring.try_recv() is None


def test_empty_full_timeout_too_large(ring: _core.Ring) -> None:
    with pytest.raises(Empty):
        ring.recv_nowait()
    with pytest.raises(Timeout):
        ring.recv(timeout=0.01)
    n = 0
    while ring.try_send(b"x" * 1000):
        n += 1
    assert n == ring.capacity // 1016
    with pytest.raises(Full):
        ring.send_nowait(b"x" * 1000)
    with pytest.raises(Timeout):
        ring.send(b"x" * 1000, timeout=0.01)
    with pytest.raises(MessageTooLarge):
        ring.send(b"x" * (ring.max_message + 1))
    for _ in range(n):
        assert ring.recv_nowait() == b"x" * 1000
    ring.send(b"y" * ring.max_message)  # the whole ring, when it is empty
    assert ring.recv_nowait() == b"y" * ring.max_message


def test_wraps_around_with_every_size(ring: _core.Ring) -> None:
    sizes = [(i * 7919) % 5000 for i in range(2000)]
    pending: list[bytes] = []
    for i, size in enumerate(sizes):
        msg = struct.pack("<I", i) * (size // 4 + 1)
        while not ring.try_send(msg):
            assert ring.recv_nowait() == pending.pop(0)
        pending.append(msg)
    while pending:
        assert ring.recv_nowait() == pending.pop(0)
    assert ring.used == 0


def test_attach_sees_same_ring_and_close_errors(name: str, ring: _core.Ring) -> None:
    with _core.Ring.attach(name) as other:
        assert other.capacity == ring.capacity and other.slot != ring.slot
        other.send(b"ping")
        assert ring.recv() == b"ping"
        alive = {slot for slot, _pid, live in ring.info()["participants"] if live}
        assert alive == {ring.slot, other.slot}
    assert other.closed
    with pytest.raises(ChannelClosed):
        other.send(b"x")
    info = _core.inspect(name)
    assert [p for p in info["participants"] if p[2]] == [(ring.slot, os.getpid(), True)]


def test_shutdown_drains_then_end_of_channel(ring: _core.Ring) -> None:
    ring.send(b"last")
    ring.shutdown()
    with pytest.raises(EndOfChannel):
        ring.send(b"more")
    assert ring.recv() == b"last"
    with pytest.raises(EndOfChannel):
        ring.recv(timeout=T)


def test_arm_reports_readiness(ring: _core.Ring) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        ring.set_notify(efd, -1)
        assert ring.arm_data() is False
        ring.send(b"x")  # the commit sees the armed flag and writes the eventfd
        assert os.eventfd_read(efd) == 1
        assert ring.arm_data() is True
        assert ring.arm_space(10) is True
    finally:
        ring.set_notify(-1, -1)
        os.close(efd)


# ---- untrusted headers -----------------------------------------------------------------


def _poke(name: str, offset: int, data: bytes) -> None:
    fd = os.open("/dev/shm" + name, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("offset", "data", "why"),
    [
        (0, b"NOTARING", "magic"),
        (8, struct.pack("<I", 99), "version"),
        (12, struct.pack("<I", 123), "header size"),
        (16, struct.pack("<Q", 3 << 12), "capacity"),
        (16, struct.pack("<Q", 1 << 20), "size does not match"),
        (24, struct.pack("<I", 0), "slot count"),
        (24, struct.pack("<I", 100000), "slot count"),
        (64, struct.pack("<Q", 1 << 30), "cursors"),
        (128, struct.pack("<Q", 1 << 30), "cursors"),
    ],
)
def test_attach_validates_every_header_field(
    name: str, ring: _core.Ring, offset: int, data: bytes, why: str
) -> None:
    _poke(name, offset, data)
    with pytest.raises(ProtocolError, match=why):
        _core.Ring.attach(name)
    with pytest.raises(ProtocolError):
        _core.inspect(name)


def test_loose_mode_is_refused(name: str, ring: _core.Ring) -> None:
    os.chmod("/dev/shm" + name, 0o644)
    with pytest.raises(PermissionError, match="with mode 644;"):
        _core.Ring.attach(name)


def test_short_segment_is_refused(name: str) -> None:
    fd = os.open("/dev/shm" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    with pytest.raises(ProtocolError, match="too small"):
        _core.Ring.attach(name)


@pytest.mark.parametrize("kind", ["ring", "block"])
def test_attach_with_every_slot_taken_names_the_cause(name: str, kind: str) -> None:
    """Rings and blocks attach through one path: a full slot table is EUSERS, named."""
    if kind == "ring":
        owner: _core.Ring | _core.Block = _core.Ring.create(name, 1 << 14, slots=2)
        attach: Callable[[str], object] = _core.Ring.attach
    else:
        owner = _core.Block.create(name, 100, b"{}", slots=2)
        attach = _core.Block.attach
    second = attach(name)  # the creator holds slot 0, this one slot 1
    try:
        with pytest.raises(OSError, match="all 2 participant slots are in use") as info:
            attach(name)
        assert info.value.errno == errno.EUSERS
    finally:
        second.close()  # type: ignore[attr-defined]
        owner.close()


def test_block_attach_checks_like_a_ring(name: str) -> None:
    """A block is refused for a loose mode, a short file or a bad header, as a ring is."""
    block = _core.Block.create(name, 100, b"{}")
    try:
        os.chmod("/dev/shm" + name, 0o644)
        with pytest.raises(PermissionError, match="mode 644"):
            _core.Block.attach(name)
        os.chmod("/dev/shm" + name, 0o600)
        size = os.stat("/dev/shm" + name).st_size
        _poke(name, size - _core.HEADER_SIZE + 24, struct.pack("<I", 100000))
        with pytest.raises(ProtocolError, match="not a valid buzon block: bad slot count"):
            _core.Block.attach(name)
        with pytest.raises(ProtocolError):
            _core.inspect(name)
        with pytest.raises(ValueError):
            _core.Block.attach(f"/proc/{os.getpid()}/fd/0")
    finally:
        block.close()
    os.truncate("/dev/shm" + name, 4096)
    with pytest.raises(ProtocolError, match="too small to be a buzon block"):
        _core.Block.attach(name)


def test_blocking_receive_and_reserve_raise_by_the_one_map(ring: _core.Ring) -> None:
    """timeout=0 on a blocking call still reads as that call's failure (one rc map)."""
    with pytest.raises(Timeout, match=r"receiving from .* timed out"):
        ring.recv(timeout=0)
    with pytest.raises(Empty, match="is empty"):
        ring.recv_nowait()
    with pytest.raises(Empty, match="nothing to receive"):
        ring.recv_view(timeout=0)
    with pytest.raises(Timeout, match="nothing to receive"):
        ring.recv_view(timeout=0.01)
    while ring.try_send(b"x" * 1000):
        pass
    with pytest.raises(Full, match="is full"):
        ring.send(b"x" * 1000, timeout=0)
    with pytest.raises(Timeout, match="timed out \\(the ring is full\\)"):
        ring.send(b"x" * 1000, timeout=0.01)
    with pytest.raises(Full, match="no room"):
        ring.reserve(1000, timeout=0)
    with pytest.raises(Timeout, match="no room"):
        ring.reserve(1000, timeout=0.01)
    ring.shutdown()
    with pytest.raises(EndOfChannel, match="shut down"):
        ring.send(b"x", timeout=0)
    with pytest.raises(EndOfChannel, match="shut down"):
        ring.reserve(1, timeout=0)


@pytest.mark.parametrize(
    ("offset", "data"),
    [
        (8, struct.pack("<I", 0xFFFFFFF0)),  # record length past the published head
        (8, struct.pack("<I", 1 << 20)),
        (0, struct.pack("<Q", 77)),  # unknown record kind
        (0, struct.pack("<Q", 2 | 5 << 8)),  # COMMITTED, but for another lap
    ],
)
def test_corrupt_record_raises_instead_of_reading_out_of_bounds(
    name: str, ring: _core.Ring, offset: int, data: bytes
) -> None:
    ring.send(b"z" * 64)
    _poke(name, _core.HEADER_SIZE + offset, data)
    with pytest.raises(ProtocolError, match="corrupt"):
        ring.recv_nowait()


def test_corrupt_cursor_after_attach(name: str, ring: _core.Ring) -> None:
    ring.send(b"z")
    _poke(name, 64, struct.pack("<Q", 3))  # head unaligned and behind rd
    with pytest.raises(ProtocolError, match="corrupt"):
        ring.recv_nowait()
    with pytest.raises(ProtocolError, match="corrupt"):
        ring.send(b"x")


# ---- many processes ----------------------------------------------------------------------


def _consume(name: str, out_fd: int, stop_after: int) -> None:
    r = _core.Ring.attach(name)
    got: list[tuple[int, int, int]] = []
    while True:
        msg = r.recv(timeout=T)
        if msg == b"STOP":
            break
        prod, seq, n = struct.unpack_from("<III", msg)
        assert msg == struct.pack("<III", prod, seq, n) + bytes([seq & 0xFF]) * n, "torn"
        got.append((prod, seq, n))
    data = pickle.dumps(got)
    os.write(out_fd, struct.pack("<Q", len(data)) + data)
    r.close()
    del stop_after


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _produce(name: str, prod: int, count: int) -> None:
    r = _core.Ring.attach(name)
    for seq in range(count):
        n = (seq * 131 + prod * 17) % 700
        r.send(struct.pack("<III", prod, seq, n) + bytes([seq & 0xFF]) * n, timeout=T)
    r.close()


@pytest.mark.parametrize(("producers", "consumers"), [(1, 1), (3, 1), (1, 3), (4, 3)])
def test_mpmc_history_oracle(name: str, producers: int, consumers: int) -> None:
    """Nothing lost, nothing duplicated, nothing torn, FIFO per producer per consumer."""
    count = 3000
    ring = _core.Ring.create(name, 1 << 14)  # small: the ring fills and wraps often
    try:
        pipes = [os.pipe() for _ in range(consumers)]
        cpids = []
        for i, (_rfd, wfd) in enumerate(pipes):
            cpids.append(fork(lambda w=wfd, i=i: _consume(name, w, i)))
            os.close(wfd)
        ppids = [fork(lambda p=p: _produce(name, p, count)) for p in range(producers)]
        for pid in ppids:
            assert reap(pid) == 0
        for _ in range(consumers):
            ring.send(b"STOP", timeout=T)
        histories = []
        for (rfd, _), pid in zip(pipes, cpids, strict=True):
            data = _read_all(rfd)
            os.close(rfd)
            assert reap(pid) == 0
            (size,) = struct.unpack_from("<Q", data)
            histories.append(pickle.loads(data[8 : 8 + size]))
    finally:
        ring.close()
    seen: dict[tuple[int, int], int] = {}
    for hist in histories:
        last: dict[int, int] = {}
        for prod, seq, _n in hist:
            assert seq > last.get(prod, -1), "FIFO per producer violated"
            last[prod] = seq
            seen[(prod, seq)] = seen.get((prod, seq), 0) + 1
    assert all(v == 1 for v in seen.values()), "duplicated"
    assert len(seen) == producers * count, "lost"


# ---- kill at step k ---------------------------------------------------------------------

WRITER_FAULTS = [
    _core.F_LOCKED,
    _core.F_HEADER,
    _core.F_RESERVED,
    _core.F_UNLOCKED,
    _core.F_MID_PAYLOAD,
    _core.F_BEFORE_COMMIT,
    _core.F_COMMITTED,
]


def _writer_killed_at(name: str, k: int, size: int) -> None:
    r = _core.Ring.attach(name)
    for i in range(3):
        r.send(b"pre%d" % i + b"." * size)
    _core._set_fault(k)
    r.send(b"victim" + b"!" * size)
    raise AssertionError("the fault point did not fire")  # pragma: no cover


@pytest.mark.parametrize("size", [10, 100_000])
@pytest.mark.parametrize("k", WRITER_FAULTS)
def test_writer_killed_at_step_k(name: str, k: int, size: int) -> None:
    ring = _core.Ring.create(name, 1 << 20)
    try:
        status = reap(fork(lambda: _writer_killed_at(name, k, size)))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        # the ring is back in service: a new writer gets the lock and the space
        after = _core.Ring.attach(name)
        for i in range(3):
            after.send(b"post%d" % i, timeout=T)
        got = []
        while True:
            msg = ring.recv(timeout=T)
            got.append(msg)
            if msg == b"post2":
                break
        want = [b"pre%d" % i + b"." * size for i in range(3)]
        if k == _core.F_COMMITTED:  # committed before the kill: delivered, once
            want.append(b"victim" + b"!" * size)
        want += [b"post0", b"post1", b"post2"]
        assert got == want
        assert ring.try_recv() is None
        # the abandoned space is reclaimed: the whole ring can be filled again
        while after.try_send(b"f" * 1000):
            pass
        while ring.try_recv() is not None:
            pass
        assert ring.used == 0
        after.close()
    finally:
        ring.close()


def _reader_killed_at(name: str, k: int) -> None:
    r = _core.Ring.attach(name)
    _core._set_fault(k)
    r.recv(timeout=T)
    raise AssertionError("the fault point did not fire")  # pragma: no cover


@pytest.mark.parametrize("k", [_core.F_CLAIMED, _core.F_COPIED])
def test_reader_killed_at_step_k(name: str, k: int) -> None:
    ring = _core.Ring.create(name, 1 << 14)
    try:
        ring.send(b"lost")
        ring.send(b"kept")
        status = reap(fork(lambda: _reader_killed_at(name, k)))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert ring.recv(timeout=T) == b"kept"  # the claimed message is dropped
        n = 0
        while ring.try_send(b"f" * 1000):  # its space comes back
            n += 1
        assert n == ring.capacity // 1016
        assert ring.info()["abandoned"] == 1
    finally:
        ring.close()


def _blocked_then_killed(name: str) -> None:
    r = _core.Ring.attach(name)
    _core._set_fault(_core.F_MID_PAYLOAD)
    r.send(b"never" * 100)


def test_blocked_reader_skips_a_writer_that_dies(name: str) -> None:
    """A reader already waiting on a reservation notices the death without a wake-up."""
    ring = _core.Ring.create(name, 1 << 14)
    try:
        status = reap(fork(lambda: _blocked_then_killed(name)))
        assert os.WIFSIGNALED(status)
        with pytest.raises(Timeout):
            ring.recv(timeout=0.2)  # skipped the dead reservation, then nothing came
        assert ring.info()["abandoned"] == 1
    finally:
        ring.close()


def test_fork_child_gets_its_own_slot(name: str, ring: _core.Ring) -> None:
    r, w = os.pipe()

    def child() -> None:
        ring.send(b"from child")
        os.write(w, struct.pack("<i", ring.slot))

    pid = fork(child)
    os.close(w)
    child_slot = struct.unpack("<i", _read_all(r))[0]
    os.close(r)
    assert reap(pid) == 0
    assert child_slot != ring.slot
    assert ring.recv(timeout=T) == b"from child"
    ring.send(b"parent still works")
    assert ring.recv(timeout=T) == b"parent still works"


# ---- loans: zero copy -------------------------------------------------------------------


def test_loan_fill_as_numpy_then_commit(ring: _core.Ring) -> None:
    import numpy as np

    loan = ring.reserve(8 * 100)
    a = np.frombuffer(loan, dtype="f8")
    a[:] = np.arange(100)
    with pytest.raises(BufferError):
        loan.commit()  # a view is still out
    del a
    loan.commit()
    assert loan.done
    with pytest.raises(ValueError):
        memoryview(loan)
    view = ring.recv_view(timeout=T)
    got = np.frombuffer(view, dtype="f8")
    assert got.tolist() == list(range(100)) and not got.flags.writeable
    with pytest.raises(BufferError):
        view.release()
    with pytest.raises(BufferError):
        ring.close()  # loans pin the mapping
    del got
    view.release()
    assert ring.used == 0


def test_loan_context_managers_and_abort(ring: _core.Ring) -> None:
    with ring.reserve(3) as loan:
        memoryview(loan)[:] = b"abc"
    with pytest.raises(RuntimeError), ring.reserve(3) as loan2:
        memoryview(loan2)[:] = b"xyz"
        raise RuntimeError("changed my mind")  # aborted: never delivered
    dropped = ring.reserve(5)
    del dropped  # dropped unfinished: aborted too
    with ring.recv_view(timeout=T) as view:
        assert bytes(view) == b"abc" and len(view) == 3
    with pytest.raises(Empty):
        ring.recv_view(timeout=0)
    assert ring.info()["abandoned"] == 2 and ring.used == 0


def test_loan_too_large_and_full(ring: _core.Ring) -> None:
    with pytest.raises(MessageTooLarge):
        ring.reserve(ring.max_message + 1)
    big = ring.reserve(ring.max_message)
    with pytest.raises(Full):
        ring.reserve(1, timeout=0)
    big.abort()
    ring.reserve(1).commit()
    assert ring.recv() == b"\0"


# ---- closing while another thread waits ----------------------------------------------------


def test_close_while_another_thread_waits(ring: _core.Ring) -> None:
    """No unmapping under a waiter: it gets ChannelClosed, then the ring is unmapped."""
    import threading
    import time

    errors: list[BaseException] = []

    def wait() -> None:
        try:
            ring.recv(timeout=T)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.05)  # let it reach the futex (not a timing assertion: either way works)
    ring.close()
    t.join(T)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ChannelClosed)
    assert ring.closed
    with pytest.raises(ChannelClosed):
        ring.send(b"x")


def _produce_then_die(name: str, prod: int, count: int, k: int) -> None:
    r = _core.Ring.attach(name)
    for seq in range(count + 1):
        if seq == count:
            _core._set_fault(k)
        n = (seq * 131 + prod * 17) % 700
        r.send(struct.pack("<III", prod, seq, n) + bytes([seq & 0xFF]) * n, timeout=T)
    raise AssertionError("the fault point did not fire")  # pragma: no cover


@pytest.mark.parametrize("k", WRITER_FAULTS)
def test_mpmc_with_a_producer_killed_at_step_k(name: str, k: int) -> None:
    """Two producers, two consumers, and a third producer killed at step k mid-stream:
    everything committed arrives exactly once and whole, FIFO per producer, and the
    others never stall."""
    count, victim_count = 800, 300
    ring = _core.Ring.create(name, 1 << 14)
    try:
        pipes = [os.pipe() for _ in range(2)]
        cpids = []
        for i, (_rfd, wfd) in enumerate(pipes):
            cpids.append(fork(lambda w=wfd, i=i: _consume(name, w, i)))
            os.close(wfd)
        victim = fork(lambda: _produce_then_die(name, 2, victim_count, k))
        ppids = [fork(lambda p=p: _produce(name, p, count)) for p in range(2)]
        status = reap(victim)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        for pid in ppids:
            assert reap(pid) == 0
        for _ in pipes:
            ring.send(b"STOP", timeout=T)
        histories = []
        for (rfd, _), pid in zip(pipes, cpids, strict=True):
            data = _read_all(rfd)
            os.close(rfd)
            assert reap(pid) == 0
            (size,) = struct.unpack_from("<Q", data)
            histories.append(pickle.loads(data[8 : 8 + size]))
    finally:
        ring.close()
    seen: dict[tuple[int, int], int] = {}
    for hist in histories:
        last: dict[int, int] = {}
        for prod, seq, _n in hist:
            assert seq > last.get(prod, -1), "FIFO per producer violated"
            last[prod] = seq
            seen[(prod, seq)] = seen.get((prod, seq), 0) + 1
    assert all(v == 1 for v in seen.values()), "duplicated"
    victim_sent = victim_count + (1 if k == _core.F_COMMITTED else 0)
    want = {(p, s) for p in range(2) for s in range(count)}
    want |= {(2, s) for s in range(victim_sent)}
    assert set(seen) == want


# ---- fuzzing the untrusted memory -------------------------------------------------------


def _fuzz(name: str, seed: int, rounds: int) -> None:
    import random

    rng = random.Random(seed)
    with _core.Ring.attach(name) as r:
        fd = os.open("/dev/shm" + name, os.O_RDWR)
        try:
            for _ in range(rounds):
                for i in range(rng.randrange(1, 6)):
                    try:
                        r.try_send(bytes([i]) * rng.randrange(0, 3000))
                    except (ProtocolError, EndOfChannel):
                        pass
                # scribble on the header page or the records, like a hostile peer
                where = rng.choice(
                    [rng.randrange(0, 512), _core.HEADER_SIZE + rng.randrange(0, 8192)]
                )
                os.pwrite(fd, os.urandom(rng.choice([1, 4, 8, 16])), where)
                for op in (r.try_recv, r.try_recv, lambda: r.try_send(b"x" * 100), r.info):
                    try:
                        op()
                    except (ProtocolError, MessageTooLarge, EndOfChannel):
                        pass
                try:
                    _core.Ring.attach(name).close()
                except (ProtocolError, OSError):
                    pass
        finally:
            os.close(fd)


@pytest.mark.parametrize("seed", range(8))
def test_fuzzed_segment_never_crashes(name: str, seed: int) -> None:
    """Random bytes written over headers and records: errors, never a crash or a hang."""
    ring = _core.Ring.create(name, 1 << 14)
    try:
        status = reap(fork(lambda: _fuzz(name, seed, 300)))
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        ring.close()


# -- block views: lending a block's bytes, the lease word (shm: out-of-line messages) --


def test_block_view_lends_bytes_and_returns_the_lease(name: str) -> None:
    owner = _core.Block.create(name, 10000, b"{}")
    reader = _core.Block.attach(name)
    try:
        assert owner.lease == 0
        owner.lease = 1
        with owner.view(0, 100, readonly=False) as w:
            memoryview(w)[:5] = b"hello"
        assert reader.lease == 1  # a writable view leaves the lease alone
        v = reader.view(0, 5)
        reader.lease = 2
        assert owner.lease == 2 and len(v) == 5 and bytes(v) == b"hello"
        with pytest.raises(TypeError):
            memoryview(v)[0] = 1  # read-only
        arr = memoryview(v)
        with pytest.raises(BufferError):
            v.release()  # a view of it is alive
        with pytest.raises(BufferError):
            reader.close()  # a block view keeps the block mapped
        arr.release()
        v.release()
        assert owner.lease == 0  # the reader gave it back
        with pytest.raises(ValueError):
            memoryview(v)  # released: no buffer any more
        with pytest.raises(ValueError):
            v.release()
        reader.lease = 7
        v2 = reader.view(9990, 10)
        del v2  # collected unreleased: released, lease returned
        assert owner.lease == 0
        for offset, n in ((0, 10001), (10000, 1), (2**63, 2**63)):
            with pytest.raises(ValueError):
                reader.view(offset, n)
        assert reader.fileno() >= 0
        owner.write(9000, b"tail")  # small: under the GIL
        big = os.urandom(70000)
        with pytest.raises(ValueError):
            owner.write(0, big)  # past the end
        with pytest.raises(ValueError):
            owner.write(9997, b"tail")
        other = _core.Block.create(name + "b", 100000, b"{}")
        try:
            other.write(1000, big)  # big: the GIL released
            assert bytes(memoryview(other)[1000:71000]) == big
        finally:
            other.close()
            _core.unlink(name + "b")
        assert bytes(memoryview(reader)[9000:9004]) == b"tail"
    finally:
        reader.close()
        owner.close()
    with pytest.raises(ChannelClosed):
        owner.view(0, 1)
    with pytest.raises(ChannelClosed):
        owner.lease = 3
