"""POSIX message queues: the ``buzon._posixmq`` extension and ``buzon.transport.mq``.

Every test uses queue names of its own (a uuid) and unlinks them; an autouse fixture
checks that no file descriptor outlives the test.
"""

from __future__ import annotations

import array
import errno
import fcntl
import itertools
import os
import select
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

from buzon import _posixmq
from buzon.address import Address, parse_address
from buzon.errors import (
    BuzonError,
    ChannelClosed,
    EndpointInUse,
    MessageTooLarge,
    NoSuchEndpoint,
    PermissionDenied,
    UnsafePath,
    UnsupportedOperation,
)
from buzon.transport import mq
from buzon.transport.base import TransportOptions

RW_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK
OPTS = TransportOptions()
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def _no_fd_leaks() -> Iterator[None]:
    before = _open_fds()
    yield
    leaked = _open_fds() - before
    assert not leaked, f"file descriptors left open: {sorted(leaked)}"


def _unlink_quietly(name: str) -> None:
    try:
        _posixmq.unlink(name)
    except FileNotFoundError:
        pass


@pytest.fixture
def qname() -> Iterator[str]:
    """An exact queue name nobody uses; unlinked after the test."""
    name = f"/buzon-test-{uuid.uuid4().hex[:16]}"
    yield name
    _unlink_quietly(name)


@pytest.fixture
def private() -> Iterator[Address]:
    """A private ``mq:NAME`` address nobody uses; its queue is unlinked after the test."""
    addr = parse_address(f"mq:test-{uuid.uuid4().hex[:16]}")
    yield addr
    _unlink_quietly(addr.mq_name())


@pytest.fixture
def exact(qname: str) -> Address:
    return parse_address(f"mq:{qname}")


class _Queue:
    """A raw read/write descriptor for extension tests, closed by the fixture."""

    def __init__(self, name: str, maxmsg: int, msgsize: int) -> None:
        self.name = name
        self.fd = _posixmq.open(name, RW_CREATE, 0o600, maxmsg, msgsize)

    def close(self) -> None:
        _posixmq.close(self.fd)


@pytest.fixture
def make_queue(qname: str) -> Iterator[Callable[..., _Queue]]:
    made: list[_Queue] = []

    def make(maxmsg: int = 8, msgsize: int = 64) -> _Queue:
        q = _Queue(qname, maxmsg, msgsize)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _writable(fd: int) -> bool:
    return bool(select.select([], [fd], [], 0)[1])


# ---- the extension --------------------------------------------------------------------


def test_prio_max_is_the_systems() -> None:
    assert os.sysconf("SC_MQ_PRIO_MAX") == _posixmq.PRIO_MAX
    assert mq.PRIO_MAX == _posixmq.PRIO_MAX


def test_higher_priority_first_and_fifo_within_a_priority(
    make_queue: Callable[..., _Queue],
) -> None:
    q = make_queue()
    for data, prio in [(b"low1", 0), (b"high", 7), (b"low2", 0), (b"mid", 3), (b"high2", 7)]:
        assert _posixmq.send(q.fd, data, prio) is True
    got = [_posixmq.receive(q.fd, 64) for _ in range(5)]
    assert got == [(b"high", 7), (b"high2", 7), (b"mid", 3), (b"low1", 0), (b"low2", 0)]
    assert _posixmq.receive(q.fd, 64) is None


def test_full_queue_returns_false(make_queue: Callable[..., _Queue]) -> None:
    q = make_queue(maxmsg=2)
    assert _posixmq.send(q.fd, b"a") is True
    assert _posixmq.sendv(q.fd, [b"b", b"c"]) is True
    assert _posixmq.send(q.fd, b"d") is False
    assert _posixmq.sendv(q.fd, [b"d", b"e"], 9) is False
    assert _posixmq.getattr(q.fd)[3] == 2
    assert _posixmq.receive(q.fd, 64) == (b"a", 0)


