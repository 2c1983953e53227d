"""Establishment contracts 4d and 4e (docs/semantics.md, "Establishing a channel").

* 4d: ``accept(timeout=T)`` bounds the wait for a connection only: a peer whose
  handshake straddles T is established by a later ``accept``, never dropped; a peer
  that is refused hears the cause; a bad handshake of any size never makes ``accept``
  raise.
* 4e: handshakes are time-boxed per peer and progress concurrently; connections that
  have not finished theirs take no handler slot, and silent ones cannot lock good
  clients out (the oldest silent one is evicted when too many are pending).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

import buzon
from buzon import aio
from buzon.protocol.frames import CodecId, FrameDecoder, Kind, encode_frame
from buzon.protocol.handshake import Handshake

pytestmark = pytest.mark.fd_check

T = 10.0  # generous bound on waits that should end much sooner


def _raw_socket(addr: buzon.Address) -> socket.socket:
    if addr.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = addr.fs_path()
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (addr.host, addr.port)
    sock.settimeout(T)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def _read_frame(sock: socket.socket) -> Any:
    """The next frame the server sends, or None at EOF."""
    dec = FrameDecoder()
    while not dec.frames:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not data:
            return None
        dec.feed(data)
    return dec.next_frame()


def _hello_bytes(**fields: Any) -> bytes:
    body = {"v": 1, "role": "client", "pid": os.getpid(), "opts": {}}
    body.update(fields)
    data = msgspec.msgpack.encode(body)
    return b"".join(bytes(p) for p in encode_frame(Kind.HELLO, CodecId.MSGPACK, data))


def _good_round_trip(lst: buzon.Listener, **options: Any) -> None:
    """A well-behaved client (in a thread) gets through ``lst`` and is heard."""
    box: list[object] = []

    def client() -> None:
        try:
            with buzon.connect(str(lst.address), timeout=T, **options) as ch:
                ch.send("through")
                box.append(ch.recv(timeout=T))
        except buzon.BuzonError as exc:
            box.append(exc)

    t = threading.Thread(target=client)
    t.start()
    try:
        with lst.accept(timeout=T) as ch:
            assert ch.recv(timeout=T) == "through"
            ch.send("back")
    finally:
        t.join(T)
    assert box == ["back"]


@pytest.fixture(params=["unix", "tcp"])
def url(request: pytest.FixtureRequest) -> str:
    return "unix:adm" if request.param == "unix" else "tcp://127.0.0.1:0"


# ------------------------------------------------------------------ 4d: accept's timeout


def test_a_handshake_straddling_the_accept_timeout_is_established(url: str) -> None:
    with buzon.listen(url) as lst:
        sock = _raw_socket(lst.address)
        try:
            with pytest.raises(buzon.Timeout):
                lst.accept(timeout=0.05)  # the peer connected but has not said HELLO yet
            hs = Handshake("client", pid=os.getpid(), options={})
            sock.sendall(hs.outgoing())
            with lst.accept(timeout=T) as ch:
                frame = _read_frame(sock)
                assert frame is not None, "the listener dropped the peer"
                hs.receive(frame)
                assert hs.done
                sock.sendall(
                    b"".join(bytes(p) for p in encode_frame(Kind.DATA, CodecId.RAW, b"hi"))
                )
                assert ch.recv_bytes(timeout=T) == b"hi"
            assert lst.rejected == 0
        finally:
            sock.close()


def test_many_peers_and_tiny_accept_timeouts_drop_nobody(url: str) -> None:
    n = 60
    with buzon.listen(url) as lst:
        results: list[object] = []

        def client() -> None:
            try:
                with buzon.connect(str(lst.address), timeout=T) as ch:
                    results.append(ch.recv(timeout=T))
            except buzon.BuzonError as exc:
                results.append(exc)

        threads = [threading.Thread(target=client) for _ in range(n)]
        for t in threads:
            t.start()
        accepted = []
        while len(accepted) < n:
            try:
                ch = lst.accept(timeout=0)
            except buzon.Timeout:
                continue
            ch.send("ok")
            accepted.append(ch)
        for t in threads:
            t.join(T)
        for ch in accepted:
            ch.close()
        assert results == ["ok"] * n
        assert lst.rejected == 0


# ------------------------------------------------------ 4d: a bad handshake of any size


@pytest.mark.parametrize("size", [10, 1000, 4060, 3000_000])
@pytest.mark.parametrize("authkey", [None, b"k" * 32])
def test_a_bad_hello_of_any_size_never_makes_accept_raise(
    url: str, size: int, authkey: bytes | None
) -> None:
    with buzon.listen(url, authkey=authkey) as lst:
        sock = _raw_socket(lst.address)
        try:
            try:
                sock.sendall(_hello_bytes(role="x" * size))
            except OSError:
                pass  # the listener may refuse before reading it all
            with pytest.raises(buzon.Timeout):
                lst.accept(timeout=0.5)
            frame = _read_frame(sock)
            if frame is not None or size < 4000:  # (a reset may beat a refusal to a writer)
                assert frame is not None and frame.kind == Kind.WELCOME
                assert len(bytes(frame.body)) < 4096
        finally:
            sock.close()
        assert lst.rejected >= 1
        _good_round_trip(lst, authkey=authkey)


# ------------------------------------------------------------ 4d: refusals name a cause


def test_a_client_refused_for_capacity_hears_max_clients(url: str) -> None:
    release = threading.Event()

    def handler(ch: buzon.Channel) -> None:
        ch.send("in")
        release.wait(T)

    server = buzon.Server(url, handler, max_clients=1)
    t = threading.Thread(target=server.serve_forever)
    t.start()
    try:
        first = buzon.connect(str(server.address), timeout=T)
        assert first.recv(timeout=T) == "in"
        with pytest.raises(buzon.HandshakeError, match="max_clients=1"):
            buzon.connect(str(server.address), timeout=T).close()
        release.set()
        first.close()
    finally:
        release.set()
        server.shutdown()
        t.join(T)
    assert server.refused == 1


def test_a_silent_peer_hears_that_its_handshake_timed_out(url: str) -> None:
    with buzon.listen(url, handshake_timeout=0.2) as lst:
        sock = _raw_socket(lst.address)
        try:
            with pytest.raises(buzon.Timeout):
                lst.accept(timeout=1.0)  # the peer's deadline passes meanwhile
            frame = _read_frame(sock)
            assert frame is not None and frame.kind == Kind.WELCOME
            assert b"timed out" in bytes(frame.body)
        finally:
            sock.close()
        assert lst.rejected == 1
        assert lst.refusals == {"timeout": 1}


# ---------------------------------------------------------------- 4e: silent connections


@pytest.fixture
def silent() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def _open_silent(addr: buzon.Address, n: int, socks: list[socket.socket]) -> None:
    """``n`` connections that never say a word (fewer if the listen backlog fills)."""
    unix = addr.scheme == "unix"
    for _ in range(n):
        sock = socket.socket(socket.AF_UNIX if unix else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(addr.fs_path() if unix else (addr.host, addr.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()  # the backlog is full: what connected is enough
            time.sleep(0.05)
            continue
        sock.settimeout(T)
        socks.append(sock)


@pytest.mark.parametrize("mode", ["thread", "async"])
def test_silent_connections_do_not_lock_out_good_clients(
    url: str, mode: str, silent: list[socket.socket]
) -> None:
    good = 60

    def handler(ch: buzon.Channel) -> None:
        ch.send(ch.recv(timeout=T))

    async def ahandler(ch: aio.Channel) -> None:
        await ch.send(await ch.recv(timeout=T))

    if mode == "thread":
        server: Any = buzon.Server(url, handler)
        t = threading.Thread(target=server.serve_forever)
        address = str(server.address)
        stop = server.shutdown
    else:
        started = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            async def main() -> None:
                box["loop"] = asyncio.get_running_loop()
                box["server"] = s = aio.Server(url, ahandler)
                started.set()
                await s.serve_forever()

            asyncio.run(main())

        t = threading.Thread(target=run)
    t.start()
    if mode == "async":
        assert started.wait(T)
        server = box["server"]
        address = str(server.address)

        def stop() -> None:
            box["loop"].call_soon_threadsafe(server.shutdown)

    try:
        _open_silent(buzon.parse_address(address), 300, silent)
        ok = 0
        for i in range(good):
            try:
                with buzon.connect(address, timeout=T) as ch:
                    ch.send(i)
                    ok += ch.recv(timeout=T) == i
            except buzon.BuzonError:
                pass
        assert ok == good
    finally:
        stop()
        t.join(T)
    assert not t.is_alive()


def test_pending_handshakes_are_capped_oldest_silent_first(
    url: str, silent: list[socket.socket]
) -> None:
    with buzon.listen(url, max_pending=8) as lst:
        _open_silent(lst.address, 20, silent)
        # an accept takes the queued connections a batch of max_pending at a time and
        # raises Timeout at its deadline even if some are still in the kernel's backlog
        # (they are the next accept's): under load one 0.3 s accept may see only the
        # first batch (evicted 0), so accept again until all twenty were met
        end = time.monotonic() + T / 2  # well inside the silent peers' handshake_timeout
        while True:
            with pytest.raises(buzon.Timeout):
                lst.accept(timeout=0.3)
            if lst.evicted >= 12 or time.monotonic() > end:
                break
        assert lst.pending == 8
        assert lst.evicted == 12
        # the first twelve were evicted, and were told so
        frame = _read_frame(silent[0])
        assert frame is not None and b"pending" in bytes(frame.body)
        _good_round_trip(lst)


# -------------------------------------------------------------------- the asyncio driver


def test_aio_accept_timeout_does_not_drop_a_straddling_handshake(url: str) -> None:
    async def main() -> None:
        with aio.listen(url) as lst:
            sock = _raw_socket(lst.address)
            try:
                with pytest.raises(buzon.Timeout):
                    await lst.accept(timeout=0.05)
                hs = Handshake("client", pid=os.getpid(), options={})
                sock.sendall(hs.outgoing())
                ch = await lst.accept(timeout=T)
                ch.close()
                frame = _read_frame(sock)
                assert frame is not None
                hs.receive(frame)
                assert hs.done
            finally:
                sock.close()
            bad = _raw_socket(lst.address)
            try:
                bad.sendall(_hello_bytes(role="x" * 4060))
                with pytest.raises(buzon.Timeout):
                    await lst.accept(timeout=0.5)
            finally:
                bad.close()
            assert lst.rejected == 1

    asyncio.run(main())


def test_aio_server_refuses_beyond_max_clients_with_the_cause(url: str) -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def handler(ch: aio.Channel) -> None:
            await ch.send("in")
            await release.wait()

        server = aio.Server(url, handler, max_clients=1)
        serving = asyncio.ensure_future(server.serve_forever())
        try:
            first = await aio.connect(str(server.address), timeout=T)
            assert await first.recv(timeout=T) == "in"
            with pytest.raises(buzon.HandshakeError, match="max_clients=1"):
                (await aio.connect(str(server.address), timeout=T)).close()
            release.set()
            await first.aclose()
        finally:
            release.set()
            server.shutdown()
            await asyncio.wait_for(serving, T)
        assert server.refused == 1

    asyncio.run(main())


# ------------------------------------------------- buzon.wait and a pending peer's deadline


@pytest.mark.parametrize("driver", ["sync", "aio"])
def test_wait_on_a_listener_refuses_a_silent_peer_at_its_deadline(url: str, driver: str) -> None:
    """``buzon.wait`` on a listener wakes for a pending peer's handshake deadline, so
    the silent peer hears "timed out" then, not when the wait ends. On f43dbb5 it was
    told only after the wait's own timeout (here 3 T)."""
    lst = (
        buzon.listen(url, handshake_timeout=0.2)
        if driver == "sync"
        else buzon.aio.listen(url, handshake_timeout=0.2)
    )
    with lst:
        sock = _raw_socket(lst.address)
        waited: list[object] = []

        def wait() -> None:
            if driver == "sync":
                waited.append(buzon.wait([lst], timeout=3 * T))
            else:
                waited.append(asyncio.run(buzon.aio.wait([lst], timeout=3 * T)))

        t = threading.Thread(target=wait)
        t.start()
        try:
            frame = _read_frame(sock)  # the socket's own timeout is T
            assert frame is not None and frame.kind == Kind.WELCOME
            assert b"timed out" in bytes(frame.body)
            good = buzon.connect(str(lst.address), timeout=T)  # ends the wait
            t.join(T)
            assert waited == [[lst]]
            good.close()
        finally:
            sock.close()
            t.join(3 * T)


