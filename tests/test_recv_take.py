"""A ``spin=0`` channel's ``recv_bytes()`` with no deadline runs in one C call
(``protocol._take.Take``, made by ``Channel._make_take``) on pipes, FIFOs, datagram
sockets and POSIX queues: it keeps every contract of the Python path it replaces — a
close() from another thread wakes it, a signal handler that raises ends it with the
read lock free, the statistics and the numbering of takes stay exact, anything but a
lone plain frame goes the Python way — and a differential test feeds the same bytes to
the C call and to the Python method and compares everything they report."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import buzon
from _fork import in_child
from buzon.errors import BuzonError, ChannelClosed, Timeout
from buzon.protocol.frames import HEADER
from buzon.sync._channel import Channel
from buzon.testing.conformance._harness import url_for

pytestmark = pytest.mark.fd_check

_take = pytest.importorskip("buzon.protocol._take")

KINDS = ["pipe", "fifo", "unixgram", "udp", "mq"]


def _pair(kind: str, **options: Any) -> tuple[buzon.Channel, buzon.Channel]:
    """(sender, receiver)."""
    if kind == "pipe":
        return buzon.pipe(**options)
    lst = buzon.listen(url_for(kind), **options)
    try:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        a = buzon.connect(str(lst.address), timeout=10, **options)
        t.join(10)
        b = box[0]
        if kind in ("unixgram", "udp"):  # datagrams: introduce the client
            a.send_bytes(b"hello", timeout=10)
            assert b.recv_bytes(timeout=10) == b"hello"
        return a, b
    finally:
        lst.close()


class Spy:
    """The Take's fallback, counting the calls that did not stay in C."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, channel: Channel, *args: Any, **kwargs: Any) -> bytes:
        self.calls += 1
        return Channel.recv_bytes(channel, *args, **kwargs)


@pytest.fixture(params=KINDS)
def spied(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel, Spy]]:
    a, b = _pair(request.param, spin=0)
    spy = Spy()
    take = b._make_take(fallback=spy)
    assert take is not None
    b.recv_bytes = b._take = take  # type: ignore[method-assign]
    b._core.recv_counts = take.counts
    try:
        yield a, b, spy
    finally:
        a.close()
        b.close()


def _late(send: Callable[[bytes], object], data: bytes, delay: float = 0.005) -> threading.Timer:
    t = threading.Timer(delay, send, (data,))
    t.start()
    return t


def _prime(a: buzon.Channel, b: buzon.Channel) -> None:
    """One receive that waits: its read first finds nothing, so the next receives
    sleep first (``_sleep_first``), which is where the C call applies."""
    _late(a.send_bytes, b"prime").join()  # sent before the receive: it reads at once
    assert b.recv_bytes() == b"prime"
    t = _late(a.send_bytes, b"prime2", 0.05)
    assert b.recv_bytes() == b"prime2"
    t.join()


@pytest.mark.parametrize("kind", KINDS)
def test_spin0_channels_get_the_c_receive_and_others_do_not(kind: str) -> None:
    a, b = _pair(kind, spin=0)
    with a, b:
        assert isinstance(b._take, _take.Take)
    a, b = _pair(kind)  # the default spin: the Python path spins first
    with a, b:
        assert not isinstance(b._take, _take.Take)
    if kind != "pipe":  # pipe() takes no idle_timeout
        a, b = _pair(kind, spin=0, idle_timeout=30.0)
        with a, b:
            assert not isinstance(b._take, _take.Take)


@pytest.mark.parametrize("kind", ["pipe", "fifo"])
def test_messages_a_read_brought_are_taken_with_no_python_frame(kind: str) -> None:
    """On a stream (pipe, fifo) one read brings several small messages: the C Take
    waits for them, and the rest are taken by the Head in front of it (protocol/_pop.c)
    with no Python frame, statistics exact. Before, every one of them went through the
    Python method (a fifo: through a wait that found the buffer busy, then the engine),
    which made a spin=0 receiver 2.4x slower per message than on 135cb2d."""
    a, b = _pair(kind, spin=0)
    with a, b:
        before = b.statistics()
        for i in range(30):
            a.send_bytes(b"m%d" % i)
        assert b.recv_bytes() == b"m0"  # the C wait: its read brings all of them
        calls: list[str] = []

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

        got = []
        sys.setprofile(profile)
        try:
            for _ in range(29):
                got.append(b.recv_bytes())
        finally:
            sys.setprofile(None)
        assert got == [b"m%d" % i for i in range(1, 30)]
        assert calls == []
        after = b.statistics()
        assert after.messages_received - before.messages_received == 30
        assert after.bytes_received - before.bytes_received == sum(
            8 + len(b"m%d" % i) for i in range(30)
        )


