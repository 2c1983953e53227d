"""``protocol._stream.wait_frame``: the wait and the read of a plain blocking receive in
one C call. What it hands back must be what the Python decoder makes of the same read
(it stays the reference): a lone plain frame as ``(flags, body)``, anything else as the
byte count left in the buffer for the decoder; None only when the deadline passed with
nothing read; errors and signals as a Python read would raise them."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buzon.protocol import _stream
from buzon.protocol.credit import SendFlow
from buzon.protocol.frames import HEADER, FrameDecoder, Kind, encode_frame

pytestmark = pytest.mark.fd_check

LIMIT = 4096


def _plain(flags: int, body: bytes) -> bytes:
    return HEADER.pack(1, 1, flags, 0, len(body)) + body


_chunk = st.one_of(
    st.builds(_plain, st.sampled_from([0, 1, 2, 3, 8, 9]), st.binary(max_size=300)),
    st.just(b"".join(bytes(b) for b in encode_frame(Kind.CREDIT, 0, b"\0" * 16))),
    st.builds(_plain, st.sampled_from([0x10, 0x40, 0x80]), st.binary(max_size=20)),
    st.builds(lambda b: HEADER.pack(2, 1, 0, 0, len(b)) + b, st.binary(max_size=20)),
    st.builds(lambda b: HEADER.pack(1, 1, 0, 0, 5000) + b, st.binary(max_size=20)),
    st.binary(min_size=1, max_size=12),  # a cut frame, or garbage
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_chunk, min_size=1, max_size=4))
def test_one_read_is_what_the_decoder_makes_of_it(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    r, w = os.pipe()
    try:
        os.write(w, data)
        buf = bytearray(64 * 1024)
        got = _stream.wait_frame(r, buf, None, 0.0, LIMIT)
    finally:
        os.close(r)
        os.close(w)
    ref = FrameDecoder(max_frame=LIMIT, read_size=2 * LIMIT)
    try:
        ref.feed(data)
        ref_frames = list(ref.frames)
    except Exception:
        ref_frames = []
    if isinstance(got, tuple):  # taken whole: exactly one plain frame was read
        assert ref_frames == [got]
        assert ref.buffered == 0
    else:
        assert got == len(data)
        assert bytes(buf[:got]) == data


def test_deadline_passes_with_nothing_read() -> None:
    r, w = os.pipe()
    try:
        buf = bytearray(1024)
        assert _stream.wait_frame(r, buf, time.monotonic() + 0.02, 0.0, LIMIT) is None
        assert _stream.wait_frame(r, buf, time.monotonic() - 1.0, 0.0, LIMIT) is None
        assert _stream.wait_frame(r, buf, time.monotonic() + 0.01, 0.005, LIMIT) is None
    finally:
        os.close(r)
        os.close(w)


def test_end_of_stream_and_errors() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        assert _stream.wait_frame(r, bytearray(64), None, 0.0, LIMIT) == 0
    finally:
        os.close(r)
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError):
            _stream.wait_frame(a.fileno(), bytearray(4), None, 0.0, LIMIT)  # buf too small
        with pytest.raises(BufferError):
            _stream.wait_frame(a.fileno(), b"immutable", None, 0.0, LIMIT)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _stream.wait_frame(-1, bytearray(64), None, 0.0, LIMIT)
    unused = os.open(os.devnull, os.O_RDONLY)
    os.close(unused)
    with pytest.raises(OSError):  # EBADF, as os.read would raise
        _stream.wait_frame(unused, bytearray(64), None, 0.0, LIMIT)


def test_waits_without_the_gil_and_wakes_on_data() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        ticks = 0
        stop = threading.Event()

        def tick() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                time.sleep(0.001)

        def send_later() -> None:
            time.sleep(0.1)
            b.send(_plain(0, b"late"))

        threads = [threading.Thread(target=tick), threading.Thread(target=send_later)]
        for t in threads:
            t.start()
        got = _stream.wait_frame(a.fileno(), bytearray(1024), time.monotonic() + 30, 0.0, LIMIT)
        stop.set()
        for t in threads:
            t.join()
        assert got == (0, b"late")
        assert ticks > 5  # other threads ran while it waited


def test_a_signal_handler_that_raises_ends_the_wait_and_one_that_returns_does_not() -> None:
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals go to the main thread")
    a, b = socket.socketpair()
    calls = 0

    def raising(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def quiet(signum: int, frame: object) -> None:
        nonlocal calls
        calls += 1

    old = signal.signal(signal.SIGALRM, raising)
    try:
        with a, b:
            a.setblocking(False)
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            with pytest.raises(KeyboardInterrupt):
                _stream.wait_frame(a.fileno(), bytearray(64), time.monotonic() + 30, 0.0, LIMIT)
            signal.signal(signal.SIGALRM, quiet)
            signal.setitimer(signal.ITIMER_REAL, 0.02)
            got = _stream.wait_frame(a.fileno(), bytearray(64), time.monotonic() + 0.3, 0.0, LIMIT)
            assert got is None and calls == 1  # the handler ran; the wait went on to its end
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- mode: a socket (recv with MSG_DONTWAIT), a sleep that is a blocking recv -------

SOCKET, BLOCK = 1, 2


@settings(max_examples=60, deadline=None)
@given(st.lists(_chunk, min_size=1, max_size=4), st.sampled_from([SOCKET, SOCKET | BLOCK]))
def test_a_socket_read_is_the_same_in_every_mode(chunks: list[bytes], mode: int) -> None:
    data = b"".join(chunks)
    a, b = socket.socketpair()
    with a, b:
        b.sendall(data)
        plain = bytearray(64 * 1024)
        got = _stream.wait_frame(a.fileno(), plain, None, 0.0, LIMIT, -1, mode)
    r, w = os.pipe()
    try:
        os.write(w, data)
        ref = bytearray(64 * 1024)
        want = _stream.wait_frame(r, ref, None, 0.0, LIMIT)  # the pipe's read(2): the reference
    finally:
        os.close(r)
        os.close(w)
    assert got == want
    if isinstance(got, int):
        assert plain[:got] == ref[:got]


def test_the_blocking_recv_wakes_on_data_without_the_gil() -> None:
    a, b = socket.socketpair()  # blocking mode
    with a, b:
        ticks = 0
        stop = threading.Event()

        def tick() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                time.sleep(0.001)

        t = threading.Thread(target=tick)
        t.start()
        threading.Timer(0.1, b.send, (_plain(3, b"late"),)).start()
        got = _stream.wait_frame(a.fileno(), bytearray(1024), None, 0.0, LIMIT, -1, SOCKET | BLOCK)
        stop.set()
        t.join()
        assert got == (3, b"late")
        assert ticks > 5


def test_the_end_of_the_stream_or_the_close_behind_a_shutdown() -> None:
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        for closing in (False, True):
            a, b = socket.socketpair()
            with a, b:
                if closing:  # close(): write the wake fd, then shut the reading side down
                    os.eventfd_write(wake, 1)
                    threading.Timer(0.05, a.shutdown, (socket.SHUT_RD,)).start()
                else:
                    threading.Timer(0.05, b.close).start()
                got = _stream.wait_frame(a.fileno(), bytearray(64), None, 0.0, LIMIT, wake, 3)
                assert got == (None if closing else 0)
    finally:
        os.close(wake)


def test_a_non_blocking_file_falls_back_to_poll_and_honours_the_wake() -> None:
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    a, b = socket.socketpair()
    try:
        with a, b:
            a.setblocking(False)  # as another process sharing the file could make it
            threading.Timer(0.05, b.send, (_plain(0, b"x"),)).start()
            assert _stream.wait_frame(a.fileno(), bytearray(64), None, 0.0, LIMIT, wake, 3) == (
                0,
                b"x",
            )
            threading.Timer(0.05, os.eventfd_write, (wake, 1)).start()
            assert _stream.wait_frame(a.fileno(), bytearray(64), None, 0.0, LIMIT, wake, 3) is None
    finally:
        os.close(wake)


def test_a_signal_during_the_blocking_recv() -> None:
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals go to the main thread")
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    a, b = socket.socketpair()
    seen: list[str] = []

    def raising(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def returning(signum: int, frame: object) -> None:
        seen.append("ran")
        threading.Timer(0.05, b.send, (_plain(0, b"after"),)).start()

    def closing(signum: int, frame: object) -> None:
        seen.append("closed")
        os.eventfd_write(wake, 1)  # what close() does before it releases the fds

    old = signal.signal(signal.SIGALRM, raising)
    try:
        with a, b:
            for handler in (raising, returning, closing):
                signal.signal(signal.SIGALRM, handler)
                signal.setitimer(signal.ITIMER_REAL, 0.05)
                try:
                    got = _stream.wait_frame(a.fileno(), bytearray(64), None, 0.0, LIMIT, wake, 3)
                except KeyboardInterrupt:
                    got = "interrupted"
                want = {raising: "interrupted", returning: (0, b"after"), closing: None}
                assert got == want[handler]
            assert seen == ["ran", "closed"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.close(wake)


def test_send_frame_never_blocks_a_blocking_mode_socket() -> None:
    a, b = socket.socketpair()  # blocking mode
    with a, b:
        assert _stream.send_frame(a.fileno(), 9, b"abc") == 11
        assert b.recv(64) == _plain(9, b"abc")
        with pytest.raises(BlockingIOError):
            for _ in range(1_000_000):
                _stream.send_frame(a.fileno(), 0, b"x" * 4000)
    with pytest.raises(OSError):
        _stream.send_frame(a.fileno() if a.fileno() >= 0 else 10_000, 0, b"x")


# -- SmallWriter: send_bytes' hot path ----------------------------------------------


class _Core:
    """What SmallWriter reads of a ChannelCore."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.credit_out: bytes | None = None
        self.closed = False
        self.sflow: object | None = None