# ----------------------------------------- accept_transport + establish go through admission


@pytest.mark.parametrize("driver", ["sync", "aio"])
def test_the_two_halves_count_and_tell_refusals(url: str, driver: str) -> None:
    """``accept_transport`` + ``establish`` (a fork-per-client server's halves) refuse
    as ``accept`` does: the peer hears the cause, the listener counts it. On f43dbb5
    ``refusals`` stayed empty."""
    listen = buzon.listen if driver == "sync" else buzon.aio.listen
    with listen(url, handshake_timeout=0.3) as lst:
        sock = _raw_socket(lst.address)  # says nothing: its handshake times out
        try:
            if driver == "sync":
                transport = lst.accept_transport(timeout=T)  # type: ignore[union-attr]
                with pytest.raises(buzon.HandshakeError, match="timed out"):
                    lst.establish(transport, timeout=T)  # type: ignore[union-attr]
            else:

                async def both() -> None:
                    transport = await lst.accept_transport(timeout=T)  # type: ignore[misc]
                    await lst.establish(transport, timeout=T)  # type: ignore[misc]

                with pytest.raises(buzon.HandshakeError, match="timed out"):
                    asyncio.run(both())
            frame = _read_frame(sock)
            assert frame is not None and frame.kind == Kind.WELCOME
            assert b"timed out" in bytes(frame.body)
        finally:
            sock.close()
        assert lst.refusals == {"timeout": 1}
        assert lst.rejected == 1
