"""The frame format's C speedup for shared-memory rings (src/buzon/protocol/_frames.c,
docs/frames.md): a plain DATA frame in or out of one ring record in one call, and a
mailbox's common record likewise (buzon.mailbox's hot path)."""

from collections.abc import Sequence
from typing import Any

from typing_extensions import Buffer

from .._core import Ring

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
    replies: dict[bytes, Ring]
    mark_fd: int
    def __init__(
        self, ring: Ring, encode: Any, decode: Any, fast_max: int, uid: int, nowait: bool
    ) -> None: ...
    def send(self, obj: object, timeout: float | None, /) -> bool: ...
    def send_receipt(self, obj: object, timeout: float | None, reply_to: bytes, /) -> int: ...
    def recv(self, ring: Ring, timeout: float | None, /) -> Any: ...
    def recv_message(self, ring: Ring, timeout: float | None, /) -> Any: ...
    def recv_from(self, ring: Ring, timeout: float | None, pid: int, /) -> Any: ...
    def set_message(self, message_type: type, peer: Any, /) -> None: ...
    def set_receipt(self, receipt_type: type, /) -> None: ...
    def send_async(
        self, obj: object, timeout: float | None, reply_to: bytes, box: Any, /
    ) -> Any: ...
    def take_ack(self, acks: Ring, message_id: int, table: dict[int, Any], /) -> Any: ...
    def wait_ack(
        self, acks: Ring, message_id: int, table: dict[int, Any], timeout: float, /
    ) -> Any: ...
    def set_acks(self, ring: Ring | None, table: Any, lock: Any, /) -> None: ...
    def receipt_ready(self, receipt: Any, /) -> Any: ...
    def next_id(self) -> int: ...
