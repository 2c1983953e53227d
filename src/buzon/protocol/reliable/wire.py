"""The wire format of reliable datagrams: the header, the hello, the per-type rules,
encoding and decoding (the byte table is in :mod:`buzon.protocol.reliable`)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ...errors import FrameError, HandshakeError
from ..crc32c import crc32c

VERSION = 1
HEADER = struct.Struct("<BBBBIIIIHHI")  # 28 bytes: see the byte table
_SACK = struct.Struct("<II")
_CRC = struct.Struct("<I")
HELLO = struct.Struct("<IIII16s")  # 32 bytes
COOKIE_SIZE = 16
OVERHEAD = HEADER.size + _CRC.size  # 32: every datagram's fixed cost
MIN_DATAGRAM = 128
MAX_FRAGMENTS = 0xFFFF
MAX_REASON = 64  # bytes of RESET reason text (a RESET answering a SYN is never larger)
RESET_COPIES = 3  # a RESET is sent this often at once: nothing ever retransmits it
_MASK = 0xFFFFFFFF
_HALF = 1 << 31
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack


class Type(IntEnum):
    SYN = 1
    COOKIE = 2
    SYN_ACK = 3
    DATA = 4
    ACK = 5
    FIN = 6
    RESET = 7


class Flag(IntEnum):
    ACK_NOW = 0x01  # acknowledge this datagram at once (a ping, a burst's end)
    CLOSED = 0x02  # the sender is CLOSED: it has everything and its FIN was acked
    BUNDLE = 0x04  # DATA: the payload is several whole messages, each u32-length-prefixed


_FLAGS_MASK = 0x07
_BUNDLE_LEN = struct.Struct("<I")


class ResetCode(IntEnum):
    PROTOCOL = 1  # the sender of the RESET saw a protocol violation
    REFUSED = 2  # a server refused a new connection (full)
    ABORT = 3  # the application aborted the connection


@dataclass(frozen=True, slots=True)
class _Rule:
    payload: tuple[int, int]  # inclusive bounds on the payload length
    sack: bool  # may carry SACK blocks
    fragments: bool  # frag index/count are meaningful (else both must be 0)
    conn_zero: bool  # conn id must be 0 (SYN) instead of non-zero


# Which fields each type may use. Anything else is a FrameError (the datagram is dropped).
DATAGRAM_RULES: dict[Type, _Rule] = {
    Type.SYN: _Rule((HELLO.size, HELLO.size), sack=False, fragments=False, conn_zero=True),
    Type.COOKIE: _Rule((COOKIE_SIZE, COOKIE_SIZE), sack=False, fragments=False, conn_zero=False),
    Type.SYN_ACK: _Rule((HELLO.size, HELLO.size), sack=False, fragments=False, conn_zero=False),
    Type.DATA: _Rule((0, _MASK), sack=True, fragments=True, conn_zero=False),
    Type.ACK: _Rule((0, 0), sack=True, fragments=False, conn_zero=False),
    Type.FIN: _Rule((0, 0), sack=True, fragments=False, conn_zero=False),
    Type.RESET: _Rule((1, 1 + MAX_REASON), sack=False, fragments=False, conn_zero=False),
}
_RULES_BY_INT = {int(t): r for t, r in DATAGRAM_RULES.items()}


# -- the wire format --------------------------------------------------------------------


@dataclass(slots=True)
class Datagram:
    """One decoded datagram; sequence fields are the u32 wire values."""

    type: int
    conn: int
    seq: int = 0
    ack: int = 0
    window: int = 0
    flags: int = 0
    frag: int = 0
    nfrag: int = 0
    sacks: tuple[tuple[int, int], ...] = ()
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Hello:
    """The SYN / SYN_ACK payload: who the sender is and what it accepts."""

    conn_id: int
    max_datagram: int
    recv_window: int
    max_message: int
    cookie: bytes = bytes(COOKIE_SIZE)

    def encode(self) -> bytes:
        return HELLO.pack(
            self.conn_id, self.max_datagram, self.recv_window, self.max_message, self.cookie
        )

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        conn_id, max_datagram, window, max_message, cookie = HELLO.unpack(payload)
        if not conn_id:
            raise HandshakeError("the peer's hello names connection id 0")
        if max_datagram < MIN_DATAGRAM or window < 1 or max_message < 1:
            raise HandshakeError(
                f"the peer's limits are unusable (max datagram {max_datagram}, "
                f"window {window}, max message {max_message})"
            )
        return cls(conn_id, max_datagram, window, max_message, cookie)


def _encode(
    type_: int,
    conn: int,
    seq: int,
    ack: int,
    window: int,
    flags: int = 0,
    frag: int = 0,
    nfrag: int = 0,
    sacks: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
    payload: bytes | memoryview = b"",
) -> bytes:
    head = _pack_header(
        VERSION,
        type_,
        flags,
        len(sacks),
        conn,
        seq & _MASK,
        ack & _MASK,
        window,
        frag,
        nfrag,
        len(payload),
    )
    if sacks:
        head += b"".join([_SACK.pack(a & _MASK, b & _MASK) for a, b in sacks])
    body = head + payload if payload else head
    return body + _CRC.pack(crc32c(body))


def encode_datagram(d: Datagram) -> bytes:
    """Encode ``d`` (no validation beyond what ``struct`` enforces; for tests and tools)."""
    return _encode(
        d.type, d.conn, d.seq, d.ack, d.window, d.flags, d.frag, d.nfrag, d.sacks, d.payload
    )


def verify_crc(data: bytes | bytearray | memoryview) -> bool:
    """True when ``data`` is long enough to be a datagram and its CRC32C matches."""
    n = len(data)
    if n < OVERHEAD:
        return False
    return bool(crc32c(memoryview(data)[: n - 4]) == _CRC.unpack_from(data, n - 4)[0])


def decode_datagram(data: bytes | bytearray | memoryview, *, verify: bool = True) -> Datagram:
    """Decode one datagram; every defect is a :class:`~buzon.errors.FrameError`.

    With ``verify=False`` the CRC is assumed checked already (:func:`verify_crc`).
    """
    n = len(data)
    if n < OVERHEAD:
        raise FrameError(f"a {n}-byte datagram is shorter than the {OVERHEAD}-byte minimum")
    if verify and not verify_crc(data):
        raise FrameError("CRC32C mismatch: the datagram was damaged")
    version, type_, flags, nsack, conn, seq, ack, window, frag, nfrag, length = _unpack_header(
        data, 0
    )
    if version != VERSION:
        raise FrameError(f"unsupported datagram version {version} (this side speaks {VERSION})")
    rule = _RULES_BY_INT.get(type_)
    if rule is None:
        raise FrameError(f"unknown datagram type {type_}")
    if flags & ~_FLAGS_MASK:
        raise FrameError(f"reserved flag bits set: {flags:#04x}")
    if HEADER.size + 8 * nsack + length + 4 != n:
        raise FrameError(
            f"lengths do not add up: {nsack} SACK blocks and {length} payload bytes "
            f"in a {n}-byte datagram"
        )
    name = Type(type_).name
    if not rule.payload[0] <= length <= rule.payload[1]:
        raise FrameError(f"a {name} datagram cannot carry {length} payload bytes")
    if nsack and not rule.sack:
        raise FrameError(f"a {name} datagram cannot carry SACK blocks")
    if rule.fragments:
        if nfrag < 1 or frag >= nfrag:
            raise FrameError(f"fragment {frag} of {nfrag} is impossible")
        if flags & Flag.BUNDLE and nfrag != 1:
            raise FrameError("a bundle of messages cannot be a fragment")
    elif frag or nfrag:
        raise FrameError(f"a {name} datagram has no fragment fields")
    elif flags & Flag.BUNDLE:
        raise FrameError(f"a {name} datagram cannot be a bundle")
    if (conn == 0) != rule.conn_zero:
        raise FrameError(f"a {name} datagram with connection id {conn}")
    sacks = []
    pos = HEADER.size
    for _ in range(nsack):
        start, end = _SACK.unpack_from(data, pos)
        if not 0 < (end - start) & _MASK < _HALF:
            raise FrameError(f"empty or inverted SACK block [{start}, {end})")
        sacks.append((start, end))
        pos += 8
    return Datagram(
        type_, conn, seq, ack, window, flags, frag, nfrag, tuple(sacks), bytes(data[pos : n - 4])
    )


def _unwrap(wire: int, near: int) -> int:
    """The unbounded sequence number with these low 32 bits that is nearest ``near``."""
    return near + ((wire - near + _HALF) & _MASK) - _HALF
