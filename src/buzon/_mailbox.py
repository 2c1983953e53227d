"""Mailboxes: named, shared, N senders x M receivers, on this host (``buzon.mailbox``).

Theory of operation
-------------------
A mailbox is one MPMC ring of :mod:`buzon._core` (the ring ``shm:`` channels and
:class:`~buzon.shm.BoundedBuffer` use) in a 0600 shared-memory segment with an
unguessable name, found through the 0600 name file ``NAME.mbox`` in buzon's private
runtime dir (published with ``link(2)``, so two creators cannot both win). Every
process and thread that opens the mailbox attaches the same ring: any sender reserves
a record, any receiver claims the next committed one by CAS, so each message goes to
exactly one receiver, the one that asked first (policy ``"any"``).

Records. Each record is one buzon frame (``protocol/frames.py``) of kind DATA, with
the header fields MESSAGE_ID (u64, per sending object), SENDER (u32 pid, u32 uid),
SENT_AT (u64 ns since the epoch) and, for a message whose sender wants to know who
took it, the receipt flag and REPLY_TO (the sender's private acknowledgement ring). A
frame larger than the ring's record goes *out of line*: a block segment of its own
holds it and the record carries ``0x00 "OOL" name`` (a frame never starts with 0x00).

Capacity. ``capacity=N``: a ring of N fixed records of ``max_inline`` bytes each, so N
messages fit whatever their size (the larger ones are out of line), then ``send``
blocks and ``send_nowait`` raises ``Full``. ``capacity=0`` (rendezvous): one record,
and ``send`` returns only once a receiver took the message (it waits for the
receiver's acknowledgement); a send that gives up withdraws its message, arbitrated
by an OFD lock on byte ``_OFFER_BASE + id`` of its acknowledgement ring
(:meth:`Mailbox._withdraw`, :meth:`Mailbox._acknowledge`). ``capacity=None``: a
ring of variable records of ``max_bytes`` bytes; ``send`` never blocks, and raises
``Full`` naming ``max_bytes`` when the messages waiting fill it.

Receipts. ``send_async`` sets the frame's receipt flag and REPLY_TO; the receiver that
takes the message writes ``(message id, pid, uid)`` where REPLY_TO says. The hot path's
receipt records (``"any"``, ``"exclusive"``) name ``"#"`` + the sender's
acknowledgement ring: the receiver stores the acknowledgement into the sender's table
(``_TABLED``: a Block beside the ring, one entry per message id modulo ``_MAX_ACKS``,
protocol/_frames.c "the acknowledgement table"), a few stores instead of a ring
record; a sender waiting for a receipt publishes the id in the table's head and its
receiver then also rings the ring (a doorbell record), whose wake-ups it sleeps on. An
entry holding a later id refuses the acknowledgement, which goes into the ring. Every
other receipt record names the ring itself; the receiver puts the acknowledgement
there (waiting at most ``_ACK_WAIT`` for room or for the ring's lock, then dropped and
counted: never a long block on a sender that does not read its acknowledgements). On
the hot path each step is one C call (``MailboxCore``): each object's ``send_async``
is its core's ``receipt_send`` (sends and makes the :class:`MailboxReceipt`, a C
type), the receiver acknowledges as it takes, and ``wait``/``done`` read the table
(without a lock) or the ring until their acknowledgement comes (``receipt_ready``, if
the mailbox's lock is free at once, else the general way, ``_receipt_wait``; others
wait in the table ``_acked``, oldest first).

Lifecycle. Opening creates the mailbox if absent (``create=None``), only creates
(``create=True``: ``EndpointInUse`` if it exists) or only opens (``create=False``:
``NoSuchEndpoint``). Capacity and policy are recorded in the ring's label; opening
with other values raises ``EndpointInUse`` (never a silent attach to something else).
``remove()`` shuts the ring down, discards what is in it (waiting receivers get
``EndOfChannel``, senders ``NoSuchEndpoint``, receipts ``Undelivered``) and unlinks
its name, FIFO and segments.

Crash safety is the ring's: a sender killed mid-send leaves a RESERVED record that
receivers skip (never a torn message), a receiver killed after claiming loses that
message (at most once; counted in ``statistics()["abandoned"]``).

Policy ``"exclusive"``: a receiver holds the mailbox while it holds an OFD write lock
on byte ``_HOLD_BYTE`` of the segment, taken before its first receive and kept until
it closes; the kernel drops the lock when the holder dies, and the next waiter takes
over: it waits on the wake-up FIFO, which the holder's close writes, and on a pidfd of
the holder's process (:meth:`Mailbox._holder_pidfd`), readable once it died. Messages
stay in the ring meanwhile: nothing the holder had not taken is lost.

Versions: a mailbox made now ends its label in ``tables`` (:data:`_TABLES`); only
there does ``send_async`` use the ``"#"`` table path, which older receivers do not
understand (they refuse to open such a mailbox).

Broadcast receipts: the sender keeps, per receipt, the message's number in the
broadcast ring and the receivers it went to (``_bc_sent``); a receiver's cursor passes
a receipt record only after it acknowledged it (``Bcast.commit``), so a receiver past
the message, or gone, without an acknowledgement lost its copy (``receipt.lost``,
:meth:`Mailbox._bc_settle`).

Policy ``"round_robin"``: each receiver has a ring of its own, listed in a receiver
table; senders put each message into one of them (:mod:`buzon._mailbox_fan`). Policy
``"broadcast"``: one shared broadcast ring, each message written once and read by every
attached receiver at its own cursor (:mod:`buzon._mailbox_bcast`).

Waiting on many things (``buzon.wait``, asyncio): every user holds the FIFO
``NAME.mbox.wake`` open and sets it as its rings' data notification; a waiter arms
the ring, and the next commit by any sender writes the FIFO (:meth:`Mailbox._ready`).
Acknowledgement rings get it too (a receiver sets it when it attaches one:
:meth:`Mailbox._acks_ready`), and an exclusive holder that closes writes it. Every
user also holds ``NAME.mbox.room`` as the ring's space notification: a sender waiting
for room fills it and arms the ring, and the next take drains it, which makes it
writable (:meth:`Mailbox._room_ready`). The blocking round-robin ``send`` and
exclusive ``recv`` wait on the same FIFOs (and pidfd) with ``select.poll``; every such
wait is bounded by ``_WAIT_SLICE``, the fallback for a wake-up another waiter consumed.

The hot path. Each object has a ``MailboxCore`` (``buzon.protocol._frames``, C): the
*common record* (the frame above with exactly MESSAGE_ID, SENDER and SENT_AT, no
out-of-band buffer; or with REPLY_TO after them, a receipt record) is encoded, built
and put, or taken, checked and decoded, in one C call: ``send``, ``send_async``,
``recv``, ``recv_message`` and a broadcast's fan-out to every receiver's ring.
``bytes`` go as they are (codec raw); other objects through a msgspec encoder without
hooks (codec msgpack: the same bytes the codec makes), so what only the codec's hooks
know (numpy arrays and scalars) or refuse goes the general way, which says why. The
receiver of a receipt record acknowledges it in C once the sender's acknowledgement
ring is attached (the general way attaches it the first time). Each plain object's own
``send`` and ``recv`` are the core's ``box_send``/``box_recv`` (bound weakly, like
``send_async``): no Python frame for a common record; the rest goes to the methods
(``_send_py``/``_send_general``, ``_recv_py``/``_recv_rest``). Message ids come from
the core's counter on both ways. The core also marks the wake-up FIFO's mtime (a
send) and atime (a take) at most once a second: ``buzon ls`` reads them as last use.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import EllipsisType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Self

from . import _core
from ._mailbox_bcast import _unlink_ool
from ._mailbox_fan import _PID
from .codec import Codec
from .errors import (
    BuzonError,
    ChannelClosed,
    Empty,
    EndOfChannel,
    EndpointInUse,
    Full,
    MessageTooLarge,
    NoSuchEndpoint,
    ProtocolError,
    Timeout,
    Undelivered,
    UnsupportedOperation,
)
from .protocol._frames import MailboxCore, MailboxReceipt, receipt_ways
from .protocol.frames import (
    DEFAULT_MAX_FRAME,
    FIELDS_FLAG,
    Field,
    Kind,
    encode_frame,
    parse_frame,
)
from .shm._names import lookup, name_path, publish, unpublish
from .shm._segment import (
    SHM_DIR,
    SegmentInfo,
    _check_name,
    attach_ring,
    create_ring,
    new_segment_name,
    remove_segment,
    segment_exists,
)
from .transport.base import PeerInfo

if TYPE_CHECKING:
    from ._mailbox_bcast import Shared
    from ._mailbox_fan import Fan
    from .names import Registration

__all__ = ["Mailbox", "MailboxReceipt", "Message", "POLICIES", "mailbox"]

Policy = Literal["any", "exclusive", "round_robin", "broadcast"]
POLICIES: tuple[str, ...] = ("any", "exclusive", "round_robin", "broadcast")
"""The receive policies (see docs/mailboxes.md)."""
_FANNED = ("round_robin", "broadcast")  # the mailbox's ring carries none of the messages

DEFAULT_CAPACITY = 1024
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_INLINE = 1024
_SUFFIX = ".mbox"
_LABEL = "mailbox"
_RAW = "raw"  # the label's last word for a raw-bytes fixed-slot mailbox (BoundedBuffer)
# The label's last word of any other mailbox made by this version: its receivers all
# understand REPLY_TO "#" (_TABLED), so send_async may ask for the acknowledgement table.
# Buzon before the tables (7d530d0) would take "#" + a ring's name for a ring it cannot
# attach, drop the acknowledgement and leave the receipt waiting: it refuses to open a
# mailbox labelled so (ProtocolError: the label is not a mailbox's), and in a mailbox
# labelled without it (made by older buzon, whose receivers may be attached) send_async
# names the acknowledgement ring itself, as older buzon does (docs/mailboxes.md).
_TABLES = "tables"
_SLOTS = 128  # participants (attached objects) per mailbox: the ring's maximum
_RECEIPT_FLAG = 0x08  # frame flag bit 3: the sender asks for a receipt
_OOL = b"\x00OOL"  # record prefix: the frame is in the block named after it
_OOL_KIND = "mailbox-message"  # an out-of-line block's metadata: kind, mailbox segment
_ACK = struct.Struct("<QII")  # message id, receiver pid, receiver uid
_ACK_RING = 64 * 1024
# how long a receiver waits to put an acknowledgement (room, or the ring's reservation
# lock, which a put without waiting gives up after 2 ms: under load a preempted holder
# keeps it longer, and the acknowledgement was lost); then it is dropped and counted
_ACK_WAIT = 0.05
_MAX_ACK_RINGS = 64  # acknowledgement rings a receiver keeps attached
_BC_SETTLE = 0.02  # how often a broadcast receipt's wait looks for copies lost
_MAX_ACKS = 1 << 16  # acknowledgements a sender keeps for receipts not yet read (MAX_ACKS in C)
# send_async's hot path: REPLY_TO "#" + the ack ring's name asks the receiver to write
# the acknowledgement into the sender's table, the Block named ring + _TABLE_SUFFIX
# (protocol/_frames.c, "the acknowledgement table": 64-byte head, 16 bytes per entry)
_TABLED = b"#"
_TABLE_SUFFIX = "t"
_ACKTAB_BYTES = 64 + 16 * _MAX_ACKS
_ACKTAB_KIND = "mailbox-acks"
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
# The frame of a message without buffers or receipt: the frame header, then the FIELDS
# block of MESSAGE_ID, SENDER and SENT_AT (u16 length 30; tag, length, value each).
_FAST = struct.Struct("<BBBBIHBBQBBIIBBQ")
_FAST_FIELDS = 30
# plain ints (an IntEnum member lookup costs ~0.1 us in 3.11, and the hot path has many)
_DATA = int(Kind.DATA)
_FIELDS = int(FIELDS_FLAG)
_F_ID = int(Field.MESSAGE_ID)
_F_SENDER = int(Field.SENDER)
_F_SENT = int(Field.SENT_AT)
_FAST_TAGS = (_F_ID, 8, _F_SENDER, 8, _F_SENT, 8)
_SENDER = struct.Struct("<II")
_WAKE = ".wake"  # NAME.mbox.wake: the FIFO a commit writes when a waiter armed
_ROOM = ".room"  # NAME.mbox.room: the FIFO a take drains when a sender armed for room
_ROOM_FILL = bytes(4096)  # one page: the room FIFO's whole buffer (F_SETPIPE_SZ)
_F_SETPIPE_SZ = 1031
# longest wait between two looks (buzon.wait, asyncio, and the blocking round-robin
# send and exclusive recv): only the fallback for a lost wake-up (see _ready)
_WAIT_SLICE = 0.1
_HOLD_BYTE = 4000  # exclusive: the holder's OFD lock (slot locks use bytes 0-127)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86-64/aarch64
# Rendezvous withdrawal: REPLY_TO starts with "!" for a message its sender may withdraw;
# byte _OFFER_BASE + message id of the sender's acknowledgement ring is the arbiter.
_WITHDRAWABLE = b"!"
_OFFER_BASE = 1 << 40


class _Withdrawn(Exception):
    """A record whose sender withdrew it: the receiver skips it (never returned)."""


def _lock_byte(fd: int, offset: int, kind: int, wait: bool) -> bool:
    """An OFD lock (F_WRLCK) or unlock (F_UNLCK) of one byte; False if it is held."""
    lock = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, lock)
    except OSError as exc:
        if exc.errno in (11, 13):  # EAGAIN, EACCES: held by another description
            return False
        raise
    return True


@dataclass(frozen=True, slots=True)
class Message:
    """A message as :meth:`Mailbox.recv_message` returns it."""

    body: Any
    """The object that was sent."""
    id: int
    """The sender's id of this message (unique per sending mailbox object)."""
    sender: PeerInfo
    """Who sent it: ``.pid`` and ``.uid`` of the sending process."""
    sent_at: float
    """When it was sent (``time.time()`` of the sender)."""


