"""A ``spin=0`` stream socket's ``recv_bytes()`` with no deadline (``unix:``, ``tcp:``)
runs in one C call too (``protocol._take.Take``, kind 2): it sleeps in ``recv`` itself,
marked as a blocking reader so that a close() from another thread shuts the reading
side down to end it; on a socket another process holds too (after a fork) it polls
instead, so that no shutdown reaches that process. The statistics, the numbering of
takes, a signal handler that raises: as on the other transports (test_recv_take.py);
and a differential test gives the C call and the Python method the same bytes."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import buzon
from _fork import in_child, reap
from buzon.errors import BuzonError, ChannelClosed, Timeout
from buzon.protocol.frames import HEADER
from buzon.sync._channel import Channel
from buzon.testing.conformance._harness import url_for

pytestmark = pytest.mark.fd_check

_take = pytest.importorskip("buzon.protocol._take")

KINDS = ["unix", "tcp"]


def _pair(kind: str, **options: Any) -> tuple[buzon.Channel, buzon.Channel]:
    """(sender, receiver), connected over a listener closed at once."""
    lst = buzon.listen(url_for(kind), **options)
    try:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        t.start()
        a = buzon.connect(str(lst.address), timeout=10, **options)
        t.join(10)
        return a, box[0]
    finally:
        lst.close()


class Spy:
    """The Take's fallback, counting the calls that did not stay in C."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, channel: Channel, *args: Any, **kwargs: Any) -> bytes:
        self.calls += 1
        return Channel.recv_bytes(channel, *args, **kwargs)


def _spy_on(b: buzon.Channel) -> Spy:
    spy = Spy()
    take = b._make_take(fallback=spy)
    assert take is not None, "no C receive for a spin=0 stream socket"
    b.recv_bytes = b._take = take  # type: ignore[method-assign]
    b._core.recv_counts = take.counts
    return spy


@pytest.fixture(params=KINDS)
def spied(request: pytest.FixtureRequest) -> Iterator[tuple[buzon.Channel, buzon.Channel, Spy]]:
    a, b = _pair(request.param, spin=0)
    try:
        yield a, b, _spy_on(b)
    finally:
        a.close()
        b.close()


def _late(send: Callable[[bytes], object], data: bytes, delay: float = 0.005) -> threading.Timer:
    t = threading.Timer(delay, send, (data,))
    t.start()
    return t


def _prime(a: buzon.Channel, b: buzon.Channel) -> None:
    """A first receive, which notes the decoder's buffer (the Python way)."""
    a.send_bytes(b"prime")
    assert b.recv_bytes() == b"prime"


def _asleep(b: buzon.Channel) -> None:
    """Wait until a thread is inside ``b``'s receive wait."""
    deadline = time.monotonic() + 10
    while not b._waiters and time.monotonic() < deadline:
        time.sleep(0.005)
    assert b._waiters


@pytest.mark.parametrize("kind", KINDS)
def test_spin0_stream_sockets_get_the_c_receive_and_others_do_not(kind: str) -> None:
    a, b = _pair(kind, spin=0)
    with a, b:
        assert isinstance(b._take, _take.Take)
        assert isinstance(a._take, _take.Take)
    a, b = _pair(kind)  # the default spin: the Python path spins first
    with a, b:
        assert not isinstance(b._take, _take.Take)
    a, b = _pair(kind, spin=0, idle_timeout=30.0)
    with a, b:
        assert not isinstance(b._take, _take.Take)


def test_waiting_receives_stay_in_c_and_count_exactly(
    spied: tuple[buzon.Channel, buzon.Channel, Spy],
) -> None:
    a, b, spy = spied
    _prime(a, b)
    before, taken, calls = b.statistics(), b._core.taken, spy.calls
    counted = b._take.counts()[0]
    for i in range(20):
        t = _late(a.send_bytes, b"late%d" % i)
        assert b.recv_bytes() == b"late%d" % i
        t.join()
    for i in range(5):  # already there: the recv returns at once, still in C
        a.send_bytes(b"now%d" % i)
        assert b.recv_bytes() == b"now%d" % i
    after = b.statistics()
    assert spy.calls == calls
    assert b._take.counts()[0] - counted == 25
    assert after.messages_received - before.messages_received == 25
    assert after.bytes_received - before.bytes_received == sum(
        8 + len(b"late%d" % i) for i in range(20)
    ) + sum(8 + len(b"now%d" % i) for i in range(5))
    assert b._core.taken - taken == 25
    assert b._blocking_reader is False


