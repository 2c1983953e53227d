"""Capacity and receipts: credits, sans-IO.

The lectures' three buffer capacities, with one meaning on every transport whatever
its kernel buffer, and delivery receipts for asynchronous sends. Both ends number the
DATA messages of one direction 1, 2, 3, ... in the order the receiver *takes* them
(``recv`` returned them); the links that carry credits keep order and lose nothing,
so the k-th message sent is the k-th taken.

The receiver tells the sender two numbers in a CREDIT frame (kind 6, no codec, a
16-byte body)::

    offset  size  field
    0       8     taken   u64 LE: messages the receiver has taken so far (never decreases)
    8       8     limit   u64 LE: the sender may send message k only while k <= limit

A CREDIT with flag bit 3 (``BLOCKED_FLAG``) also says "I, as a sender, am blocked for
want of your credit": its receiver then announces after its very next take instead of
batching, so a blocked sender waits only while N messages really are untaken.

Modes (:class:`SendFlow` and :class:`RecvFlow` implement them; the drivers only
move frames and wait):

``capacity=N`` (bounded)
    At most N messages sent but not yet taken. Both ends start from ``limit = N``
    without a frame. The receiver grants ``limit = taken + N`` when it took the last
    message it had in hand (so after ``recv`` returns, the sender knows of every take
    but those of messages already read with it), after ``max(1, N // 2)`` takes
    within one batch, and after any take while the sender said it is blocked.
``capacity=0`` (rendezvous)
    ``limit`` starts at 0. A receiver that begins to wait *offers* one message
    (``limit = taken + 1``); taking it sends ``limit = taken`` (this is also the
    acknowledgement a blocked ``send`` waits for: ``taken >= k``); a receive that times
    out withdraws the offer. A message sent under an offer that was withdrawn while it
    travelled is kept by the receiver and taken by its next receive (its sender is still
    blocked until then, or times out). An end blocked in a rendezvous ``send`` of a
    duplex channel offers too (it receives next: the request/response pattern), and
    its offer stands until it takes a message; so a request and its reply cost one
    trip each way, and each ``send`` still returns only once its message was taken.
Deferred takes (``capacity=0``)
    A receiver may hold a take's CREDIT back (``on_take(defer=True)``): every CREDIT
    carries ``taken``, so the next one it writes anyway (its next offer, the one
    written with its next message: the reply) acknowledges the take too, and a
    request/response costs two writes, as without a capacity. The receiver must write
    it (:meth:`RecvFlow.confirm`) without waiting for its next call: on a WITHDRAW of
    that message, at close, at exit, and within a bound after the take (the blocking
    driver's confirmer, docs/semantics.md). Nothing else changes: an offer is still
    written before any take, so the withdrawal rules below hold as they are; a
    sender cannot tell a deferring receiver from one whose CREDIT is slow.
Withdrawing (``capacity=0``)
    A rendezvous ``send`` that gives up (its timeout, a cancellation, an interrupt)
    after its message #k was written sends a WITHDRAW: a CREDIT frame whose codec bits
    are 1 (``WITHDRAW_CODEC``), body ``(k, w)`` with ``w`` the sender's count of
    withdrawals. The receiver takes a message only while its own offer stands, and only
    after a read, made after it announced that offer, that found the link empty (so it
    has read every WITHDRAW written before its offer was visible). On a WITHDRAW for a
    message it has not taken it drops the message and answers with a WITHDRAWN (codec
    bits 2, body ``(k, w)``); for one it took it answers nothing (its CREDIT with
    ``taken >= k`` already went). The sender learns which happened: the CREDIT
    (taken: ``send`` returns), the WITHDRAWN (dropped: ``send`` raises), or, on a local
    link, at once: if after its WITHDRAW was written and it read everything the receiver
    wrote, the receiver's latest CREDIT says no offer stands (``limit < k``), no take can
    happen before the receiver reads the WITHDRAW (a take needs an offer announced and a
    read after it). Numbering: a withdrawn message is not counted (the sender's
    ``sent`` goes back by one), so message numbers stay the order of takes.
``capacity=None`` (unbounded) and the default (the transport's own buffer)
    No limit, no CREDIT frames — except as receipts.

Receipts: a DATA frame with flag bit 3 (``RECEIPT_FLAG``) asks for one. The receiver
answers with a CREDIT carrying its ``taken`` count once it took that message and has
no further complete message in hand (at the end of what its reads brought: a stream
receiver reads once more, never waiting, before it answers, so messages that came
meanwhile join the batch), after at most :data:`REPORT_EVERY` such takes, or before it
waits — acknowledgements are batched, never one per message on a busy stream, and a
receiver that took everything the link held answers at once.

Nothing here reads a clock or touches I/O; each method returns the CREDIT frame to
write (``bytes``) or ``None``.
"""

