"""``protocol._dgram``: the receive (and a plain receive's wait) of datagram sockets
and POSIX queues, the small-send hot path of message transports, and the ``fifo:``
reader's wait in C. What the C hands back must be what the Python reference makes of
the same message (``parse_frame`` for a datagram or queue message; the pure-Python
fifo reassembler and frame decoder for a fifo read): a lone plain DATA frame as
``(flags, body)``, anything else untouched for the Python path; None only when the
deadline passed or the wake fd became readable; errors and signals as a Python call
would raise them."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from buzon import _posixmq
from buzon.errors import FrameError
from buzon.protocol import _dgram
from buzon.protocol.fifo import CODEC_BITS, FIRST, LAST, Encoder, Reassembler, wrap
from buzon.protocol.frames import HEADER, FrameDecoder, Kind, encode_frame, parse_frame

pytestmark = pytest.mark.fd_check

LIMIT = 4096
SIZE = 8192


def _plain(flags: int, body: bytes) -> bytes:
    return HEADER.pack(1, 1, flags, 0, len(body)) + body


_message = st.one_of(
    st.builds(_plain, st.sampled_from([0, 1, 2, 3, 4, 7, 8, 9]), st.binary(max_size=300)),
    st.just(b"".join(bytes(b) for b in encode_frame(Kind.CREDIT, 0, b"\0" * 16))),
    st.builds(_plain, st.sampled_from([0x10, 0x20, 0x40, 0x80]), st.binary(max_size=20)),
    st.builds(lambda b: HEADER.pack(2, 1, 0, 0, len(b)) + b, st.binary(max_size=20)),
    st.builds(lambda b: HEADER.pack(1, 1, 0, 0, len(b) + 1) + b, st.binary(max_size=20)),
    st.builds(
        lambda b: HEADER.pack(1, 1, 0, 0, len(b)) + b, st.binary(min_size=4090, max_size=4100)
    ),
    st.binary(max_size=12),  # a cut frame, or garbage (empty too: a datagram may be)
)


def _reference_plain(msg: bytes) -> tuple[int, bytes] | None:
    """What the Python decoder makes of ``msg``: ``(codec, body)`` when it is a plain
    DATA frame the C may take whole (codec 0-3 alone in the flags byte, no receipt,
    no buffers, no fields), else None."""
    try:
        frame = parse_frame(msg, LIMIT)
    except FrameError:
        return None
    if (
        frame.kind != Kind.DATA
        or frame.receipt
        or frame.buffers
        or frame.fields is not None
        or frame.codec > 3
        or msg[2] != frame.codec
    ):
        return None
    return frame.codec, bytes(frame.body)


@pytest.fixture
def dgram_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    with a, b:
        yield a, b


@pytest.fixture
def queue() -> Iterator[int]:
    name = f"/dgtest-{uuid.uuid4().hex[:10]}"
    mqd = _posixmq.open(name, os.O_CREAT | os.O_RDWR | os.O_NONBLOCK, 0o600, 10, SIZE)
    _posixmq.unlink(name)
    try:
        yield mqd
    finally:
        _posixmq.close(mqd)


@settings(max_examples=200, deadline=None)
@given(st.lists(_message, min_size=1, max_size=5), st.booleans())
def test_each_message_is_what_the_python_decoder_makes_of_it(
    messages: list[bytes], spin: bool
) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        receiver = _dgram.Receiver(b.fileno(), _dgram.SOCKET, SIZE)
        for msg in messages:
            a.send(msg)
            got = receiver.wait(time.monotonic() + 10, 0.01 if spin else 0.0, LIMIT)
            ref = _reference_plain(msg)
            if isinstance(got, tuple):
                assert ref == got
            else:
                assert got == msg
                assert ref is None
        assert receiver.recv() is None
        assert receiver.truncated == 0


_CREDIT = b"".join(bytes(b) for b in encode_frame(Kind.CREDIT, 0, b"\0" * 16))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_message, st.sampled_from([0, 0, 1, 5])), min_size=1, max_size=6))
@example([(_CREDIT, 1), (_plain(0, b""), 1)])  # a CREDIT is no sign the news was seen
def test_a_queue_message_is_taken_whole_only_when_its_priority_did_not_change(
    messages: list[tuple[bytes, int]],
) -> None:
    name = f"/dgtest-{uuid.uuid4().hex[:10]}"
    mqd = _posixmq.open(name, os.O_CREAT | os.O_RDWR | os.O_NONBLOCK, 0o600, 10, SIZE)
    _posixmq.unlink(name)
    try:
        receiver = _dgram.Receiver(mqd, _dgram.MQ, SIZE)
        news, last = False, 0  # a change the Python path has not seen yet
        for msg, prio in messages:
            _posixmq.send(mqd, msg, prio)
            got = receiver.wait(None, 0.0, LIMIT)
            assert receiver.priority == prio
            if prio != last:
                news, last = True, prio
            ref = _reference_plain(msg)
            if ref is not None and not news:
                assert got == ref
            else:
                assert got == msg
                if not (len(msg) >= 2 and msg[1] == Kind.CREDIT):
                    news = False  # seen by the Python path (a CREDIT is applied blind)
    finally:
        _posixmq.close(mqd)


def test_a_bound_socket_names_each_new_sender_once(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bound")
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    one = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    two = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with bound, one, two:
        bound.bind(path)
        bound.setblocking(False)
        one.bind(os.path.join(tmp_path, "one"))
        two.bind(os.path.join(tmp_path, "two"))
        receiver = _dgram.Receiver(bound.fileno(), _dgram.SOCKET, SIZE, False)
        assert receiver.sender is None
        frame = _plain(0, b"x")
        got = []
        for sock in (one, one, two, two, one):
            sock.sendto(frame, path)
            got.append(receiver.wait(None, 0.0, LIMIT))
        # a new sender's message goes the Python way (it names the peer), the next not
        assert got == [frame, (0, b"x"), frame, (0, b"x"), frame]
        assert receiver.sender is not None and b"one" in receiver.sender


def test_an_oversized_datagram_is_dropped_and_counted() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        receiver = _dgram.Receiver(b.fileno(), _dgram.SOCKET, 64)
        a.send(b"x" * 65)
        a.send(_plain(0, b"ok"))
        # the drop is news: the next message goes the Python way once
        assert receiver.wait(None, 0.0, LIMIT) == _plain(0, b"ok")
        assert receiver.truncated == 1
        a.send(b"y" * 100)
        assert receiver.recv() is None  # dropped, nothing else there
        assert receiver.truncated == 2


def test_deadline_wake_and_errors(dgram_pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = dgram_pair
    receiver = _dgram.Receiver(b.fileno(), _dgram.SOCKET, SIZE)
    assert receiver.wait(time.monotonic() + 0.02, 0.0, LIMIT) is None
    assert receiver.wait(time.monotonic() - 1.0, 0.0, LIMIT) is None
    assert receiver.wait(time.monotonic() + 0.01, 0.005, LIMIT) is None
    wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        os.eventfd_write(wake, 1)
        assert receiver.wait(None, 0.0, LIMIT, wake) is None  # ends at once, never read
        assert os.eventfd_read(wake) == 1
    finally:
        os.close(wake)
    with pytest.raises(ValueError):
        receiver.wait(None, 0.0, LIMIT, -5)
    with pytest.raises(TypeError):
        receiver.wait(None)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        _dgram.Receiver(-1, _dgram.SOCKET, SIZE)
    receiver.close()
    with pytest.raises(OSError):
        receiver.recv()
    with pytest.raises(OSError):
        receiver.wait(None, 0.0, LIMIT)


def test_waits_without_the_gil_and_wakes_on_data(
    dgram_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = dgram_pair
    receiver = _dgram.Receiver(b.fileno(), _dgram.SOCKET, SIZE)
    ticks = 0
    stop = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    threading.Timer(0.1, a.send, (_plain(1, b"late"),)).start()
    got = receiver.wait(time.monotonic() + 30, 0.0, LIMIT)
    stop.set()
    t.join()
    assert got == (1, b"late")
    assert ticks > 5


def test_a_signal_handler_that_raises_ends_the_wait_and_one_that_returns_does_not(
    dgram_pair: tuple[socket.socket, socket.socket],
) -> None:
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals go to the main thread")
    a, b = dgram_pair
    receiver = _dgram.Receiver(b.fileno(), _dgram.SOCKET, SIZE)
    calls = 0

    def raising(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def quiet(signum: int, frame: object) -> None:
        nonlocal calls
        calls += 1

    old = signal.signal(signal.SIGALRM, raising)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            receiver.wait(time.monotonic() + 30, 0.0, LIMIT)
        signal.signal(signal.SIGALRM, quiet)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        threading.Timer(0.3, a.send, (_plain(0, b"after"),)).start()
        assert receiver.wait(time.monotonic() + 30, 0.0, LIMIT) == (0, b"after")
        assert calls == 1
        # a signal during the spin: handled when the spin ends, before the sleep
        signal.signal(signal.SIGALRM, raising)
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        with pytest.raises(KeyboardInterrupt):
            receiver.wait(time.monotonic() + 30, 0.2, LIMIT)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- the send hot path -------------------------------------------------------------


class _Core:
    """The fields a MessageSender reads of a channel core."""

    def __init__(self) -> None:
        from collections import deque

        self.backlog: deque[object] = deque()
        self.credit_out: bytes | None = None
        self.closed = False
        self.sflow: object | None = None


def test_message_sender_sends_one_plain_frame_and_steps_aside_when_not_quiet(
    dgram_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = dgram_pair
    core, lock = _Core(), threading.Lock()
    send = _dgram.MessageSender(a.fileno(), _dgram.SOCKET, core, lock, 100)
    assert send(b"abc") is True
    assert b.recv(100) == _plain(0, b"abc")
    assert send(b"x" * 101) is False  # over the limit
    assert send(bytearray(b"x")) is False  # not bytes
    core.backlog.append(1)
    assert send(b"x") is False
    core.backlog.clear()
    for field, value in (("credit_out", b"c"), ("closed", True), ("sflow", object())):
        setattr(core, field, value)
        assert send(b"x") is False
        setattr(core, field, _Core().__dict__[field])
    with lock:
        assert send(b"x") is False
    assert send(b"") is True
    assert b.recv(100) == _plain(0, b"")
    assert send.counts() == (2, 8 + 3 + 8, 0)
    with pytest.raises(socket.error):
        b.recv(100)  # nothing else was sent


def test_message_sender_of_a_bound_end_replies_to_the_last_sender(
    tmp_path: os.PathLike[str],
) -> None:
    path = os.path.join(tmp_path, "bound")
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with bound, peer:
        bound.bind(path)
        bound.setblocking(False)
        peer.bind(os.path.join(tmp_path, "peer"))
        receiver = _dgram.Receiver(bound.fileno(), _dgram.SOCKET, SIZE, False)
        core = _Core()  # kept: the writer holds its core weakly
        send = _dgram.MessageSender(
            bound.fileno(), _dgram.SOCKET, core, threading.Lock(), 100, receiver
        )
        assert send(b"early") is False  # nobody to answer yet
        peer.sendto(b"hi", path)
        assert receiver.recv() == b"hi"
        assert send(b"reply") is True
        assert peer.recv(100) == _plain(0, b"reply")


def test_message_sender_of_a_queue(queue: int) -> None:
    core = _Core()  # kept: the writer holds its core weakly
    send = _dgram.MessageSender(queue, _dgram.MQ, core, threading.Lock(), 100)
    assert send(b"q") is True
    assert _posixmq.receive(queue, SIZE) == (_plain(0, b"q"), 0)
    for _ in range(10):
        assert send(b"fill") is True
    assert send(b"full") is False  # would block: the general way waits
    assert send.counts() == (11, 11 * 8 + 1 + 40, 1)


def test_message_sender_of_a_fifo_numbers_its_pieces_like_the_encoder() -> None:
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        os.set_blocking(w, False)

        class Writer:  # the FifoWriter fields the C checks
            def __init__(self) -> None:
                self.encoder = Encoder(1234, 99)
                self._job = None
                self._batch: list[bytes] = []
                self._corked = False
                self.framed = True

        writer = Writer()
        core = _Core()  # kept: the writer holds its core weakly
        send = _dgram.MessageSender(w, _dgram.FIFO, core, threading.Lock(), 100, None, writer, wrap)
        assert send(b"one") is True and send(b"two") is True
        assert writer.encoder.seq == 2
        expect = Encoder(1234, 99)
        want = b"".join(expect.encode([_plain(0, b"one")]) + expect.encode([_plain(0, b"two")]))
        assert os.read(r, 4096) == want
        writer._corked = True
        assert send(b"x") is False
        writer._corked = False
        writer._batch.append(b"held")
        assert send(b"x") is False
        writer._batch.clear()
        writer.framed = False
        assert send(b"x") is False
        assert writer.encoder.seq == 2
    finally:
        os.close(r)
        os.close(w)


def test_message_sender_holds_the_write_lock_while_it_numbers_a_fifo_piece() -> None:
    """The fifo's numbering reads and sets the encoder's seq: no other thread may send
    between, so the sender holds the write lock (acquire(False)) from its checks to the
    count, and gives it back; a lock held elsewhere sends it the general way."""
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)

        class Writer:
            def __init__(self) -> None:
                self.encoder = Encoder(1234, 99)
                self._job = None
                self._batch: list[bytes] = []
                self._corked = False
                self.framed = True

        lock = threading.Lock()
        held: list[bool] = []

        def piece(*args: object) -> bytes:
            held.append(lock.locked())
            return wrap(*args)  # type: ignore[arg-type]

        core = _Core()  # kept: the writer holds its core weakly
        send = _dgram.MessageSender(w, _dgram.FIFO, core, lock, 100, None, Writer(), piece)
        assert send(b"one") is True
        assert held == [True]  # numbered under the lock
        assert lock.acquire(False)  # and given back
        assert send(b"two") is False  # held elsewhere: the general way
        lock.release()
        assert held == [True]
    finally:
        os.close(r)
        os.close(w)


# -- the fifo: reader's wait -----------------------------------------------------------

_fifo_piece = st.one_of(
    st.builds(lambda b: ("frame", _plain(0, b)), st.binary(max_size=200)),
    st.builds(lambda b: ("frame", _plain(2, b)), st.binary(max_size=50)),
    st.builds(lambda b: ("frame", _plain(8, b)), st.binary(max_size=50)),  # receipt asked
    st.builds(lambda b: ("junk", b), st.binary(min_size=1, max_size=40)),
)


def _frames_of(data: bytes) -> list[object]:
    ref = FrameDecoder(max_frame=LIMIT, read_size=2 * LIMIT)
    ref.feed(data)
    return list(ref.frames)


@settings(max_examples=150, deadline=None)
@given(st.lists(_fifo_piece, min_size=1, max_size=4))
def test_a_fifo_read_gives_what_the_python_reassembler_gives(
    pieces: list[tuple[str, bytes]],
) -> None:
    enc = Encoder(7, 8, accelerated=False)
    data = b"".join(
        wrap(FIRST | LAST, [body], enc.pid, enc.nonce, i) if kind == "frame" else body
        for i, (kind, body) in enumerate(pieces)
    )
    # the reference: the pure-Python reassembler, then the frame decoder
    ref = Reassembler(LIMIT, join=False, frames=True, accelerated=False)
    out = memoryview(bytearray(64 * 1024))
    view = ref.get_buffer(len(data))
    view[: len(data)] = data
    view.release()
    filled = ref.received(len(data), out, 0, 0.0, True)
    want = _frames_of(bytes(out[:filled]))
    # the C wait, then what FifoWaiter does with an untaken read
    fast = Reassembler(LIMIT, join=False, frames=True)
    assert fast.scan is not None
    r, w = os.pipe()
    try:
        os.write(w, data)
        buf = bytearray(64 * 1024)
        got = _dgram.wait_fifo(r, buf, None, 0.0, LIMIT, -1, fast.scan, LIMIT, CODEC_BITS)
    finally:
        os.close(r)
        os.close(w)
    assert got is not None
    if len(got) == 2:
        assert want == [got]
        return
    n, pos, done = got  # type: ignore[misc]
    assert n == len(data)
    if pos != n:
        done = fast.received_rest(memoryview(buf), n, pos, done, 0.0, True)
    assert _frames_of(bytes(buf[:done])) == want


def test_fifo_wait_deadline_wake_and_end() -> None:
    fast = Reassembler(LIMIT, join=False, frames=True)
    r, w = os.pipe()
    wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        os.set_blocking(r, False)
        buf = bytearray(8192)
        args = (fast.scan, LIMIT, CODEC_BITS)
        assert _dgram.wait_fifo(r, buf, time.monotonic() + 0.02, 0.0, LIMIT, -1, *args) is None
        assert _dgram.wait_fifo(r, buf, time.monotonic() + 0.01, 0.005, LIMIT, -1, *args) is None
        os.eventfd_write(wake, 1)
        assert _dgram.wait_fifo(r, buf, None, 0.0, LIMIT, wake, *args) is None
        os.close(w)
        w = -1
        assert _dgram.wait_fifo(r, buf, None, 0.0, LIMIT, -1, *args) == (0, 0, 0)
        with pytest.raises(TypeError):
            _dgram.wait_fifo(r, buf, None)  # type: ignore[call-arg]
    finally:
        os.close(r)
        os.close(wake)
        if w >= 0:
            os.close(w)
