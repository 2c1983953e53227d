"""The blocking client's solo call path (a call while no other is in flight, its frame
made in C) and its reads without slices: every semantics of the general path holds."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from _rpc_helpers import Recorder, calc_service, serving

import buzon
from buzon import rpc
from buzon.errors import CodecError, RemoteError

URLS = ["unix:fast", "tcp://127.0.0.1:0", "seqpacket:fast", "shm:fast"]


def _count_reads(c: rpc.Client) -> list[float | None]:
    """Record the timeout of every wait for input the client makes on its connection
    (the channel's receive that sleeps when nothing is there)."""
    ch = c.channel
    inner = ch._receive
    seen: list[float | None] = []

    def counting(timeout: float | None, *rest: Any) -> Any:
        seen.append(timeout)
        return inner(timeout, *rest)

    ch._receive = counting  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("url", ["unix:slices", "shm:slices"])
@pytest.mark.parametrize("timeout", [None, 60.0])
def test_a_blocked_call_reads_once_instead_of_in_slices(url: str, timeout: float | None) -> None:
    """A call waiting 0.8 s for its reply sleeps in one read (a close() from another
    thread wakes it: the next test); 0.25 s slices made it read at least 3 times."""
    with (
        serving(url, calc_service(Recorder())) as srv,
        rpc.connect(srv.address, timeout=timeout) as c,
    ):
        assert c.add(1, 2) == 3
        reads = _count_reads(c)
        assert c.sleep_then(7, 0.8) == 7
        assert len(reads) == 1, reads
        assert reads[0] is None if timeout is None else reads[0] > 50.0


@pytest.mark.parametrize("url", URLS)
def test_close_from_another_thread_ends_a_call_blocked_without_slices(url: str) -> None:
    rec = Recorder()
    with serving(url, calc_service(rec)) as srv:
        c = rpc.connect(srv.address, timeout=None)
        box: list[BaseException] = []

        def waiter() -> None:
            try:
                c.block("closer")
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        end = time.monotonic() + 10
        while not rec.concurrent and time.monotonic() < end:
            time.sleep(0.01)
        c.close()
        t.join(10)
        rec.event("closer").set()
        assert not t.is_alive(), "a waiting call did not notice the close"
        assert isinstance(box[0], buzon.ChannelClosed)


def test_a_call_started_while_a_solo_call_reads_is_answered_by_that_reader() -> None:
    """Thread A's call (solo: nothing else in flight) reads the connection; thread B's
    call, made meanwhile, takes the general path and sleeps: A's reads settle B's reply
    (out of order) while A's own call still runs."""
    rec = Recorder()
    with (
        serving("unix:twoway", calc_service(rec)) as srv,
        rpc.connect(srv.address, timeout=30) as c,
    ):
        got: list[Any] = []
        a = threading.Thread(target=lambda: got.append(c.block("a")))
        a.start()
        end = time.monotonic() + 10
        while not rec.concurrent and time.monotonic() < end:
            time.sleep(0.01)
        assert c._reading  # A reads
        assert c.add(20, 22) == 42  # answered while A's call is in flight
        assert a.is_alive() and not got
        rec.event("a").set()
        a.join(10)
        assert got == ["released"]
        assert c.in_flight == 0 and c.late == 0


def test_values_the_c_framing_leaves_alone_take_the_codec_path() -> None:
    rec = Recorder()
    with (
        serving("unix:fallback", calc_service(rec)) as srv,
        rpc.connect(srv.address, timeout=30) as c,
    ):
        big = "é" * 5000  # past the small frame
        assert c.echo(big) == big
        assert c.kw(1, 2, 3, scale=2) == 12  # keywords
        with pytest.raises(CodecError):
            c.add(2**64, 1)  # the codec's own error, nothing sent
        assert c.in_flight == 0
        with pytest.raises(RemoteError) as err:
            c.add([1], 2)  # a list argument: the server validates
        assert err.value.code == RemoteError.INVALID_PARAMS
        assert c.add(1, 2) == 3


@rpc.remote
class _Listener:
    def __init__(self) -> None:
        self.seen: list[int] = []

    @rpc.expose
    def notice(self, value: int) -> int:
        self.seen.append(value)
        return value * 2


class _Keeper:
    def __init__(self) -> None:
        self.kept: Any = None

    @rpc.expose
    def keep(self, listener: Any) -> None:
        self.kept = listener

    @rpc.expose
    def poke(self, value: int) -> int:
        """A call with plain arguments (the solo path) whose handler calls the
        client's object back: the waiting client reads and answers that call."""
        return int(self.kept.notice(value)) + 1


def test_a_solo_call_answers_the_servers_callback_while_it_waits() -> None:
    keeper = _Keeper()
    listener = _Listener()
    with serving("unix:keeper", keeper) as srv, rpc.connect(srv.address, timeout=30) as c:
        c.keep(listener)
        assert c.poke(5) == 11
        assert c.poke(6) == 13
        assert listener.seen == [5, 6]
        keeper.kept = None


def test_the_solo_path_validates_results_against_the_protocol() -> None:
    class Wrong:
        def wrong_result(self) -> int: ...

    with (
        serving("unix:wrong", calc_service(Recorder())) as srv,
        rpc.connect(srv.address, Wrong, timeout=30) as c,
        pytest.raises(RemoteError),
    ):  # the server checks its own hint first
        c.wrong_result()

    class Narrow:
        def echo(self, value: str) -> int: ...

    with (
        serving("unix:narrow", calc_service(Recorder())) as srv,
        rpc.connect(srv.address, Narrow, timeout=30) as c,
    ):
        with pytest.raises(buzon.ValidationError):
            c.echo("x")
        assert c.in_flight == 0


@pytest.mark.parametrize("url", ["unix:stats", "shm:stats"])
def test_messages_taken_apart_in_c_are_counted_as_the_channel_counts_them(url: str) -> None:
    """The short path reads some messages without the channel's decoder (a ring's
    record parsed in C): both ends' statistics still count every message and byte."""
    with (
        serving(url, calc_service(Recorder())) as srv,
        rpc.connect(srv.address, timeout=30) as c,
    ):
        before = c.channel.statistics()
        for i in range(50):
            assert c.add(i, 1) == i + 1
        after = c.channel.statistics()
        assert after.messages_sent - before.messages_sent == 50
        assert after.messages_received - before.messages_received == 50
        sent = after.bytes_sent - before.bytes_sent
        received = after.bytes_received - before.bytes_received
        assert sent > 50 * 20 and received > 50 * 20  # header, fields and body each
        (conn,) = srv._connections
        # the server counts a reply once its send returned: the client may have read
        # the last reply a moment before that (bounded wait, not a timing claim)
        end = time.monotonic() + 10
        server = conn.ch.statistics()
        while server.messages_sent < 50 and time.monotonic() < end:
            time.sleep(0.001)
            server = conn.ch.statistics()
        assert server.messages_received >= 50 and server.messages_sent >= 50