def test_waiting_receives_stay_in_c_and_count_exactly(
    spied: tuple[buzon.Channel, buzon.Channel, Spy],
) -> None:
    a, b, spy = spied
    _prime(a, b)
    before, taken, calls = b.statistics(), b._core.taken, spy.calls
    for i in range(20):
        t = _late(a.send_bytes, b"late%d" % i)
        assert b.recv_bytes() == b"late%d" % i
        t.join()
    after = b.statistics()
    assert spy.calls - calls <= 2  # every 17th receive reads first (the Python path)
    assert b._take.counts()[0] >= 18
    assert after.messages_received - before.messages_received == 20
    assert after.bytes_received - before.bytes_received == sum(
        8 + len(b"late%d" % i) for i in range(20)
    )
    assert b._core.taken - taken == 20


def test_arguments_go_the_python_way(spied: tuple[buzon.Channel, buzon.Channel, Spy]) -> None:
    a, b, spy = spied
    with pytest.raises(Timeout):
        b.recv_bytes(timeout=0.01)
    with pytest.raises(Timeout):
        b.recv_bytes(0.01)
    with pytest.raises(ValueError):
        b.recv_bytes(timeout=-1)
    with pytest.raises(TypeError):
        b.recv_bytes(None, None)  # type: ignore[call-arg]
    a.send_bytes(b"x")
    assert b.recv_bytes(timeout=None) == b"x"
    assert spy.calls == 5


def test_close_from_another_thread_wakes_the_c_receive(
    spied: tuple[buzon.Channel, buzon.Channel, Spy],
) -> None:
    a, b, spy = spied
    _prime(a, b)
    calls = spy.calls
    out: list[BaseException | bytes] = []

    def run() -> None:
        try:
            out.append(b.recv_bytes())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not b._waiters and time.monotonic() < deadline:  # asleep in the wait
        time.sleep(0.005)
    assert b._waiters and spy.calls == calls  # in the C call, not the fallback
    b.close()
    t.join(10)
    assert not t.is_alive()
    assert len(out) == 1 and isinstance(out[0], ChannelClosed), out
    assert not b._rlock.locked()


@pytest.mark.parametrize("kind", KINDS)
def test_a_signal_handler_that_raises_ends_the_c_receive_with_the_lock_free(kind: str) -> None:
    def body() -> None:
        a, b = _pair(kind, spin=0)
        with a, b:
            _prime(a, b)
            before = b._take.counts()

            def interrupt(signum: int, frame: object) -> None:
                raise KeyboardInterrupt

            signal.signal(signal.SIGALRM, interrupt)
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            try:
                b.recv_bytes()
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("recv returned")
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            assert not b._rlock.locked() and not b._waiters
            t = _late(a.send_bytes, b"next")  # nothing lost or half-read: it goes on
            assert b.recv_bytes() == b"next"
            t.join()
            assert b._take.counts()[0] == before[0] + 1

    in_child(body)


def test_a_forked_child_receives_through_its_copy() -> None:
    a, b = buzon.pipe(spin=0)
    with a, b:

        def body() -> None:
            for i in range(5):
                t = _late(a.send_bytes, b"c%d" % i)
                assert b.recv_bytes() == b"c%d" % i
                t.join()
            assert b._wake >= 0  # the child made its own wake fd

        _prime(a, b)
        in_child(body)
        t = _late(a.send_bytes, b"parent")  # the parent's end still works
        assert b.recv_bytes() == b"parent"
        t.join()


# -- differential: the C call against the Python method, the same bytes in ------------

_PLAIN = st.builds(
    lambda flags, body: HEADER.pack(1, 1, flags, 0, len(body)) + body,
    st.integers(0, 3),
    st.binary(max_size=300),
)
_RECEIPT = st.builds(  # a receipt asked for (flag 8): the Python path answers it
    lambda body: HEADER.pack(1, 1, 8, 0, len(body)) + body, st.binary(max_size=40)
)
_GARBAGE = st.binary(min_size=8, max_size=20).map(lambda g: b"\x09" + g)  # not a version


@st.composite
def _stream(draw: st.DrawFn) -> tuple[list[bytes], int, bool]:
    """Writes into a pipe (frames: plain, asking a receipt, larger than the C call
    takes; split anywhere, sometimes ending in garbage), how many messages they hold,
    and whether garbage ends them."""
    big = st.binary(min_size=2000, max_size=3000).map(
        lambda body: HEADER.pack(1, 1, 0, 0, len(body)) + body
    )
    frames = draw(st.lists(st.one_of(_PLAIN, _PLAIN, _RECEIPT, big), min_size=1, max_size=8))
    data = b"".join(frames)
    garbage = draw(st.integers(0, 9)) == 0
    if garbage:
        data += draw(_GARBAGE)
    cuts = sorted(draw(st.lists(st.integers(1, len(data) - 1), max_size=4)))
    chunks, last = [], 0
    for c in [*cuts, len(data)]:
        if c > last:
            chunks.append(data[last:c])
            last = c
    return chunks, len(frames), garbage


