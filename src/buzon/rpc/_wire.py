"""The ``wire="buzon"`` RPC messages: a small msgpack body, ids in the frame header.

Every message is one buzon DATA frame. The body says what it is; call ids,
correlation and the deadline travel as the frame's header fields
(:class:`buzon.protocol.frames.Field`), not in the body:

=========  ===============================  ==========================================
message    body                             header fields
=========  ===============================  ==========================================
request    ``[0, method, args]`` or         MESSAGE_ID (u64 call id), DEADLINE (u32 ms
           ``[0, method, args, kwargs]``    left, when the caller has a deadline)
reply      ``[1, None, result]`` or         CORRELATION (u64: the call id it answers)
           ``[1, [code, message, data],
           None]``
notify     ``[2, method, args(, kwargs)]``  DEADLINE (optional); no reply is sent
cancel     ``[3]``                          CORRELATION (the call id given up on)
=========  ===============================  ==========================================

Sans-IO: the helpers here only build and read these values.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from ..errors import RemoteError, frame_cap_exceeded
from ..protocol._rpc import parse as _parse
from ..protocol._rpc import parse_parts as _parse_parts
from ..protocol.frames import FIELDS_FLAG, VERSION, CodecId, Field, Frame, Kind, encode_frame

if TYPE_CHECKING:
    from ..sync import Channel

__all__ = [
    "CANCEL",
    "NOTIFY",
    "REPLY",
    "ONCE",
    "OTHER",
    "REQUEST",
    "error_body",
    "as_message",
    "from_item",
    "error_from",
    "id_field",
    "ms_field",
    "read_id",
    "read_ms",
    "recv",
    "send",
    "send_frame",
    "unpack_id",
    "unpack_ms",
]

REQUEST, REPLY, NOTIFY, CANCEL = 0, 1, 2, 3

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
#: a u64 id field's value -> ``(id,)`` (for callers that inline :func:`read_id`)
unpack_id = _U64.unpack
#: a DEADLINE field's value -> ``(milliseconds,)`` (for callers that inline :func:`read_ms`)
unpack_ms = _U32.unpack
MAX_MS = 0xFFFFFFFF

MESSAGE_ID = int(Field.MESSAGE_ID)
CORRELATION = int(Field.CORRELATION)
DEADLINE = int(Field.DEADLINE)


# A DATA frame's header and a FIELDS block of one id (tag, 8, u64), with or without a
# DEADLINE (tag, 4, u32) after it: one pack for the header region of every RPC message.
_WITH_ID = struct.Struct("<BBBBIHBBQ")
_WITH_ID_MS = struct.Struct("<BBBBIHBBQBBI")
_SMALL = 4096


def send(
    ch: Any,
    body: Any,
    tag: int,
    call_id: int,
    budget: float | None,
    timeout: float | None,
) -> None:
    """Send ``body`` on the channel ``ch`` with the id field ``tag`` = ``call_id``
    (and a DEADLINE of ``budget`` seconds, when given), waiting up to ``timeout``.

    A small body without out-of-band buffers (the common case) is framed with one
    ``struct`` pack; anything else by :func:`~buzon.protocol.frames.encode_frame`.
    """
    core = ch._core
    codec, payload, buffers = core.codec.encode(body)
    if not buffers and len(payload) <= _SMALL:
        if budget is None:
            head = _WITH_ID.pack(
                VERSION, Kind.DATA, codec | FIELDS_FLAG, 0, len(payload), 10, tag, 8, call_id
            )
        else:
            ms = max(0, min(MAX_MS, int(budget * 1000.0)))
            head = _WITH_ID_MS.pack(
                VERSION,
                Kind.DATA,
                codec | FIELDS_FLAG,
                0,
                len(payload),
                16,
                tag,
                8,
                call_id,
                DEADLINE,
                4,
                ms,
            )
        frame = head + payload
        if len(frame) > core.max_frame:
            raise frame_cap_exceeded(len(frame), core.max_frame)
        ch._send_encoded([frame], timeout)
        return
    fields = {tag: id_field(call_id)}
    if budget is not None:
        fields[DEADLINE] = ms_field(budget)
    ch._send_encoded(
        encode_frame(Kind.DATA, codec, payload, buffers, fields=fields, max_frame=core.max_frame),
        timeout,
    )


def send_frame(ch: Channel, frame: bytes, timeout: float | None) -> None:
    """Send one whole encoded frame (``protocol._rpc.request``/``reply``) on the
    channel ``ch`` (``Channel._send_frame``: one C call where the channel is quiet)."""
    ch._send_frame(frame, timeout)


#: :func:`recv`'s kind of a message it did not take apart (``a``: body, ``b``: fields)
OTHER = -1
#: :func:`recv`'s kind of an exactly-once request taken apart in C (``a``: method,
#: ``b``: ``(args, client, seq, acked, enc)``; ``protocol/_rpc.c``, its last block)
ONCE = 16


def recv(ch: Channel, timeout: float | None) -> tuple[int, int, int, Any, Any]:
    """The next message on the channel ``ch`` (waiting up to ``timeout``, raising as
    ``Channel.recv`` does), as ``(kind, call_id, ms, a, b)``:

    - a request ``[0, method, [plain...]]`` with its MESSAGE_ID: ``(REQUEST, call_id,
      ms, method, args)`` (``ms``: the DEADLINE field, -1 if none);
    - a reply ``[1, None, plain]`` with its CORRELATION: ``(REPLY, call_id, -1,
      result, None)``;
    - an exactly-once request ``[0, method, [plain...], None, [client, seq, acked]]``:
      ``(ONCE, call_id, ms, method, (args, client, seq, acked, enc))`` (``enc``: what
      identifies its arguments in the completion table);
    - anything else: ``(OTHER, 0, -1, body, fields)``, decoded by the channel.

    The first two, the common case, are taken apart in C (``protocol._rpc.parse``)
    instead of through the channel's decoder and the codec: the channel offers a
    message that arrives as one whole frame to it (``Channel._recv_parsed``); a
    frame the channel's decoder cut is taken apart from its fields and body.
    """
    item = ch._recv_parsed(_parse, timeout)
    if type(item) is tuple and item[0] == -1:
        parsed: tuple[int, int, int, Any, Any] = item[1]
        return parsed
    return from_item(ch, item)


def from_item(ch: Channel, item: Frame | tuple[int, Any]) -> tuple[int, int, int, Any, Any]:
    """:func:`recv`'s result for a channel item that the C parse did not take
    (``Channel._recv_parsed`` gave the item itself): a frame the decoder cut is taken
    apart from its fields and body, anything else decoded by the channel."""
    if type(item) is tuple:
        return OTHER, 0, -1, ch._core.item_object(item), None
    frame: Frame = item  # type: ignore[assignment]  # not a tuple: a Frame
    fields = frame.fields
    if fields and frame.codec == CodecId.MSGPACK and not frame.buffers:
        parsed_parts = _parse_parts(fields, frame.body)
        if parsed_parts is not None:
            return parsed_parts
    return OTHER, 0, -1, ch._core.item_object(item), fields


def as_message(kind: int, call_id: int, ms: int, a: Any, b: Any) -> tuple[Any, Any]:
    """A :func:`recv` result as the ``(body, fields)`` the general path reads."""
    if kind == OTHER:
        return a, b
    if kind == REPLY:
        return [REPLY, None, a], {CORRELATION: id_field(call_id)}
    fields = {MESSAGE_ID: id_field(call_id)}
    if ms >= 0:
        fields[DEADLINE] = _U32.pack(ms)
    if kind == ONCE:
        return [REQUEST, a, b[0], None, [b[1], b[2], b[3]]], fields
    return [REQUEST, a, b], fields


def id_field(call_id: int) -> bytes:
    """A call id as its header-field value (u64)."""
    return _U64.pack(call_id)


def read_id(fields: dict[int, bytes] | None, tag: int) -> int | None:
    """The u64 id in field ``tag``, or None if absent or not 8 bytes."""
    if fields is None:
        return None
    value = fields.get(tag)
    if value is None or len(value) != 8:
        return None
    return int(_U64.unpack(value)[0])


def ms_field(seconds: float) -> bytes:
    """A remaining budget as the DEADLINE field (u32 milliseconds, rounded down)."""
    ms = max(0, min(MAX_MS, int(seconds * 1000.0)))  # down: never extends the budget
    return _U32.pack(ms)


def read_ms(fields: dict[int, bytes] | None) -> float | None:
    """The DEADLINE field in seconds, or None."""
    if fields is None:
        return None
    value = fields.get(DEADLINE)
    if value is None or len(value) != 4:
        return None
    return int(_U32.unpack(value)[0]) / 1000.0


def error_body(err: RemoteError) -> list[Any]:
    """A reply body for ``err``."""
    return [REPLY, [err.code, err.message, err.data], None]


def error_from(value: Any) -> RemoteError:
    """The :class:`RemoteError` a reply's error part describes (tolerant of junk)."""
    if isinstance(value, (list, tuple)) and len(value) >= 2:
        code = value[0] if isinstance(value[0], int) else RemoteError.INTERNAL_ERROR
        data = value[2] if len(value) > 2 else None
        return RemoteError(str(value[1]), code, data)
    return RemoteError(f"malformed error reply: {value!r}", RemoteError.INTERNAL_ERROR)