def test_oversized_message_is_emsgsize(make_queue: Callable[..., _Queue]) -> None:
    q = make_queue(msgsize=64)
    assert _posixmq.send(q.fd, b"x" * 64) is True
    with pytest.raises(OSError) as info:
        _posixmq.send(q.fd, b"x" * 65)
    assert info.value.errno == errno.EMSGSIZE
    with pytest.raises(OSError) as info:
        _posixmq.sendv(q.fd, [b"x" * 60, b"y" * 5])
    assert info.value.errno == errno.EMSGSIZE
    with pytest.raises(OSError) as info:  # the receive buffer must hold msgsize bytes
        _posixmq.receive(q.fd, 63)
    assert info.value.errno == errno.EMSGSIZE
    assert _posixmq.getattr(q.fd)[3] == 1


def test_getattr_reports_the_real_size(make_queue: Callable[..., _Queue]) -> None:
    q = make_queue(maxmsg=5, msgsize=100)
    flags, maxmsg, msgsize, curmsgs = _posixmq.getattr(q.fd)
    assert (maxmsg, msgsize, curmsgs) == (5, 100, 0)
    assert flags & os.O_NONBLOCK
    _posixmq.send(q.fd, b"one")
    assert _posixmq.getattr(q.fd)[3] == 1


def test_default_size_comes_from_the_system(qname: str) -> None:
    fd = _posixmq.open(qname, RW_CREATE)
    try:
        _, maxmsg, msgsize, _ = _posixmq.getattr(fd)
    finally:
        _posixmq.close(fd)
    with open("/proc/sys/fs/mqueue/msg_default") as f:
        assert maxmsg == int(f.read())
    with open("/proc/sys/fs/mqueue/msgsize_default") as f:
        assert msgsize == int(f.read())


@pytest.mark.parametrize("total", [0, 10, 4096, 4097, 8192])
def test_sendv_joins_parts_into_one_message(make_queue: Callable[..., _Queue], total: int) -> None:
    # 4096 is the C scratch buffer: below it the parts are joined on the stack, above
    # it on the heap; 20 parts are more views than the C code keeps on the stack.
    q = make_queue(msgsize=8192)
    payload = os.urandom(total)
    cut = [0, *sorted(int(total * k / 19) for k in range(1, 19)), total]
    kinds: list[Callable[[bytes], Any]] = [bytes, bytearray, memoryview]
    parts = [kinds[i % 3](payload[a:b]) for i, (a, b) in enumerate(itertools.pairwise(cut))]
    assert len(parts) == 19
    assert _posixmq.sendv(q.fd, parts, 4) is True
    assert _posixmq.sendv(q.fd, (memoryview(payload),), 2) is True
    assert _posixmq.receive(q.fd, 8192) == (payload, 4)
    assert _posixmq.receive(q.fd, 8192) == (payload, 2)


def test_sendv_takes_any_contiguous_buffer(make_queue: Callable[..., _Queue]) -> None:
    q = make_queue()
    ints = array.array("i", [1, 2, 3])
    assert _posixmq.sendv(q.fd, [b"<", ints, memoryview(b"abcdef")[2:4], b">"]) is True
    assert _posixmq.receive(q.fd, 64) == (b"<" + ints.tobytes() + b"cd>", 0)


