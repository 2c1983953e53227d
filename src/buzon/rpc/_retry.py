"""The retry rules of ``at_least_once`` and ``exactly_once`` calls, written once for the
blocking client (:mod:`buzon.rpc._client`) and the asyncio one
(:mod:`buzon.aio._rpc_client`); no I/O here, the clients wait and reconnect.

A call is sent again after a lost connection, with a growing pause (5 ms doubling to
200 ms), until it is answered or its deadline passes. An ``exactly_once`` call carries
the same (client id, sequence number) every time, plus the lowest sequence number still
open (everything below it is acknowledged: the server may collect those records).

Which server start answers: the connection handshake says (HELLO options
``{"rpc": {"instance", "durable"}}``), else, from an older server, the name's
registration. A reconnect that finds another start counts as a restart the call cannot
survive unless both tables are durable (SQLite): then the retries go on and the new
start answers them from its record. A call sent before a restart it cannot survive
raises :class:`~buzon.errors.ServerRestarted` (its outcome is unknown; it is never
sent to the new start), as does a retry the server itself answers "outcome unknown"
(a plain handler a crash cut short).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from ..errors import (
    ChannelClosed,
    ConnectError,
    DeadlineExceeded,
    EndOfChannel,
    ProtocolError,
    RemoteError,
    ServerRestarted,
)
from ..errors import Timeout as _Timeout

__all__ = ["RETRY", "Retrying", "note_restart", "raise_outcome", "server_start"]

# what a lost or failed connection raises: the call may be sent again
RETRY = (EndOfChannel, ChannelClosed, ConnectError, ProtocolError, _Timeout)

_FIRST_PAUSE = 0.005
_MAX_PAUSE = 0.2


def server_start(ch: Any, instance_of: Callable[[], str | None] | None) -> tuple[str | None, bool]:
    """(instance id, durable table) of the server start behind channel ``ch``: from its
    handshake, else (an older server) the name's registration (``instance_of``)."""
    peer = ch.peer
    said = peer.extra.get("options", {}).get("rpc") if peer is not None else None
    if isinstance(said, dict) and isinstance(said.get("instance"), str):
        return said["instance"], said.get("durable") is True
    return (instance_of() if instance_of is not None else None), False


def note_restart(
    client: Any, before: tuple[str | None, bool], now: tuple[str | None, bool]
) -> None:
    """After a reconnect: count another server start (``client._restarts``: calls in
    flight are lost; ``client.restarts_survived``: both tables durable, they go on)."""
    (old, kept), (new, kept_now) = before, now
    if old is not None and new != old:
        if kept and kept_now:
            client.restarts_survived += 1
        else:
            client._restarts += 1


def raise_outcome(method: str, error: BaseException) -> None:
    """Raise the error an answer of an ``at_least_once`` / ``exactly_once`` call
    carries (the server's "outcome unknown" as ``ServerRestarted``)."""
    if isinstance(error, RemoteError) and error.code == RemoteError.OUTCOME_UNKNOWN:
        raise ServerRestarted(f"{method}: {error.message}") from None
    raise error


class Retrying:
    """One call's retries (``client`` is either client; ``lock`` guards its sequence
    numbers when threads share it)."""

    __slots__ = ("at", "client", "delay", "last", "lock", "method", "restarts", "sent", "seq")

    def __init__(
        self,
        client: Any,
        method: str,
        lock: Any = None,
        first: tuple[int, float | None, int, BaseException] | None = None,
    ) -> None:
        """``first``: the call's first attempt was made already (the blocking client's
        solo path) and lost its connection: ``(seq, at, restarts, error)``, the
        sequence number it opened, its deadline, the client's restart count before
        it was sent, and what broke it; the retries go on from there."""
        self.client = client
        self.method = method
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.delay = _FIRST_PAUSE
        self.last: BaseException | None = None
        self.sent = False
        if first is not None:
            self.seq, self.at, self.restarts, self.last = first
            self.sent = True
            return
        self.at = client._deadline()
        self.seq = 0
        if client._semantics == "exactly_once":
            with self.lock:
                self.seq = client._next_seq
                client._next_seq += 1
                client._open_seqs.add(self.seq)
        self.restarts = client._restarts

    def check_deadline(self) -> None:
        """Before an attempt: ``DeadlineExceeded`` once the call's deadline passed."""
        if self.at is not None and time.monotonic() >= self.at:
            raise DeadlineExceeded(
                f"{self.method}: no answer by the deadline after {self.client.retries} "
                f"retries (last: {self.last})"
            )

    def key(self) -> list[Any] | None:
        """The attempt's exactly-once key (None: at least once); ``ServerRestarted`` if
        the call was sent before a restart its server's table did not survive."""
        if not self.seq:
            return None
        if self.sent and self.client._restarts != self.restarts:
            raise ServerRestarted(
                f"{self.method}: the server restarted with this call in flight (a new "
                "instance id in the handshake) and its completion table did not persist: "
                "the outcome is unknown and the new server has no record of it, so it is "
                "not sent again"
            )
        with self.lock:
            acked = min(self.client._open_seqs)
        return [self.client._client_id, self.seq, acked]

    def outcome(self, error: BaseException | None) -> None:
        """An answer came: raise its error (the server's "outcome unknown" as
        ``ServerRestarted``)."""
        if error is not None:
            raise_outcome(self.method, error)

    def failed(self, exc: BaseException) -> None:
        """An attempt failed with one of :data:`RETRY`: re-raise it if the call cannot go
        on (the client is closing; a deadline or a restart), else mark the connection
        broken (the next attempt reconnects)."""
        client = self.client
        if client._closing or isinstance(exc, (DeadlineExceeded, ServerRestarted)):
            raise exc
        self.last = exc
        if client._broken is None:
            client._broken = EndOfChannel(f"the connection failed: {exc}")

    def pause(self) -> float:
        """The pause before the next attempt (never past the deadline); counted."""
        self.client.retries += 1
        pause = self.delay
        if self.at is not None:
            pause = min(pause, max(0.0, self.at - time.monotonic()))
        self.delay = min(self.delay * 2, _MAX_PAUSE)
        return pause

    def done(self) -> None:
        """The call is over: its sequence number is no longer open."""
        if self.seq:
            with self.lock:
                self.client._open_seqs.discard(self.seq)