_GENERAL = object()  # Mailbox._recv_from: the hot path did not receive (the general way)
_NEW = object.__new__
_SLOTS_OF: dict[str, Any] = dict(vars(Message))  # the slot descriptors, by field
_SET_BODY = _SLOTS_OF["body"].__set__
_SET_ID = _SLOTS_OF["id"].__set__
_SET_SENDER = _SLOTS_OF["sender"].__set__
_SET_SENT_AT = _SLOTS_OF["sent_at"].__set__


def _message(body: Any, message_id: int, sender: PeerInfo, sent_at: float) -> Message:
    """``Message(body, message_id, sender, sent_at)`` through its slots: the frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) costs twice as much."""
    m: Message = _NEW(Message)
    _SET_BODY(m, body)
    _SET_ID(m, message_id)
    _SET_SENDER(m, sender)
    _SET_SENT_AT(m, sent_at)
    return m


_PEERS: dict[tuple[int, int], PeerInfo] = {}


def _peer(pid: int, uid: int) -> PeerInfo:
    """The ``PeerInfo`` of (pid, uid) for messages and receipts: one shared instance
    each (it is frozen, and building one costs about 2 µs, more than a receive)."""
    peer = _PEERS.get((pid, uid))
    if peer is None:
        if len(_PEERS) >= 4096:
            _PEERS.clear()
        peer = _PEERS[pid, uid] = PeerInfo(pid=pid, uid=uid)
    return peer


def _label(policy: str, capacity: int | None, max_inline: int, raw: bool = False) -> str:
    """A new mailbox ring's label: a raw one ends in ``raw``, any other in ``tables``
    (see :data:`_TABLES`)."""
    cap = "none" if capacity is None else capacity
    return f"{_LABEL} {policy} {cap} {max_inline} " + (_RAW if raw else _TABLES)


def _label_tabled(label: str) -> bool:
    """Whether a mailbox ring's label says its receivers write acknowledgement tables
    (the REPLY_TO ``"#"`` path; see :data:`_TABLES`)."""
    return label.endswith(" " + _TABLES)


def _parse_label(label: str) -> tuple[str, int | None, int, bool]:
    """(policy, capacity, max_inline, raw) from a mailbox ring's label (with or without
    its last word ``tables``); ProtocolError if it is not one."""
    parts = label.split(" ")
    if len(parts) == 5 and parts[4] == _TABLES:
        parts.pop()
    try:
        raw = len(parts) == 5 and parts[4] == _RAW
        if len(parts) != 4 + raw or parts[0] != _LABEL or parts[1] not in POLICIES:
            raise ValueError(label)
        capacity = None if parts[2] == "none" else int(parts[2])
        if raw and (parts[1] != "any" or capacity is None or capacity < 1):
            raise ValueError(label)
        return parts[1], capacity, int(parts[3]), raw
    except ValueError:
        raise ProtocolError(f"segment label {label!r} is not a buzon mailbox's") from None


def _ring_size(records: int, record: int) -> int:
    need = records * ((_core.RECORD_HEADER + record + 7) & ~7)
    cap = 4096
    while cap < need:
        cap <<= 1
    return cap


def _settled(receipt: MailboxReceipt) -> bool:
    return len(receipt._receivers) + receipt.lost >= receipt.expected


def _receipt_done(receipt: MailboxReceipt) -> bool:
    """``MailboxReceipt.done()`` the general way (its C hot path could not say): read
    the acknowledgements that already arrived (broadcast: and the copies lost), never
    wait."""
    box = receipt._box
    while not _settled(receipt):
        who = box._ack_of(receipt.id, 0.0)
        if who is None:
            if box._bc is not None:
                box._bc_settle(receipt)  # (sets receipt.lost)
            break
        receipt._receivers += (who,)
    return _settled(receipt)


def _receipt_wait(receipt: MailboxReceipt, timeout: float | None) -> PeerInfo:
    """``MailboxReceipt.wait(timeout)`` the general way (see :class:`MailboxReceipt`).
    A broadcast receipt also looks, every ``_BC_SETTLE`` seconds, for copies lost (no
    acknowledgement comes for those)."""
    if receipt.expected == 0:
        raise Undelivered(f"message {receipt.id} went to no receiver (none was attached)")
    box = receipt._box
    deadline = None if timeout is None else time.monotonic() + timeout
    while not _settled(receipt):
        if box._bc is not None and box._bc_settle(receipt):
            break
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        step = left
        if box._bc is not None and receipt.id in box._bc_sent:
            step = _BC_SETTLE if left is None else min(left, _BC_SETTLE)
        who = box._ack_of(receipt.id, step)
        if who is None:
            if step != left:
                continue  # (a slice, not the deadline)
            raise Timeout(
                f"message {receipt.id} was not taken within {timeout} s "
                f"({len(receipt._receivers)} of {receipt.expected} receivers took it)"
            )
        receipt._receivers += (who,)
    if not receipt._receivers:
        raise Undelivered(
            f"message {receipt.id} was lost by each of the {receipt.expected} receivers it "
            "went to (their backlogs dropped it, the overflow rule, or they closed or died "
            "before taking it)"
        )
    return receipt._receivers[0]


receipt_ways(_receipt_done, _receipt_wait)


