"""A rendezvous send (``capacity=0``) on a transport whose rings keep it themselves
(``shm:``; ``transport/shm/_rendezvous.py`` and ``_core_rv.c`` have the mechanism).

The send puts its message as any send does, then waits until the receiver took that
record. A send that gives up (its deadline, a cancellation, an interrupt, a signal
handler's exception, a close from another thread, the peer gone) withdraws the record:
one compare-and-swap racing the receiver's claim decides. Withdrawn: nothing of it is
ever delivered and the send raises (a timeout says so). Taken first: the send succeeded
after all and returns, except that an interrupt (``KeyboardInterrupt``) still goes on,
as on every other transport (``_engine.send_steps``).

Engine steps like ``_engine``'s (both drivers run :func:`rv_send_steps`: the asyncio
one always, the blocking one when the ring is full or the message large); the
blocking driver's common case waits in one C call (``RingRendezvous.wait``) and ends
through :func:`settle`, the same decision.
"""

from __future__ import annotations

from typing import Any

from ._channel import ChannelCore
from ._engine import WRITE, Step, Steps, room
from .errors import Timeout
from .transport.base import Buffer

__all__ = ["WITHDRAWN_MESSAGE", "rv_send_steps", "rv_wait_steps", "settle"]

WITHDRAWN_MESSAGE = (
    "send timed out before the receiver took the message (capacity=0); it was "
    "withdrawn, so nothing of it is delivered"
)


def settle(core: ChannelCore, rv: Any, ticket: int, exc: BaseException) -> None:
    """A rendezvous send ends with ``exc`` before its record was seen taken: withdraw
    it and raise, or return if the receiver took it first (an interrupt raises
    anyway). The withdrawal is counted (``aborted``; ``messages_sent`` goes back)."""
    if rv.withdraw(ticket):
        core.count_withdrawn()
        if isinstance(exc, Timeout):
            raise Timeout(WITHDRAWN_MESSAGE) from None
        raise exc
    if isinstance(exc, KeyboardInterrupt):
        raise exc


def rv_wait_steps(core: ChannelCore, rv: Any, ticket: int) -> Steps:
    """Wait until record ``ticket`` is taken: the space fd turns writable when the
    receiver frees a record (``RingRendezvous.arm``)."""
    try:
        while not rv.arm(ticket):
            yield Step(WRITE, rv.space_fd, what="send")
    except BaseException as exc:
        settle(core, rv, ticket, exc)


def rv_send_steps(core: ChannelCore, bufs: list[Buffer], priority: int = 0) -> Steps:
    """The whole rendezvous send: wait for room, put (the ticket read in the same
    resumption, under the driver's write lock), wait for the take."""
    rv = core.rv_ring
    while not core.try_send(bufs, priority):
        yield room(core)
    ticket = rv.ticket()
    yield from rv_wait_steps(core, rv, ticket)
