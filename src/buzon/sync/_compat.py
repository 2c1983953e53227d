"""Blocking driver for the ``multiprocessing.connection`` authkey exchange."""

from __future__ import annotations

import os
from typing import Any

from .._channel import ChannelCore
from .._policy import Prepared
from ..errors import EndOfChannel, HandshakeError, ProtocolError, Timeout
from ..protocol.mpcompat import ClientAuth, ServerAuth
from ..transport.base import WOULD_BLOCK
from ._channel import wait_fds

__all__ = ["mp_handshake"]


def mp_handshake(core: ChannelCore, prep: Prepared, role: str, deadline: float | None) -> None:
    """Run the stdlib's challenge/response (both ways) when an authkey is set."""
    if prep.authkey is None:
        return
    auth: Any = (ServerAuth if role == "server" else ClientAuth)(prep.authkey, os.urandom)
    transport: Any = core.transport
    buf = bytearray(512)
    try:
        while True:
            for msg in auth.outgoing():
                _write(core, msg, deadline)
            if auth.done:
                break
            readable, _ = wait_fds(core.read_fileno(), -1, True, False, deadline)
            if not readable:
                raise Timeout("multiprocessing authkey exchange timed out")
            n = transport.recv_into(memoryview(buf))
            if n == WOULD_BLOCK:
                continue
            if n == 0:
                raise EndOfChannel("the peer closed during the authkey exchange")
            auth.receive_data(bytes(buf[:n]))
    except ProtocolError:
        for msg in auth.outgoing():  # e.g. #FAILURE#, so the peer learns why
            try:
                _write(core, msg, deadline)
            except Exception:
                break
        raise
    except (EndOfChannel, Timeout) as exc:
        raise HandshakeError(f"multiprocessing authkey exchange failed: {exc}") from None
    if auth.unused_data:
        assert core.decoder is not None
        core.decoder.feed(auth.unused_data)


def _write(core: ChannelCore, data: bytes, deadline: float | None) -> None:
    if not core.try_send([data]):
        raise ProtocolError("cannot write the authkey exchange")
    core.stats.messages_sent -= 1
    core.stats.bytes_sent -= len(data)
    while core.pending:
        _, writable = wait_fds(-1, core.write_fileno(), False, True, deadline)
        if not writable:
            raise Timeout("authkey exchange write timed out")
        core.flush()