def _writer(fd: int, core: _Core, lock: threading.Lock, parts: list[tuple[int, bytes, int]]):
    def on_part(flags: int, data: bytes, n: int) -> int:
        parts.append((flags, data, n))
        return 41

    return _stream.SmallWriter(fd, core, lock, 100_000, on_part)


def test_small_writer_writes_one_plain_frame_and_counts_it() -> None:
    r, w = os.pipe()
    try:
        parts: list[tuple[int, bytes, int]] = []
        core = _Core()  # kept: the writer holds its core weakly
        write = _writer(w, core, threading.Lock(), parts)
        assert write(b"hello") is True
        assert write(b"") is True
        assert os.read(r, 100) == _plain(0, b"hello") + _plain(0, b"")
        assert write.counts() == (2, 13 + 8, 0)
        assert parts == []
    finally:
        os.close(r)
        os.close(w)


def test_small_writer_steps_aside_whenever_the_channel_is_not_quiet() -> None:
    r, w = os.pipe()
    try:
        core, lock, parts = _Core(), threading.Lock(), []
        write = _writer(w, core, lock, parts)
        assert write(bytearray(b"x")) is False  # bytes only
        assert write(b"x" * 100_001) is False  # over the limit
        with lock:
            assert write(b"x") is False  # another thread is writing
        core.pending.append(b"tail")  # bytes owed (the core keeps this list for good)
        assert write(b"x") is False
        core.pending.clear()
        for name, value in [("credit_out", b"c"), ("closed", True)]:
            setattr(core, name, value)
            assert write(b"x") is False
            setattr(core, name, _Core().__dict__[name])
        flow = SendFlow(2)
        flow.sent = 2  # numbered sends without credit: the engine's way (it waits)
        core.sflow = flow
        assert write(b"x") is False and flow.sent == 2
        core.sflow = None
        os.set_blocking(w, False)
        while True:  # no room: nothing written, counted as a would-block
            try:
                os.write(w, b"f" * 4096)
            except BlockingIOError:
                break
        assert write(b"x") is False
        assert write.counts() == (0, 0, 1)
        os.close(r)
        r = -1
        assert write(b"x") is False  # EPIPE: the general way meets and reports it
        assert parts == []
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)