from __future__ import annotations

import struct

from ..errors import FrameError, ProtocolError
from .frames import HEADER, VERSION, Kind

__all__ = [
    "BLOCKED_FLAG",
    "CREDIT_SIZE",
    "RECEIPT_FLAG",
    "REPORT_EVERY",
    "UNLIMITED",
    "WITHDRAWN_CODEC",
    "WITHDRAW_CODEC",
    "ReceiptCore",
    "ReceiptWriter",
    "RecvFlow",
    "RvStream",
    "SendFlow",
    "check_capacity",
    "decode_credit",
    "encode_credit",
    "encode_withdraw",
]

try:  # receipts' hot path in C (protocol/_credit.c); this module stays the reference
    from ._credit import ReceiptCore, ReceiptWriter
except ImportError:  # pragma: no cover - a build without the extension
    ReceiptWriter = None  # type: ignore[assignment,misc]

    class ReceiptCore:  # type: ignore[no-redef]
        """A receipt's data: its channel, its SendFlow, its message number."""

        __slots__ = ("_channel", "_flow", "number")

        def __init__(self, channel: object, flow: object, number: int) -> None:
            self._channel = channel
            self._flow = flow
            self.number = number


try:  # capacity=0 on a framed stream, the blocking driver's send and receive in C
    from ._rv import RvStream  # (protocol/_rv.c); this module stays the reference
except ImportError:  # pragma: no cover - a build without the extension
    RvStream = None  # type: ignore[assignment,misc]


UNLIMITED = 2**64 - 1
RECEIPT_FLAG = 0x08
BLOCKED_FLAG = 0x08  # the same bit, on CREDIT frames
REPORT_EVERY = 256
_BODY = struct.Struct("<QQ")
CREDIT_SIZE = HEADER.size + _BODY.size
_CREDIT_HEADER = HEADER.pack(VERSION, Kind.CREDIT, 0, 0, _BODY.size)
_BLOCKED_HEADER = HEADER.pack(VERSION, Kind.CREDIT, BLOCKED_FLAG, 0, _BODY.size)
#: a CREDIT frame's codec bits (always 0 on a plain CREDIT) mark the withdrawal frames
WITHDRAW_CODEC = 1
WITHDRAWN_CODEC = 2


def check_capacity(capacity: object) -> int | None:
    """Validate a ``capacity=`` argument: an int >= 0, or None (unbounded)."""
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int >= 0 or None, not {capacity!r}")
    if not 0 <= capacity <= 2**32:
        raise ValueError(f"capacity must be between 0 and 2**32, not {capacity}")
    return capacity


def encode_credit(taken: int, limit: int, blocked: bool = False) -> bytes:
    return (_BLOCKED_HEADER if blocked else _CREDIT_HEADER) + _BODY.pack(taken, limit)


def encode_withdraw(number: int, serial: int, answer: bool = False) -> bytes:
    """A WITHDRAW of message ``number`` (the sender's ``serial``-th withdrawal), or
    (``answer``) the receiver's WITHDRAWN: it dropped that message."""
    codec = WITHDRAWN_CODEC if answer else WITHDRAW_CODEC
    return HEADER.pack(VERSION, Kind.CREDIT, codec, 0, _BODY.size) + _BODY.pack(number, serial)


def decode_credit(body: bytes | bytearray | memoryview) -> tuple[int, int]:
    if len(body) != _BODY.size:
        raise FrameError(f"a CREDIT frame has a {_BODY.size}-byte body, not {len(body)}")
    taken, limit = _BODY.unpack(body)
    return taken, limit


class SendFlow:
    """The sending side of one direction: may the next message go, which are taken.

    ``capacity`` is 0, N, or None/-1 for "no limit" (unbounded or the default);
    receipts work in every mode.
    """

    __slots__ = (
        "capacity",
        "error",
        "failed_after",
        "limit",
        "receiver",
        "sent",
        "taken",
        "withdrawals",
        "withdrawn",
    )

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.sent = 0
        self.taken = 0
        self.limit = UNLIMITED if capacity is None else capacity
        self.receiver: int | None = None  # the receiving process, where the link knows
        # the link broke: messages after ``failed_after`` will never be taken (why)
        self.error: str | None = None
        self.failed_after = 0
        self.withdrawals = 0  # WITHDRAW frames sent (capacity=0)
        self.withdrawn = 0  # the highest of them known settled as dropped

    def settle_withdrawal(self, serial: int) -> bool:
        """Withdrawal ``serial`` dropped its message (a WITHDRAWN came, or the sender
        knows it will): that message no longer counts. False if already settled."""
        if serial <= self.withdrawn:
            return False
        self.withdrawn = serial
        self.sent -= 1
        return True

    def sendable(self) -> bool:
        """True if one more message may be sent now."""
        return self.sent < self.limit

    def on_sent(self) -> int:
        """A DATA message left; returns its number."""
        self.sent += 1
        return self.sent

    def on_credit(self, taken: int, limit: int) -> None:
        """Apply a CREDIT frame. A peer that claims more than was sent, takes back
        takes, or (bounded) grants more than the capacity breaks the protocol."""
        if taken > self.sent:
            raise ProtocolError(f"the peer reports {taken} messages taken of {self.sent} sent")
        if taken < self.taken:
            raise ProtocolError("the peer's count of messages taken went backwards")
        cap = self.capacity
        if cap is not None and limit != UNLIMITED and limit > taken + max(cap, 1):
            raise ProtocolError(
                f"the peer grants {limit - taken} messages; the channel's capacity is {cap}"
            )
        self.taken = taken
        if cap is not None:
            self.limit = limit

    def delivered(self, number: int) -> bool:
        return self.taken >= number