class Mailbox:
    """A named mailbox on this host: any number of senders and receivers, in any mix
    of processes and threads, share it. Made by :func:`buzon.mailbox`.

    ``send`` blocks while the mailbox is full (capacity N) or until a receiver took the
    message (capacity 0); ``recv`` blocks until a message arrives. ``timeout=None``
    waits for ever, a number of seconds raises :class:`~buzon.errors.Timeout`; the
    ``_nowait`` forms raise ``Full``/``Empty`` instead. Thread-safe. Passes to child
    processes (spawn, forkserver, fork) by name, through multiprocessing or pickle.
    """

    def __init__(
        self,
        name: str,
        capacity: int | EllipsisType | None = ...,
        policy: Policy | EllipsisType = ...,
        create: bool | None = None,
        *,
        max_inline: int = DEFAULT_MAX_INLINE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_message: int = DEFAULT_MAX_FRAME,
    ) -> None:
        if name.startswith("name:"):
            raise NoSuchEndpoint(
                f"{name!r}: name: addresses need the name service, which is not there yet"
            )
        if policy == "broadcast" and capacity == 0:
            raise ValueError(
                "a broadcast mailbox cannot be a rendezvous (capacity=0): capacity is each "
                "receiver's backlog; use N or None"
            )
        if policy is not ... and policy not in POLICIES:
            raise ValueError(f"unknown mailbox policy {policy!r}; use one of {POLICIES}")
        if (
            capacity is not ...
            and capacity is not None
            and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0)
        ):
            raise ValueError(f"capacity must be 0, a positive int or None, not {capacity!r}")
        if not 16 <= max_inline <= 1 << 20:
            raise ValueError("max_inline must be between 16 bytes and 1 MiB")
        if max_bytes < 4096:
            raise ValueError("max_bytes must be at least 4096")
        self.name = name
        self.max_message = max_message
        self.path = name_path(name, _SUFFIX)
        ring, self.created = self._open(capacity, policy, create, max_inline, max_bytes)
        self._setup(ring)

    def _setup(self, ring: _core.Ring) -> None:
        self._ring = ring
        self._segment = ring.name
        label = ring.info()["label"]
        self.policy, self.capacity, self.max_inline, self._raw = _parse_label(label)
        ring.title = self._title()  # its errors name the mailbox, not the segment
        self._tabled = _label_tabled(label)  # receipts may ask for the table (_TABLES)
        self._fixed = bool(ring.info()["record_size"])
        self._inline = ring.max_message
        self._local = threading.local()  # a codec per thread (codecs are not thread-safe)
        self._uid = os.getuid()
        self._lock = threading.Lock()  # acknowledgement ring and tables
        self._acks: _core.Ring | None = None
        self._acks_pid = 0
        self._acks_fd = -1  # the sender's description of its ack ring: withdrawal locks
        self._acktab: _core.Block | None = None  # its acknowledgement table (hot path)
        self._acked: dict[int, list[PeerInfo]] = {}  # oldest first (the C table too)
        # broadcast receipts not settled yet: message id -> (its message number in the
        # broadcast ring, the (entry, pid, start) of each receiver it went to)
        self._bc_sent: dict[int, tuple[int, list[tuple[int, int, int]]]] = {}
        # acknowledgement rings we write to, by REPLY_TO: (ring, withdrawal fd or -1,
        # the sender's table or None)
        self._reply_rings: OrderedDict[str, tuple[_core.Ring, int, _core.Block | None]] = (
            OrderedDict()
        )
        self._hold_fd = -1
        self._hold_pid = 0
        self._hold_lock = threading.Lock()
        self._closed = False
        self._wake_fd = _open_wake(self.path + _WAKE)
        self._room_fd = -1
        try:
            self._room_fd = _open_wake(self.path + _ROOM, small=True)
        finally:
            if self._room_fd < 0:
                os.close(self._wake_fd)
        ring.set_notify(self._wake_fd, self._room_fd)
        self._fan: Fan | None = None
        self._bc: Shared | None = None
        if self.policy == "round_robin":
            from ._mailbox_fan import Fan

            self._fan = Fan(self)
        self._broadcast = self.policy == "broadcast"
        # send's hot path: one ring, no rendezvous; a frame that fits a record
        self._plain = self.policy not in _FANNED and self.capacity != 0 and not self._raw
        # recv's hot path (the C core): records that are frames, no exclusive hold
        self._fast_recv = self.policy != "exclusive" and not self._raw
        self._fast_max = min(self._inline, self.max_message) - _FAST.size
        encode, decode = _fast_codec()
        self._core = MailboxCore(
            ring, encode, decode, self._fast_max, self._uid, self.capacity is None
        )
        self._core.set_message(Message, _peer)  # its recv_message makes the Message
        self._ids = iter(self._core.next_id, None)  # one sequence with the hot path's
        if self._broadcast:
            from ._mailbox_bcast import Shared

            self._bc = Shared(self, encode, decode)  # (closes the fds on failure)
            self._ids = iter(self._bc.next_id, None)  # (its hot path's counter)
        self._core.replies = {}  # acknowledgement rings by name, for the hot path's acks
        self._core.mark_fd = self._wake_fd  # last send/take, for buzon ls (describe)
        self._ack_name: tuple[int, bytes] = (0, b"")  # (pid, name) of our own ack ring
        # send_async's, send's and recv's hot paths without a Python frame: the core's
        # receipt_send, box_send and box_recv, bound to this object (weakly) as its own
        # send_async, send and recv (the methods are the general way; close unbinds)
        cls = type(self)
        hot_recv = self._fast_recv and self._fan is None and not self._broadcast
        self._core.bind(self, self._plain, hot_recv, self._tabled)
        vars(self)["send_async"] = self._core.receipt_send
        if self._plain and cls.send is Mailbox.send:
            vars(self)["send"] = self._core.box_send
        if hot_recv and cls.recv is Mailbox.recv:
            vars(self)["recv"] = self._core.box_recv
        self._counts = {
            "sent": 0,
            "received": 0,
            "acks_dropped": 0,
            "out_of_line": 0,
            "withdrawn": 0,
        }
        from . import _reduction

        _reduction.register()

    # ---- opening ---------------------------------------------------------------------

    def _open(
        self,
        capacity: int | EllipsisType | None,
        policy: Policy | EllipsisType,
        create: bool | None,
        max_inline: int,
        max_bytes: int,
        raw: bool = False,
    ) -> tuple[_core.Ring, bool]:
        """The mailbox's ring, attached or created, and whether this call created it.
        ``raw``: a raw-bytes fixed-slot mailbox (:class:`~buzon.shm.BoundedBuffer`):
        ``capacity`` slots of ``max_inline`` bytes, opened only as one (ValueError)."""
        for _ in range(8):
            segment = lookup(self.path)
            if segment is not None:
                try:
                    ring = attach_ring(segment)
                except NoSuchEndpoint:
                    unpublish(self.path, segment)  # its segment is gone: a stale name
                    continue
                try:
                    info = ring.info()
                    if info["closed"]:  # being removed right now
                        ring.close()
                        time.sleep(0.001)
                        continue
                    have_policy, have_capacity, have_inline, have_raw = _parse_label(info["label"])
                except BaseException:
                    ring.close()
                    raise
                if raw and (
                    not have_raw
                    or (capacity is not ... and capacity != have_capacity)
                    or have_inline < max_inline
                ):
                    ring.close()
                    what = (
                        f"other sizes (slots={have_capacity}, item_size={have_inline})"
                        if have_raw
                        else "as a mailbox of objects, not a raw-bytes one"
                    )
                    raise ValueError(
                        f"bounded buffer {self.name!r} exists {what}; attach without "
                        "slots/item_size, or remove it first"
                    )
                if create:
                    ring.close()
                    raise EndpointInUse(f"mailbox {self.name!r} exists (create=True)")
                if (capacity is not ... and capacity != have_capacity) or (
                    policy is not ... and policy != have_policy
                ):
                    ring.close()
                    raise EndpointInUse(
                        f"mailbox {self.name!r} exists with capacity={have_capacity!r}, "
                        f"policy={have_policy!r}, not capacity="
                        f"{have_capacity if capacity is ... else capacity!r}, policy="
                        f"{have_policy if policy is ... else policy!r}: open it with those "
                        "values (or without them), or remove it first"
                    )
                return ring, False
            if create is False:
                raise NoSuchEndpoint(f"no mailbox named {self.name!r} (create=False)")
            cap = DEFAULT_CAPACITY if capacity is ... else capacity
            pol = "any" if policy is ... else policy
            label = _label(pol, cap, max_inline, raw)
            if cap is None:
                size = 1 << (max_bytes - 1).bit_length()
                ring = create_ring(size, label=label, slots=_SLOTS)
            else:
                records = max(cap, 1)
                ring = create_ring(
                    _ring_size(records, max(max_inline, 1)),
                    label=label,
                    slots=_SLOTS,
                    records=records,
                    record_size=max(max_inline, 1),
                )
            if pol == "round_robin":
                from ._mailbox_fan import create_table, table_name

                create_table(ring.name)
            elif pol == "broadcast":
                from . import _mailbox_bcast

                _mailbox_bcast.create(ring.name, cap, max(max_inline, 1), max_bytes)
            if publish(self.path, ring.name):
                return ring, True
            ring.close()  # somebody else created it first: use theirs
            remove_segment(ring.name)
            if pol == "round_robin":
                remove_segment(table_name(ring.name))
            elif pol == "broadcast":
                remove_segment(_mailbox_bcast.segment_name(ring.name))
        raise NoSuchEndpoint(f"mailbox {self.name!r} keeps changing; try again")

    @classmethod
    def _attach_segment(cls, name: str, path: str, segment: str) -> Self:
        """The mailbox ``name`` by its segment: how a child process attaches the
        mailbox it was passed, wherever its own runtime dir is."""
        self = cls.__new__(cls)
        self.name = name
        self.path = path
        self.max_message = DEFAULT_MAX_FRAME
        self.created = False
        self._setup(attach_ring(segment))
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (self.name, self.path, self._ring.name, self.max_message))

    # ---- sending ---------------------------------------------------------------------

    def _codec(self) -> Codec:
        codec: Codec | None = getattr(self._local, "codec", None)
        if codec is None:
            codec = self._local.codec = Codec()
        return codec

    def _encode(self, obj: Any, message_id: int, reply_to: str | None) -> list[Any]:
        codec_id, body, buffers = self._codec().encode(obj)
        if not buffers and reply_to is None and len(body) + _FAST.size <= self.max_message:
            # the common frame, header and fields in one pack (the same bytes as below)
            head = _FAST.pack(
                1, _DATA, codec_id | _FIELDS, 0, len(body), _FAST_FIELDS,
                _F_ID, 8, message_id,
                _F_SENDER, 8, os.getpid(), self._uid,
                _F_SENT, 8, time.time_ns(),
            )  # fmt: skip
            return [head, body]
        fields: dict[int, bytes] = {
            Field.MESSAGE_ID: _U64.pack(message_id),
            Field.SENDER: _SENDER.pack(os.getpid(), self._uid),
            Field.SENT_AT: _U64.pack(time.time_ns()),
        }
        if reply_to is not None:
            fields[Field.REPLY_TO] = reply_to.encode("ascii")
            codec_id |= _RECEIPT_FLAG
        try:
            return encode_frame(
                Kind.DATA, codec_id, body, buffers, max_frame=self.max_message, fields=fields
            )
        except MessageTooLarge as exc:
            size = sum(memoryview(b).nbytes for b in buffers) + len(body)
            raise MessageTooLarge(
                f"a message of {size} bytes is over mailbox {self.name!r}'s limit of "
                f"{self.max_message} bytes: open it with a larger max_message= (every "
                "process that receives from it too), or send smaller messages"
            ) from exc

    def _record(self, parts: list[Any], inline: int = 0) -> list[Any]:
        """The ring record for a frame: itself, or a reference to a block holding it
        (over ``inline`` bytes; 0: the ring's record)."""
        total = sum(len(p) if type(p) is bytes else memoryview(p).nbytes for p in parts)
        if total <= (inline or self._inline):
            return parts
        block_name = new_segment_name()
        meta = json.dumps({"kind": _OOL_KIND, "mailbox": self._segment}).encode()
        block = _core.Block.create("/" + block_name, total, meta, 2)
        try:
            pos = 0
            for p in parts:
                block.write(pos, p)
                pos += memoryview(p).nbytes
        except BaseException:
            block.close()
            remove_segment(block_name)
            raise
        block.close()
        self._counts["out_of_line"] += 1
        return [_OOL + block_name.encode("ascii")]

    def _put(self, record: list[Any], timeout: float | None, nowait: bool) -> None:
        self._check_open()
        try:
            if nowait or self.capacity is None:
                self._ring.send_nowait(record)
            else:
                self._ring.send(record, timeout)
        except (Full, EndOfChannel) as exc:
            self._drop_record(record)
            self._put_failed(exc)
        except BaseException:
            self._drop_record(record)
            raise
        self._counts["sent"] += 1

    def _put_failed(self, exc: Exception) -> NoReturn:
        """The mailbox's error for a ring that was full (``Full``) or shut down."""
        if isinstance(exc, EndOfChannel):
            raise NoSuchEndpoint(f"mailbox {self.name!r} was removed") from None
        if self.capacity is None:
            raise Full(
                f"mailbox {self.name!r} is full: capacity=None holds messages up to its "
                f"byte cap, max_bytes={self._ring.capacity}; receive faster, or create "
                "it with a larger max_bytes="
            ) from None
        raise Full(f"mailbox {self.name!r} is full (capacity={self.capacity})") from None

    def _put_round_robin(self, record: list[Any], deadline: float | None, nowait: bool) -> None:
        """Hand ``record`` to the next receiver with room, waiting for one: on the room
        FIFO, which the next take by any receiver (or a receiver that attaches, or
        :meth:`remove`) makes writable (:meth:`_room_ready`)."""
        assert self._fan is not None
        armed = False  # the last look armed the space notification and found room
        need = 0  # the record's bytes (capacity=None), reckoned at the first wait
        try:
            while True:
                self._check_open()
                if self._ring.info()["closed"]:
                    raise NoSuchEndpoint(f"mailbox {self.name!r} was removed")
                if self._fan.round_robin(record):
                    self._counts["sent"] += 1
                    return
                if nowait:
                    raise Full(
                        f"mailbox {self.name!r}: no receiver has room (capacity="
                        f"{self.capacity} each) or none is attached"
                    )
                if deadline is not None and time.monotonic() >= deadline:
                    raise Timeout(
                        f"mailbox {self.name!r}: no receiver had room (or none was attached)"
                    )
                if not need:  # capacity=None: room means room for this record (a
                    # backlog may have room for a smaller one only): armed for its size
                    need = 1
                    if self.capacity is None:
                        need = max(1, sum(memoryview(p).nbytes for p in record))
                if self._room_ready(need) and not armed:
                    armed = True  # room came meanwhile: look again (once)
                    continue
                self._wait_fds((), (self._room_fd,), deadline)
                armed = False
        except BaseException:
            self._drop_record(record)
            raise

    def _wait_fds(
        self,
        reads: Iterable[int],
        writes: Iterable[int],
        deadline: float | None,
        slice_: float | None = None,
    ) -> None:
        """Block until one of the fds is ready (readable / writable), the deadline or
        the fallback slice (``_wait_slice``) passes; the caller looks again."""
        until = time.monotonic() + (self._wait_slice if slice_ is None else slice_)
        if deadline is not None:
            until = min(until, deadline)
        # a close() in another thread wakes it (the wake-up FIFO poked, the room FIFO
        # drained) and closes the fds only after it left (see _wait_enter)
        self._wait_enter()
        try:
            poller = select.poll()
            for fd in reads:
                poller.register(fd, select.POLLIN)
            for fd in writes:
                poller.register(fd, select.POLLOUT)
            left = until - time.monotonic()
            if left > 0:
                poller.poll(max(1, int(left * 1000 + 0.999)))
        finally:
            self._wait_leave()
        self._check_open()

    def _new_backlog(self) -> _core.Ring:
        """A ring for one receiver of a round_robin/broadcast mailbox (its backlog)."""
        label = f"mailbox-rx {self.name}"
        if self.capacity is None:
            ring = create_ring(self._ring.capacity, label=label, slots=_SLOTS)
        else:
            records = max(self.capacity, 1)
            ring = create_ring(
                _ring_size(records, self.max_inline),
                label=label,
                slots=_SLOTS,
                records=records,
                record_size=self.max_inline,
            )
        ring.set_notify(self._wake_fd, self._room_fd)  # its takes wake waiting senders
        return ring

    def _bc_entry(self) -> int:
        """Broadcast: this object's receiver entry, attaching it first if needed. Once
        attached, ``recv`` is one C call (``Bcast.next``, an attribute of this object
        until it closes) that hands anything but a common record taken without a
        timeout to the class's ``recv`` (or, the record taken, to ``_bc_general``)."""
        bc = self._bc
        assert bc is not None
        if bc.entry < 0 or bc.pid != _PID[0]:
            self._check_open()
            entry = bc.subscribe()
            cls = type(self)
            if cls.recv is Mailbox.recv:
                bc.ring.bind(entry, Mailbox.recv.__get__(self, cls), self._bc_general)
                self.recv = bc.ring.next  # type: ignore[method-assign]
            return entry
        return bc.entry

    def _bc_general(self, data: bytes, timeout: float | None) -> Any:
        """The object of a broadcast record that is not a common one (out of line,
        receipt, other codecs): the general way; then the cursor moves past it
        (``Bcast.commit``: after a receipt's acknowledgement, see ``_bc_settle``)."""
        try:
            if data[:4] == _OOL:
                data = self._fetch(data, timeout)
            return self._decode(data)[0]
        finally:
            if self._bc is not None:
                self._bc.ring.commit()

    def _rx(self) -> _core.Ring:
        """The ring this object receives from: the mailbox's, or its own backlog
        (broadcast: this object attaches as a receiver; the mailbox's ring is returned,
        its messages are in the broadcast ring)."""
        fan = self._fan
        if fan is None:
            if self._bc is not None:
                self._bc_entry()
            return self._ring
        if fan.mine is None:  # a new receiver: room for senders waiting for one
            ring = fan.subscribe()
            ring.title = self._ring.title
            self._drain_room()
            return ring
        return fan.subscribe()

    def _title(self) -> str:
        """What error messages call this mailbox."""
        if self.name.startswith("inbox-"):  # (buzon._direct.inbox_name)
            return f"the inbox of process {self.name[6:].split('-')[0]}"
        return f"{'bounded buffer' if self._raw else 'mailbox'} {self.name!r}"

    @staticmethod
    def _drop_record(record: list[Any]) -> None:
        first = bytes(memoryview(record[0])[:4]) if record else b""
        if len(record) == 1 and first == _OOL:
            remove_segment(bytes(record[0][4:]).decode("ascii"))

    # ---- the raw-bytes fixed-slot mode (BoundedBuffer) ----------------------------------

    def _put_raw(self, item: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Add ``item``, waiting for a free slot (``Timeout`` after ``timeout`` seconds;
        ``MessageTooLarge`` over ``item_size``; ``NoSuchEndpoint`` once removed)."""
        try:
            self._ring.send(item, timeout)
        except EndOfChannel:
            raise NoSuchEndpoint(f"mailbox {self.name!r} was removed") from None

    def _put_raw_nowait(self, item: bytes | bytearray | memoryview) -> None:
        """Add ``item`` or raise ``Full``."""
        try:
            self._ring.send_nowait(item)
        except EndOfChannel:
            raise NoSuchEndpoint(f"mailbox {self.name!r} was removed") from None

    def _get_raw(self, timeout: float | None = None) -> bytes:
        """Take the oldest item, waiting for one (``Timeout`` after ``timeout`` seconds;
        ``EndOfChannel`` once removed and empty)."""
        return self._ring.recv(timeout)

    def _get_raw_nowait(self) -> bytes:
        """Take the oldest item or raise ``Empty``."""
        return self._ring.recv_nowait()

    def _no_fields(self, what: str) -> NoReturn:
        raise UnsupportedOperation(
            f"mailbox {self.name!r} is a raw-bytes one (a BoundedBuffer): its records are "
            f"the bytes sent, without id, sender or receipt, so it has no {what}"
        )

    def _send(
        self, obj: Any, timeout: float | None, nowait: bool, receipt: bool, offer: bool = False
    ) -> int:
        """Send ``obj``; its message id. ``offer``: a rendezvous whose caller waits for
        the receiver itself (asyncio): the message is withdrawable, as when this call
        waits (``capacity == 0`` and not ``nowait``)."""
        if self._raw:
            if receipt:
                self._no_fields("send_async")
            self._check_open()
            if nowait:
                self._put_raw_nowait(obj)
            else:
                self._put_raw(obj, timeout)
            self._counts["sent"] += 1
            return 0
        deadline = None if timeout is None else time.monotonic() + timeout
        rendezvous = self.capacity == 0 and not nowait
        message_id = next(self._ids)
        if self._bc is not None:
            return self._send_broadcast(obj, message_id, receipt)[0]
        reply_to = self._ack_ring().name if (receipt or rendezvous or offer) else None
        if offer or (rendezvous and not receipt):
            reply_to = "!" + self._ack_ring().name  # the receiver checks the offer stands
        record = self._record(self._encode(obj, message_id, reply_to))
        if self._fan is not None:
            self._put_round_robin(record, deadline, nowait)
        else:
            self._put(record, timeout, nowait)
        if rendezvous and not receipt:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                taken = self._ack_of(message_id, left) is not None
            except BaseException:
                self._withdraw(message_id)  # interrupted: nobody takes it from now on
                raise
            if not taken and self._withdraw(message_id):
                raise Timeout(
                    f"no receiver took the message within {timeout} s (capacity=0: it "
                    "was withdrawn, no receiver will see it)"
                )
        return message_id

    def _withdraw(self, message_id: int) -> bool:
        """Withdraw rendezvous message ``message_id``: True if done (no receiver took
        it, and none will), False if a receiver took it first (its acknowledgement
        is then read: the send succeeded). The lock on byte ``_OFFER_BASE + id`` of
        the acknowledgement ring is the arbiter: a receiver takes the message only if
        it gets that lock (and holds it until its acknowledgement is written); the
        sender takes it (waiting out a receiver that holds it) and keeps it."""
        with self._lock:
            acks = self._acks
            if acks is None or self._acks_pid != os.getpid():
                return True
            if self._acks_fd < 0:
                path = os.path.join(SHM_DIR, acks.name.lstrip("/"))
                self._acks_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            fd = self._acks_fd
        _lock_byte(fd, _OFFER_BASE + message_id, fcntl.F_WRLCK, True)
        try:
            taken = self._ack_of(message_id, 0.0) is not None
        except Undelivered:
            taken = False
        if taken:
            _lock_byte(fd, _OFFER_BASE + message_id, fcntl.F_UNLCK, False)
            return False
        self._counts["withdrawn"] += 1
        return True

    def send(self, obj: Any, timeout: float | None = None) -> None:
        """Put ``obj`` into the mailbox, waiting while it is full (capacity N) or until
        a receiver took it (capacity 0). ``NoSuchEndpoint`` once it was removed."""
        if self._plain and not self._closed:  # the hot path: one ring, a small message
            try:  # built, encoded and sent in one C call (protocol/_frames.c)
                if self._core.send(obj, timeout):
                    return
            except (Full, EndOfChannel) as exc:
                self._put_failed(exc)
        elif self._broadcast and not self._closed:  # one C call writes it once for
            try:  # every receiver (_bcast.c)
                got = self._bc.ring.send(obj)  # type: ignore[union-attr]
            except EndOfChannel as exc:
                self._put_failed(exc)
            if got is None:
                return
            if type(got) is bytes:  # it reused the slot of an out-of-line message
                _unlink_ool(got)
                return
        self._send(obj, timeout, False, False)

    _send_py = send  # the method, for the core's box_send (the object's own send)

    def _send_general(self, obj: Any, timeout: float | None) -> None:
        """:meth:`send` of what is not a common record (the core's box_send found so)."""
        self._send(obj, timeout, False, False)

    def send_nowait(self, obj: Any) -> None:
        """Put ``obj`` into the mailbox or raise ``Full`` (capacity 0: if the one
        hand-over place is taken; it does not wait for a receiver)."""
        self._send(obj, 0, True, False)

    def send_many(self, objs: Iterable[Any], timeout: float | None = None) -> int:
        """Send each object in turn (``timeout`` for each); returns how many."""
        n = 0
        for obj in objs:
            self._send(obj, timeout, False, False)
            n += 1
        return n

    def _send_broadcast(self, obj: Any, message_id: int, receipt: bool) -> tuple[int, int]:
        """(message id, how many receivers it went to: counted for a receipt only) of
        a broadcast, the general way (a frame built here; out of line if large)."""
        self._check_open()
        bc = self._bc
        assert bc is not None
        reply_to = self._ack_ring().name if receipt else None
        entries = bc.receiver_entries() if receipt else []
        record = self._record(self._encode(obj, message_id, reply_to), bc.payload)
        try:
            n = bc.put(record)
            if receipt:  # whom it went to, and where: for copies lost (_bc_settle)
                sent = self._bc_sent
                sent[message_id] = (n, entries)
                if len(sent) > _MAX_ACKS:
                    del sent[next(iter(sent))]  # (that receipt then waits for acks only)
        except EndOfChannel:
            self._drop_record(record)
            raise NoSuchEndpoint(f"mailbox {self.name!r} was removed") from None
        except BaseException:
            self._drop_record(record)
            raise
        return message_id, len(entries)  # (counted by the ring: Bcast.sent)

    def _bc_settle(self, receipt: MailboxReceipt) -> bool:
        """A broadcast receipt: True once every receiver its message went to took it or
        lost it (``receipt.lost`` counts those: their backlog dropped it, or they closed
        or died first). A receiver's cursor passes a receipt record only after its
        acknowledgement was written (``Bcast.commit``), so a receiver past the message
        whose acknowledgement is not here lost it."""
        sent = self._bc_sent.get(receipt.id)
        if sent is None or self._bc is None or self._closed:
            return False  # (sent through another object, or long ago: acks only)
        settled = self._bc.lost_copies(*sent)
        while (who := self._ack_of(receipt.id, 0.0)) is not None:  # after the cursors
            receipt._receivers += (who,)
        took: dict[int, int] = {}
        for peer in receipt._receivers:
            pid = peer.pid or 0
            took[pid] = took.get(pid, 0) + 1
        lost = waiting = 0
        for pid, done in settled:
            if took.get(pid, 0) > 0:
                took[pid] -= 1
            elif done:
                lost += 1
            else:
                waiting += 1
        receipt.lost = lost
        if waiting:
            return False
        del self._bc_sent[receipt.id]
        return True

    def send_async(self, obj: Any, timeout: float | None = None) -> MailboxReceipt:
        """Put ``obj`` into the mailbox (waiting for room like :meth:`send`, but
        never for a receiver) and return a receipt naming who takes it (broadcast:
        every receiver it went to, ``receipt.receivers``)."""
        # (each object has its core's receipt_send as its own send_async: see _setup)
        return self._send_async(obj, timeout, True)

    def _send_async(self, obj: Any, timeout: float | None, hot: bool) -> MailboxReceipt:
        """:meth:`send_async`; ``hot``: try the hot path (False: the core found that
        ``obj`` is no common record)."""
        if hot and self._plain and self._tabled and not self._closed:  # one C call
            pid, reply_to = self._ack_name
            if pid != _PID[0]:  # its receiver writes our table (see _TABLED)
                reply_to = _TABLED + self._ack_ring().name.encode("ascii")
                self._ack_name = (_PID[0], reply_to)
            try:
                receipt = self._core.send_async(obj, timeout, reply_to, self)
            except (Full, EndOfChannel) as exc:
                self._put_failed(exc)
            if receipt is not None:
                return receipt  # type: ignore[no-any-return]
        if self._bc is not None:
            return MailboxReceipt(self, *self._send_broadcast(obj, next(self._ids), True))
        if self._raw:
            self._no_fields("send_async")
        return MailboxReceipt(self, self._send(obj, timeout, False, True))

    def _send_async_failed(self, exc: BaseException) -> NoReturn:
        """The error of a failed hot-path ``send_async`` (the core's receipt_send)."""
        if isinstance(exc, (Full, EndOfChannel)):
            self._put_failed(exc)
        raise exc

    # ---- receipts ----------------------------------------------------------------------

    def _ack_ring(self) -> _core.Ring:
        with self._lock:
            self._check_open()  # (a closed object makes none: nobody would remove it)
            if self._acks is None or self._acks_pid != os.getpid():
                # a forked child makes its own: acknowledgements go to their sender
                self._acks = create_ring(_ACK_RING, label=f"mailbox-acks {self.name}")
                meta = json.dumps({"kind": _ACKTAB_KIND, "mailbox": self._segment}).encode()
                try:
                    self._acktab = _core.Block.create(
                        self._acks.name + _TABLE_SUFFIX, _ACKTAB_BYTES, meta, _SLOTS
                    )
                except BaseException:
                    name = self._acks.name
                    self._acks.close()
                    self._acks = None
                    remove_segment(name)
                    raise
                self._acks_pid = os.getpid()
                self._core.set_acks(self._acks, self._acked, self._lock, self._acktab)
                if self._acks_fd >= 0:  # the parent's (its locks stay the parent's)
                    os.close(self._acks_fd)
                    self._acks_fd = -1
            return self._acks

    def _ack_of(self, message_id: int, timeout: float | None) -> PeerInfo | None:
        """Who took message ``message_id``, waiting up to ``timeout`` (None: for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        removed = False
        while True:
            with self._lock:
                waiting = self._acked.get(message_id)
                if waiting:
                    who = waiting.pop(0)
                    if not waiting:
                        del self._acked[message_id]
                    return who
                acks = self._acks
                if acks is None or self._acks_pid != _PID[0]:  # _PID: getpid without a call
                    return None
                if self._closed:
                    raise ChannelClosed(f"mailbox {self.name!r} was closed")
                left = 0.02 if deadline is None else min(0.02, deadline - time.monotonic())
                came = True  # something came in this slice (ours, or others' only)
                got: PeerInfo | None
                try:  # one C call: what is there, else one wait of up to a slice
                    got = self._core.wait_ack(acks, message_id, self._acked, max(0.0, left))
                except (Timeout, Empty):
                    got, came = None, False
                if got is not None:
                    return got
            if not came:
                if removed:  # and no acknowledgement came in one more slice
                    raise Undelivered(
                        f"mailbox {self.name!r} was removed before message {message_id} was taken"
                    )
                removed = not self._ring_exists()
                if deadline is not None and time.monotonic() >= deadline and not removed:
                    return None

    def _ring_exists(self) -> bool:
        try:
            return not self._ring.info()["closed"]
        except Exception:
            return False

    def _acknowledge(self, reply_to: bytes, message_id: int) -> bool:
        """Tell the sender who took ``message_id``; False if the sender withdrew it
        (a rendezvous whose send gave up): the message is then not taken."""
        withdrawable = reply_to[:1] == _WITHDRAWABLE
        tabled = reply_to[:1] == _TABLED
        key = reply_to.decode("ascii", "replace")
        name = key[withdrawable or tabled :]
        with self._lock:
            entry = self._reply_rings.get(key)
            if entry is None:
                try:
                    entry = (attach_ring(name), -1, self._attach_table(name) if tabled else None)
                except Exception:  # its sender is gone, or a bad name: nobody to tell
                    self._counts["acks_dropped"] += 1
                    return True
                # an acknowledgement wakes a sender waiting in asyncio (_acks_ready)
                entry[0].set_notify(self._wake_fd, -1)
                self._reply_rings[key] = entry
                if not withdrawable:  # the hot path acknowledges from now on (never an
                    # offer: see _OFFER_BASE); a '#' name writes the sender's table
                    table = entry[2]
                    self._core.replies[reply_to] = entry[0] if table is None else (entry[0], table)
                while len(self._reply_rings) > _MAX_ACK_RINGS:
                    old, gone = self._reply_rings.popitem(last=False)
                    self._core.replies.pop(old.encode("ascii"), None)
                    _close_reply(gone)
            else:
                self._reply_rings.move_to_end(key)
            ring, fd, _table = entry
            if withdrawable and fd < 0:
                try:
                    fd = os.open(
                        os.path.join(SHM_DIR, ring.name.lstrip("/")), os.O_RDWR | os.O_CLOEXEC
                    )
                except OSError:  # its sender closed: nobody waits for the message
                    fd = -1
                else:
                    self._reply_rings[key] = (ring, fd, None)
        if not withdrawable and self._core.ack(reply_to, message_id):  # as the hot path
            return True
        ack = _ACK.pack(message_id, os.getpid(), os.getuid())
        if fd < 0:
            self._send_ack(ring, ack)
            return True
        # the offer stands while the sender does not hold this byte; holding it until
        # the acknowledgement is written makes a withdrawal wait for it, then see it
        if not _lock_byte(fd, _OFFER_BASE + message_id, fcntl.F_WRLCK, False):
            self._counts["withdrawn"] += 1
            return False
        try:
            return self._send_ack(ring, ack)  # False: the sender never learns: withdrawn
        finally:
            _lock_byte(fd, _OFFER_BASE + message_id, fcntl.F_UNLCK, False)

    @staticmethod
    def _attach_table(ring_name: str) -> _core.Block:
        """The acknowledgement table of the sender whose ack ring is ``ring_name``."""
        bare = ring_name.lstrip("/")
        _check_name(bare)
        block = _core.Block.attach("/" + bare + _TABLE_SUFFIX)
        try:  # a block of another kind (a scribbled REPLY_TO) is never written
            meta = json.loads(block.meta().rstrip(b"\0") or b"null")
            if not isinstance(meta, dict) or meta.get("kind") != _ACKTAB_KIND:
                raise ProtocolError(f"{bare}{_TABLE_SUFFIX} is no acknowledgement table")
        except BaseException:
            block.close()
            raise
        return block

    def _send_ack(self, ring: _core.Ring, ack: bytes) -> bool:
        """Write an acknowledgement, waiting at most ``_ACK_WAIT`` for room or for the
        ring's lock (a preempted receiver may hold it); else dropped and counted."""
        try:
            ring.send(ack, _ACK_WAIT)
            return True
        except (Timeout, Full, EndOfChannel, ChannelClosed):
            self._counts["acks_dropped"] += 1
            return False

    # ---- receiving ---------------------------------------------------------------------

    def _take(self, timeout: float | None) -> bytes:
        """The next record's frame (out-of-line ones fetched), waiting up to timeout."""
        if self._closed:
            raise ChannelClosed(f"mailbox {self.name!r} was closed")
        if timeout is None:
            deadline = None
        else:
            if timeout == 0.0 and self.policy == "any":
                data = self._ring.recv_nowait()
                return data if data[:4] != _OOL or self._raw else self._fetch(data, timeout)
            deadline = time.monotonic() + timeout
        if self.policy == "exclusive":
            self._hold(deadline)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        bc = self._bc
        if bc is not None:  # the shared broadcast ring, at this receiver's cursor
            entry = self._bc_entry()
            if timeout == 0.0:
                data = bc.ring.take(entry, 0.0, True)  # (committed by _next)
            else:
                data = bc.ring.take(entry, left if left is None else max(left, 1e-9), True)
            return data if data[:4] != _OOL else self._fetch(data, timeout)
        ring = self._rx()
        if timeout == 0.0:
            data = ring.recv_nowait()
        else:  # a wait whose time ran out (holding, say) is a Timeout, never Empty
            data = ring.recv(left if left is None else max(left, 1e-9))
        return data if data[:4] != _OOL or self._raw else self._fetch(data, timeout)

    def _fetch(self, data: bytes, timeout: float | None) -> bytes:
        """The frame an out-of-line record points to (its block removed once read; a
        broadcast's stays for the other receivers: the sender that reuses its slot
        removes it); the next message if the block is gone (``buzon clean --force``
        removed it, or, broadcast, this receiver was lapped)."""
        block_name = data[4:].decode("ascii", "replace")
        try:
            block = _core.Block.attach("/" + block_name)
        except FileNotFoundError:
            return self._take(timeout)
        try:
            return bytes(memoryview(block))
        finally:
            block.close()
            if self._bc is None:
                remove_segment(block_name)

    def _decode(self, data: bytes) -> tuple[Any, int, int, int, int]:
        """(object, message id, sender pid, sender uid, sent_at ns) of a frame (raw
        mode: of a record, which is the object)."""
        if self._raw:
            self._counts["received"] += 1
            return data, 0, 0, 0, 0
        n = len(data)
        if (
            n >= _FAST.size
            and data[2] & 0xF8 == _FIELDS  # no receipt, not chunked
            and data[8] == _FAST_FIELDS
            and data[9] == 0
            and data[3] == 0  # no out-of-band buffers
        ):
            (version, kind, flags, _, blen, _, t1, l1, message_id, t2, l2, pid, uid, t3, l3, ns) = (
                _FAST.unpack_from(data)
            )
            if (
                version == 1
                and kind == _DATA
                and (t1, l1, t2, l2, t3, l3) == _FAST_TAGS
                and _FAST.size + blen == n
            ):
                self._counts["received"] += 1
                body = memoryview(data)[_FAST.size :]
                return self._codec().decode(flags & 7, body, []), message_id, pid, uid, ns
        frame = parse_frame(data, self.max_message)
        fields = frame.fields or {}
        try:
            message_id = _U64.unpack(fields[Field.MESSAGE_ID])[0]
            pid, uid = _SENDER.unpack(fields[Field.SENDER])
            ns = _U64.unpack(fields[Field.SENT_AT])[0]
        except (KeyError, struct.error):
            raise ProtocolError(
                f"mailbox {self.name!r}: a message without its id, sender or time"
            ) from None
        self._counts["received"] += 1
        if (
            frame.receipt
            and Field.REPLY_TO in fields
            and not self._acknowledge(fields[Field.REPLY_TO], message_id)
        ):
            raise _Withdrawn
        return (
            self._codec().decode(frame.codec, frame.body, frame.buffers),
            message_id,
            pid,
            uid,
            ns,
        )

    def recv(self, timeout: float | None = None) -> Any:
        """Take the next message's object, waiting for one; ``EndOfChannel`` once the
        mailbox was removed and is empty."""
        bc = self._bc
        if bc is not None and not self._closed and (timeout is None or timeout > 0):
            # broadcast: one C call reads the next common record at our cursor (_bcast.c)
            got = bc.ring.recv(
                bc.entry if bc.entry >= 0 and bc.pid == _PID[0] else self._bc_entry(), timeout
            )
            if type(got) is not tuple:
                return got
            return self._bc_general(got[0], timeout)  # (never withdrawn: no rendezvous)
        elif self._fast_recv and not self._closed and (timeout is None or timeout > 0):
            # the hot path: one C call takes and decodes a common record (_frames.c)
            fan = self._fan
            if fan is None:
                ring = self._ring
            else:  # our own backlog (Fan.subscribe's hot path, without its call)
                mine = fan.mine
                ring = mine[1] if mine is not None and fan.pid == _PID[0] else self._rx()
            got = self._core.recv(ring, timeout)
            if type(got) is not tuple:
                return got
            return self._recv_rest(got, timeout)
        return self._next(timeout)[0]

    _recv_py = recv  # the method, for the core's box_recv (the object's own recv)

    def _recv_rest(self, got: tuple[Any, ...], timeout: float | None) -> Any:
        """The object of what the core's recv took but did not answer itself."""
        if len(got) == 2:  # a common record the codec decodes (or says why not)
            return self._codec().decode(got[0], got[1], [])
        data = got[0]
        if data[:4] == _OOL:
            data = self._fetch(data, timeout)
        try:
            return self._decode(data)[0]
        except _Withdrawn:  # its sender gave up on it: the next one (full timeout)
            return self._next(timeout)[0]

    def _next(self, timeout: float | None) -> tuple[Any, int, int, int, int]:
        """The next message decoded (``_decode``), skipping withdrawn ones."""
        deadline = None if not timeout else time.monotonic() + timeout
        while True:
            try:
                return self._decode(self._take(timeout))
            except _Withdrawn:
                if deadline is not None:  # (a positive wait: Timeout, not Empty)
                    timeout = max(1e-6, deadline - time.monotonic())
            finally:
                if self._bc is not None:  # past it: acknowledged (see _bc_general)
                    self._bc.ring.commit()

    def recv_nowait(self) -> Any:
        """Take the next message's object or raise ``Empty``."""
        return self._next(0.0)[0]

    def recv_message(self, timeout: float | None = None) -> Message:
        """Take the next message with its id, sender and time (:class:`Message`)."""
        if self._raw:
            self._no_fields("recv_message")
        if (
            self._fast_recv
            and self._bc is None
            and not self._closed
            and (timeout is None or timeout > 0)
        ):
            # the hot path: one C call takes a common record with its fields (_frames.c)
            got = self._core.recv_message(self._ring if self._fan is None else self._rx(), timeout)
            if type(got) is Message:
                return got
            data = got[0]
            if data[:4] == _OOL:
                data = self._fetch(data, timeout)
            try:
                body, message_id, pid, uid, ns = self._decode(data)
                return _message(body, message_id, _peer(pid, uid), ns / 1e9)
            except _Withdrawn:  # its sender gave up on it: the next one (full timeout)
                pass
        body, message_id, pid, uid, ns = self._next(timeout)
        return _message(body, message_id, _peer(pid, uid), ns / 1e9)

    def _recv_from(self, pid: int, timeout: float | None) -> Any:
        """The inbox's hot path (``buzon.recv_from``): one C call takes the next message;
        the object itself if process ``pid`` sent it, else its :class:`Message` (the
        caller holds it back); ``_GENERAL`` when the general way must receive instead."""
        if self._fast_recv and self._fan is None and self._bc is None and not self._closed:
            got = self._core.recv_from(self._ring, timeout, pid)
            if type(got) is not tuple:
                return got
            data = got[0]
            if data[:4] == _OOL:
                data = self._fetch(data, timeout)
            try:
                body, message_id, sender, uid, ns = self._decode(data)
            except _Withdrawn:
                return _GENERAL
            return _message(body, message_id, _peer(sender, uid), ns / 1e9)
        return _GENERAL

    # ---- the exclusive policy ------------------------------------------------------------

    def _hold(self, deadline: float | None) -> None:
        """Become the mailbox's one receiver (exclusive), waiting for the holder."""
        if self._hold_fd >= 0 and self._hold_pid != os.getpid():
            # a forked child: the inherited fd shares the parent's hold, not its own
            os.close(self._hold_fd)
            self._hold_fd = -1
        if self._hold_fd >= 0:
            return
        with self._hold_lock:
            if self._hold_fd >= 0:
                return
            fd = os.open("/dev/shm/" + self._ring.name.lstrip("/"), os.O_RDWR | os.O_CLOEXEC)
            lock = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _HOLD_BYTE, 1, 0)
            try:
                drained = False
                while True:
                    try:
                        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
                        self._hold_fd, fd = fd, -1
                        self._hold_pid = os.getpid()
                        self._beacon()
                        return
                    except OSError as exc:
                        if exc.errno not in (11, 13):  # EAGAIN, EACCES: held
                            raise
                    if not drained:  # empty the FIFO, then try again before waiting on
                        self._drain_wake()  # it: a wake-up from now on stays readable
                        drained = True
                        continue
                    if deadline is not None and time.monotonic() >= deadline:
                        raise Timeout(
                            f"mailbox {self.name!r} is held by another receiver "
                            "(policy='exclusive')"
                        )
                    self._wait_hold(deadline)
                    drained = False
            finally:
                if fd >= 0:
                    os.close(fd)

    def _wait_hold(self, deadline: float | None) -> None:
        """Wait until the exclusive holder may have let go: its close writes the wake-up
        FIFO (:meth:`close`), its death makes a pidfd of its process readable, and
        :meth:`remove` writes the FIFO too (the caller drained it before it tried)."""
        self._check_open()
        if self._ring.info()["closed"]:
            raise EndOfChannel(f"mailbox {self.name!r} was removed")
        pidfd = self._holder_pidfd()
        try:
            self._wait_fds((self._wake_fd,) + ((pidfd,) if pidfd >= 0 else ()), (), deadline)
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def holding(self) -> bool:
        """policy='exclusive': True while this object is the mailbox's receiver."""
        return self._hold_fd >= 0 and self._hold_pid == os.getpid()

    def _beacon(self) -> None:
        """The holder also takes a classic (per-process) lock on byte ``_HOLD_BYTE + 1``:
        ``F_GETLK`` tells a waiter its pid (an OFD lock's is -1), so the waiter can wait
        on a pidfd for the holder's death (:meth:`_holder_pidfd`). Only a hint: the
        process loses it when it closes any fd of the segment."""
        beacon = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _HOLD_BYTE + 1, 1, 0)
        try:
            fcntl.fcntl(self._hold_fd, fcntl.F_SETLK, beacon)
        except OSError:
            pass

    def _holder_pidfd(self) -> int:
        """A pidfd of the exclusive holder's process (readable once it exits; the
        caller closes it), or -1 if that is not known (the holder is in this process,
        or lost its beacon)."""
        try:
            fd = os.open(os.path.join(SHM_DIR, self._segment.lstrip("/")), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return -1
        try:
            query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _HOLD_BYTE + 1, 1, 0)
            kind, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
        except OSError:
            return -1
        finally:
            os.close(fd)
        if kind == fcntl.F_UNLCK or pid <= 0:
            return -1
        try:
            return os.pidfd_open(pid)
        except OSError:
            return -1

    def _poke(self) -> None:
        """Make :meth:`fileno` readable once (a waiter looks again)."""
        try:
            os.write(self._wake_fd, bytes(8))
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _room_ready(self, need: int = 1) -> bool:
        """True if the mailbox's ring has room for a record now; else arm the space
        notification: the next take by any receiver drains the room FIFO
        (:attr:`_room_fd`), which then becomes writable. The FIFO is filled first, so
        it is not writable before that. (asyncio senders wait on it.) ``need``: the
        record's bytes, for a round_robin backlog of capacity=None (room for a smaller
        record is no room for it)."""
        self._check_open()
        try:
            while os.write(self._room_fd, _ROOM_FILL):
                pass
        except BlockingIOError:
            pass
        if self._fan is None:
            return bool(self._ring.arm_space(self._inline if self._fixed else 1))
        # round_robin: room in any receiver's backlog will do (a receiver that attaches
        # drains the FIFO too: see _rx)
        want = self.max_inline if self.capacity is not None else need
        ready = False
        for _i, _name, ring in self._fan.receivers():
            try:
                ready = bool(ring.arm_space(want)) or ready
            except Exception:  # (shut down, or gone: the retry finds out)
                ready = True
        return ready

    def _drain_room(self) -> None:
        try:
            while os.read(self._room_fd, 1 << 16):
                pass
        except BlockingIOError:
            pass

    def _acks_ready(self) -> bool:
        """True if an acknowledgement (or nothing to wait for) is there; else arm the
        acknowledgement ring: the next acknowledgement any receiver writes makes
        :meth:`fileno` readable (receivers set it as the ring's notification)."""
        self._check_open()
        acks = self._acks
        if acks is None or self._acks_pid != os.getpid():
            return False  # nothing will come (the fallback slice bounds the wait)
        if acks.arm_data():
            return True
        self._drain_wake()
        return bool(acks.arm_data())

    # ---- readiness: buzon.wait and the asyncio twin ------------------------------------

    def fileno(self) -> int:
        """A fd that becomes readable when a message may have arrived (for
        ``select``/``poll``/``buzon.wait``; arm it with :meth:`_ready` first)."""
        return self._wake_fd

    def _ready(self) -> bool:
        """True if a message (or the end) is there; else arm the wake-up: the next
        commit by any sender writes :meth:`fileno`.

        A waiter that finds nothing empties the FIFO first, so the fd does not stay
        readable for ever. With several waiters one may empty the FIFO under another
        that was just woken; the others then find the message at their next look, which
        is why waiters sleep at most ``_WAIT_SLICE`` at a time (``_wait_slice``)."""
        if self._closed:
            return True  # recv_nowait raises ChannelClosed: not Empty
        if self._bc is not None:
            entry = self._bc_entry()
            if self._bc.ring.arm(entry):
                return True
            self._drain_wake()
            return bool(self._bc.ring.arm(entry))
        ring = self._rx()
        if ring.arm_data():
            return True
        self._drain_wake()
        return bool(ring.arm_data())

    _wait_slice = _WAIT_SLICE
    _sleepers = 0  # threads in buzon.wait on this object (see _wait_enter)
    _registration: Registration | None = None  # its name (mailbox("name:NAME") made it)

    def _wait_enter(self) -> int:
        """A thread is about to sleep on this object's fds (``buzon.wait``, a blocking
        round-robin ``send`` or exclusive ``recv``): counted in, so that a ``close()``
        in another thread wakes it (a poke of the wake-up FIFO, the room FIFO drained)
        and closes the fds only after it left. ChannelClosed if closed. No extra fd."""
        with self._lock:
            if self._closed:
                raise ChannelClosed(f"mailbox {self.name!r} was closed")
            self._sleepers += 1
        return -1

    def _wait_leave(self) -> None:
        with self._lock:
            self._sleepers -= 1

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed(f"mailbox {self.name!r} was closed")

    def qsize(self) -> int:
        """Messages in the mailbox right now (approximate under concurrent use)."""
        if self._bc is not None:  # a broadcast receiver's backlog (0 before it attached)
            return self._bc.depth()
        ring = self._ring
        if self._fan is not None and self._fan.mine is not None:
            ring = self._fan.mine[1]  # a receiver's own backlog
        return _depth(ring.info())

    def __len__(self) -> int:
        return self.qsize()

    def statistics(self) -> dict[str, int]:
        """This object's counts (sent, received, out_of_line, acks_dropped) and the
        mailbox's: depth, abandoned (messages lost to killed senders or receivers),
        dropped (round_robin: messages this object's sends lost with a dead receiver;
        broadcast: messages the mailbox's receivers lost to the overflow rule)."""
        info = self._ring.info()
        dropped = self._fan.dropped if self._fan is not None else 0
        counts = dict(self._counts)  # and the hot path's, counted in C
        counts["sent"] += self._core.sent
        counts["received"] += self._core.received
        if self._bc is not None and not self._closed:  # the mailbox's receivers' drops
            dropped = self._bc.dropped()
            counts["sent"] += self._bc.ring.sent
            counts["received"] += self._bc.ring.received
        counts["acks_dropped"] += self._core.acks_dropped
        return dict(counts, depth=self.qsize(), abandoned=info["abandoned"], dropped=dropped)

    def exists(self) -> bool:
        """True while the mailbox's name still leads to its segment."""
        segment = lookup(self.path)
        return segment is not None and segment_exists(segment)

    def close(self) -> None:
        """Detach this object (the mailbox and its messages stay; see :meth:`remove`)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._core.bind(None, False)  # send_async: ChannelClosed, the general way
            self._core.set_acks(None, None, None, None)
            if self._fan is not None:
                left = self._fan.unsubscribe()
                lost = 0
                for data in left:  # round_robin: what it had not taken goes to the others
                    if self.policy != "round_robin" or not self._fan.round_robin([data]):
                        self._drop_record([data])
                        self._fan.dropped += 1
                        lost += 1
                if lost:
                    self._fan.retire(lost, 0, lost)  # sent, and lost (buzon ls)
                self._fan.close()
            if self._bc is not None:  # its counts join the totals (its backlog as lost)
                self.__dict__.pop("recv", None)  # (Bcast.next: see _bc_entry)
                self._bc.ring.bind(-1, None, None)
                self._bc.close()
            if self._acks is not None and self._acks_pid == os.getpid():
                name = self._acks.name
                self._acks.close()
                remove_segment(name)
                if self._acktab is not None:
                    self._acktab.close()
                    remove_segment(name + _TABLE_SUFFIX)
                if self._acks_fd >= 0:
                    os.close(self._acks_fd)  # (its withdrawals stand: the ring is gone)
            self._acks_fd = -1
            self._acks = None
            self._acktab = None
            self._core.replies.clear()  # (the same rings)
            for entry in self._reply_rings.values():
                _close_reply(entry)
            self._reply_rings.clear()
        if self._hold_fd >= 0:
            os.close(self._hold_fd)
            self._hold_fd = -1
            if self._hold_pid == os.getpid():
                self._poke()  # a receiver waiting in asyncio for the hold takes over
        if self._sleepers:  # threads waiting on its fds (buzon.wait, a blocking send or
            self._poke()  # recv): woken, then the fds go
            self._drain_room()
            end = time.monotonic() + 1.0
            while self._sleepers and time.monotonic() < end:
                time.sleep(0.0002)
        for hook in CLOSING_HOOKS:  # asyncio tasks waiting on these fds: ChannelClosed
            hook((self._wake_fd, self._room_fd), f"mailbox {self.name!r} was closed")
        self._ring.close()
        self._core.mark_fd = -1
        for fd in (self._wake_fd, self._room_fd):
            if fd >= 0:
                os.close(fd)
        self._wake_fd = self._room_fd = -1

    def remove(self) -> None:
        """Destroy the mailbox: waiting receivers get ``EndOfChannel``, later sends
        ``NoSuchEndpoint``, messages still in it are discarded; its name and segment are
        unlinked, and the next ``buzon.mailbox(name)`` makes a new one. This object is
        closed (``remove()`` after ``close()`` works too)."""
        if self._registration is not None:  # mailbox("name:NAME") registered it here
            self._registration.remove()
        segment = self._segment
        ring = self._ring
        if self._closed:
            try:
                ring = attach_ring(segment)
            except NoSuchEndpoint:
                unpublish(self.path, segment)
                return
        ring.shutdown()
        unpublish(self.path, segment)
        if self.policy == "round_robin":
            from ._mailbox_fan import Fan

            fan = self._fan if self._fan is not None and not self._closed else Fan(self)
            fan.shutdown_all()
            if fan is not self._fan:
                fan.close()
        elif self.policy == "broadcast":
            from ._mailbox_bcast import Shared

            try:
                bc = self._bc if self._bc is not None and not self._closed else None
                if bc is None:
                    encode, decode = _fast_codec()
                    bc = Shared(self, encode, decode)
                bc.shutdown_all()
                if bc is not self._bc:
                    bc.close()
            except NoSuchEndpoint:
                pass  # its broadcast ring is gone already
        for fifo in (_WAKE, _ROOM):
            _wake_waiters(self.path + fifo, fifo == _ROOM)  # (they find it removed)
            try:
                os.unlink(self.path + fifo)
            except FileNotFoundError:
                pass
        while True:  # out-of-line messages nobody will take: remove their blocks
            try:
                data = ring.recv_nowait()
            except Exception:
                break
            if data[:4] == _OOL and not self._raw:
                remove_segment(data[4:].decode("ascii", "replace"))
        remove_segment(segment)
        if ring is not self._ring:
            ring.close()
        self.close()

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        cap = "None" if self.capacity is None else self.capacity
        return f"<Mailbox {self.name!r} policy={self.policy!r} capacity={cap}>"


def _close_reply(entry: tuple[_core.Ring, int, _core.Block | None]) -> None:
    entry[0].close()
    if entry[1] >= 0:
        os.close(entry[1])
    if entry[2] is not None:
        entry[2].close()


_FAST_CODEC: tuple[Any, Any] | None = None


def _fast_codec() -> tuple[Any, Any]:
    """The hot path's msgpack ``encode`` and ``decode`` (msgspec; shared, thread-safe):
    the encoder has no hooks, so what only the codec's hooks handle (numpy arrays, numpy
    scalars) is refused and goes the general way; the decoder is the codec's (its
    extension hook rebuilds small arrays sent inline)."""
    global _FAST_CODEC
    if _FAST_CODEC is None:
        import msgspec

        ext = Codec()._ext_hook  # a codec of its own: never holds out-of-band buffers
        _FAST_CODEC = (
            msgspec.msgpack.Encoder().encode,
            msgspec.msgpack.Decoder(ext_hook=ext).decode,
        )
    return _FAST_CODEC


#: called with the fds a closing mailbox releases and why, before they go: the asyncio
#: driver's ``close_fds`` (registered by ``buzon.aio``'s mailbox module) wakes the
#: tasks waiting on them with ChannelClosed and drops the loops' registrations
CLOSING_HOOKS: list[Callable[[Iterable[int], str], None]] = []


def _wake_waiters(path: str, room: bool) -> None:
    """Wake whoever waits on the FIFO at ``path``: empty the room FIFO (senders wait
    for it to be writable), write the wake-up FIFO (receivers wait for it readable)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if room:
            while os.read(fd, 1 << 16):
                pass
        else:
            os.write(fd, bytes(8))
    except OSError:  # (empty, or full: readable anyway)
        pass
    finally:
        os.close(fd)