def _drain(
    ch: buzon.Channel,
    peer: buzon.Channel,
    chunks: list[bytes],
    n: int,
    garbage: bool,
    use_c: bool,
) -> list[Any]:
    """Write ``chunks`` into the channel's pipe from a thread, a little apart, while
    the channel receives its ``n`` messages (and meets the garbage); what each receive
    gave (bytes or the error's type)."""
    recv = ch.recv_bytes if use_c else (lambda: Channel.recv_bytes(ch))
    fd = peer._core.write_fileno()

    def write() -> None:
        for chunk in chunks:
            os.write(fd, chunk)
            time.sleep(0.001)

    t = threading.Thread(target=write)
    t.start()
    got: list[Any] = []
    try:
        for _ in range(n + garbage):
            ch._sleep_first = 16  # the state in which the C call applies
            try:
                got.append(recv())
            except BuzonError as exc:
                got.append(type(exc))
                break
    finally:
        t.join()
    return got


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_stream())
def test_differential_pipe(stream: tuple[list[bytes], int, bool]) -> None:
    chunks, n, garbage = stream
    results = []
    for use_c in (True, False):
        a, b = buzon.pipe(spin=0)
        with a, b:
            b._make_wake()  # the C call needs the wake fd the first Python wait makes
            got = _drain(b, a, chunks, n, garbage, use_c)
            st_ = b.statistics()
            results.append(
                (
                    got,
                    st_.messages_received,
                    st_.bytes_received,
                    st_.rejected_frames,
                    st_.credits_sent > 0,  # how many: the next chunk's timing (_more_coming)
                    b._core.taken,
                    b._core.taking,
                )
            )
            if use_c:
                assert isinstance(b._take, _take.Take)
    assert results[0] == results[1]


_DGRAM = st.one_of(
    _PLAIN,
    _PLAIN,
    st.builds(lambda body: HEADER.pack(1, 1, 0x40, 0, len(body)) + body, st.binary(max_size=30)),
    _GARBAGE,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datagrams=st.lists(_DGRAM, min_size=1, max_size=10))
def test_differential_unixgram(datagrams: list[bytes]) -> None:
    results = []
    for use_c in (True, False):
        a, b = _pair("unixgram", spin=0)
        with a, b:
            b._make_wake()
            sock: socket.socket = a._core.transport.sock  # type: ignore[attr-defined]
            recv = b.recv_bytes if use_c else functools.partial(Channel.recv_bytes, b)
            got: list[Any] = []
            for d in datagrams:
                sock.send(d)
                b._sleep_first = 16
                try:
                    got.append(recv())
                except BuzonError as exc:
                    got.append(type(exc))
            st_ = b.statistics()
            results.append(
                (
                    got,
                    st_.messages_received,
                    st_.bytes_received,
                    st_.rejected_frames,
                    st_.credits_sent > 0,  # how many: the next chunk's timing (_more_coming)
                    b._core.taken,
                    b._core.taking,
                )
            )
    assert results[0] == results[1]


# -- send_bytes' C head (protocol._take.Put) ----------------------------------------


@pytest.mark.parametrize("kind", ["pipe", "fifo", "unixgram", "udp", "mq"])
def test_send_bytes_takes_the_c_head_where_a_small_writer_is(kind: str) -> None:
    a, b = _pair(kind, spin=0)
    with a, b:
        assert isinstance(a.send_bytes, _take.Put)
        before = a.statistics().messages_sent
        for i in range(5):
            a.send_bytes(b"m%d" % i)
        a.send_bytes(b"t", timeout=5)  # arguments: the method itself
        a.send_bytes(b"p", priority=0)
        a.send_bytes(bytearray(b"ba"))  # not bytes: the writer refuses, the method sends
        got = [b.recv_bytes(timeout=10) for _ in range(8)]
        assert got == [b"m0", b"m1", b"m2", b"m3", b"m4", b"t", b"p", b"ba"]
        assert a.statistics().messages_sent - before == 8
    with pytest.raises(ChannelClosed):
        a.send_bytes(b"closed")


