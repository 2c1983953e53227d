"""The reference for protocol/_rpc.c's exactly-once block (tests/protocol/
test_rpc_once_c.py; test_rpc_c.py's damaged frames use it too)."""

from __future__ import annotations

from typing import Any

import msgspec

from buzon.protocol.frames import Field, parse_frame
from buzon.rpc import _wire as w

_PLAIN_TYPES = (int, float, str, bytes, bool, type(None))


def reference_once(data: bytes) -> tuple[Any, ...] | None:
    """What the general path makes of a frame whose body has five elements, in the
    shape ``parse`` gives (None: the general path's own checks decide)."""
    try:
        frame = parse_frame(data, 1 << 20)
        body = msgspec.msgpack.decode(frame.body)
    except Exception:
        return None
    fields = frame.fields or {}
    if frame.codec != 1 or frame.buffers or frame.receipt or type(body) is not list:
        return None
    if len(body) != 5 or type(body[0]) is not int or body[0] != 0 or body[3] is not None:
        return None
    method, args, key = body[1], body[2], body[4]
    if type(method) is not str or type(args) is not list:
        return None
    if not all(type(a) in _PLAIN_TYPES for a in args):
        return None
    if type(key) is not list or len(key) != 3:
        return None
    client, seq, acked = key
    if type(client) is not bytes or not 0 < len(client) <= 64:
        return None
    if type(seq) is not int or type(acked) is not int or not 0 <= acked <= seq:
        return None
    ident = fields.get(int(Field.MESSAGE_ID))
    if ident is None or len(ident) != 8 or int.from_bytes(ident, "little") >= 2**63:
        return None
    ms = fields.get(int(Field.DEADLINE))
    ms_value = int.from_bytes(ms, "little") if ms is not None and len(ms) == 4 else -1
    enc = msgspec.msgpack.encode([method, args, None])
    return (w.ONCE, int.from_bytes(ident, "little"), ms_value, method, (args, *key, enc))