def _open_wake(path: str, small: bool = False) -> int:
    """Open (creating it if absent) the mailbox's wake-up FIFO, read-write and
    non-blocking: every user holds it open, so writes never block or fail on it.
    ``small``: a one-page buffer (the room FIFO, which a waiter fills)."""
    from ._runtime import check_endpoint_path

    for _ in range(3):
        check_endpoint_path(path, must_exist=False)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
            if small:
                try:
                    fcntl.fcntl(fd, _F_SETPIPE_SZ, len(_ROOM_FILL))
                except OSError:  # (filled by another already: it has its size)
                    pass
            return fd
        except FileNotFoundError:
            try:
                os.mkfifo(path, 0o600)
            except FileExistsError:
                pass
    raise NoSuchEndpoint(f"cannot make the wake-up FIFO {path}")


def _attach(name: str, path: str, segment: str, max_message: int) -> Mailbox:
    box = Mailbox._attach_segment(name, path, segment)
    box.max_message = max_message
    box._fast_max = box._core.fast_max = min(box._inline, max_message) - _FAST.size
    return box


def mailbox(
    name: str,
    capacity: int | EllipsisType | None = ...,
    policy: Policy | EllipsisType = ...,
    create: bool | None = None,
    *,
    max_inline: int = DEFAULT_MAX_INLINE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_message: int = DEFAULT_MAX_FRAME,
) -> Mailbox:
    """Open the mailbox ``name`` on this host, creating it if absent.

    ``capacity``: 0 (rendezvous: ``send`` returns once a receiver took the message), N
    (``send`` waits while N messages wait; default 1024) or None (unbounded up to
    ``max_bytes`` of messages, then ``Full``). ``policy``: who gets each message;
    ``"any"`` (default): the receiver that asks first; ``"exclusive"``: one receiver at
    a time holds the mailbox, the next takes over when it closes or dies.
    ``create``: None opens or creates, True only creates (``EndpointInUse`` if it
    exists), False only opens (``NoSuchEndpoint``). Opening an existing mailbox with
    another ``capacity`` or ``policy`` raises ``EndpointInUse``; leave them out to take
    what it has. ``max_inline``: bytes a message may take inside the ring (bigger ones
    go out of line, in a block of their own); ``max_message``: the frame cap
    (``MessageTooLarge`` above it). ``name`` may be ``name:NAME``: the mailbox a
    process registered as ``mailbox:BOX`` under NAME (:mod:`buzon.names`); if nobody
    holds NAME, the mailbox NAME is opened or created and registers itself under NAME
    (owned by this process: the name goes with :meth:`Mailbox.remove` or the process's
    death, not with ``close``). ``create=False``: ``NoSuchEndpoint`` if the name is not
    registered; ``create=True``: ``EndpointInUse`` if it is.
    """
    options: dict[str, Any] = {
        "max_inline": max_inline,
        "max_bytes": max_bytes,
        "max_message": max_message,
    }
    if isinstance(name, str) and name.startswith("name:"):
        return _by_name(name, capacity, policy, create, options)
    return Mailbox(name, capacity, policy, create, **options)