def test_a_send_the_kernel_takes_in_part_is_finished() -> None:
    """TCP takes part of a frame when its buffer is nearly full: ``partial`` (the
    driver's _send_slow) finishes it while a thread drains the peer."""
    lst = buzon.listen("tcp://127.0.0.1:0")
    try:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        a = buzon.connect(str(lst.address), timeout=10)
        t.join(10)
        b = box[0]
    finally:
        lst.close()
    parts: list[int] = []

    def partial(serial: int) -> None:
        parts.append(serial)
        a._put_rest(serial)

    with a, b:
        a.send_bytes = _take.Put(a, a._core, Channel.send_bytes, partial)  # type: ignore[method-assign]
        for _ in range(3):  # partial takes are rare (a few per 2000 sends): try again
            msgs = [bytes([i % 251]) * 4000 for i in range(2000)]
            got: list[bytes] = []

            def drain(got: list[bytes] = got, n: int = len(msgs)) -> None:
                time.sleep(0.1)  # let the sender fill the buffers first
                for _ in range(n):
                    got.append(b.recv_bytes(timeout=30))

            t = threading.Thread(target=drain)
            t.start()
            for m in msgs:
                a.send_bytes(m)
            t.join(60)
            assert got == msgs
            if parts:
                return
    pytest.skip("the kernel took no send in part this time (the case this test is for)")


def test_two_receiving_threads_share_the_messages(
    spied: tuple[buzon.Channel, buzon.Channel, Spy],
) -> None:
    """One thread asleep in the C call holds the read lock: another thread's receive
    goes the Python way and waits for the lock; each message reaches exactly one."""
    a, b, spy = spied
    _prime(a, b)
    got: list[bytes] = []
    lock = threading.Lock()

    def receive(n: int) -> None:
        for _ in range(n):
            data = b.recv_bytes()
            with lock:
                got.append(data)

    threads = [threading.Thread(target=receive, args=(n,)) for n in (5, 4)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # both waiting
    for i in range(9):
        a.send_bytes(b"m%d" % i)
        time.sleep(0.005)
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    assert sorted(got) == sorted(b"m%d" % i for i in range(9))
    assert not b._rlock.locked() and not b._waiters
    assert spy.calls > 0  # the receive that found the lock held went the Python way


def test_a_close_while_the_checks_run_python_ends_the_receive() -> None:
    """The C call's checks run one Python method (the decoder's idle_buffer), during
    which another thread may close the channel and the fds be reused: the call looks
    at ``_closing`` again once among the waiters, and raises ChannelClosed rather than
    wait on the reused fds (which nobody writes: before, it slept there for good)."""
    from buzon.protocol.frames import FrameDecoder

    a, b = buzon.pipe(spin=0)
    _prime(a, b)
    reused: list[int] = []

    class Hook(FrameDecoder):
        __slots__ = ()

        def idle_buffer(self) -> bytearray | None:
            buf = FrameDecoder.idle_buffer(self)
            if not reused:  # once: "another thread" closes now, a new file takes the fds
                b.close()
                for _ in range(3):
                    reused.extend(os.pipe())
            return buf

    out: list[BaseException | bytes] = []

    def run() -> None:
        try:
            out.append(b.recv_bytes())
        except BaseException as exc:
            out.append(exc)

    b._core.decoder.__class__ = Hook
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    try:
        assert not t.is_alive(), "the receive waits on reused fds"
        assert len(out) == 1 and isinstance(out[0], ChannelClosed), out
    finally:
        for fd in reused:  # wake a receive stuck on them, then let them go
            with contextlib.suppress(OSError):
                os.write(fd, HEADER.pack(1, 1, 0, 0, 0))
        t.join(5)
        for fd in reused:
            os.close(fd)
        a.close()


def test_a_close_that_woke_the_c_wait_ends_the_receive_before_it_reads_again() -> None:
    """A close() in another thread wakes the C wait (on a FIFO its nudge is input the
    wait reads) and releases the fds once the waiter left ``_waiters``, which the C
    Take does before it hands what it got to Python: the rest of the receive must then
    raise ChannelClosed, not read the released fds (under load this raised
    ``BuzonError('fifo read: Bad file descriptor')``). The interleaving is forced: the
    wait returns "nothing for you" with the close begun."""
    a, b = _pair("fifo", spin=0)
    with a, b:
        core = b._core
        real = core.wait_receiver
        assert real is not None

        class NudgedWhileClosing:
            blocks = True

            def wait(self, *args: Any) -> int:
                b._closing = True  # close() began; its nudge was all the wait read
                return 0

        reads: list[str] = []

        def engine(*args: Any) -> Any:
            reads.append("the receive went on reading")
            raise AssertionError("read after close")

        core.wait_receiver = NudgedWhileClosing()
        try:
            take = b._make_take()
        finally:
            core.wait_receiver = real
        assert take is not None
        b._make_wake()  # what the C call needs to wait (made at the first wait)
        b._run_receive = engine  # type: ignore[method-assign]
        try:
            with pytest.raises(ChannelClosed):
                take()
        finally:
            b._closing = False
            del b._run_receive
        assert reads == []
        assert b._rlock.acquire(blocking=False)  # the read lock was given back
        b._rlock.release()
