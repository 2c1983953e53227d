"""The establishment contract (checks 18-20, contracts 4h, 4d, 4e): functions of the
transport and the driver, each with its own listener and clients, written once on a
:class:`Side` of the driver under test, which plays both roles: asyncio listeners and
clients as tasks on one loop, or blocking ones in threads."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..._schemes import scheme_info
from ...errors import Timeout
from ._harness import (
    TRANSPORTS,
    NotApplicable,
    Server,
    Side,
    T,
    expect,
    gather,
    run_side,
    scheme_of,
    url_for,
)


def _establishes(transport: str) -> bool:
    """Has an address to connect to, and a peer that answers (not plain inet datagrams,
    which no one acknowledges)."""
    info = scheme_info(scheme_of(transport))
    lossy = info.address == "inet" and not info.connection_oriented
    return info.has_url and (transport.endswith("-reliable") or not lossy)


ESTABLISHMENT_TRANSPORTS = tuple(t for t in TRANSPORTS if _establishes(t))


def _applies(transport: str) -> None:
    if transport in ESTABLISHMENT_TRANSPORTS:
        return
    if not scheme_info(scheme_of(transport)).has_url:
        raise NotApplicable("made in one call (buzon.pipe()): nothing to connect to or accept")
    raise NotApplicable("plain inet datagrams: nobody answers, so nothing tells a client in")


_HANDSHAKE_TRANSPORTS = tuple(
    t for t in TRANSPORTS if t.endswith("-reliable") or scheme_info(scheme_of(t)).handshake
)
_LATE = 0.2  # the listener appears this long after the client started connecting


def _establish_url(transport: str) -> tuple[str, dict[str, Any]]:
    """A URL nobody listens on yet (for tcp/udp a port just found free) and options."""
    import socket

    options: dict[str, Any] = {"reliable": True} if transport.endswith("-reliable") else {}
    scheme = transport.removesuffix("-reliable")
    info = scheme_info(scheme)
    if info.address == "inet":
        kind = socket.SOCK_STREAM if info.connection_oriented else socket.SOCK_DGRAM
        probe = socket.socket(socket.AF_INET, kind)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        return f"{scheme}://127.0.0.1:{port}", options
    return url_for(transport), options


async def _connect_and_send(side: Side, url: str, message: str, **options: Any) -> None:
    """A client that connects (retrying until T), sends one message, flushes, closes."""
    ch = await side.connect(url, timeout=T, **options)
    try:
        await ch.send(message, T)
        await ch.flush(T)
    finally:
        await ch.close()


async def _take_one(server: Server, timeout: float | None = T) -> Any:
    ch = await server.accept(timeout)
    try:
        return await ch.recv(T)
    finally:
        await ch.close()


def check_connect_retry(transport: str, driver: str) -> None:
    """(18) connect(url, timeout=T) keeps trying until T: it reaches an endpoint that
    appears only later, and for one that never appears raises Timeout (naming the
    cause) when T has passed, not before; retry=False fails at once (4h)."""
    from ...errors import ConnectError

    _applies(transport)

    async def check(side: Side) -> None:
        url, options = _establish_url(transport)
        start = time.monotonic()
        with expect(Timeout) as caught:
            await side.connect(url, timeout=_LATE, **options)
        assert time.monotonic() - start >= _LATE * 0.9, "gave up before its timeout"
        assert isinstance(caught.value.__cause__, ConnectError), repr(caught.value.__cause__)

        url, options = _establish_url(transport)

        async def late_server() -> Any:
            await asyncio.sleep(_LATE)  # the client is trying by now
            server = side.listen(url, **options)
            try:
                return await _take_one(server)
            finally:
                server.close()

        _, got = await gather(_connect_and_send(side, url, "late", **options), late_server())
        assert got == "late", got
        if transport == "udp-reliable":
            return  # retry=False: a port nobody binds may answer nothing: only the deadline tells
        url, options = _establish_url(transport)
        with expect(ConnectError):
            await (await side.connect(url, timeout=T, retry=False, **options)).close()

    run_side(check, driver)


def check_accept_timeout(transport: str, driver: str) -> None:
    """(19) accept(timeout=T) bounds the wait for a connection only (4d): peers
    connecting while the server calls accept(timeout=0) in a loop are all
    established, none refused."""
    _applies(transport)
    if transport not in _HANDSHAKE_TRANSPORTS:
        raise NotApplicable("one channel per endpoint and no handshake: nothing can straddle")
    n = 8

    async def check(side: Side) -> None:
        url, options = _establish_url(transport)
        server = side.listen(url, **options)
        try:
            address = str(server.lst.address)

            async def serve() -> list[Any]:
                got: list[Any] = []
                deadline = time.monotonic() + T * 2
                while len(got) < n and time.monotonic() < deadline:
                    try:
                        got.append(await _take_one(server, 0))
                    except Timeout:
                        await asyncio.sleep(0.001)  # let the clients' tasks run
                return got

            clients = [_connect_and_send(side, address, f"m{i}", **options) for i in range(n)]
            *_, got = await gather(*clients, serve())
            assert sorted(got) == sorted(f"m{i}" for i in range(n)), got
            assert server.lst.rejected == 0
        finally:
            server.close()

    run_side(check, driver)


def check_admission(transport: str, driver: str) -> None:
    """(20) Admission (4e): silent connections (connect, say nothing) beyond
    max_pending evict the oldest of them; a good client still gets through."""
    import socket

    _applies(transport)
    info = scheme_info(scheme_of(transport))
    if transport.endswith("-reliable") or info.message_boundaries or not info.connection_oriented:
        raise NotApplicable("a silent connection needs a stream socket to hold open")
    cap, silent = 4, 12

    async def check(side: Side) -> None:
        url, options = _establish_url(transport)
        server = side.listen(url, max_pending=cap, **options)
        socks: list[socket.socket] = []
        try:
            addr = server.lst.address
            for _ in range(silent):
                family = socket.AF_UNIX if info.address == "local" else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)
                sock.connect(addr.fs_path() if info.address == "local" else (addr.host, addr.port))
            _, got = await gather(
                _connect_and_send(side, str(addr), "good", **options), _take_one(server)
            )
            assert got == "good", got
            assert server.lst.pending <= cap
            assert server.lst.evicted >= silent - cap, server.lst.refusals
        finally:
            for sock in socks:
                sock.close()
            server.close()

    run_side(check, driver)