def _by_name(
    url: str,
    capacity: int | EllipsisType | None,
    policy: Policy | EllipsisType,
    create: bool | None,
    options: dict[str, Any],
) -> Mailbox:
    """``mailbox("name:NAME")``: the registered mailbox, or (the name free) the mailbox
    NAME, registered under NAME by this process."""
    from .names import lookup, register, resolve_mailbox

    bare = url.removeprefix("name:")
    try:
        box_name = resolve_mailbox(url)
    except NoSuchEndpoint:
        if create is False:
            raise
    else:
        if create is True:
            raise EndpointInUse(
                f"{url!r} is registered already (-> mailbox:{box_name}); create=True "
                "makes a new one only"
            )
        return Mailbox(box_name, capacity, policy, create, **options)
    box = Mailbox(bare, capacity, policy, create, **options)
    try:
        box._registration = register(bare, f"mailbox:{bare}", {"policy": box.policy})
    except EndpointInUse:  # another process registered it meanwhile: theirs stands
        try:
            if lookup(bare).address == f"mailbox:{bare}":
                return box  # for this very mailbox: nothing to change
        except NoSuchEndpoint:
            pass
        box.close()
        return _by_name(url, capacity, policy, False, options)
    except BaseException:
        box.close()
        raise
    return box


# ---- forensics: buzon ls / buzon clean ------------------------------------------------


