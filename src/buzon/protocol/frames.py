"""The buzon frame: encoding and an incremental, allocation-safe decoder.

Every buzon message on the wire is one frame. On stream transports (pipes, FIFOs,
Unix and TCP sockets) frames follow each other; on message transports (POSIX queues,
datagram sockets) each datagram carries exactly one frame.

Byte table (all integers little-endian)::

    offset  size     field
    0       1        version        0x01; anything else is a FrameError
    1       1        kind           1 DATA, 2 HELLO, 3 AUTH, 4 WELCOME, 5 CLOSE
    2       1        flags          bits 0-2: codec (0 raw, 1 msgpack, 2 json, 3 pickle)
                                    bits 3-7: reserved, must be zero
    3       1        nbufs          number of out-of-band buffers (DATA only), 0-255
    4       4        body length    u32, length of the codec body
    8       8*nbufs  buffer lengths u64 each
    ...     body     codec body     e.g. msgpack bytes
    ...     ...      buffers        the out-of-band buffers, back to back, in order

The total (header + table + body + buffers) is checked against ``max_frame``
*before* anything is allocated for it: a peer announcing 4 GiB costs 8 bytes of
reading and a :class:`FrameTooLarge`, nothing more.

The decoder follows asyncio's buffered-protocol shape so the transport reads straight
into it: :meth:`FrameDecoder.get_buffer` says where the next ``recv_into`` should land
and :meth:`FrameDecoder.buffer_updated` says how much did. Small frames are parsed out
of one reusable read buffer, many per system call; a frame larger than half that
buffer gets an exactly-sized buffer of its own and is read into it directly, so its
bytes are copied once, from the kernel into the place they will stay.

This module is sans-IO: no sockets, no selectors, no clocks.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from ..errors import FrameError, FrameTooLarge

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HANDSHAKE_MAX_FRAME",
    "HEADER",
    "VERSION",
    "CodecId",
    "Frame",
    "FrameDecoder",
    "Kind",
    "encode_frame",
    "parse_frame",
]

VERSION = 1
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
HANDSHAKE_MAX_FRAME = 4096
HEADER = struct.Struct("<BBBBI")
_BUFLEN = struct.Struct("<Q")
_unpack_header = HEADER.unpack_from
_CODEC_MASK = 0x07
_RESERVED_MASK = 0xF8


class Kind(IntEnum):
    DATA = 1
    HELLO = 2
    AUTH = 3
    WELCOME = 4
    CLOSE = 5


class CodecId(IntEnum):
    RAW = 0
    MSGPACK = 1
    JSON = 2
    PICKLE = 3


_KINDS = frozenset(int(k) for k in Kind)
_CODECS = frozenset(int(c) for c in CodecId)


@dataclass(slots=True)
class Frame:
    """One decoded frame. ``body`` and ``buffers`` are views the frame owns."""

    kind: int
    codec: int
    body: bytes | bytearray | memoryview
    buffers: list[memoryview]

    @property
    def nbytes(self) -> int:
        return len(self.body) + sum(b.nbytes for b in self.buffers)


def encode_frame(
    kind: int,
    codec: int,
    body: bytes | bytearray | memoryview,
    buffers: Sequence[memoryview] = (),
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> list[bytes | bytearray | memoryview]:
    """Return the frame as a list of buffers, ready for one vectored write.

    The header and a small body are joined into one ``bytes``; out-of-band buffers
    are passed through untouched (no copy).
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
    total = HEADER.size + 8 * nbufs + blen
    if nbufs:
        table = b"".join(_BUFLEN.pack(b.nbytes) for b in buffers)
        total += sum(b.nbytes for b in buffers)
    else:
        table = b""
    if total > max_frame:
        from ..errors import MessageTooLarge

        raise MessageTooLarge(f"frame of {total} bytes exceeds the frame cap of {max_frame}")
    head = HEADER.pack(VERSION, kind, codec, nbufs, blen) + table
    if blen <= 4096:
        out: list[bytes | bytearray | memoryview] = [head + body]
    else:
        out = [head, body]
    out.extend(buffers)
    return out


def _check_header(version: int, kind: int, flags: int, nbufs: int) -> None:
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (this side speaks {VERSION})")
    if kind not in _KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    if flags & _RESERVED_MASK:
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


