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
from typing import Any

from ..errors import RemoteError
from ..protocol.frames import Field

__all__ = [
    "CANCEL",
    "NOTIFY",
    "REPLY",
    "REQUEST",
    "error_body",
    "error_from",
    "id_field",
    "ms_field",
    "read_id",
    "read_ms",
]

REQUEST, REPLY, NOTIFY, CANCEL = 0, 1, 2, 3

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
MAX_MS = 0xFFFFFFFF

MESSAGE_ID = int(Field.MESSAGE_ID)
CORRELATION = int(Field.CORRELATION)
DEADLINE = int(Field.DEADLINE)


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
