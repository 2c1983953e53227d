"""The frame format's C speedup for shared-memory rings (src/buzon/protocol/_frames.c,
docs/frames.md): a plain DATA frame in or out of one ring record in one call, and a
mailbox's common record likewise (buzon.mailbox's hot path)."""

from collections.abc import Callable, Sequence
from typing import Any

from typing_extensions import Buffer

from .._core import Block, Ring
from ..transport.base import PeerInfo

HEADER_SIZE: int

class RingFrames:
    """Buzon frames as the records of one :class:`buzon._core.Ring` (the ``shm:``
    channel's hot path); counts what its own calls moved."""

    ring: Ring
    def __init__(self, ring: Ring) -> None: ...
    def try_send_frame(self, body: Buffer, codec: int, /) -> bool: ...
    def try_send_frames(self, bodies: Sequence[object], codec: int, start: int, /) -> int: ...
    def try_recv_frame(self, max_frame: int, /) -> tuple[int, bytes] | None: ...
    def stop(self) -> None: ...
    def counts(self) -> tuple[int, int, int, int]: ...

def data_frame(body: Buffer, flags: int, /) -> bytes:
    """A DATA frame without buffers or fields: the 8-byte header (``flags``: the codec,
    maybe the receipt bit) and ``body``, joined in one allocation."""

def mailbox_send(
    ring: Ring, body: Buffer, codec: int, message_id: int, uid: int, timeout: float | None, /
) -> None:
    """Put a mailbox's common record (a DATA frame with the fields MESSAGE_ID, SENDER and
    SENT_AT; the pid and the time are read here) into ``ring``, waiting for room like
    ``Ring.send`` (``timeout`` None: for ever; <= 0: ``Full`` at once)."""

def mailbox_recv(ring: Ring, timeout: float | None, /) -> tuple[int, bytes] | bytes:
    """Take the next record of ``ring``, waiting like ``Ring.recv`` (<= 0: ``Empty`` at
    once): ``(codec, body)`` if it is a mailbox's common record, else the record's bytes
    (the caller's general path)."""

def plain_data_flags(message: Buffer, max_frame: int, /) -> int:
    """The flags byte of a message that is exactly one plain DATA frame (codec 0-3, with
    or without the receipt bit; no buffers, fields or chunks; at most ``max_frame``
    bytes), else -1."""

class MailboxReceipt:
    """The fate of one message sent with :meth:`buzon.Mailbox.send_async`.

    :meth:`done` says whether a receiver took it (never waits), :meth:`wait` waits
    (:class:`~buzon.errors.Timeout` when ``timeout`` passes), and :attr:`receiver`
    names the process that took it (``PeerInfo`` with ``.pid`` and ``.uid``). On a
    broadcast mailbox the message went to ``expected`` receivers: :attr:`receivers`
    lists those that took it so far, and ``done``/``wait`` mean all of them.
    """

    @property
    def id(self) -> int: ...
    @property
    def expected(self) -> int: ...
    @property
    def _box(self) -> Any: ...
    _receivers: tuple[PeerInfo, ...]
    lost: int
    def __init__(self, box: Any, message_id: int, expected: int = 1) -> None: ...
    @property
    def receiver(self) -> PeerInfo | None: ...
    @property
    def receivers(self) -> list[PeerInfo]: ...
    def done(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> PeerInfo: ...

def receipt_ways(done: Callable[[Any], bool], wait: Callable[[Any, float | None], Any], /) -> None:
    """The general way of :meth:`MailboxReceipt.done` and :meth:`MailboxReceipt.wait`."""

class MailboxCore:
    """A mailbox object's hot path (``buzon._mailbox``): common records sent and
    received in one C call each; anything else is left to the general way."""

    fast_max: int
    @property
    def sent(self) -> int: ...
    @property
    def received(self) -> int: ...
    @property
    def acks_dropped(self) -> int: ...
    replies: dict[bytes, Ring | tuple[Ring, Block]]
    mark_fd: int
    def __init__(
        self, ring: Ring, encode: Any, decode: Any, fast_max: int, uid: int, nowait: bool
    ) -> None: ...
    def send(self, obj: object, timeout: float | None, /) -> bool: ...
    def recv(self, ring: Ring, timeout: float | None, /) -> Any: ...
    def recv_message(self, ring: Ring, timeout: float | None, /) -> Any: ...
    def recv_from(self, ring: Ring, timeout: float | None, pid: int, /) -> Any: ...
    def set_message(self, message_type: type, peer: Any, /) -> None: ...
    def send_async(
        self, obj: object, timeout: float | None, reply_to: bytes, box: Any, /
    ) -> Any: ...
    def take_ack(self, acks: Ring, message_id: int, table: dict[int, Any], /) -> Any: ...
    def wait_ack(
        self, acks: Ring, message_id: int, table: dict[int, Any], timeout: float, /
    ) -> Any: ...
    def set_acks(
        self, ring: Ring | None, table: Any, lock: Any, acktab: Block | None, /
    ) -> None: ...
    def ack(self, reply_to: bytes, message_id: int, /) -> bool: ...
    def bind(self, box: Any, hot: bool, hot_recv: bool = False, tabled: bool = ..., /) -> None: ...
    def box_send(self, obj: object, timeout: float | None = None) -> None: ...
    def box_recv(self, timeout: float | None = None) -> Any: ...
    def receipt_send(self, obj: object, timeout: float | None = None) -> MailboxReceipt: ...
    def receipt_ready(self, receipt: Any, /) -> Any: ...
    def next_id(self) -> int: ...