def test_small_writer_counts_a_numbered_send_in_the_flow() -> None:
    """A channel that numbers its sends (receipts, a capacity) keeps the C path while
    it has credit, the send counted in ``sflow.sent`` as ``send_small`` counts it."""
    r, w = os.pipe()
    try:
        core, lock, parts = _Core(), threading.Lock(), []
        write = _writer(w, core, lock, parts)
        core.sflow = flow = SendFlow(None)  # receipts: no limit
        flow.sent = 5
        assert write(b"x") is True and flow.sent == 6
        core.sflow = flow = SendFlow(1)  # a capacity with one credit left
        assert write(b"y") is True and flow.sent == 1
        assert write(b"z") is False and flow.sent == 1  # no credit: the engine's way
        assert write.counts()[0] == 2 and parts == []
        assert (
            os.read(r, 100) == b"\x01\x01\x00\x00\x01\x00\x00\x00x\x01\x01\x00\x00\x01\x00\x00\x00y"
        )
    finally:
        os.close(r)
        os.close(w)


def test_small_writer_hands_a_partial_write_to_the_core() -> None:
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        room = 0
        while True:  # fill the pipe, then free one page: a large write takes part
            try:
                room += os.write(w, b"f" * 4096)
            except BlockingIOError:
                break
        assert len(os.read(r, 4096)) == 4096
        parts: list[tuple[int, bytes, int]] = []
        core = _Core()  # kept: the writer holds its core weakly
        write = _writer(w, core, threading.Lock(), parts)
        data = b"d" * 10_000  # more than PIPE_BUF: a non-blocking pipe may take part
        assert write(data) == 41  # the serial on_part returned
        assert parts == [(0, data, 4096)]
        assert write.counts() == (0, 0, 0)  # the core counts what it finishes
    finally:
        os.close(r)
        os.close(w)


