"""A spin=0 receive with no deadline on a datagram socket sleeps in ``recvmsg`` itself
(one system call, as the raw socket), and every contract of the poll it replaced holds:
``close()`` from another thread ends it (a bound end kicks itself, a connected end shuts
its reading side), another process sharing the socket keeps receiving, a kick is never a
message nor a sender, and a socket another process made non-blocking still waits."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import buzon
from buzon.errors import ChannelClosed
from buzon.protocol._dgram import KICK
from buzon.testing.conformance._harness import url_for

pytestmark = pytest.mark.fd_check

KINDS = ["unixgram", "udp"]
JOIN = 10.0  # generous: only a waiter that never wakes gets near it


def _pair(kind: str) -> tuple[Any, buzon.Channel, buzon.Channel]:
    """(listener, bound end, connected end), spin=0, the client introduced."""
    lst = buzon.listen(url_for(kind), spin=0)
    client = buzon.connect(str(lst.address), spin=0, timeout=10)
    client.send_bytes(b"hello", timeout=10)
    bound = lst.accept(timeout=10)
    assert bound.recv_bytes(timeout=10) == b"hello"
    return lst, bound, client


@pytest.fixture(params=KINDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Any, buzon.Channel, buzon.Channel]]:
    lst, bound, client = _pair(request.param)
    try:
        yield lst, bound, client
    finally:
        client.close()
        bound.close()
        lst.close()


def _receive_in_thread(ch: buzon.Channel) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(ch.recv_bytes())
        except BaseException as exc:  # the test looks at it
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(0.2)  # into its wait (no assertion on how long)
    assert t.is_alive(), "the receive did not block"
    return t, out


def _receiver(ch: buzon.Channel) -> Any:
    return ch._core.transport.receiver  # type: ignore[attr-defined]


@pytest.mark.parametrize("end", ["bound", "connected"])
def test_the_wait_sleeps_in_recvmsg_and_close_ends_it(
    pair: tuple[Any, buzon.Channel, buzon.Channel], end: str
) -> None:
    _lst, bound, client = pair
    ch = bound if end == "bound" else client
    receiver = _receiver(ch)
    assert receiver.blocks
    assert not fcntl.fcntl(ch._core.transport.read_fileno(), fcntl.F_GETFL) & os.O_NONBLOCK  # type: ignore[attr-defined]
    t, out = _receive_in_thread(ch)
    assert receiver.in_block  # asleep in recvmsg itself, not in poll
    ch.close()
    t.join(JOIN)
    assert not t.is_alive(), "close() did not end the wait"
    assert len(out) == 1 and isinstance(out[0], ChannelClosed), out


@pytest.mark.parametrize("kind", KINDS)
def test_a_bound_end_whose_name_is_gone_is_still_woken(kind: str) -> None:
    lst, bound, client = _pair(kind)
    lst.close()  # a unixgram file unlinked: the kick has no address, the shutdown ends it
    try:
        t, out = _receive_in_thread(bound)
        bound.close()
        t.join(JOIN)
        assert not t.is_alive() and isinstance(out[0], ChannelClosed), out
    finally:
        client.close()
        bound.close()


def test_a_kick_is_never_a_message_nor_a_sender(
    pair: tuple[Any, buzon.Channel, buzon.Channel],
) -> None:
    lst, bound, client = pair
    family = socket.AF_INET if str(lst.address).startswith("udp") else socket.AF_UNIX
    stranger = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_UNIX:
            stranger.bind(os.path.join(os.environ["BUZON_RUNTIME_DIR"], "stranger.dgram"))
            to: Any = bound._core.transport.sock.getsockname()  # type: ignore[attr-defined]
        else:
            to = ("127.0.0.1", lst.address.port)  # type: ignore[attr-defined]
        t, out = _receive_in_thread(bound)
        stranger.sendto(KICK, to)  # wakes the wait: not closing, so it sleeps again
        t.join(0.2)
        assert t.is_alive() and out == []
        client.send_bytes(b"real")
        t.join(JOIN)
        assert out == [b"real"]
        stranger.sendto(KICK, to)  # and the poll path (a deadline) skips it too
        client.send_bytes(b"second")
        assert bound.recv_bytes(timeout=10) == b"second"
        bound.send_bytes(b"reply")  # to the client, never to the kicker
        assert client.recv_bytes(timeout=10) == b"reply"
        stranger.settimeout(0.05)
        with pytest.raises(OSError):
            stranger.recv(64)
    finally:
        stranger.close()


@pytest.mark.parametrize("end", ["bound", "connected"])
def test_a_socket_made_non_blocking_elsewhere_still_waits(
    pair: tuple[Any, buzon.Channel, buzon.Channel], end: str
) -> None:
    _lst, bound, client = pair
    ch, peer = (bound, client) if end == "bound" else (client, bound)
    fd = ch._core.transport.read_fileno()  # type: ignore[attr-defined]
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    t, out = _receive_in_thread(ch)  # recvmsg says EAGAIN: the wait polls instead
    peer.send_bytes(b"late")
    t.join(JOIN)
    assert out == [b"late"]
    t, out = _receive_in_thread(ch)
    ch.close()
    t.join(JOIN)
    assert not t.is_alive() and isinstance(out[0], ChannelClosed), out


@pytest.mark.parametrize("kind", KINDS)
def test_a_process_sharing_the_socket_keeps_receiving_after_a_close_ended_a_wait(
    kind: str,
) -> None:
    """The end of a wait never reaches another process's copy of the socket: a bound
    end (which a fork shares) is kicked, never shut down; a connected end that a fork
    shared never sleeps in recvmsg, so nothing needs shutting down."""
    lst, bound, client = _pair(kind)
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(go_w)
            os.read(go_r, 1)  # the parent closed its bound end
            sock = bound._core.transport.sock  # type: ignore[attr-defined]
            sock.settimeout(0.3)  # nothing sent yet: a shut-down socket says b"" at once
            try:
                os.write(res_w, b"early " + sock.recv(65536))
            except TimeoutError:
                os.write(res_w, b"waited")
            os.read(go_r, 1)
            sock.settimeout(10)
            os.write(res_w, sock.recv(65536)[8:])
            status = 0
        finally:
            os._exit(status)
    os.close(go_r)
    os.close(res_w)
    try:
        assert not _receiver(client).blocks  # shared by the fork: its waits poll
        assert _receiver(bound).blocks  # a bound end's kick reaches only readers
        t, out = _receive_in_thread(bound)
        bound.close()
        t.join(JOIN)
        assert not t.is_alive() and isinstance(out[0], ChannelClosed), out
        os.write(go_w, b"g")
        assert os.read(res_r, 100) == b"waited"
        os.write(go_w, b"g")
        client.send_bytes(b"to-the-child")  # what the child's copy receives
        assert os.read(res_r, 100) == b"to-the-child"
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(go_w)
        os.close(res_r)
        client.close()
        lst.close()


def _simplex(scheme: str) -> Iterator[tuple[Any, buzon.Channel, buzon.Channel]]:
    """(listener, reading end, writing end) of one queue or FIFO, spin=0; closed after."""
    lst = buzon.listen(url_for(scheme), spin=0)
    writer = buzon.connect(str(lst.address), spin=0, timeout=10)
    reader = lst.accept(timeout=10)
    try:
        yield lst, reader, writer
    finally:
        writer.close()
        reader.close()
        lst.close()


@pytest.fixture
def mq() -> Iterator[tuple[Any, buzon.Channel, buzon.Channel]]:
    yield from _simplex("mq")


def test_a_queue_receive_sleeps_in_mq_receive_and_close_ends_it(
    mq: tuple[Any, buzon.Channel, buzon.Channel],
) -> None:
    _lst, reader, writer = mq
    receiver = _receiver(reader)
    assert receiver.blocks
    t, out = _receive_in_thread(reader)
    assert receiver.in_block  # asleep in mq_receive itself, not in poll
    writer.send_bytes(b"first")
    t.join(JOIN)
    assert out == [b"first"]
    t, out = _receive_in_thread(reader)
    reader.close()
    t.join(JOIN)
    assert not t.is_alive() and isinstance(out[0], ChannelClosed), out


def test_a_queue_kick_is_never_a_message_nor_a_priority(
    mq: tuple[Any, buzon.Channel, buzon.Channel],
) -> None:
    from buzon import _posixmq

    _lst, reader, writer = mq
    name = reader._core.transport.name  # type: ignore[attr-defined]
    q = _posixmq.open(name, os.O_WRONLY | os.O_NONBLOCK)
    try:
        t, out = _receive_in_thread(reader)
        assert _posixmq.send(q, KICK, 7)  # wakes the wait: not closing, it sleeps again
        t.join(0.2)
        assert t.is_alive() and out == []
        writer.send_bytes(b"real")
        t.join(JOIN)
        assert out == [b"real"]
        assert _posixmq.send(q, KICK, 9)  # left in the queue: the next receive skips it
        writer.send_bytes(b"second")
        assert reader.recv_bytes(timeout=10) == b"second"
        assert reader._core.transport.last_priority == 0  # type: ignore[attr-defined]
    finally:
        _posixmq.close(q)


def test_a_queue_made_non_blocking_elsewhere_still_waits(
    mq: tuple[Any, buzon.Channel, buzon.Channel],
) -> None:
    from buzon import _posixmq

    _lst, reader, writer = mq
    _posixmq.setblocking(reader._core.transport.read_fileno(), False)  # type: ignore[attr-defined]
    t, out = _receive_in_thread(reader)  # mq_receive says EAGAIN: the wait polls instead
    writer.send_bytes(b"late")
    t.join(JOIN)
    assert out == [b"late"]
    t, out = _receive_in_thread(reader)
    reader.close()
    t.join(JOIN)
    assert not t.is_alive() and isinstance(out[0], ChannelClosed), out


@pytest.fixture
def fifo() -> Iterator[tuple[Any, buzon.Channel, buzon.Channel]]:
    yield from _simplex("fifo")


def _fifo_waiter(ch: buzon.Channel) -> Any:
    return ch._core.wait_receiver  # type: ignore[attr-defined]


def test_a_fifo_receive_sleeps_in_read_and_close_ends_it(
    fifo: tuple[Any, buzon.Channel, buzon.Channel],
) -> None:
    _lst, reader, writer = fifo
    assert _fifo_waiter(reader).blocks
    bfd = reader._core.transport._bfd  # type: ignore[attr-defined]
    assert not fcntl.fcntl(bfd, fcntl.F_GETFL) & os.O_NONBLOCK
    t, out = _receive_in_thread(reader)
    writer.send_bytes(b"first")
    t.join(JOIN)
    assert out == [b"first"]
    t, out = _receive_in_thread(reader)
    reader.close()
    t.join(JOIN)
    assert not t.is_alive() and isinstance(out[0], ChannelClosed), out
    assert reader.statistics().rejected_frames == 0  # the nudge is no rejected byte


def test_a_fifo_nudge_without_a_close_is_skipped(
    fifo: tuple[Any, buzon.Channel, buzon.Channel],
) -> None:
    _lst, reader, writer = fifo
    t, out = _receive_in_thread(reader)
    reader._core.transport._nudge()  # type: ignore[attr-defined]  # as a close's, but no close
    t.join(0.2)
    assert t.is_alive() and out == []
    writer.send_bytes(b"real")
    t.join(JOIN)
    assert out == [b"real"]
    assert reader.statistics().rejected_frames == 0


def test_a_fifo_made_non_blocking_elsewhere_still_waits(
    fifo: tuple[Any, buzon.Channel, buzon.Channel],
) -> None:
    _lst, reader, writer = fifo
    os.set_blocking(reader._core.transport._bfd, False)  # type: ignore[attr-defined]
    t, out = _receive_in_thread(reader)  # read says EAGAIN: the wait polls instead
    writer.send_bytes(b"late")
    t.join(JOIN)
    assert out == [b"late"]
    t, out = _receive_in_thread(reader)
    reader.close()
    t.join(JOIN)
    assert not t.is_alive() and isinstance(out[0], ChannelClosed), out