def _split(view: memoryview) -> Frame:
    """Cut a complete frame (exactly its bytes) into body and buffers."""
    _, kind, flags, nbufs, blen = HEADER.unpack_from(view, 0)
    pos = HEADER.size + 8 * nbufs
    body = view[pos : pos + blen]
    pos += blen
    buffers = []
    for i in range(nbufs):
        n = _BUFLEN.unpack_from(view, HEADER.size + 8 * i)[0]
        buffers.append(view[pos : pos + n])
        pos += n
    return Frame(kind, flags & _CODEC_MASK, body, buffers)


def parse_frame(
    datagram: bytes | bytearray | memoryview, max_frame: int = DEFAULT_MAX_FRAME
) -> Frame:
    """Parse one frame that must fill ``datagram`` exactly (message transports)."""
    total = _frame_total(datagram, 0, len(datagram), max_frame)
    if total < 0 or total > len(datagram):
        raise FrameError(f"truncated frame: {len(datagram)} bytes received")
    if total != len(datagram):
        raise FrameError(f"{len(datagram) - total} stray bytes after the frame")
    return _split(memoryview(datagram))


class FrameDecoder:
    """Incremental frame decoder for byte streams.

    Feed it with :meth:`get_buffer`/:meth:`buffer_updated` (zero-copy reads) or
    :meth:`feed` (for tests and ``data_received``-style callers); take complete frames
    from :attr:`frames`. Any error is final: the stream is out of sync after it.
    """

    __slots__ = ("_buf", "_end", "_failed", "_large", "_large_got", "_start", "frames", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, read_size: int = 256 * 1024) -> None:
        self.max_frame = max_frame
        self.frames: deque[Frame] = deque()
        self._buf = bytearray(read_size)
        self._start = 0
        self._end = 0
        self._large: bytearray | None = None  # exactly-sized buffer of one big frame
        self._large_got = 0
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return (self._end - self._start) + (self._large_got if self._large is not None else 0)

    def get_buffer(self) -> memoryview:
        """The writable region the next read should fill (never empty)."""
        if self._failed:
            raise FrameError("the decoder already failed; the stream is out of sync")
        if self._large is not None:
            return memoryview(self._large)[self._large_got :]
        if self._end == len(self._buf):
            self._compact()
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written into the region :meth:`get_buffer` returned."""
        if self._large is not None:
            self._large_got += nbytes
            if self._large_got == len(self._large):
                frame = self._large
                self._large = None
                self._large_got = 0
                self.frames.append(_split(memoryview(frame)))
            return
        self._end += nbytes
        self._parse()

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

    def _compact(self) -> None:
        n = self._end - self._start
        if self._start:
            self._buf[:n] = self._buf[self._start : self._end]
        self._start, self._end = 0, n
        if n == len(self._buf):  # only with a read_size smaller than a header and its table
            # A new buffer, not extend(): the caller may still hold a view of the old one.
            self._buf = self._buf + bytes(len(self._buf))

    def _parse(self) -> None:
        buf = self._buf
        half = len(buf) // 2
        frames = self.frames
        limit = min(half, self.max_frame)
        view = memoryview(buf)
        try:
            while True:
                start = self._start
                avail = self._end - start
                if avail >= 8:
                    # Fast path: a small DATA frame without buffers (the common case).
                    version, kind, flags, nbufs, blen = _unpack_header(buf, start)
                    total = 8 + blen
                    if (
                        version == VERSION
                        and kind == 1
                        and flags <= 3
                        and not nbufs
                        and total <= avail
                        and total <= limit
                    ):
                        frames.append(Frame(1, flags, bytes(view[start + 8 : start + total]), []))
                        self._start = start + total
                        continue
                total = _frame_total(buf, start, avail, self.max_frame)
                if total < 0:
                    break
                if total > half:
                    # A big frame: move what we have into its own exact buffer.
                    large = bytearray(total)
                    got = min(avail, total)
                    large[:got] = view[start : start + got]
                    self._start += got
                    if got == total:
                        frames.append(_split(memoryview(large)))
                        continue
                    self._large, self._large_got = large, got
                    break
                if avail < total:
                    break
                chunk = bytes(view[start : start + total])
                self._start += total
                frames.append(_split(memoryview(chunk)))
        except FrameError:
            self._failed = True
            raise
        finally:
            view.release()
        if self._start == self._end:
            self._start = self._end = 0
