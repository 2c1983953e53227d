"""A TCP close must not reset the connection while the kernel still holds bytes of
messages whose send returned. Closing a TCP socket with unread input (CREDITs of
receipts, a reply nobody reads) makes the kernel answer with a reset and drop what it
had not sent yet: the receiver got a stream cut inside a frame. Both drivers linger
(bounded by close_timeout) until the peer's kernel acknowledged everything, reading
input away meanwhile."""

from __future__ import annotations

import asyncio
import select
import threading
from typing import Any

import pytest

import buzon

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: more than the peer's receive window


def _pair() -> tuple[Any, buzon.Channel, buzon.Channel]:
    lst = buzon.listen("tcp://127.0.0.1:0")
    accepted: list[buzon.Channel] = []
    t = threading.Thread(target=lambda: accepted.append(lst.accept(timeout=10)))
    t.start()
    c = buzon.connect(str(lst.address), timeout=10)
    t.join(10)
    return lst, c, accepted[0]


def _unread_input_at(ch: Any) -> None:
    """Wait until ``ch``'s socket holds input it will never read."""
    assert select.select([ch.fileno()], [], [], 10)[0], "the reply did not arrive"


@pytest.mark.fd_check
def test_a_blocking_close_with_unread_input_loses_nothing(runtime_dir: str) -> None:
    lst, c, s = _pair()
    with lst, s:
        s.send_bytes(b"a reply the client never reads")
        _unread_input_at(c)
        c.send_bytes(PAYLOAD)  # returns with most of it still in the kernel
        c.send_bytes(b"last")
        c.close()
        assert s.recv_bytes(timeout=30) == PAYLOAD
        assert s.recv_bytes(timeout=30) == b"last"
        with pytest.raises(buzon.EndOfChannel):
            s.recv_bytes(timeout=30)


@pytest.mark.fd_check
@pytest.mark.parametrize("how", ["aclose", "close"])
def test_an_asyncio_close_with_unread_input_loses_nothing(runtime_dir: str, how: str) -> None:
    lst = buzon.listen("tcp://127.0.0.1:0")
    got: list[Any] = []
    connected = threading.Event()

    def receive() -> None:
        with lst.accept(timeout=10) as s:
            assert connected.wait(10)  # the reply comes after the client's handshake
            s.send_bytes(b"a reply the client never reads")
            try:
                got.append(s.recv_bytes(timeout=30))
                got.append(s.recv_bytes(timeout=30))
            except buzon.BuzonError as exc:  # a reset cut the stream
                got.append(exc)

    async def main() -> None:
        c = await buzon.aio.connect(str(lst.address), timeout=10)
        connected.set()
        _unread_input_at(c)
        await c.send_bytes(PAYLOAD)
        await c.send_bytes(b"last")
        if how == "aclose":
            await c.aclose()
        else:
            c.close()  # lingers in the background, on this loop
            for _ in range(3000):
                if t.is_alive():
                    await asyncio.sleep(0.01)

    with lst:
        t = threading.Thread(target=receive)
        t.start()
        asyncio.run(main())
        t.join(30)
    assert got == [PAYLOAD, b"last"]


@pytest.mark.fd_check
def test_a_close_does_not_wait_on_unix_or_when_all_was_acknowledged(runtime_dir: str) -> None:
    """Only TCP lingers, and only while bytes are unacknowledged."""
    lst, c, s = _pair()
    with lst, s:
        c.send_bytes(b"small")
        assert s.recv_bytes(timeout=10) == b"small"
        for _ in range(1000):  # the ack of a received message comes at once on loopback
            if not c._core.lingers():
                break
            select.select([], [], [], 0.005)
        assert not c._core.lingers()
        c.close()
    a, b = buzon.pipe()
    with a, b:
        assert not a._core.lingers()


@pytest.mark.fd_check
def test_a_unix_close_with_unread_input_ends_the_peer_cleanly(runtime_dir: str) -> None:
    """A Unix stream socket closed with unread input (the receiver's CREDITs of a
    channel with a capacity) made the peer's kernel report a reset: the receiver got
    everything, then ``EndOfChannel('... Connection reset by peer')`` instead of the
    peer's plain close. The close reads that input away first."""
    lst = buzon.listen("unix:unreadcredits", capacity=4)
    box: list[buzon.Channel] = []
    t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
    t.start()
    a = buzon.connect("unix:unreadcredits", timeout=10, capacity=4)
    t.join(10)
    lst.close()
    with box[0] as b:
        got: list[Any] = []
        for i in range(40):
            a.send(i, timeout=10)
            got.append(b.recv(timeout=10))  # each take writes a CREDIT a never reads
        _unread_input_at(a)
        a.close()
        with pytest.raises(buzon.EndOfChannel) as ended:
            b.recv(timeout=10)
        assert got == list(range(40))
        assert "reset" not in str(ended.value), ended.value
