"""The contracts about giving up and hostile peers (checks 21-26: 4a, 4b, 4c, 4f, 4g
of issue 9).

Each is a function of the transport and the driver that opens the pairs it needs
(:func:`run_check`) and raises :class:`NotApplicable`, saying why, where the
contract has no meaning for a transport.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import multiprocessing
import os
import time
from dataclasses import replace
from typing import Any

from ..._schemes import scheme_info
from ...errors import EndOfChannel, FrameError, Full, Timeout, UnsupportedOperation
from ._harness import (
    CAPACITY_TRANSPORTS,
    NotApplicable,
    Pair,
    T,
    expect,
    gather,
    run_check,
    scheme_of,
)

MIB = 1 << 20
BOUND = MIB  # what a receiver may commit ahead of the bytes that arrived

# -- 4a: a send that raises delivered nothing ------------------------------------------

BIG = 8_000_000  # far more than any kernel buffer: a send must wait for the reader
PAD = b"f" * 1000


async def _give_up(p: Pair, obj: Any, timeout: float, cancel: bool) -> bool:
    """Send ``obj`` giving up after ``timeout``: by the send's own timeout, or (asyncio,
    ``cancel``) by cancelling it from outside. True if it returned, False if it gave up."""
    try:
        if cancel:
            await asyncio.wait_for(p.a.ch.send(obj), timeout)
        else:
            await p.a.send(obj, timeout)
    except (TimeoutError, Timeout):
        return False
    return True


def _fill(p: Pair) -> int:
    """send_nowait numbered messages (1 KB each) until the link is full; how many."""
    n = 0
    while n < 200_000:
        try:
            p.a.send_nowait({"i": n, "p": PAD})
        except Full:
            return n
        n += 1
    raise AssertionError("200000 messages never filled the link")


async def _gave_up_delivers_nothing(p: Pair, cancel: bool) -> None:
    if p.a.properties.max_message is None:  # a stream: time out half-way into a frame
        accepted = []
        big = {"p": b"x" * BIG}
        returned = await _give_up(p, big, 0.2, cancel)
    else:  # whole messages: time out waiting for room
        accepted = [{"i": i, "p": PAD} for i in range(_fill(p))]
        big = {"p": b"late"}
        returned = await _give_up(p, big, 0.05, cancel)
    expected: list[Any] = [*accepted, *([big] if returned else []), "after"]

    async def drain() -> list[Any]:
        return [await p.b.recv(T) for _ in expected]

    _, got = await gather(p.a.send("after", T), drain())
    assert got == expected, f"gave up: {not returned}; got {len(got)} messages"
    with expect(Timeout):  # and nothing more
        await p.b.recv(0.05)


async def _retry_until_sent(p: Pair, n: int, size: int, cancel: bool) -> int:
    """Send n messages, each retried until a send returns; how many attempts gave up."""
    gave_up = 0
    for i in range(n):
        while not await _give_up(p, {"i": i, "p": b"r" * size}, 0.01, cancel and i % 2 == 0):
            gave_up += 1
            assert gave_up < 5000, "a retried send never got through"
    return gave_up


async def _slow_reader(p: Pair, n: int) -> list[int]:
    out = []
    for _ in range(n):
        await asyncio.sleep(0.05)  # the sender gives up a few times meanwhile
        out.append((await p.b.recv(T))["i"])
    return out


def check_giving_up(transport: str, driver: str) -> None:
    """(26) A send that gives up delivered nothing; one that returned is delivered (4a).
    A send that times out half-way into a frame far larger than the link's buffers
    (streams) or while the link is full (message links), or, in asyncio, that is
    cancelled from outside (wait_for), delivers none of its message, and the channel
    stays in step; with capacity=2 and a slow reader, a loop that retries each message
    until a send returns delivers every message exactly once, in order."""
    info = scheme_info(scheme_of(transport))
    if info.address == "inet" and not info.connection_oriented and "-reliable" not in transport:
        raise NotApplicable("a lossy link drops instead of waiting for room: no send gives up")

    async def nothing(p: Pair) -> None:
        for cancel in [False] if p.sync else [False, True]:
            await _gave_up_delivers_nothing(p, cancel)

    async def retried(p: Pair) -> None:
        unit = p.a.properties.max_message
        size = 256 * 1024 if unit is None else min(16 * 1024, unit // 2)
        for cancel in [False] if p.sync else [False, True]:
            n = 6
            gave_up, got = await gather(_retry_until_sent(p, n, size, cancel), _slow_reader(p, n))
            assert got == list(range(n)), got
            assert gave_up > 0, "no send gave up: the check did not check"
            with expect(Timeout):  # no message twice
                await p.b.recv(0.05)

    run_check(nothing, transport, driver)
    if transport in CAPACITY_TRANSPORTS:
        run_check(retried, transport, driver, capacity=2)


# -- 4b: memory follows bytes received -------------------------------------------------


def _resident(view: memoryview) -> int:
    """Bytes of ``view``'s memory that are committed: every byte of a bytearray (zeroed
    when made), the resident pages of an anonymous mapping (``mincore``: pages cost
    memory once written)."""
    base = view.obj
    if not isinstance(base, mmap.mmap):
        return view.nbytes
    page = mmap.PAGESIZE
    size = len(base)
    libc = ctypes.CDLL(None, use_errno=True)
    cbuf = (ctypes.c_char * size).from_buffer(base)
    try:
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(cbuf)), ctypes.c_size_t(size), vec):
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec) * page
    finally:
        del cbuf


def committed(decoder: Any) -> int:
    """The memory a stream receiver's frame decoder holds: its read buffer and the
    parts of a big frame in progress (a caller's ``recv_bytes_into`` buffer excluded)."""
    total = len(decoder._buf)
    big = decoder._big
    if big is not None:
        _, _, parts, sunk = big
        for i, part in enumerate(parts):
            if not (sunk and i == 1):
                total += _resident(part)
    return total


def _hostile_headers(max_frame: int) -> list[tuple[str, bytes]]:
    """DATA frame headers announcing nearly ``max_frame`` bytes, each followed by 100
    bytes of payload: what a peer can send in a few hundred bytes."""
    from ...protocol.frames import HEADER, LAZY_MIN, Kind

    def head(blen: int, lengths: list[int]) -> bytes:
        table = b"".join(n.to_bytes(8, "little") for n in lengths)
        return HEADER.pack(1, Kind.DATA, 0, len(lengths), blen) + table + b"x" * 100

    room = max_frame - 64 * 1024
    many = min(255, room // LAZY_MIN)
    return [
        ("one buffer", head(0, [room])),
        ("a body", head(room, [])),
        (f"{many} buffers just under LAZY_MIN", head(0, [LAZY_MIN - 1] * many)),
    ]


def _write_raw(p: Pair, data: bytes) -> None:
    """``data`` onto the link from ``a``, bypassing its framing: a stream's bytes, or
    one whole message of a message transport."""
    from ...transport.base import MessageTransport, StreamTransport

    transport = p.a.ch._core.transport
    if isinstance(transport, MessageTransport):
        assert transport.send_message([data]), "the link had no room for one small message"
        return
    assert isinstance(transport, StreamTransport)
    view = memoryview(data)
    for _ in range(1000):
        n = transport.send_buffers([view])
        if n > 0:
            view = view[n:]
        if not view:
            return
    raise AssertionError("could not write a few hundred bytes")


async def _until_taken_in(p: Pair, decoder: Any, rejected: int) -> None:
    """Receive until the receiver has taken the lie in, then raise what recv raised:
    Timeout once its decoder holds the header (a stream) or the lie was rejected and
    counted (fifo:), or the FrameError it was (a message link). Never returns."""
    deadline = time.monotonic() + T
    while True:
        try:
            got = await p.b.recv(0.05)
        except Timeout:
            held = decoder is not None and decoder.buffered
            if held or p.b.statistics().rejected_frames > rejected:
                raise
            if time.monotonic() > deadline:
                raise AssertionError("the lie never reached the receiver") from None
            continue
        raise AssertionError(f"a frame that lies about its size was delivered: {got!r}"[:300])


def check_memory_bound(transport: str, driver: str) -> None:
    """(21) Memory follows bytes received, not bytes announced (4b): a peer whose frame
    header announces nearly max_frame (one buffer, a body, or many buffers just under
    the lazy threshold) and then sends 100 bytes makes the receiver commit at most
    1 MiB more (measured in the decoder: bytearrays count whole, anonymous mappings
    by their resident pages). Where messages arrive whole the lie is a FrameError for
    that message alone (or, fifo:, a message dropped and counted as rejected), and the
    channel goes on."""
    max_frame = 64 * MIB

    for what, data in _hostile_headers(max_frame):

        async def body(p: Pair, what: str = what, data: bytes = data) -> None:
            decoder = p.b.ch._core.decoder
            before = committed(decoder) if decoder is not None else 0
            rejected = p.b.statistics().rejected_frames
            _write_raw(p, data)
            try:
                await _until_taken_in(p, decoder, rejected)
            except FrameError:  # a message link: the lie is one bad message
                pass
            except Timeout:
                if decoder is not None and decoder.buffered:  # a stream: waits for more
                    grown = committed(decoder) - before
                    assert grown <= BOUND + len(data), (
                        f"{what}: {len(data)} bytes made the receiver commit {grown >> 10} KiB"
                    )
                    return
                # a link that checks whole messages (fifo:): dropped, and counted
                assert p.b.statistics().rejected_frames > rejected, f"{what}: vanished"
            await p.a.send("after the lie", T)  # the channel goes on
            assert await p.b.recv(T) == "after the lie", what

        run_check(body, transport, driver, max_frame=max_frame)


# -- 4c: dead peers are reported -------------------------------------------------------


def _quick(transport: str) -> Any:
    """Reliable-datagram timers that notice a dead peer in half a second."""
    if not transport.endswith("-reliable"):
        scheme = scheme_of(transport)
        raise NotApplicable(
            f"{scheme}: a peer that dies is the end of the channel (end_of_channel and"
            " the transport's own tests check it); a live peer that does not read is"
            " back-pressure, not death"
            if scheme_info(scheme).reliable_module is None
            else f"{scheme} without reliable=True: no acknowledgements, so nothing can tell"
        )
    from ...transport.reliable import DEFAULT_CONFIG

    return replace(
        DEFAULT_CONFIG[scheme_of(transport)], dead_peer_timeout=0.5, keepalive=0.1, linger=0.1
    )


def _silence(end: Any) -> None:
    """Make ``end`` a silent peer, as if its process were stopped: a sender waiting
    for acknowledgements pumps every reliable endpoint of its own process (so that a
    program holding both ends works), so ``end``'s is marked as another process's."""
    end.ch._core.transport._ep.forked = True


def check_dead_peer_send(transport: str, driver: str) -> None:
    """(22) A send blocked for room raises EndOfChannel naming dead_peer_timeout when
    the peer goes silent (never the caller's own Timeout, 10x longer); the messages
    never acknowledged are counted in statistics().dropped; later sends and flushes
    raise EndOfChannel too (4c)."""
    config = _quick(transport)

    async def body(p: Pair) -> None:
        _silence(p.b)
        with expect(EndOfChannel) as caught:
            for _ in range(100_000):  # the window fills long before
                await p.a.send_bytes(b"x" * 1000, T)
        assert "dead_peer_timeout" in str(caught.value), caught.value
        assert p.a.statistics().dropped >= 1
        with expect(EndOfChannel):
            await p.a.flush(T)
        with expect(EndOfChannel):
            await p.a.send_bytes(b"more", T)

    run_check(body, transport, driver, reliable=config)


def check_dead_peer_flush(transport: str, driver: str) -> None:
    """(23) flush never returns normally with unacknowledged data: with the peer
    silent it raises EndOfChannel (naming dead_peer_timeout) after that timeout, and
    counts what was lost in statistics().dropped; with everything acknowledged it
    returns, even once the peer went silent (4c)."""
    config = _quick(transport)

    async def body(p: Pair) -> None:
        await p.a.send_bytes(b"taken", T)
        await p.a.flush(T)  # acknowledged: the peer's driver ran while it received
        assert await p.b.recv_bytes(T) == b"taken"
        _silence(p.b)
        await p.a.flush(T)  # nothing unacknowledged: returns, silent peer or not
        await p.a.send_bytes(b"unacknowledged", T)
        with expect(EndOfChannel) as caught:
            await p.a.flush(T)
        assert "dead_peer_timeout" in str(caught.value), caught.value
        assert p.a.statistics().dropped >= 1

    run_check(body, transport, driver, reliable=config)


# -- 4f: FIFO writers cannot poison each other -----------------------------------------


def _bad_writes() -> list[tuple[str, bytes]]:
    from ...protocol.fifo import Encoder

    real = Encoder(os.getpid(), 12345).encode([b"w" * 3000])[0]
    return [
        ("5 bytes of a frame header", b"\x01\x01\x00\x00\x05"),
        ("random bytes", os.urandom(3000)),
        ("text from a shell", b"hello from a shell\n"),
        ("a false envelope", b"\xf1\xf0\xb0\x7a" + b"\x01\x03\xa0\x0f" + bytes(16)),
        ("half a real piece (a writer killed mid-write)", real[: len(real) // 2]),
    ]


def _raw_write(path: str, data: bytes) -> None:
    """What a shell, a writer of another protocol or a dying writer leaves."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def check_several_writers(transport: str, driver: str) -> None:
    """(24) Where several writers share one endpoint (fifo:, mq:, unixgram:, udp:), a
    garbage or partial write by one does not poison it for the others (4f): each good
    writer's messages arrive whole and in its order and the reader goes on. A FIFO
    resynchronises and counts the rejected bytes; on a message link a bad message is
    one FrameError (or one rejected frame) and nothing more."""
    info = scheme_info(scheme_of(transport))
    if info.connection_oriented or transport.endswith("-reliable") or not info.has_url:
        raise NotApplicable(
            "each peer has a channel of its own: a peer's garbage can only end its own"
            " channel (FrameError); it shares the link with nobody"
        )
    if info.message_boundaries:
        run_check(_foreign_messages, transport, driver)
    else:
        run_check(_fifo_garbage, transport, driver)


async def _fifo_garbage(p: Pair) -> None:
    path = p.listener.address.fs_path()
    other = await p.connect(str(p.listener.address))
    try:
        bad = _bad_writes()
        for i, (_, data) in enumerate(bad):
            await p.a.send({"w": "a", "i": i}, T)
            _raw_write(path, data)
            await other.send({"w": "other", "i": i}, T)
            await p.a.send_bytes(b"y" * 10_000, T)  # more than PIPE_BUF: two pieces
        got: dict[str, list[Any]] = {"a": [], "other": [], "bytes": []}
        for _ in range(3 * len(bad)):
            msg = await p.b.recv(T)
            if isinstance(msg, bytes):
                got["bytes"].append(msg)
            else:
                got[msg["w"]].append(msg["i"])
        assert got["a"] == list(range(len(bad))), got
        assert got["other"] == list(range(len(bad))), got
        assert got["bytes"] == [b"y" * 10_000] * len(bad)
        stats = p.b.statistics()
        counted = sum(len(data) for what, data in bad if not what.startswith("half"))
        assert stats.rejected_frames >= len(bad) - 1, stats
        assert stats.rejected_bytes >= counted, stats
    finally:
        await other.close()


async def _foreign_messages(p: Pair) -> None:
    """Another writer of the endpoint sends messages that are no buzon frame (written
    beneath its channel, as a program of another protocol would)."""
    other = await p.connect(str(p.listener.address))
    foreign = other.ch._core.transport
    bad = [data[:200] for _, data in _bad_writes()[1:]] + [b"\x01\x01\x00\x00\x05"]
    got: dict[str, list[int]] = {"a": [], "other": []}
    errors = 0
    try:
        for i, data in enumerate(bad):  # a round at a time: a queue holds 10 messages
            await p.a.send({"w": "a", "i": i}, T)
            assert foreign.send_message([data]), "no room for one small message"
            await other.send({"w": "other", "i": i}, T)
            while len(got["a"]) + len(got["other"]) < 2 * (i + 1):
                try:
                    msg = await p.b.recv(T)
                except FrameError:
                    errors += 1
                    continue
                got[msg["w"]].append(msg["i"])
        assert got == {"a": list(range(len(bad))), "other": list(range(len(bad)))}, got
        assert errors + p.b.statistics().rejected_frames >= len(bad), errors
    finally:
        await other.close()


# -- 4g: channel ends and listeners pass to children ------------------------------------

METHODS = ("fork", "forkserver", "spawn")


def _refusal(transport: str) -> str | None:
    """The documented reason a channel end of ``transport`` cannot be pickled for a
    child (docs/semantics.md, "Passing to a child"), or None."""
    if transport.endswith("-reliable"):
        return "delivery protocol"
    return None


def _child(end: Any, listener: Any, duplex: bool) -> None:
    """In the child: answer one message on ``end``, then serve one client of
    ``listener``; any failure is the child's exit code."""
    msg = end.recv(timeout=T)
    if duplex:
        end.send(f"echo {msg}", timeout=T)
    end.close()
    if listener is not None:
        with listener.accept(timeout=T) as ch:
            ch.send(ch.recv(timeout=T) + "!", timeout=T)
        listener.close()


def _passable(obj: Any) -> str | None:
    """None if ``obj`` pickles as the argument of a child being started, else the
    refusal's message. (As if a Process were being started: outside that, each fd
    would wait in multiprocessing's resource sharer for a child to fetch it.)"""
    from multiprocessing import context
    from multiprocessing.reduction import ForkingPickler

    class Starting:  # what a Popen being started offers the pickler
        def duplicate_for_child(self, fd: int) -> int:
            return fd

        def DupFd(self, fd: int) -> int:  # multiprocessing's name for it
            return fd

    starting: Any = Starting()
    context.set_spawning_popen(starting)
    try:
        ForkingPickler.dumps(obj)
    except UnsupportedOperation as exc:
        return str(exc)
    finally:
        context.set_spawning_popen(None)
    return None


def _stop_helpers(started: tuple[bool, bool]) -> None:
    """Stop the forkserver and resource tracker this check started (none left behind)."""
    from multiprocessing import forkserver, resource_tracker

    if not started[0]:
        forkserver._forkserver._stop()  # type: ignore[attr-defined]
    if not started[1]:
        resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


def check_pass_to_child(transport: str, driver: str) -> None:
    """(25) A channel end and a listener pass to a child under fork, forkserver and
    spawn, as multiprocessing.Pipe ends do (shm: ends included: their rings and blocks
    go by fd): the child answers on the end and serves a client of the listener. Ends
    that cannot (reliable datagrams) and listeners of one channel are refused with a
    typed error naming the reason; asyncio objects are refused (they belong to an event
    loop) and keep working (4g)."""
    from multiprocessing import forkserver, resource_tracker

    if driver != "sync":

        async def refused(p: Pair) -> None:
            for obj in (p.b.ch, p.listener):
                if obj is not None:
                    why = _passable(obj)
                    assert why is not None and "event loop" in why, why
            await p.a.send("still works", T)
            assert await p.b.recv(T) == "still works"

        run_check(refused, transport, driver)
        return
    running = (
        forkserver._forkserver._forkserver_pid is not None,  # type: ignore[attr-defined]
        resource_tracker._resource_tracker._pid is not None,  # type: ignore[attr-defined]
    )
    try:
        for method in METHODS:
            run_check(_in_child(method), transport, driver)
    finally:
        _stop_helpers(running)


def _in_child(method: str) -> Any:
    async def body(p: Pair) -> None:
        expected = _refusal(p.transport)
        pickled = method != "fork"  # under fork the arguments are inherited
        why = _passable(p.b.ch)
        if expected is not None:
            assert why is not None and expected in why, (expected, why)
            return
        else:
            assert why is None, why
        listener = p.listener
        # a listener that accepts many channels passes; a single channel's endpoint not
        if listener is not None and not scheme_info(scheme_of(p.transport)).connection_oriented:
            if pickled:  # an endpoint of one channel: refused, saying so
                why = _passable(listener)
                assert why is not None and "single channel" in why, why
            listener = None
        elif listener is not None and pickled:
            assert _passable(listener) is None, _passable(listener)
        ctx: Any = multiprocessing.get_context(method)
        proc = ctx.Process(target=_child, args=(p.b.ch, listener, p.duplex), daemon=True)
        proc.start()
        try:
            await p.a.send("hi", T)
            if p.duplex:
                assert await p.a.recv(T) == "echo hi"
            if listener is not None:
                client = await p.connect(str(listener.address), **p.options)
                try:
                    await client.send("x", T)
                    assert await client.recv(T) == "x!"
                finally:
                    await client.close()
        finally:
            await p.threads.call(proc.join, T * 2)
            if proc.exitcode is None:
                proc.kill()
                await p.threads.call(proc.join, T)
            code = proc.exitcode
            proc.close()
        assert code == 0, f"the child under {method} failed: exit code {code}"

    return body
