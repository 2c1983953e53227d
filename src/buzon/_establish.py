"""Link establishment (handshakes) written once, as generators both drivers run.

A handshake needs three kinds of I/O: write some bytes, read the next frame, read
some raw bytes. Instead of writing each handshake twice (blocking and asyncio), it is
a generator that *yields* what it needs — ``("write", data)``, ``("frame", None)``,
``("bytes", None)``, ``("wait-read"|"wait-write", None)`` (TLS: just wait for the fd),
or ``("delivered", None)`` (wait until the peer acknowledged everything written) — and
receives the result. A driver is a ten-line loop that
performs the operation and sends the result back (or throws the I/O error in), so
both drivers share every decision, message and error translation made here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from typing import Any

from ._channel import DEFAULT_CAPACITY, ChannelCore
from ._policy import Prepared
from .errors import BuzonError, EndOfChannel, HandshakeError, ProtocolError, Timeout
from .protocol.frames import HANDSHAKE_MAX_FRAME
from .protocol.mpcompat import ClientAuth, ServerAuth
from .transport.base import PeerInfo

__all__ = ["Op", "Steps", "establish_steps", "retry_delay"]

Op = tuple[str, bytes | None]
Steps = Generator[Op, Any, None]


_RETRY_BACKOFF = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)


def retry_delay(attempt: int, deadline: float | None, address: object) -> float:
    """How long a driver sleeps before retrying a connector that has no fd to wait on
    (a FIFO without a reader): a short back-off, never past the deadline."""
    delay = _RETRY_BACKOFF[min(attempt, len(_RETRY_BACKOFF) - 1)]
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"connecting to {address} timed out (no reader/listener yet)")
        delay = min(delay, remaining)
    return delay


def establish_steps(core: ChannelCore, prep: Prepared, role: str) -> Steps:
    """All the I/O needed before ``core`` may carry messages (possibly none)."""
    if core.transport.tls_pending:
        yield from _tls_handshake(core)
    if prep.compat == "multiprocessing":
        if prep.authkey is not None:
            yield from _mp_auth(core, prep, role)
    elif prep.handshake:
        yield from _buzon_handshake(core, prep, role)
    if core.acked:
        # Reliable datagrams: stay until the peer has acknowledged our side of the
        # handshake. Only this process can retransmit it, and after returning it may
        # not call buzon again for a while (a server between accept and recv, or a
        # peer in this very process, blocked waiting for exactly that datagram).
        try:
            yield ("delivered", None)
        except Timeout:
            raise HandshakeError(
                "the peer did not acknowledge the handshake in time (is it still there?)"
            ) from None
        except EndOfChannel as exc:  # the peer went silent for dead_peer_timeout
            raise HandshakeError(f"the peer never acknowledged the handshake: {exc}") from None


def _tls_handshake(core: ChannelCore) -> Steps:
    """Drive the TLS handshake: the transport says which way to wait."""
    transport: Any = core.transport
    try:
        while (want := transport.handshake_step()) is not None:
            yield ("wait-" + want, None)
    except Timeout:
        raise HandshakeError("TLS handshake timed out") from None
    except EndOfChannel:
        raise HandshakeError("the peer closed the connection during the TLS handshake") from None
    core.peer = transport.peer


def _buzon_handshake(core: ChannelCore, prep: Prepared, role: str) -> Steps:
    from .protocol.handshake import NONCE_SIZE, Handshake, agreed_capacity  # msgspec: lazily

    opts = prep.channel
    options: dict[str, Any] = {"codec": opts.codec, "pickle": opts.pickle}
    if opts.capacity != DEFAULT_CAPACITY:
        options["capacity"] = opts.capacity
    hs = Handshake(
        role,
        pid=os.getpid(),
        options=options,
        authkey=prep.authkey,
        nonce=os.urandom(NONCE_SIZE) if prep.authkey is not None else b"",
    )
    decoder = core.decoder  # None on message links: each frame is one message there
    if decoder is not None:
        decoder.max_frame = HANDSHAKE_MAX_FRAME
    try:
        yield ("write", hs.outgoing())
        while not hs.done:
            frame = yield ("frame", None)
            try:
                hs.receive(frame)
            finally:
                out = hs.outgoing()
                if out:
                    try:
                        yield ("write", out)
                    except BuzonError:
                        pass  # the peer is gone; the error already raised matters more
    except EndOfChannel:
        hint = "is an authkey required? " if prep.authkey is None else ""
        raise HandshakeError(
            f"the peer closed the connection during the handshake ({hint}is it a buzon endpoint?)"
        ) from None
    except Timeout:
        raise HandshakeError(
            f"handshake timed out after {opts.handshake_timeout} s (is the peer a buzon endpoint?)"
        ) from None
    if decoder is not None:
        decoder.max_frame = opts.max_frame
    assert hs.peer is not None
    stated, capacity = agreed_capacity(options, hs.peer.opts)
    if stated and opts.capacity == DEFAULT_CAPACITY:
        core.set_capacity(capacity)  # the peer stated it; this end adopts it
    peer = core.peer
    core.peer = PeerInfo(
        pid=peer.pid if peer.pid is not None else hs.peer.pid,
        uid=peer.uid,
        gid=peer.gid,
        address=peer.address,
        extra={**peer.extra, "hello_pid": hs.peer.pid, "options": dict(hs.peer.opts)},
    )


def _mp_auth(core: ChannelCore, prep: Prepared, role: str) -> Steps:
    """The ``multiprocessing.connection`` challenge/response, both ways."""
    assert prep.authkey is not None
    auth: ServerAuth | ClientAuth = (ServerAuth if role == "server" else ClientAuth)(
        prep.authkey, os.urandom
    )
    try:
        while True:
            for msg in auth.outgoing():
                yield ("write", msg)
            if auth.done:
                break
            data = yield ("bytes", None)
            auth.receive_data(data)
    except ProtocolError:
        for msg in auth.outgoing():  # e.g. #FAILURE#, so the peer learns why
            try:
                yield ("write", msg)
            except BuzonError:
                break
        raise
    except (EndOfChannel, Timeout) as exc:
        raise HandshakeError(f"multiprocessing authkey exchange failed: {exc}") from None
    if auth.unused_data:
        assert core.decoder is not None
        core.decoder.feed(auth.unused_data)
