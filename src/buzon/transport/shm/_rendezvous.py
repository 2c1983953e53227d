"""``capacity=0`` on ``shm:``: the rendezvous is the ring record itself (``_core_rv.c``).

A rendezvous send puts its record as any send does and then waits until that record
is taken, watching the record's state word; no CREDIT frame crosses the reverse ring.
A send that gives up withdraws the record with one compare-and-swap that races the
receiver's claim on the same word, so exactly one of "taken (the send returns)" and
"withdrawn (nothing is ever delivered)" happens. :class:`RingRendezvous` is what the
channel core and both drivers use; the engine's steps are in ``buzon._ring_rv``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ... import _core
from ...errors import EndOfChannel

if TYPE_CHECKING:
    from ._ring import ShmTransport

__all__ = ["PENDING", "TAKEN", "WITHDRAWN", "RingRendezvous"]

PENDING, TAKEN, WITHDRAWN = 0, 1, 2


class RingRendezvous:
    """The rendezvous calls of one ``shm:`` end (made by
    :meth:`ShmTransport.start_rendezvous`, which puts both rings in rendezvous mode).

    ``ticket()`` names the record this end put last (read it under the write lock,
    right after the put); ``wait`` blocks for its take (sync driver, GIL released);
    ``arm`` prepares a wait on ``space_fd`` becoming writable (asyncio, and the engine's
    general path); ``withdraw`` gives the record up (True) unless it was taken first
    (False), once per ticket.
    """

    __slots__ = (
        "_incoming",
        "_transport",
        "_wait",
        "_withdraw",
        "arm_state",
        "last_block",
        "last_put",
        "max_record",
        "receiver_waiting",
        "send_frame",
        "sock_fd",
        "space_fd",
        "state",
        "stop_waiting",
    )

    def __init__(self, transport: ShmTransport, tx: _core.Ring, rx: _core.Ring) -> None:
        tx.set_rendezvous()
        rx.set_rendezvous()  # our receives say when they wait (the peer's send_nowait)
        self._transport = transport
        self.last_put = tx.last_put
        self.state = tx.rv_state
        self.arm_state = tx.rv_arm
        self._withdraw = tx.rv_withdraw
        # (ticket, block, kind) of the last out-of-line message: its block comes back
        # if the message is withdrawn
        self.last_block: tuple[int, Any, int] | None = None
        self._wait = tx.rv_wait
        self.receiver_waiting = tx.receiver_waiting
        self.stop_waiting = rx.stop_waiting  # our receive gave up: the peer's send_nowait
        self._incoming = rx.spin_wait
        self.space_fd = transport.write_fileno()
        self.sock_fd = transport.socket_fileno()
        ops = transport.ring_ops
        assert ops is not None
        self.send_frame = ops.send_frame
        self.max_record = ops.max_record

    def incoming(self) -> bool:
        """A record waits in our receive ring (nothing is taken; a receiver that asks
        is about to wait: the peer's send_nowait may hand it a message)."""
        return self._incoming(0.0)

    def withdraw(self, ticket: int) -> bool:
        """Give record ``ticket`` up: True withdrawn (it is never delivered; an
        out-of-line message's block comes back), False taken first. Once per ticket."""
        if not self._withdraw(ticket):
            return False
        last = self.last_block
        if last is not None and last[0] == ticket:
            self.last_block = None
            self._transport.block_withdrawn(last[1], last[2])
        return True

    def peer_gone(self) -> bool:
        """The peer closed its end or died."""
        return self._transport.peer_gone()

    def ticket(self) -> int:
        """The position of the record this end put last (read it under the write lock,
        right after the put): what :meth:`wait`, :meth:`arm` and :meth:`withdraw` name."""
        return self.last_put()

    def wait(self, ticket: int, timeout: float | None, spin: float, wake_fd: int) -> int:
        """Block until record ``ticket`` is taken: TAKEN (1), 0 when ``timeout``
        passed, 2 when woken without a take (the peer closed or died, or ``wake_fd``: a
        close() in another thread). A signal handler's exception propagates."""
        return self._wait(ticket, timeout, spin, self.space_fd, self.sock_fd, wake_fd)

    def arm(self, ticket: int) -> int:
        """Before a wait for ``space_fd`` to turn writable: fill its pipe and arm the
        ring's space notification (a consumer that frees empties the pipe), then
        return the record's state. Raises :class:`EndOfChannel` if the peer is gone and
        the record is not taken."""
        transport = self._transport
        try:
            os.write(self.space_fd, b"\0")
        except BlockingIOError:
            pass
        except (BrokenPipeError, OSError):
            if self.state(ticket) == TAKEN:
                return TAKEN
            raise EndOfChannel(f"the peer of {transport.address} is gone") from None
        state: int = self.arm_state(ticket)
        if state == PENDING and transport.peer_gone():
            state = self.state(ticket)
            if state == PENDING:
                raise EndOfChannel(f"the peer of {transport.address} closed the channel")
        return state