def test_small_writer_holds_the_write_lock_while_the_tail_is_kept() -> None:
    """on_part is Python code: another thread may run meanwhile, and it must not find
    the write lock free before the partial frame's tail is owed (it would write a frame
    of its own into the middle of this one). The writer takes the lock for the write
    and gives it back after on_part; a lock held elsewhere sends it the general way."""
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        while True:  # fill the pipe, then free one page: a large write takes part
            try:
                os.write(w, b"f" * 4096)
            except BlockingIOError:
                break
        assert len(os.read(r, 4096)) == 4096
        lock = threading.Lock()
        held: list[bool] = []

        def on_part(flags: int, data: bytes, n: int) -> int:
            held.append(lock.locked())
            return 7

        core = _Core()  # kept: the writer holds its core weakly
        write = _stream.SmallWriter(w, core, lock, 100_000, on_part)
        assert write(b"d" * 10_000) == 7
        assert held == [True]  # the lock was this call's while the tail was kept
        assert lock.acquire(False)  # and it is free again
        lock.release()
    finally:
        os.close(r)
        os.close(w)


def test_a_signal_during_the_spin_is_handled_before_the_sleep() -> None:
    """A signal that comes while the call spins interrupts no system call; its handler
    must still run before the call sleeps: run later (when something wakes the sleep),
    it would raise after the call took a message, which would then be lost."""
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals go to the main thread")
    a, b = socket.socketpair()

    def raising(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, raising)
    try:
        with a, b:
            a.setblocking(False)
            later = threading.Timer(2.0, b.send, (_plain(0, b"kept"),))  # after the spin
            later.start()
            signal.setitimer(signal.ITIMER_REAL, 0.02)  # well inside a 0.5 s spin
            try:
                with pytest.raises(KeyboardInterrupt):
                    _stream.wait_frame(a.fileno(), bytearray(64), time.monotonic() + 10, 0.5, LIMIT)
            finally:
                later.join()
            a.settimeout(10)
            assert a.recv(64) == _plain(0, b"kept")  # the interrupted call took nothing
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("spin", [0.0, 0.001])
def test_the_wake_fd_ends_the_sleep_and_is_never_read(spin: float) -> None:
    r, w = os.pipe()
    wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        threading.Timer(0.05, os.eventfd_write, (wake, 1)).start()
        assert _stream.wait_frame(r, bytearray(64), None, spin, LIMIT, wake) is None
        assert os.eventfd_read(wake) == 1  # still there for every other waiter
        os.write(w, _plain(0, b"data"))  # data and the wake both ready: the data wins
        os.eventfd_write(wake, 1)
        assert _stream.wait_frame(r, bytearray(64), None, 0.0, LIMIT, wake) == (0, b"data")
        with pytest.raises(ValueError, match="wake"):
            _stream.wait_frame(r, bytearray(64), None, 0.0, LIMIT, -2)
    finally:
        for fd in (r, w, wake):
            os.close(fd)


