"""The establishment contract (checks 18-20, contracts 4h, 4d, 4e): functions of the
transport and the driver, each with its own listener and clients. The server side runs
in the driver under test (a blocking listener, or an asyncio one in an event loop);
clients are blocking ones in threads, or asyncio ones in loops of their own."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from ..._schemes import scheme_info
from ...errors import Timeout
from ._harness import TRANSPORTS, NotApplicable, T, expect, scheme_of, url_for


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


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its result or exception lands in the returned box."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # reported by the caller
            box.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, box


def _connect_and_send(url: str, driver: str, message: str, **options: Any) -> None:
    """A client in ``driver`` that connects (retrying until T), sends one message, flushes."""
    import buzon

    from ... import aio

    if driver == "sync":
        with buzon.connect(url, timeout=T, **options) as ch:
            ch.send(message, T)
            ch.flush(T)
        return

    async def main() -> None:
        ch = await aio.connect(url, timeout=T, **options)
        try:
            await ch.send(message, T)
            await ch.flush(T)
        finally:
            await ch.aclose()

    asyncio.run(main())


def check_connect_retry(transport: str, driver: str) -> None:
    """(18) connect(url, timeout=T) keeps trying until T: it reaches an endpoint that
    appears only later, and for one that never appears raises Timeout (naming the
    cause) when T has passed, not before; retry=False fails at once (4h)."""
    import buzon

    from ... import aio
    from ...errors import ConnectError

    _applies(transport)
    url, options = _establish_url(transport)
    start = time.monotonic()
    with expect(Timeout) as caught:
        if driver == "sync":
            buzon.connect(url, timeout=_LATE, **options).close()
        else:
            asyncio.run(aio.connect(url, timeout=_LATE, **options)).close()
    assert time.monotonic() - start >= _LATE * 0.9, "gave up before its timeout"
    assert isinstance(caught.value.__cause__, ConnectError), repr(caught.value.__cause__)
    url, options = _establish_url(transport)
    t, box = _in_thread(lambda: _connect_and_send(url, driver, "late", **options))
    try:
        time.sleep(_LATE)
        with buzon.listen(url, **options) as lst, lst.accept(timeout=T) as ch:
            assert ch.recv(timeout=T) == "late"
    finally:
        t.join(T * 2)
    assert box == [None], f"connect did not wait for the late endpoint: {box}"
    if transport == "udp-reliable":
        return  # retry=False: a port nobody binds may answer nothing: only the deadline tells
    url, options = _establish_url(transport)
    with expect(ConnectError):
        if driver == "sync":
            buzon.connect(url, timeout=T, retry=False, **options).close()
        else:
            asyncio.run(aio.connect(url, timeout=T, retry=False, **options)).close()


def check_accept_timeout(transport: str, driver: str) -> None:
    """(19) accept(timeout=T) bounds the wait for a connection only (4d): peers
    connecting while the server calls accept(timeout=0) in a loop are all
    established, none refused."""
    import buzon

    from ... import aio

    _applies(transport)
    if transport not in _HANDSHAKE_TRANSPORTS:
        raise NotApplicable("one channel per endpoint and no handshake: nothing can straddle")
    url, options = _establish_url(transport)
    n = 8
    listener: Any = buzon.listen(url, **options) if driver == "sync" else aio.listen(url, **options)
    with listener as lst:
        clients = [
            _in_thread(
                functools.partial(_connect_and_send, str(lst.address), "sync", f"m{i}", **options)
            )
            for i in range(n)
        ]
        got: list[Any] = []

        async def take() -> Any:
            while True:
                try:
                    return await lst.accept(timeout=0)
                except Timeout:
                    continue

        deadline = time.monotonic() + T * 2
        while len(got) < n and time.monotonic() < deadline:
            if driver == "sync":
                try:
                    ch = lst.accept(timeout=0)
                except Timeout:
                    continue
                with ch:
                    got.append(ch.recv(timeout=T))
            else:

                async def one() -> Any:
                    ch = await asyncio.wait_for(take(), T)
                    try:
                        return await ch.recv(timeout=T)
                    finally:
                        await ch.aclose()

                got.append(asyncio.run(one()))
        for t, _ in clients:
            t.join(T * 2)
        assert sorted(got) == sorted(f"m{i}" for i in range(n)), got
        assert all(box == [None] for _, box in clients), [box for _, box in clients]
        assert lst.rejected == 0


def check_admission(transport: str, driver: str) -> None:
    """(20) Admission (4e): silent connections (connect, say nothing) beyond
    max_pending evict the oldest of them; a good client still gets through."""
    import socket

    import buzon

    from ... import aio

    info = scheme_info(scheme_of(transport))
    _applies(transport)
    if transport.endswith("-reliable") or info.message_boundaries or not info.connection_oriented:
        raise NotApplicable("a silent connection needs a stream socket to hold open")
    url, options = _establish_url(transport)
    cap, silent = 4, 12
    listener: Any = (
        buzon.listen(url, max_pending=cap, **options)
        if driver == "sync"
        else aio.listen(url, max_pending=cap, **options)
    )
    socks: list[socket.socket] = []
    with listener as lst:
        try:
            addr = lst.address
            for _ in range(silent):
                family = socket.AF_UNIX if transport == "unix" else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)
                sock.connect(addr.fs_path() if transport == "unix" else (addr.host, addr.port))
            t, box = _in_thread(lambda: _connect_and_send(str(addr), "sync", "good", **options))
            try:
                if driver == "sync":
                    with lst.accept(timeout=T) as ch:
                        assert ch.recv(timeout=T) == "good"
                else:

                    async def one() -> Any:
                        ch = await lst.accept(timeout=T)
                        try:
                            return await ch.recv(timeout=T)
                        finally:
                            await ch.aclose()

                    assert asyncio.run(one()) == "good"
            finally:
                t.join(T * 2)
            assert box == [None], box
            assert lst.pending <= cap
            assert lst.evicted >= silent - cap, lst.refusals
        finally:
            for sock in socks:
                sock.close()


ESTABLISHMENT_CHECKS: dict[str, Callable[[str, str], None]] = {
    "connect_retry": check_connect_retry,
    "accept_timeout": check_accept_timeout,
    "admission": check_admission,
}