def test_sendv_rejects_what_is_not_a_contiguous_buffer(
    make_queue: Callable[..., _Queue],
) -> None:
    q = make_queue()
    with pytest.raises(TypeError):
        _posixmq.sendv(q.fd, [b"ok", "text"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        _posixmq.sendv(q.fd, 42)  # type: ignore[arg-type]
    with pytest.raises(BufferError):
        _posixmq.sendv(q.fd, [b"ok", memoryview(b"abcdef")[::2]])
    assert _posixmq.getattr(q.fd)[3] == 0


def test_priority_must_be_in_range(make_queue: Callable[..., _Queue]) -> None:
    q = make_queue()
    for bad in (-1, _posixmq.PRIO_MAX):
        with pytest.raises(ValueError, match="priority"):
            _posixmq.send(q.fd, b"x", bad)
        with pytest.raises(ValueError, match="priority"):
            _posixmq.sendv(q.fd, [b"x"], bad)
    assert _posixmq.send(q.fd, b"top", _posixmq.PRIO_MAX - 1) is True
    assert _posixmq.receive(q.fd, 64) == (b"top", _posixmq.PRIO_MAX - 1)


def test_descriptor_is_close_on_exec_and_mode_0600(make_queue: Callable[..., _Queue]) -> None:
    q = make_queue()
    assert fcntl.fcntl(q.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    st = os.fstat(q.fd)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid == os.getuid()


def test_descriptor_readiness_works_with_select(make_queue: Callable[..., _Queue]) -> None:
    q = make_queue(maxmsg=1)
    assert not _readable(q.fd)
    assert _writable(q.fd)
    _posixmq.send(q.fd, b"x")
    assert _readable(q.fd)
    assert not _writable(q.fd)


def test_open_unlink_close_errors(qname: str, make_queue: Callable[..., _Queue]) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        _posixmq.open(qname, os.O_RDONLY)
    assert missing.value.filename == qname
    with pytest.raises(FileNotFoundError):
        _posixmq.unlink(qname)
    with pytest.raises(ValueError, match="both"):
        _posixmq.open(qname, RW_CREATE, 0o600, 4, 0)
    with pytest.raises(ValueError, match="negative"):
        _posixmq.open(qname, RW_CREATE, 0o600, -1, 10)
    make_queue()
    with pytest.raises(FileExistsError):
        _posixmq.open(qname, RW_CREATE)


def test_close_twice_is_ebadf(qname: str) -> None:
    fd = _posixmq.open(qname, RW_CREATE)
    _posixmq.close(fd)
    with pytest.raises(OSError) as info:
        _posixmq.close(fd)
    assert info.value.errno == errno.EBADF


def test_setblocking_toggles_o_nonblock(make_queue: Callable[..., _Queue]) -> None:
    q = make_queue()
    _posixmq.setblocking(q.fd, True)
    assert not _posixmq.getattr(q.fd)[0] & os.O_NONBLOCK
    _posixmq.setblocking(q.fd, False)
    assert _posixmq.getattr(q.fd)[0] & os.O_NONBLOCK


class _Alarm:
    """A real-time signal timer whose handler runs ``on_signal``; always cancelled."""

    def __init__(self, on_signal: Callable[[], None]) -> None:
        self.on_signal = on_signal
        self.fired = 0

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.fired += 1
        self.on_signal()

    def __enter__(self) -> _Alarm:
        self._old = signal.signal(signal.SIGALRM, self._handler)
        return self

    def start(self, seconds: float) -> None:
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)


def _give_up() -> None:
    raise TimeoutError("the blocking call did not return")


def test_blocking_receive_releases_the_gil(make_queue: Callable[..., _Queue]) -> None:
    q = make_queue()
    _posixmq.setblocking(q.fd, True)
    # The sender thread needs the GIL while the main thread waits in receive().
    sender = threading.Timer(0.05, _posixmq.send, (q.fd, b"late", 2))
    with _Alarm(_give_up) as alarm:
        alarm.start(5)
        sender.start()
        try:
            assert _posixmq.receive(q.fd, 64) == (b"late", 2)
        finally:
            sender.join()


def test_blocking_send_waits_for_room_and_retries_after_signals(
    make_queue: Callable[..., _Queue],
) -> None:
    q = make_queue(maxmsg=1)
    _posixmq.send(q.fd, b"first")
    _posixmq.setblocking(q.fd, True)
    reader = threading.Timer(0.3, _posixmq.receive, (q.fd, 64))
    with _Alarm(lambda: None) as alarm:  # interrupts the wait with EINTR, no exception
        alarm.start(0.05)
        reader.start()
        try:
            start = time.monotonic()
            assert _posixmq.send(q.fd, b"second") is True
            assert time.monotonic() - start >= 0.2
        finally:
            reader.join()
    assert alarm.fired == 1
    assert _posixmq.receive(q.fd, 64) == (b"second", 0)


def test_signal_handler_exception_interrupts_a_blocking_receive(
    make_queue: Callable[..., _Queue],
) -> None:
    q = make_queue()
    _posixmq.setblocking(q.fd, True)
    with _Alarm(_give_up) as alarm, pytest.raises(TimeoutError):
        alarm.start(0.05)
        _posixmq.receive(q.fd, 64)


# ---- the transport --------------------------------------------------------------------


def test_listen_accept_connect_send_recv(private: Address) -> None:
    lst = mq.listen(private, OPTS)
    try:
        assert lst.address == private
        assert _readable(lst.fileno())
        reader = lst.accept()
        assert isinstance(reader, mq.MQTransport)
        assert lst.accept() is None  # one queue, one channel
        assert not _readable(lst.fileno())
        conn = mq.connect(private, OPTS)
        assert conn.want == "retry"
        writer = conn.step()
        try:
            assert reader.read_fileno() >= 0 and reader.write_fileno() == -1
            assert writer.write_fileno() >= 0 and writer.read_fileno() == -1
            assert reader.can_recv and not reader.can_send
            assert writer.send_message([b"head|", memoryview(b"body"), bytearray(b"|oob")])
            assert _readable(reader.read_fileno())
            assert reader.recv_message() == b"head|body|oob"
            assert reader.recv_message() is None
        finally:
            writer.close()
            reader.close()
    finally:
        lst.close()


def test_properties_describe_a_simplex_message_queue(private: Address) -> None:
    lst = mq.listen(private, TransportOptions(mq_maxmsg=4, mq_msgsize=512))
    reader = lst.accept()
    assert isinstance(reader, mq.MQTransport)
    try:
        p = reader.properties
        assert (p.transport, p.direction, p.boundaries) == ("mq", "simplex", "message")
        assert (p.connection_oriented, p.reliable, p.ordered, p.local) == (
            False,
            True,
            True,
            True,
        )
        assert p.priorities and p.max_message == 512
        assert "within a priority" in p.notes
        assert reader.scheme == "mq" and reader.message_oriented
    finally:
        reader.close()
        lst.close()


def test_max_message_and_capacity_are_the_queues(private: Address) -> None:
    lst = mq.listen(private, TransportOptions(mq_maxmsg=3, mq_msgsize=128))
    reader = lst.accept()
    writer = mq.connect(private, OPTS).step()
    assert isinstance(reader, mq.MQTransport)
    try:
        for end in (reader, writer):
            assert (end.max_message, end.capacity) == (128, 3)
        assert all(writer.send_message([b"m"]) for _ in range(3))
        assert writer.send_message([b"m"]) is False  # full: would block
        assert reader.depth() == 3
    finally:
        writer.close()
        reader.close()
        lst.close()


def test_one_size_option_takes_the_default_for_the_other(private: Address) -> None:
    with open("/proc/sys/fs/mqueue/msgsize_default") as f:
        default_msgsize = int(f.read())
    lst = mq.listen(private, TransportOptions(mq_maxmsg=2))
    reader = lst.accept()
    assert isinstance(reader, mq.MQTransport)
    try:
        assert (reader.capacity, reader.max_message) == (2, default_msgsize)
    finally:
        reader.close()
        lst.close()


def test_too_large_is_rejected_before_the_kernel(
    private: Address, monkeypatch: pytest.MonkeyPatch
) -> None:
    lst = mq.listen(private, TransportOptions(mq_maxmsg=2, mq_msgsize=128))
    writer = mq.connect(private, OPTS).step()
    try:
        real_sendv = _posixmq.sendv
        calls: list[int] = []

        def spy(mqd: int, bufs: Any, priority: int = 0) -> bool:
            calls.append(len(bufs))
            return real_sendv(mqd, bufs, priority)

        monkeypatch.setattr(_posixmq, "sendv", spy)
        with pytest.raises(MessageTooLarge) as info:
            writer.send_message([b"h" * 100, memoryview(b"b" * 29)])
        assert "message of 129 bytes exceeds the queue's msgsize 128" in str(info.value)
        assert calls == []
        assert writer.send_message([b"h" * 100, memoryview(b"b" * 28)]) is True
        assert calls == [2]
    finally:
        writer.close()
        lst.close()


def test_priorities_reach_the_reader(private: Address) -> None:
    lst = mq.listen(private, OPTS)
    reader = lst.accept()
    writer = mq.connect(private, OPTS).step()
    assert isinstance(reader, mq.MQTransport)
    try:
        for body, prio in [(b"a", 1), (b"b", 9), (b"c", 5), (b"d", 9)]:
            assert writer.send_message([body], priority=prio)
        got = []
        while (msg := reader.recv_message()) is not None:
            got.append((msg, reader.last_priority))
        assert got == [(b"b", 9), (b"d", 9), (b"c", 5), (b"a", 1)]
        with pytest.raises(ValueError, match="priority"):
            writer.send_message([b"x"], priority=mq.PRIO_MAX)
    finally:
        writer.close()
        reader.close()
        lst.close()


def test_each_end_does_only_its_direction(private: Address) -> None:
    lst = mq.listen(private, OPTS)
    reader = lst.accept()
    writer = mq.connect(private, OPTS).step()
    assert isinstance(reader, mq.MQTransport)
    try:
        with pytest.raises(UnsupportedOperation):
            reader.send_message([b"x"])
        with pytest.raises(UnsupportedOperation):
            writer.recv_message()
    finally:
        writer.close()
        reader.close()
        lst.close()


def test_close_unlinks_the_queue_it_created(private: Address) -> None:
    lst = mq.listen(private, OPTS)
    reader = lst.accept()
    writer = mq.connect(private, OPTS).step()
    assert isinstance(reader, mq.MQTransport)
    try:
        writer.send_message([b"before close"])
        lst.close()
        lst.close()  # idempotent
        assert not mq.queue_exists(private)
        with pytest.raises(NoSuchEndpoint):
            mq.connect(private, OPTS).step()
        with pytest.raises(ChannelClosed):
            lst.accept()
        assert lst.fileno() == -1
        # Like an accepted socket, the reader outlives its listener.
        assert reader.recv_message() == b"before close"
    finally:
        writer.close()
        reader.close()
    reader.close()  # idempotent
    assert reader.closed and reader.read_fileno() == -1
    with pytest.raises(ChannelClosed):
        reader.recv_message()
    with pytest.raises(ChannelClosed):
        writer.send_message([b"x"])


def test_close_without_accept_releases_the_descriptor_and_queue(private: Address) -> None:
    # The autouse fixture checks the descriptor; here, the queue.
    lst = mq.listen(private, OPTS)
    assert mq.queue_exists(private)
    lst.close()
    assert not mq.queue_exists(private)


def test_close_leaves_a_queue_that_replaced_ours(private: Address) -> None:
    lst = mq.listen(private, OPTS)
    _posixmq.unlink(private.mq_name())  # removed behind its back, then made anew
    fd = _posixmq.open(private.mq_name(), RW_CREATE)
    try:
        lst.close()
        assert mq.queue_exists(private)  # not ours: left alone
    finally:
        _posixmq.close(fd)
        _posixmq.unlink(private.mq_name())


def test_private_queue_is_named_for_the_user_and_mode_0600(private: Address) -> None:
    lst = mq.listen(private, OPTS)
    reader = lst.accept()
    writer = mq.connect(private, OPTS).step()
    assert isinstance(reader, mq.MQTransport)
    try:
        assert reader.name == f"/buzon-{os.getuid()}-{private.name}"
        for fd in (reader.read_fileno(), writer.write_fileno()):
            st = os.fstat(fd)
            assert st.st_mode & 0o777 == 0o600
            assert st.st_uid == os.getuid()
    finally:
        writer.close()
        reader.close()
        lst.close()


def test_a_live_listener_owns_its_private_queue(private: Address) -> None:
    lst = mq.listen(private, OPTS)
    try:
        with pytest.raises(EndpointInUse, match="another process listens") as info:
            mq.listen(private, OPTS)
        assert info.value.errno == errno.EEXIST
        assert mq.queue_exists(private)  # not removed: it is in use
    finally:
        lst.close()
    assert not mq.queue_exists(private)


def test_a_dead_listeners_queue_is_reclaimed_with_its_messages(private: Address) -> None:
    """A crashed listener leaves its queue (and no live lock): the next listener takes it
    over, with whatever was sent meanwhile, and removes it when it closes."""
    fd = _posixmq.open(private.mq_name(), RW_CREATE)  # as a crashed owner would leave it
    try:
        _posixmq.send(fd, b"sent while nobody listened", 0)
    finally:
        _posixmq.close(fd)
    lst = mq.listen(private, OPTS)
    reader = lst.accept()
    assert isinstance(reader, mq.MQTransport)
    try:
        assert reader.recv_message() == b"sent while nobody listened"
    finally:
        reader.close()
        lst.close()
    assert not mq.queue_exists(private)


def test_a_leftover_queue_open_to_others_is_not_reclaimed(private: Address) -> None:
    fd = _posixmq.open(private.mq_name(), RW_CREATE, 0o622)
    try:
        os.fchmod(fd, 0o622)  # past the umask: writable by others, as an attacker would
        with pytest.raises(UnsafePath):
            mq.listen(private, OPTS)
    finally:
        _posixmq.close(fd)
        _posixmq.unlink(private.mq_name())


def test_exact_name_reads_a_queue_another_program_made(exact: Address) -> None:
    name = exact.mq_name()
    fd = _posixmq.open(name, RW_CREATE, 0o644, 4, 256)
    try:
        _posixmq.send(fd, b"from elsewhere", 3)
        lst = mq.listen(exact, TransportOptions(mq_maxmsg=2, mq_msgsize=64))
        reader = lst.accept()
        assert isinstance(reader, mq.MQTransport)
        try:
            assert not lst.created
            assert (reader.capacity, reader.max_message) == (4, 256)  # the real size
            assert reader.recv_message() == b"from elsewhere"
            assert reader.last_priority == 3
        finally:
            reader.close()
            lst.close()
        assert mq.queue_exists(exact)  # not ours to unlink
    finally:
        _posixmq.close(fd)


def test_exact_name_is_created_and_unlinked_when_absent(exact: Address) -> None:
    lst = mq.listen(exact, OPTS)
    assert lst.created and mq.queue_exists(exact)
    lst.close()
    assert not mq.queue_exists(exact)


@needs_root
def test_exact_name_of_another_user_is_refused(exact: Address) -> None:
    fd = _posixmq.open(exact.mq_name(), RW_CREATE, 0o666)
    try:
        os.fchown(fd, 65534, 65534)
        with pytest.raises(UnsafePath, match="uid 65534"):
            mq.listen(exact, OPTS)
    finally:
        _posixmq.close(fd)


def test_connect_refuses_a_private_queue_others_can_open(private: Address) -> None:
    fd = _posixmq.open(private.mq_name(), RW_CREATE)
    try:
        os.fchmod(fd, 0o622)
        with pytest.raises(UnsafePath, match="mode 622"):
            mq.connect(private, OPTS).step()
    finally:
        _posixmq.close(fd)


@needs_root
def test_connect_refuses_a_private_queue_of_another_user(private: Address) -> None:
    fd = _posixmq.open(private.mq_name(), RW_CREATE)
    try:
        os.fchown(fd, 65534, 65534)
        with pytest.raises(UnsafePath, match="uid 65534"):
            mq.connect(private, OPTS).step()
    finally:
        _posixmq.close(fd)


def test_connect_to_a_missing_queue(private: Address) -> None:
    conn = mq.connect(private, OPTS)
    with pytest.raises(NoSuchEndpoint, match=private.mq_name()) as info:
        conn.step()
    assert isinstance(info.value, FileNotFoundError)
    conn.close()


@needs_root
def test_connect_without_permission(exact: Address) -> None:
    lst = mq.listen(exact, OPTS)
    try:
        pid = os.fork()
        if pid == 0:  # the child: become nobody and try to open root's 0600 queue
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                mq.connect(exact, OPTS).step()
            except PermissionDenied:
                code = 0
            except BaseException:
                code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        lst.close()


def test_bad_sizes_are_refused_with_the_limits(private: Address) -> None:
    with pytest.raises(ValueError, match="capacity 0"):
        mq.listen(private, TransportOptions(mq_maxmsg=0, mq_msgsize=10))
    with pytest.raises(BuzonError, match="msgsize_max"):  # above even root's hard limit
        mq.listen(private, TransportOptions(mq_maxmsg=1, mq_msgsize=1 << 30))
    assert not mq.queue_exists(private)


def test_list_exists_and_remove(private: Address) -> None:
    lst = mq.listen(private, OPTS)
    try:
        assert private.mq_name() in mq.list_queues()
        assert mq.queue_exists(private) and mq.queue_exists(str(private))
    finally:
        lst.close()
    assert private.mq_name() not in mq.list_queues()
    fd = _posixmq.open(private.mq_name(), RW_CREATE)
    _posixmq.close(fd)
    assert mq.remove_queue(private) is True
    assert mq.remove_queue(private) is False
    assert not mq.queue_exists(private)