def _depth(info: dict[str, Any]) -> int:
    if "depth" in info:  # a broadcast mailbox's (its receivers' backlogs)
        return int(info["depth"])
    return max(0, int(info["committed"] - info["consumed"] - info["abandoned"]))


def _block_meta(name: str) -> dict[str, Any] | None:
    """The metadata of block segment ``name`` (at [3072, 4096) of its last page), read
    without attaching it; None if it has none that parses."""
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, 1024, size - 4096 + 3072) if size >= 4096 else b""
    finally:
        os.close(fd)
    try:
        meta = json.loads(raw.rstrip(b"\0") or b"null")
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def keeps(seg: SegmentInfo, *, force: bool = False) -> str | None:
    """Why ``buzon clean`` must keep ``seg``, a segment no process holds (None: it may
    go). A mailbox lives until removed: one with messages in it stays unless
    ``force``; the out-of-line block of a message still in a mailbox always stays
    while that mailbox exists (it goes with it)."""
    if seg.kind == "ring" and seg.label.startswith(_LABEL + " ") and not force:
        depth = _depth(seg.details)
        if depth:
            return f"mailbox with {depth} message(s) in it (clean --force removes it)"
    if seg.kind == "block":
        meta = _block_meta(seg.name)
        if meta is not None and meta.get("kind") == _OOL_KIND:
            box = meta.get("mailbox")
            if isinstance(box, str) and segment_exists(box):
                return "a message of a mailbox that exists"
    return None


