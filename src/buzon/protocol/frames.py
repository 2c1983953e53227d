"""The buzon frame: encoding and an incremental, allocation-safe decoder.

Every buzon message on the wire is one frame. On stream transports (pipes, FIFOs,
Unix and TCP sockets) frames follow each other; on message transports (POSIX queues,
datagram sockets) each datagram carries exactly one frame.

Byte table (all integers little-endian)::

    offset  size     field
    0       1        version        0x01; anything else is a FrameError
    1       1        kind           1 DATA, 2 HELLO, 3 AUTH, 4 WELCOME, 5 CLOSE (reserved),
                                    6 CREDIT (capacity and receipts: protocol/credit.py)
    2       1        flags          bits 0-2: codec (0 raw, 1 msgpack, 2 json, 3 pickle)
                                    bit 3: DATA: the sender asks for a receipt;
                                    CREDIT: the sender is blocked for credit
                                    bit 4: DATA: CHUNKED, the payload goes as segments
                                    bit 5: DATA: FIELDS, a header-field block follows
                                    the length table
                                    bits 6-7: reserved, must be zero
    3       1        nbufs          number of out-of-band buffers (DATA only), 0-255
    4       4        body length    u32, length of the codec body
    8       8*nbufs  buffer lengths u64 each
    (FIELDS) 2       fields length  u16 L, then L bytes of fields: u8 tag, u8 n, n bytes
    ...     body     codec body     e.g. msgpack bytes
    ...     ...      buffers        the out-of-band buffers, back to back, in order

A CHUNKED frame sends its payload (body, then buffers) as segments, each a u32
length ``n`` (1 <= n <= the payload left) and ``n`` payload bytes, and then the u32
``0`` (END): only END completes the frame. The u32 ``0xFFFFFFFF`` in place of a
segment length or of END ABORTS the frame: the receiver drops what it had of it and
goes on with the next frame. This is what lets a sender give up a large message at
any point before its last four bytes (a timeout, a cancellation) without delivering
it and without tearing the stream (``docs/frames.md``).

The total (header + table + fields + body + buffers; segment lengths not counted) is
checked against ``max_frame`` *before* anything is allocated for it: a peer
announcing 4 GiB costs 8 bytes of reading and a :class:`FrameTooLarge`, nothing more.
And memory follows the bytes that arrived, not the bytes announced: a payload part of
``LAZY_MIN`` bytes or more gets an anonymous mapping, whose pages cost memory only
once written, so a header announcing 64 MiB commits nothing until the data comes.

The decoder follows asyncio's buffered-protocol shape so the transport reads straight
into it: :meth:`FrameDecoder.get_buffer` says where the next ``recv_into`` should land
and :meth:`FrameDecoder.buffer_updated` says how much did. Small frames are parsed out
of one reusable read buffer, many per system call; a frame larger than half that
buffer gets an exactly-sized buffer of its own and is read into it directly, so its
bytes are copied once, from the kernel into the place they will stay.

The channel core's small frames go through a few functions here, so no other layer
packs or unpacks a header: :func:`data_frame` (a small DATA frame, header and body in
one allocation), :func:`plain_data_flags` (is a message one plain DATA frame?),
:func:`data_header` (the header of a DATA frame whose body is a separate part),
:func:`loan_header` (the header of a lent ``shm:`` message) and :func:`frame_length`
(the length a header announces). The first two are C (``protocol/_frames.c``, which
also puts frames in and takes them out of shared-memory ring records in one call for
the ``shm:`` hot path; the ring itself moves opaque records).

This module is sans-IO: no sockets, no selectors, no clocks.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections import deque
from collections.abc import Sequence
from enum import IntEnum

from .._record import Record
from ..errors import FrameError, FrameTooLarge
from ._frames import data_frame, plain_data_flags

try:  # the C twin of the hot path (protocol/_stream.c); this module stays the reference
    from ._stream import SmallWriter, send_frame, wait_frame, write_frame
    from ._stream import plain_run as _plain_run
except ImportError:  # pragma: no cover - a build without the extension
    _plain_run = None  # type: ignore[assignment]
    SmallWriter = None  # type: ignore[assignment,misc]
    wait_frame = None  # type: ignore[assignment]
    write_frame = None  # type: ignore[assignment]
    send_frame = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_FRAME",
    "ABORT_SEGMENT",
    "CHUNKED_FLAG",
    "FIELDS_FLAG",
    "HANDSHAKE_MAX_FRAME",
    "HEADER",
    "LAZY_MIN",
    "SEGMENT_SIZE",
    "VERSION",
    "CodecId",
    "Frame",
    "FrameDecoder",
    "Field",
    "Kind",
    "chunk_frame",
    "data_frame",
    "data_header",
    "encode_fields",
    "encode_frame",
    "frame_length",
    "lazy_buffer",
    "loan_header",
    "parse_frame",
    "plain_data_flags",
    "SmallWriter",
    "send_frame",
    "wait_frame",
    "write_frame",
]

VERSION = 1
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
HANDSHAKE_MAX_FRAME = 4096
HEADER = struct.Struct("<BBBBI")
_BUFLEN = struct.Struct("<Q")
_LOAN_HEADER = struct.Struct("<BBBBIQ")  # a DATA frame with one buffer, before the buffer
_unpack_header = HEADER.unpack_from
_CODEC_MASK = 0x07
_RECEIPT = 0x08
CHUNKED_FLAG = 0x10
FIELDS_FLAG = 0x20
_DATA_ONLY = CHUNKED_FLAG | FIELDS_FLAG
_RESERVED_MASK = 0xC0
_SEGLEN = struct.Struct("<I")
_FIELDS_LEN = struct.Struct("<H")
#: a segment length that aborts the chunked frame it is in
ABORT_SEGMENT = 0xFFFFFFFF
_ABORT_BYTES = _SEGLEN.pack(ABORT_SEGMENT)
#: the segment length that completes a chunked frame (after all of its payload)
_END_BYTES = _SEGLEN.pack(0)
#: payload bytes per segment of a chunked frame (what a sender that gives up must
#: still write of the segment it is in, at most)
SEGMENT_SIZE = 1024 * 1024
#: payload parts at least this big are anonymous mappings (memory on first write)
LAZY_MIN = 1024 * 1024
# a DATA frame's flags may take the small-frame fast paths: a known codec (0-3), with
# or without the receipt bit; (codec | receipt bit, body) tuples keep the bit
_NOT_FAST = 0xF4
# one or more well-formed CREDIT frames back to back (header: v1, kind 6, flags 0 or 8,
# no buffers, a 16-byte body), so a batch of acknowledgements costs one match
_CREDIT_RUN = re.compile(rb"(?:\x01\x06[\x00\x08]\x00\x10\x00\x00\x00.{16})+", re.DOTALL)


class Kind(IntEnum):
    """Frame kinds. 1-63 must be known to the receiver (an unknown one is a
    :class:`FrameError`); 64-127 are optional control frames a receiver that does not
    know them skips (they may carry a body, never buffers); 128-255 are reserved."""

    DATA = 1
    HELLO = 2
    AUTH = 3
    WELCOME = 4
    CLOSE = 5  # reserved: a graceful end on links without EOF (not sent yet)
    CREDIT = 6  # capacity credits and receipts (protocol/credit.py); never a message


#: kinds 64-127: control frames a receiver may skip when it does not know them
OPTIONAL_KINDS = range(64, 128)


class Field(IntEnum):
    """Header-field tags (the FIELDS block). A receiver ignores tags it does not know,
    so new fields need no new version; a field whose meaning must not be ignored
    needs a new frame version instead."""

    MESSAGE_ID = 1  # u64: the sender's id of this message
    SENDER = 2  # u32 pid, u32 uid: who sent it (filled in by mailboxes)
    CORRELATION = 3  # u64: the message this one answers (RPC replies)
    DEADLINE = 4  # u32: the sender's remaining budget, in milliseconds
    REPLY_TO = 5  # utf-8: where answers go (an address or a name)
    SENT_AT = 6  # u64: when the sender sent it, ns since the epoch (mailboxes)


def lazy_buffer(n: int) -> memoryview:
    """A writable zeroed buffer of ``n`` bytes whose memory follows what is written
    into it: an anonymous mapping from ``LAZY_MIN`` up (untouched pages cost nothing),
    a bytearray below."""
    if n >= LAZY_MIN:
        return memoryview(mmap.mmap(-1, n))
    return memoryview(bytearray(n))


def encode_fields(fields: dict[int, bytes]) -> bytes:
    """The FIELDS block for ``fields`` (tag -> value): u16 length, then per field
    u8 tag, u8 length, value."""
    parts = []
    for tag, value in fields.items():
        if not 0 < tag < 256 or len(value) > 255:
            raise FrameError(f"header field {tag}: tags are 1-255, values at most 255 bytes")
        parts.append(bytes((tag, len(value))) + value)
    block = b"".join(parts)
    if len(block) > 0xFFFF:
        raise FrameError("header fields take at most 65535 bytes")
    return _FIELDS_LEN.pack(len(block)) + block


def _parse_fields(
    data: memoryview | bytes | bytearray, start: int, length: int
) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    pos, end = start, start + length
    while pos < end:
        if end - pos < 2:
            raise FrameError("a header field is cut short")
        tag, n = data[pos], data[pos + 1]
        if tag == 0 or pos + 2 + n > end:
            raise FrameError(f"malformed header field (tag {tag}, {n} bytes)")
        fields[tag] = bytes(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return fields


class CodecId(IntEnum):
    RAW = 0
    MSGPACK = 1
    JSON = 2
    PICKLE = 3


_KINDS = frozenset(int(k) for k in Kind)
_CODECS = frozenset(int(c) for c in CodecId)


class Frame(Record):
    """One decoded frame. ``body`` and ``buffers`` are views the frame owns."""

    kind: int
    codec: int
    body: bytes | bytearray | memoryview
    buffers: list[memoryview]
    sunk: bool = False  # the payload was read straight into the decoder's sink
    receipt: bool = False  # the sender asked for a receipt (flag bit 3)
    fields: dict[int, bytes] | None = None  # header fields (FIELDS flag), by tag

    @property
    def nbytes(self) -> int:
        return len(self.body) + sum(b.nbytes for b in self.buffers)


# DATA frames with header fields (the RPC messages) in C: protocol/_fields.c builds
# their Frame in one call; the Python code here stays the reference and takes every
# other shape (and raises the errors)
try:
    from . import _fields as _fields_c
except ImportError:  # pragma: no cover - a build without the extension
    _fields_frame = _fields_run = None
else:
    _fields_c.bind(Frame)
    _fields_frame = _fields_c.fields_frame
    _fields_run = _fields_c.fields_run


def encode_frame(
    kind: int,
    codec: int,
    body: bytes | bytearray | memoryview,
    buffers: Sequence[memoryview] = (),
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    fields: dict[int, bytes] | None = None,
) -> list[bytes | bytearray | memoryview]:
    """Return the frame as a list of buffers, ready for one vectored write.

    The header and a small body are joined into one ``bytes``; out-of-band buffers
    are passed through untouched (no copy). ``fields`` (DATA only) adds a FIELDS block.
    """
    nbufs = len(buffers)
    if nbufs > 255:
        raise FrameError("a frame carries at most 255 out-of-band buffers")
    blen = body.nbytes if isinstance(body, memoryview) else len(body)  # bytes, not items
    if blen > 0xFFFFFFFF:
        from ..errors import MessageTooLarge

        raise MessageTooLarge(
            f"a frame body is at most 4 GiB (u32); this one is {blen} bytes: "
            "send it as an out-of-band buffer"
        )
    block = b""
    if fields:
        block = encode_fields(fields)
        codec |= FIELDS_FLAG
    total = HEADER.size + 8 * nbufs + len(block) + blen
    if nbufs:
        table = b"".join(_BUFLEN.pack(b.nbytes) for b in buffers)
        total += sum(b.nbytes for b in buffers)
    else:
        table = b""
    if total > max_frame:
        from ..errors import frame_cap_exceeded

        raise frame_cap_exceeded(total, max_frame)
    head = HEADER.pack(VERSION, kind, codec, nbufs, blen) + table + block
    if blen <= 4096:
        out: list[bytes | bytearray | memoryview] = [head + body]
    else:
        out = [head, body]
    out.extend(buffers)
    return out


def chunk_frame(
    bufs: Sequence[bytes | bytearray | memoryview], segment: int = SEGMENT_SIZE
) -> tuple[list[bytes | bytearray | memoryview], list[int]]:
    """Turn an encoded DATA frame (``encode_frame``'s buffers) into its CHUNKED form,
    without copying the payload: the header gets the CHUNKED flag and the payload is
    cut into segments of at most ``segment`` bytes, each behind its u32 length.

    Returns the buffers and the *abort points*: the offsets in the chunked byte stream
    where a segment length or the END is due (after the header region, after each
    segment). A sender that stops writing before one of them can end the frame there
    with :data:`ABORT_SEGMENT` (see :func:`abort_marker`) instead of the rest; only a
    sender already inside the END marker is committed to the frame.
    """
    first = memoryview(bufs[0]).cast("B")
    nbufs = first[3]
    hlen = HEADER.size + 8 * nbufs
    if first[2] & FIELDS_FLAG:
        hlen += 2 + _FIELDS_LEN.unpack_from(first, hlen)[0]
    head = bytearray(first[:hlen])
    head[2] |= CHUNKED_FLAG
    out: list[bytes | bytearray | memoryview] = [bytes(head)]
    points = [hlen]
    pos = hlen
    payload: list[memoryview] = [first[hlen:]] if first.nbytes > hlen else []
    payload.extend(memoryview(b).cast("B") for b in bufs[1:])
    room = 0  # bytes left in the current segment
    left = sum(p.nbytes for p in payload)
    for part in payload:
        while part.nbytes:
            if not room:
                room = min(segment, left)
                if pos != hlen:
                    points.append(pos)
                out.append(_SEGLEN.pack(room))
                pos += 4
            take = min(room, part.nbytes)
            out.append(part[:take])
            part = part[take:]
            room -= take
            left -= take
            pos += take
    if pos != hlen:
        points.append(pos)
    out.append(_END_BYTES)
    return out, points


def abort_marker() -> bytes:
    """The 4 bytes that end a chunked frame at an abort point, unsent."""
    return _ABORT_BYTES


def _check_header(version: int, kind: int, flags: int, nbufs: int) -> None:
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (this side speaks {VERSION})")
    if kind not in _KINDS and kind not in OPTIONAL_KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    if (
        flags & _RESERVED_MASK
        or (flags & _RECEIPT and kind not in (Kind.DATA, Kind.CREDIT))
        or (flags & _DATA_ONLY and kind != Kind.DATA)
    ):
        raise FrameError(f"reserved flag bits set: {flags:#04x}")
    if flags & _CODEC_MASK not in _CODECS:
        raise FrameError(f"unknown codec id {flags & _CODEC_MASK}")
    if nbufs and kind != Kind.DATA:
        raise FrameError("only DATA frames may carry out-of-band buffers")


def _frame_total(
    data: memoryview | bytes | bytearray, start: int, avail: int, max_frame: int
) -> int:
    """Validate the header at ``start``; return the total frame length or -1 if unknown yet."""
    if avail < HEADER.size:
        return -1
    version, kind, flags, nbufs, blen = HEADER.unpack_from(data, start)
    _check_header(version, kind, flags, nbufs)
    table = 8 * nbufs
    total: int = HEADER.size + table + blen
    if flags & FIELDS_FLAG:
        total += 2
        if avail >= HEADER.size + table + 2:
            flen: int = _FIELDS_LEN.unpack_from(data, start + HEADER.size + table)[0]
            total += flen
            table += 2 + flen
        else:
            table += 2
    if avail < HEADER.size + table:
        if total > max_frame:
            raise FrameTooLarge(f"frame announces {total} bytes; the cap is {max_frame}")
        return -1
    for i in range(nbufs):
        n: int = _BUFLEN.unpack_from(data, start + HEADER.size + 8 * i)[0]
        total += n
    if total > max_frame:
        raise FrameTooLarge(f"frame announces {total} bytes; the cap is {max_frame}")
    return total


def frame_length(data: memoryview | bytes | bytearray, max_frame: int = DEFAULT_MAX_FRAME) -> int:
    """The whole length of the frame that ``data`` starts with, as its header region
    announces it (header, buffer-length table, fields, body, buffers; a CHUNKED frame's
    segment lengths not counted); -1 if ``data`` is too short to tell yet.

    Only the header region is read, so a message can be checked to be exactly one frame
    (``frame_length(first_piece) == total_size``) before its payload is looked at.
    Raises :class:`FrameError` if the header is not a valid one (version, kind, flags,
    buffers on a kind that has none) and :class:`FrameTooLarge` if it announces more
    than ``max_frame`` bytes.
    """
    return _frame_total(data, 0, len(data), max_frame)


def data_header(nbytes: int, flags: int) -> bytes:
    """The 8-byte header of a DATA frame whose ``nbytes`` body follows it as a separate
    part (no buffers, no fields): for a transport that writes parts as one record, so a
    large body is not joined to its header (``shm:`` rings: one copy in, one out)."""
    return HEADER.pack(VERSION, Kind.DATA, flags, 0, nbytes)


def loan_header(nbytes: int) -> bytes:
    """The header region of a raw DATA frame whose one out-of-band buffer of ``nbytes``
    is written in place after it (a lent ``shm:`` message): the 8-byte header with one
    buffer and an empty body, then the buffer's u64 length."""
    return _LOAN_HEADER.pack(VERSION, Kind.DATA, CodecId.RAW, 1, 0, nbytes)


def _header_len(view: memoryview | bytes | bytearray, start: int) -> int:
    """Length of the header region (header, table, fields) of the frame at ``start``
    (its header already checked and complete)."""
    flags, nbufs = view[start + 2], view[start + 3]
    n = HEADER.size + 8 * nbufs
    if flags & FIELDS_FLAG:
        n += 2 + _FIELDS_LEN.unpack_from(view, start + n)[0]
    return n


def _fields_of(view: memoryview | bytes | bytearray, start: int) -> dict[int, bytes] | None:
    if not view[start + 2] & FIELDS_FLAG:
        return None
    at = start + HEADER.size + 8 * view[start + 3]
    return _parse_fields(view, at + 2, _FIELDS_LEN.unpack_from(view, at)[0])


def _split(view: memoryview) -> Frame:
    """Cut a complete frame (exactly its bytes) into body and buffers."""
    _, kind, flags, nbufs, blen = HEADER.unpack_from(view, 0)
    if flags & CHUNKED_FLAG:
        raise FrameError("a CHUNKED frame on a message link (segments are for streams)")
    pos = _header_len(view, 0)
    fields = _fields_of(view, 0)
    body = view[pos : pos + blen]
    pos += blen
    buffers = []
    for i in range(nbufs):
        n = _BUFLEN.unpack_from(view, HEADER.size + 8 * i)[0]
        buffers.append(view[pos : pos + n])
        pos += n
    return Frame(
        kind, flags & _CODEC_MASK, body, buffers, receipt=bool(flags & _RECEIPT), fields=fields
    )


def parse_frame(
    datagram: bytes | bytearray | memoryview, max_frame: int = DEFAULT_MAX_FRAME
) -> Frame:
    """Parse one frame that must fill ``datagram`` exactly (message transports)."""
    if _fields_frame is not None:  # the common frame with header fields, in C
        frame = _fields_frame(datagram, max_frame)
        if frame is not None:
            return frame
    total = _frame_total(datagram, 0, len(datagram), max_frame)
    if total < 0 or total > len(datagram):
        raise FrameError(f"truncated frame: {len(datagram)} bytes received")
    if datagram[2] & CHUNKED_FLAG:
        raise FrameError("a CHUNKED frame on a message link (segments are for streams)")
    if total != len(datagram):
        raise FrameError(f"{len(datagram) - total} stray bytes after the frame")
    return _split(memoryview(datagram))


class FrameDecoder:
    """Incremental frame decoder for byte streams.

    Feed it with :meth:`get_buffer`/:meth:`buffer_updated` (zero-copy reads) or
    :meth:`feed` (for tests and ``data_received``-style callers); take complete frames
    from :attr:`frames`.

    Small frames are cut out of one reusable read buffer, many per read. A frame larger
    than half that buffer is read *part by part* into buffers of their own: the body
    into an exactly sized buffer, each out-of-band buffer into its own (so a numpy
    array gets malloc-aligned memory of its own), or, for a raw payload, straight into
    the caller's buffer set as :attr:`sink` (``recv_bytes_into``): the bytes are
    copied once, by the kernel, to their final place.

    Errors are raised in stream order: frames that completed before a bad one are
    delivered first, and the error surfaces when the bad frame would be next (from
    :meth:`buffer_updated` if nothing precedes it, else from :meth:`check`). An error
    is final — the stream is out of sync — except :class:`FrameTooLarge`, which is
    re-evaluated when :attr:`max_frame` changes: a handshake reads with a 4 KiB cap,
    and data frames that arrive right behind its last message wait for the real cap.
    """

    __slots__ = (
        "_big",
        "_buf",
        "_end",
        "_error",
        "_failed",
        "_fields",
        "_got",
        "_hdr",
        "_hdr_got",
        "_left",
        "_max_frame",
        "_part",
        "_seg",
        "_spare",
        "_start",
        "_view",
        "aborted",
        "control",
        "frames",
        "sink",
        "skipped",
    )

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, read_size: int = 256 * 1024) -> None:
        self._max_frame = max_frame
        self._error: FrameError | None = None
        # Complete frames in order: a Frame, or for the common small DATA frame without
        # buffers just ``(flags, body)`` (cheaper to make): the codec id, plus 8 if the
        # sender asked for a receipt; next_frame() gives Frames.
        self.frames: deque[Frame | tuple[int, bytes]] = deque()
        # CREDIT frames as (flags, body), kept apart from messages: the channel applies
        # them at once, even while messages read before them wait to be received
        self.control: deque[tuple[int, bytes]] = deque()
        self._buf = bytearray(read_size)
        self._view = memoryview(self._buf)  # its exports never resize: see _compact
        self._start = 0
        self._end = 0
        # a big frame in progress: (kind, codec, parts, sunk); _part/_got: where we are
        self._big: tuple[int, int, list[memoryview], bool] | None = None
        self._part = 0
        self._got = 0
        self._spare: bytearray | mmap.mmap | None = None  # a big buffer from recycle()
        self._failed = False
        self.sink: memoryview | None = None
        # a CHUNKED big frame: bytes left in the current segment (0: its u32 length is
        # next, read into _hdr; -1: not chunked), payload bytes left, its header fields
        self._seg = -1
        self._left = 0
        self._hdr = memoryview(bytearray(4))
        self._hdr_got = 0
        self._fields: dict[int, bytes] | None = None
        self.aborted = 0  # chunked frames their sender aborted (dropped whole)
        self.skipped = 0  # optional control frames of kinds this side does not know

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max_frame = value
        if isinstance(self._error, FrameTooLarge) and not self._failed:
            self._error = None
            self._parse()

    def next_frame(self) -> Frame:
        """Pop the next complete frame (``frames`` must not be empty) as a Frame."""
        item = self.frames.popleft()
        if type(item) is tuple:
            flags = item[0]
            return Frame(1, flags & _CODEC_MASK, item[1], [], receipt=flags > _CODEC_MASK)
        assert isinstance(item, Frame)
        return item

    def take_all(self) -> list[Frame]:
        """Pop every complete frame, as Frames."""
        out = []
        while self.frames:
            out.append(self.next_frame())
        return out

    def check(self) -> None:
        """Raise the error of the next frame, if that frame is bad (call when
        :attr:`frames` is empty, before reading more)."""
        if self._error is not None and not self.frames:
            raise self._error

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        n = self._end - self._start
        if self._big is not None:
            parts = self._big[2]
            n += sum(p.nbytes for p in parts[: self._part]) + self._got + 1
        return n

    def get_buffer(self) -> memoryview:
        """The writable region the next read should fill (never empty)."""
        if self._failed:
            raise FrameError("the decoder already failed; the stream is out of sync")
        if self._error is not None:
            raise self._error
        if self._big is not None:
            return self._big_target()
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end :]

    def idle_buffer(self) -> bytearray | None:
        """The read buffer when the decoder holds nothing (no byte of a frame, no
        complete frame, no error): a read may then go into it from its start, and
        :meth:`buffer_updated` be told after (``protocol._stream.wait_frame`` does
        that read, and takes a lone plain frame itself). None otherwise."""
        if self._end or self._big is not None or self._error is not None or self.frames:
            return None
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written into the region :meth:`get_buffer` returned."""
        if self._big is not None:
            try:
                self._advance(nbytes)
            except FrameError as exc:
                self._error = exc
                self._failed = True
                if not self.frames:
                    raise
            return
        start = self._start
        end = self._end = self._end + nbytes
        avail = end - start
        if avail >= 8 and self._error is None and _plain_run is not None:
            # Fastest path: the read brought a run of small DATA frames (in C)
            limit = min(len(self._buf) >> 1, self._max_frame)
            start = self._start = _plain_run(self._buf, start, end, limit, self.frames.append)
            if start != end and _fields_run is not None:  # frames with header fields
                start = self._start = _fields_run(self._buf, start, end, limit, self.frames.append)
            if start == end:
                self._start = self._end = 0
                return
            if end - start > 1 and self._buf[start + 1] == 6:  # CREDITs lead: take them
                start = self._credits(start, end)
                if start < end:
                    start = self._start = _plain_run(
                        self._buf, start, end, limit, self.frames.append
                    )
                if start == end:
                    self._start = self._end = 0
                    return
        elif avail >= 8 and self._error is None:
            # Fastest path: the read brought exactly one small DATA frame (a round trip).
            version, kind, flags, nbufs, blen = _unpack_header(self._buf, start)
            if (
                blen + 8 == avail
                and version == VERSION
                and kind == 1
                and not flags & _NOT_FAST
                and not nbufs
                and avail <= self._max_frame
                and avail <= len(self._buf) >> 1
            ):
                self.frames.append((flags, bytes(self._buf[start + 8 : end])))
                self._start = self._end = 0
                return
        self._parse()
        if self._error is not None and not self.frames:
            raise self._error

    def _credits(self, start: int, end: int) -> int:
        """A run of well-formed plain CREDIT frames at ``start``, as :meth:`_parse`
        takes it (the last one's body, "blocked" if any says so), without its copy of
        the read; returns where the run ends (``start``: none there)."""
        buf = self._buf
        run = _CREDIT_RUN.match(buf, start, end)
        if run is None:
            return start
        pos = self._start = run.end()
        blocked = 8 if 8 in buf[start + 2 : pos : 24] else 0
        self.control.append((blocked, bytes(buf[pos - 16 : pos])))
        return pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` in, whatever its size, and parse what completes."""
        mv = memoryview(data).cast("B")
        while mv:
            target = self.get_buffer()
            n = min(len(target), len(mv))
            target[:n] = mv[:n]
            mv = mv[n:]
            self.buffer_updated(n)

    def eof(self) -> None:
        """The stream ended. Raises :class:`FrameError` if a frame was cut short."""
        if self.buffered:
            self._failed = True
            raise FrameError(f"stream ended inside a frame ({self.buffered} bytes of it received)")

    def release_sink(self) -> None:
        """Stop writing into :attr:`sink`; a big frame already flowing into it moves to a
        buffer of its own first (the caller's buffer is theirs again)."""
        sink, self.sink = self.sink, None
        big = self._big
        if sink is None or big is None or not big[3]:
            return
        kind, codec, parts, _ = big
        own = lazy_buffer(parts[1].nbytes)
        own[: self._got if self._part == 1 else 0] = parts[1][: self._got if self._part == 1 else 0]
        parts[1].release()
        parts[1] = own
        self._big = (kind, codec, parts, False)

    def recycle(self, frame: Frame) -> None:
        """The consumer copied ``frame`` out and keeps no view of it: let the next big
        frame reuse its largest buffer (fresh memory costs page faults, ~0.4 ms/MiB)."""
        if frame.sunk:
            return
        best: bytearray | mmap.mmap | None = None
        for view in (frame.body, *frame.buffers):
            if isinstance(view, memoryview):
                base = view.obj
                view.release()
                if isinstance(base, bytearray | mmap.mmap) and (
                    best is None or len(base) > len(best)
                ):
                    best = base
        frame.buffers = []
        frame.body = b""
        if (
            best is not None
            and len(best) >= len(self._buf) // 2
            and (self._spare is None or len(best) > len(self._spare))
        ):
            self._spare = best

    # -- internals ----------------------------------------------------------------------

    def _big_buffer(self, n: int) -> memoryview:
        spare = self._spare
        if spare is not None and len(spare) >= n:
            self._spare = None
            return memoryview(spare)[:n]
        return lazy_buffer(n)

    def _compact(self) -> None:
        n = self._end - self._start
        if self._start:
            self._buf[:n] = self._buf[self._start : self._end]
        self._start, self._end = 0, n
        if n == len(self._buf):  # only with a read_size smaller than a header and its table
            # A new buffer, not extend(): the caller may still hold a view of the old one.
            self._buf = self._buf + bytes(len(self._buf))
            self._view = memoryview(self._buf)

    def _begin_big(self, view: memoryview, start: int) -> None:
        """Set up the parts of a big (or CHUNKED) frame whose header region is at
        ``start``. Parts are lazy buffers: memory follows the bytes that arrive."""
        _, kind, flags, nbufs, blen = _unpack_header(view, start)
        lengths = [_BUFLEN.unpack_from(view, start + 8 + 8 * i)[0] for i in range(nbufs)]
        codec = flags & (_CODEC_MASK | _RECEIPT)  # the receipt bit rides along
        self._fields = _fields_of(view, start)
        parts = [lazy_buffer(blen) if blen >= LAZY_MIN else memoryview(bytearray(blen))]
        # parts below LAZY_MIN are bytearrays (zeroed: committed at once) while they add
        # up to LAZY_MIN; past that, mappings too: 255 parts just under LAZY_MIN would
        # otherwise commit 255 MiB for a header of 2 KiB
        eager = blen if blen < LAZY_MIN else 0
        sunk = False
        sink = self.sink
        for i, n in enumerate(lengths):
            if (
                i == 0
                and sink is not None
                and not self.frames  # it must be the very next frame the caller takes
                and nbufs == 1
                and blen == 0
                and codec & _CODEC_MASK == CodecId.RAW
                and sink.nbytes >= n
            ):
                parts.append(sink[:n])
                sunk = True
            elif n < LAZY_MIN and eager + n > LAZY_MIN:
                parts.append(memoryview(mmap.mmap(-1, n)))
            else:
                parts.append(self._big_buffer(n))
                eager += n if n < LAZY_MIN else 0
        self._big = (kind, codec, parts, sunk)
        self._part = 0
        self._got = 0
        self._left = blen + sum(lengths)
        self._seg = 0 if flags & CHUNKED_FLAG else -1
        self._hdr_got = 0
        self._start = start + _header_len(view, start)
        self._skip_full_parts()  # empty parts (a frame with no payload: complete)
        # bytes already buffered behind the header belong to this frame
        while self._big is not None and self._start < self._end:
            target = self._big_target()
            n = min(target.nbytes, self._end - self._start)
            target[:n] = view[self._start : self._start + n]
            self._start += n
            self._advance(n)

    def _big_target(self) -> memoryview:
        """Where the next bytes of the big frame in progress go."""
        if self._seg == 0:  # a segment length is next
            return self._hdr[self._hdr_got :]
        assert self._big is not None
        target = self._big[2][self._part][self._got :]
        if self._seg > 0 and target.nbytes > self._seg:
            target = target[: self._seg]
        return target

    def _skip_full_parts(self) -> None:
        assert self._big is not None
        parts = self._big[2]
        while self._part < len(parts) and self._got == parts[self._part].nbytes:
            self._part += 1
            self._got = 0
        if self._part == len(parts) and self._seg < 0:
            self._complete()

    def _complete(self) -> None:
        assert self._big is not None
        kind, codec, parts, sunk = self._big
        self._big = None
        self._seg = -1
        frame = Frame(
            kind,
            codec & _CODEC_MASK,
            parts[0],
            parts[1:],
            sunk,
            bool(codec & _RECEIPT),
            self._fields,
        )
        self._fields = None
        if kind == Kind.CREDIT:
            self.control.append((frame.codec | (8 if frame.receipt else 0), bytes(frame.body)))
        elif kind in OPTIONAL_KINDS:
            self.skipped += 1
        else:
            self.frames.append(frame)

    def _advance(self, nbytes: int) -> None:
        seg = self._seg
        if seg == 0:  # bytes of a segment length
            self._hdr_got += nbytes
            if self._hdr_got == 4:
                self._hdr_got = 0
                self._segment(_SEGLEN.unpack_from(self._hdr, 0)[0])
            return
        self._got += nbytes
        if seg > 0:
            self._seg = seg - nbytes
            self._left -= nbytes
        self._skip_full_parts()

    def _segment(self, n: int) -> None:
        """A segment length arrived: the next ``n`` payload bytes, or an abort."""
        if n == ABORT_SEGMENT:
            big = self._big
            assert big is not None
            if big[3] and self.sink is not None:
                self.sink = None  # the caller's buffer holds a torn message: not theirs
            self._big = None
            self._seg = -1
            self._fields = None
            self.aborted += 1
            return
        if n == 0 and not self._left:
            self._complete()  # END
            return
        if n == 0 or n > self._left:
            what = "END" if n == 0 else f"a segment of {n} bytes"
            raise FrameError(f"{what} in a chunked frame with {self._left} bytes to come")
        self._seg = n

    def _parse(self) -> None:
        buf = self._buf
        half = len(buf) // 2
        frames = self.frames
        append = frames.append
        control = self.control
        limit = min(half, self._max_frame)
        view = memoryview(buf)
        # Small frames are sliced out of one bytes snapshot of what this read brought:
        # one copy for the whole read instead of a view and a copy per frame.
        base = self._start
        end = self._end
        data = bytes(view[base:end])
        try:
            while self._big is None:
                # Fast path: a run of small DATA frames without buffers (the common case).
                pos = self._start - base
                stop = end - base
                while stop - pos >= 8:
                    version, kind, flags, nbufs, blen = _unpack_header(data, pos)
                    total = 8 + blen
                    if (
                        version != VERSION
                        or kind != 1
                        or flags & _NOT_FAST
                        or nbufs
                        or total > stop - pos
                        or total > limit
                    ):
                        if kind == 6:  # CREDITs: a run of them is matched in one go
                            run = _CREDIT_RUN.match(data, pos, stop)
                            if run is not None:
                                pos = run.end()
                                # counts are cumulative: the last one says it all, but a
                                # "blocked" bit (flags 8) anywhere in the run counts
                                blocked = 8 if 8 in data[run.start() + 2 : pos : 24] else 0
                                control.append((blocked, data[pos - 16 : pos]))
                                continue
                        break
                    append((flags, data[pos + 8 : pos + total]))
                    pos += total
                self._start = start = pos + base
                avail = end - start
                total = _frame_total(buf, start, avail, self._max_frame)
                if total < 0:
                    break
                if total > half or buf[start + 2] & CHUNKED_FLAG:
                    if avail < _header_len(buf, start):
                        break
                    self._begin_big(view, start)
                    continue
                if avail < total:
                    break
                # a bytearray: arrays rebuilt on its buffers are writable, like big ones
                chunk = bytearray(view[start : start + total])
                self._start += total
                frame = _split(memoryview(chunk))
                if frame.kind == Kind.CREDIT:  # apart: a waiting sender needs it first
                    control.append((frame.codec | (8 if frame.receipt else 0), bytes(frame.body)))
                elif frame.kind in OPTIONAL_KINDS:
                    self.skipped += 1
                else:
                    append(frame)
        except FrameTooLarge as exc:
            self._error = exc  # kept until max_frame changes or the caller reaches it
        except FrameError as exc:
            self._error = exc
            self._failed = True
        finally:
            view.release()
        if self._start == self._end:
            self._start = self._end = 0