class RecvFlow:
    """The receiving side of one direction: counts takes, decides when to announce."""

    __slots__ = (
        "_step",
        "capacity",
        "granted",
        "limit",
        "offering",
        "peer_blocked",
        "report_due",
        "reported",
        "taken",
        "unreported",
    )

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.taken = 0
        self.reported = 0  # ``taken`` in the last CREDIT written
        self.limit = UNLIMITED if capacity is None else capacity
        self.granted = self.limit  # the highest limit ever announced (withdrawals race)
        self.offering = False
        self.peer_blocked = False  # the sender said it waits for our credit
        self.report_due = False  # a receipt was asked for and not yet answered
        self.unreported = 0  # receipt-asking takes since the last CREDIT
        self._step = max(1, capacity // 2) if capacity else 1

    def on_take(self, receipt: bool, more: bool, defer: bool = False) -> bytes | None:
        """The receiver took one message (``more``: another is already in hand).
        ``defer`` (capacity 0): the take's CREDIT is not returned; it is owed
        (:attr:`owed`) and rides with this end's next CREDIT (its next offer, the one
        before its next message) or :meth:`confirm` writes it."""
        self.taken = taken = self.taken + 1
        if taken > self.granted:
            raise ProtocolError(
                f"the peer sent message {taken}; it was allowed {self.granted} (capacity)"
            )
        cap = self.capacity
        if receipt:
            self.report_due = True
            self.unreported += 1
        if cap is None:
            if self.report_due and (not more or self.unreported >= REPORT_EVERY):
                return self._announce()
            return None
        if cap == 0:
            self.offering = False
            self.limit = taken  # the offer is used up; this also acknowledges the take
            return None if defer else self._announce()
        self.limit = taken + cap
        if not more or self.peer_blocked or taken - self.reported >= self._step:
            return self._announce()
        if self.report_due and (not more or self.unreported >= REPORT_EVERY):
            return self._announce()
        return None

    def before_wait(self) -> bytes | None:
        """The receiver is about to wait for a message (nothing is in hand)."""
        if self.capacity == 0:
            if not self.offering:
                self.offering = True
                self.limit = self.taken + 1
                return self._announce()
            return None
        if self.report_due or (self.capacity is not None and self.taken > self.reported):
            return self._announce()
        return None

    @property
    def owed(self) -> bool:
        """capacity 0: a take whose CREDIT was deferred and not yet written."""
        return self.capacity == 0 and self.taken > self.reported

    def confirm(self) -> bytes | None:
        """The CREDIT a deferred take owes (None: nothing is owed)."""
        return self._announce() if self.owed else None

    def receipts_owed(self) -> bytes | None:
        """The CREDIT that receipt-asking takes not acknowledged yet owe (they were
        taken while more messages were in hand), or None: a receiver that closes
        writes it first, so that those receipts complete rather than fail."""
        if self.report_due and self.capacity != 0:
            return self._announce()
        return None

    def on_wait_end(self) -> bytes | None:
        """The receiver stopped waiting without a message (timeout, cancellation)."""
        if self.capacity == 0 and self.offering:
            self.offering = False
            self.limit = self.taken
            return self._announce()
        return None

    def on_peer_blocked(self) -> bytes | None:
        """The peer's sender is blocked for want of credit: answer at the next take,
        or now if takes are not announced yet."""
        self.peer_blocked = True
        if self.capacity and self.taken > self.reported:
            return self._announce()
        return None

    def blocked_notice(self) -> bytes:
        """This end's sender is blocked: a CREDIT (of this end's receive state) saying so."""
        return self._announce(blocked=True)

    def _announce(self, blocked: bool = False) -> bytes:
        self.reported = self.taken
        self.report_due = False
        self.peer_blocked = False
        self.unreported = 0
        if self.limit > self.granted:
            self.granted = self.limit
        return encode_credit(self.taken, self.limit, blocked)