def test_small_writer_on_a_blocking_mode_socket_never_blocks() -> None:
    a, b = socket.socketpair()  # blocking mode: the socket transports keep theirs so
    with a, b:
        parts: list[tuple[int, bytes, int]] = []

        def on_part(flags: int, data: bytes, n: int) -> int:
            parts.append((flags, data, n))
            return 41

        core = _Core()  # kept: the writer holds its core weakly
        write = _stream.SmallWriter(a.fileno(), core, threading.Lock(), 100_000, on_part, True)
        assert write(b"hi") is True
        assert b.recv(64) == _plain(0, b"hi")
        results = set()
        for _ in range(100_000):  # a peer that does not read: sendmsg(MSG_DONTWAIT) says so
            got = write(b"y" * 3000)
            results.add(got if isinstance(got, bool) else "part")
            if got is False:
                break
        assert False in results
        assert write.counts()[2] == 1  # the would-block, counted


def test_small_writer_writes_a_whole_frame_as_it_is() -> None:
    """``write(frame, True)`` (Channel._send_frame: a frame made elsewhere, header
    included) writes the bytes unchanged, counts them, refuses what is no frame's
    size; a partial write gives on_part the whole frame with flags -1."""
    r, w = os.pipe()
    try:
        parts: list[tuple[int, bytes, int]] = []
        core = _Core()  # kept: the writer holds its core weakly
        write = _writer(w, core, threading.Lock(), parts)
        frame = _plain(5, b"whole")
        assert write(frame, True) is True
        assert os.read(r, 100) == frame  # not framed again
        assert write.counts() == (1, len(frame), 0)
        assert write(b"short", True) is False  # shorter than a header: not a frame
        assert write(b"x" * 100_009, True) is False  # past limit + 8
        assert write(frame, False) is True and os.read(r, 100) == _plain(0, frame)
        os.set_blocking(w, False)
        while True:  # fill the pipe to leave less room than the frame
            try:
                os.write(w, b"f" * 4096)
            except BlockingIOError:
                break
        assert len(os.read(r, 4096)) == 4096
        big = _plain(0, b"d" * 10_000)
        assert write(big, True) == 41
        assert parts == [(-1, big, 4096)]
    finally:
        os.close(r)
        os.close(w)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(_chunk, min_size=0, max_size=4),
    st.sampled_from([0, SOCKET, SOCKET | BLOCK]),
    st.booleans(),
)
def test_a_read_the_spin_saw_is_the_read_the_sleep_makes(
    chunks: list[bytes], mode: int, closed: bool
) -> None:
    """With a spin, data already there is read as soon as the spin sees it (no second
    poll): the same result as without the spin, in every mode, the end of the stream
    (0) included."""
    data = b"".join(chunks)
    results = []
    for spin in (0.0, 0.05):
        if mode:
            a, b = socket.socketpair()
            rfd, writer = a.fileno(), b
        else:
            r, w = os.pipe()
            a, b = os.fdopen(r, "rb", 0), os.fdopen(w, "wb", 0)
            os.set_blocking(r, False)
            rfd, writer = r, b
        with a, b:
            if data:
                writer.sendall(data) if mode else writer.write(data)  # type: ignore[union-attr]
            if closed or not data:
                writer.close()
            buf = bytearray(64 * 1024)
            deadline = None if mode & BLOCK else time.monotonic() + 5
            got = _stream.wait_frame(rfd, buf, deadline, spin, LIMIT, -1, mode)
            results.append((got, bytes(buf[:got]) if isinstance(got, int) else None))
    assert results[0] == results[1]


def test_a_spin_that_sees_a_close_reports_it() -> None:
    """The close's shutdown (MODE_BLOCK) seen by the spin's read: None, as the sleep's."""
    a, b = socket.socketpair()
    wake_r, wake_w = os.pipe()
    try:
        with a, b:
            os.write(wake_w, b"x")
            a.shutdown(socket.SHUT_RD)
            got = _stream.wait_frame(a.fileno(), bytearray(64), None, 0.05, LIMIT, wake_r, 3)
            assert got is None
    finally:
        os.close(wake_r)
        os.close(wake_w)