_ACTIVE_S = 2.0  # describe: a mailbox used this recently gets its rates measured
_RATE_WINDOW_S = 0.02


def _fanned_counts(name: str, info: dict[str, Any], pids: set[int]) -> dict[str, Any]:
    """A ``broadcast``/``round_robin`` mailbox's counts for ``buzon ls``: its ring
    carries none of its messages, so ``info``'s counters are replaced by the sums over
    its receivers (round_robin: their rings, read from the subscriber table without
    attaching; broadcast: their entries in the broadcast ring) plus the totals of the
    receivers gone (closed or found dead); a broadcast message counts once per receiver
    it reached, and the messages its receivers lost to the overflow rule are
    ``dropped`` (not taken). The receivers' pids join ``pids``."""
    from ._mailbox_fan import _ENTRY, _TABLE, MAX_RECEIVERS, RETIRED, table_name

    if _parse_label(info["label"])[0] == "broadcast":
        from ._mailbox_bcast import counts

        got = counts(name)
        if got is None:
            return dict(info, dropped=0)
        reached, taken, dropped, lost, depth, who = got
        pids.update(who)
        return dict(
            info,
            committed=reached,
            consumed=taken,
            abandoned=lost,
            dropped=dropped,
            depth=depth,
        )

    try:
        block = _core.Block.attach(table_name(name))
    except (FileNotFoundError, OSError):
        return info
    view = memoryview(block)
    try:
        committed, consumed, lost = RETIRED.unpack_from(view, 8)
        rings = [
            raw.rstrip(b"\0").decode("ascii", "replace")
            for i in range(MAX_RECEIVERS)
            if (raw := bytes(view[_TABLE + i * _ENTRY : _TABLE + (i + 1) * _ENTRY])).strip(b"\0")
        ]
    finally:
        view.release()
        block.close()
    for ring in rings:
        try:
            r = _core.inspect(ring)
        except (OSError, BuzonError):
            continue  # gone meanwhile: its counts are in the totals now
        committed += r["committed"]
        consumed += r["consumed"]
        lost += r["abandoned"]
        pids.update(pid for _slot, pid, live in r["participants"] if live)
    return dict(info, committed=committed, consumed=consumed, abandoned=lost)