def test_several_frames_in_one_read_are_all_delivered(
    spied: tuple[buzon.Channel, buzon.Channel, Spy],
) -> None:
    a, b, _spy = spied
    _prime(a, b)
    a.send_bytes_many([b"m%d" % i for i in range(50)])  # one write: one read brings all
    assert [b.recv_bytes() for _ in range(50)] == [b"m%d" % i for i in range(50)]
    with pytest.raises(Timeout):
        b.recv_bytes(timeout=0.01)


def test_close_from_another_thread_ends_the_recv_it_sleeps_in(
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
    _asleep(b)
    assert spy.calls == calls  # in the C call, not the fallback
    assert b._blocking_reader is True  # asleep in recv itself: close() must shut it down
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
            assert not b._rlock.locked() and not b._waiters and not b._blocking_reader
            t = _late(a.send_bytes, b"next")  # nothing lost or half-read: it goes on
            assert b.recv_bytes() == b"next"
            t.join()
            assert b._take.counts()[0] == before[0] + 1

    in_child(body)


@pytest.mark.parametrize("kind", KINDS)
def test_a_shared_socket_is_never_shut_down_under_the_other_process(kind: str) -> None:
    """After a fork the child holds the receiving socket too: the parent's C receive
    then polls (no blocking recv to end with a shutdown), a close() from another
    thread still ends it, and the child's copy still reads what comes next."""
    a, b = _pair(kind, spin=0)
    with a:
        _prime(a, b)
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.close(go_w)
                assert os.read(go_r, 1) == b"!"  # the parent closed its end
                code = 0 if b.recv_bytes(timeout=10) == b"after" else 2
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(go_r)
        try:
            out: list[BaseException | bytes] = []

            def run() -> None:
                try:
                    out.append(b.recv_bytes())
                except BaseException as exc:
                    out.append(exc)

            t = threading.Thread(target=run, daemon=True)
            t.start()
            _asleep(b)
            assert b._blocking_reader is False  # shared: the wait polls
            b.close()
            t.join(10)
            assert not t.is_alive()
            assert len(out) == 1 and isinstance(out[0], ChannelClosed), out
            os.write(go_w, b"!")
            a.send_bytes(b"after")
        finally:
            os.close(go_w)
            assert os.waitstatus_to_exitcode(reap(pid, 30)) == 0


# -- differential: the C call against the Python method, the same bytes in ------------

_PLAIN = st.builds(
    lambda flags, body: HEADER.pack(1, 1, flags, 0, len(body)) + body,
    st.integers(0, 3),
    st.binary(max_size=300),
)
_RECEIPT = st.builds(  # a receipt asked for (flag 8): the Python path answers it
    lambda body: HEADER.pack(1, 1, 8, 0, len(body)) + body, st.binary(max_size=40)
)
_BIG = st.binary(min_size=2000, max_size=3000).map(  # more than one read may bring
    lambda body: HEADER.pack(1, 1, 0, 0, len(body)) + body
)
_GARBAGE = st.binary(min_size=8, max_size=20).map(lambda g: b"\x09" + g)  # not a version


@st.composite
def _stream(draw: st.DrawFn) -> tuple[list[bytes], int, bool]:
    """Writes into the socket (frames split anywhere, sometimes ending in garbage), how
    many messages they hold, and whether garbage ends them."""
    frames = draw(st.lists(st.one_of(_PLAIN, _PLAIN, _RECEIPT, _BIG), min_size=1, max_size=8))
    data = b"".join(frames)
    garbage = draw(st.integers(0, 9)) == 0
    if garbage:
        data += draw(_GARBAGE)
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=4))))
    chunks, last = [], 0
    for c in [*cuts, len(data)]:
        chunks.append(data[last:c])
        last = c
    return chunks, len(frames), garbage


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_stream())
def test_differential_unix(stream: tuple[list[bytes], int, bool]) -> None:
    chunks, n, garbage = stream
    results = []
    for use_c in (True, False):
        a, b = _pair("unix", spin=0)
        with a, b:
            _prime(a, b)
            recv = b.recv_bytes if use_c else functools.partial(Channel.recv_bytes, b)

            def write(sock: Any = a._core._stream.sock) -> None:
                for chunk in chunks:
                    sock.sendall(chunk)
                    time.sleep(0.001)

            t = threading.Thread(target=write)
            t.start()
            got: list[Any] = []
            try:
                for _ in range(n + garbage):
                    try:
                        got.append(recv())
                    except BuzonError as exc:
                        got.append(type(exc))
                        break
            finally:
                t.join()
            st_ = b.statistics()
            results.append(
                (
                    got,
                    st_.messages_received,
                    st_.bytes_received,
                    st_.rejected_frames,
                    b._core.taken,
                    b._core.taking,
                )
            )
            if use_c:
                assert isinstance(b._take, _take.Take)
    assert results[0] == results[1]