def _ago(t: float, now: float) -> str:
    return "never" if t <= 0 else f"{max(0.0, now - t):.0f} s ago"


def describe(segment: str, path: str | None = None) -> str:
    """``buzon ls``: the state of the mailbox in ``segment``: policy, capacity, depth,
    live users (pids), age, last use (``path``: its name file, whose wake-up FIFO's
    mtime and atime the hot path sets at most once a second on a send and a take),
    messages sent, taken and lost so far, and, for a mailbox used in the last
    ``_ACTIVE_S`` seconds, its rates now (two looks ``_RATE_WINDOW_S`` apart)."""
    name = segment if segment.startswith("/") else "/" + segment
    info = _core.inspect(name)
    t0 = time.monotonic()
    policy, capacity, item, raw = _parse_label(info["label"])
    live = {pid for _slot, pid, alive in info["participants"] if alive}
    fanned = policy in _FANNED
    if fanned:  # messages live in the receivers' rings: their counts are the mailbox's
        info = _fanned_counts(name, info, live)
    pids = sorted(live)
    now = time.time()
    age = max(0.0, now - info["created_ns"] / 1e9)
    users = "pid " + ",".join(map(str, pids)) if pids else "no live users"
    cap = "None" if capacity is None else capacity
    used = ""
    last = 0.0
    if path is not None:
        try:
            st = os.stat(path + _WAKE)
        except OSError:
            st = None
        if st is not None:
            sent_at = st.st_mtime if info["committed"] else 0.0  # else: the FIFO's birth
            taken_at = st.st_atime if info["consumed"] else 0.0
            last = max(sent_at, taken_at)
            used = f", last send {_ago(sent_at, now)}, last take {_ago(taken_at, now)}"
    rates = ""
    if last and now - last <= _ACTIVE_S:
        time.sleep(_RATE_WINDOW_S)
        later = _core.inspect(name)
        if fanned:
            later = _fanned_counts(name, later, set())
        dt = max(1e-6, time.monotonic() - t0)
        sent = (later["committed"] - info["committed"]) / dt
        taken = (later["consumed"] - info["consumed"]) / dt
        rates = f", now {sent:.0f} sent/s {taken:.0f} taken/s"
        info = later
    # broadcast: messages its receivers lost to the overflow rule (never counted taken)
    dropped = f", {info['dropped']} dropped" if "dropped" in info else ""
    return (
        f"policy={policy} capacity={cap}{f' raw item_size={item}' if raw else ''} "
        f"depth={_depth(info)}, {users}, age {age:.0f} s"
        f"{used}, {info['committed']} sent, {info['consumed']} taken, "
        f"{info['abandoned']} lost{dropped}{rates}"
    )
