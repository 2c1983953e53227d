"""The ``fifo:`` envelope: many writers, one reader, and no writer can poison the rest.

Theory of operation
-------------------
A FIFO is one byte stream shared by every process that opens it for writing. The kernel
keeps a write of at most ``PIPE_BUF`` (4096) bytes in one piece; a longer write may be
cut short when the FIFO fills (on Linux a non-blocking write is never interleaved with
another: the pipe stays locked through it), and a writer killed or timed out in the
middle of a message leaves part of it behind. So a framed ``fifo:`` channel never writes
a message as one run of bytes: the writer cuts every message into **pieces**, each
written with one ``write``, each in an **envelope** that names its writer and can be
checked on its own (all integers little-endian)::

    offset  size  field
    0       4     magic         F1 F0 B0 7A (F1 F0 never occurs in UTF-8 text)
    4       1     version       1
    5       1     flags         bit 0 FIRST (a message starts), bit 1 LAST (it ends),
                                bit 2 ABORT (the writer gave its message up; no payload);
                                the others are 0
    6       2     reserved      0
    8       4     length        payload bytes that follow, at most 256 KiB
    12      4     pid           the writing process
    16      4     nonce         random per writer end: two ends of one process differ
    20      4     seq           the writer's piece number (+1 per piece, wraps)
    24      4     header crc    CRC32C of bytes 0-23
    28      n     payload       ``length`` bytes
    28+n    4     piece crc     CRC32C of bytes 0 to 28+n (header and payload)

A piece of at most ``PIPE_BUF`` bytes (payload up to 4064) is always written whole. A
larger one (the writer sizes it to the FIFO's free space) may be cut short: the writer
then sends it again whole, with the same ``seq``; the reader skips the stump (a true
header followed by the wrong bytes, or an unfinished piece left when the FIFO is
drained, since every complete write is in by then) and counts it apart (``stumps``).

The header carries a CRC of its own so a reader can reject a false header at once,
without waiting for the payload it announces (a false length would otherwise hold the
good writers' pieces behind it); a piece that is all there is checked by its piece CRC
alone (one pass over its bytes). A message is the payloads of one writer's pieces from a FIRST
one to a LAST one with consecutive ``seq``; a small message is one piece (FIRST and
LAST). The payload is the channel's frame (``protocol/frames.py``): the envelope carries
it and knows nothing of it.

The reader (:class:`Reassembler`) scans the byte stream for envelopes. Bytes that are not
a valid envelope (a shell writing text, a writer of another protocol, bits of anything)
are skipped up to the next valid one, and counted: each run of them is one rejected
frame and its bytes are rejected bytes. Pieces are sorted per writer ``(pid, nonce)``:

* a FIRST piece starts that writer's message (one it left unfinished is dropped);
* a piece that does not continue the writer's message (wrong ``seq``, or no message
  started) drops what the writer had and is itself dropped;
* a LAST piece completes the message, which is delivered whole; so each writer's
  messages arrive whole and in its order, however writers interleave;
* ABORT drops the writer's unfinished message (a send that timed out or was
  cancelled sends it when it can); a writer that died leaves its message to the
  frame timeout: one without a new piece for ``frame_timeout`` seconds is dropped.

Memory is bounded: a message being reassembled may not pass ``max_frame`` (it is
dropped when it would), at most ``max_writers`` messages are in reassembly at once
(a new writer evicts the one idle longest), and their bytes together stay under
``max_pending`` (the idlest go first). Every dropped message counts as one rejected
frame and its bytes as rejected bytes.

Everything here is sans-IO: bytes in (:meth:`Reassembler.get_buffer` /
:meth:`Reassembler.buffer_updated`), messages and counters out; time is an argument.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

from ..errors import FrameError
from .crc32c import _c_crc32c
from .crc32c import crc32c as _py_crc32c
from .frames import _CODECS, Kind, frame_length
from .frames import VERSION as _FRAME_VERSION

Buffer = bytes | bytearray | memoryview

# the C function itself where it is built (a Python wrapper costs a call per piece)
crc32c: Callable[[Buffer, int], int] = _c_crc32c if _c_crc32c is not None else _py_crc32c

_c: ModuleType | None
try:  # the hot paths in C (protocol/_envelope.c); this module stays the reference
    from . import _envelope as _c
except ImportError:  # not built: everything in Python, same bytes, same results
    _c = None
#: the C speedup is built (``accelerated=True`` objects use it)
ACCELERATED = _c is not None
# the C scan knows plain DATA frames of version 1 (kind 1) and these codecs
_SCAN_FRAMES = _FRAME_VERSION == 1 and int(Kind.DATA) == 1
#: the codecs the C scan lets through (bit ``1 << codec id``)
CODEC_BITS = sum(1 << c for c in _CODECS)

__all__ = [
    "ABORT",
    "ACCELERATED",
    "CODEC_BITS",
    "FIRST",
    "HEADER_SIZE",
    "LAST",
    "MAGIC",
    "MAX_PAYLOAD",
    "MAX_PIECE_PAYLOAD",
    "OVERHEAD",
    "PIECE_MAX",
    "Encoder",
    "Reassembler",
    "envelope",
    "piece",
    "wrap",
]

MAGIC = b"\xf1\xf0\xb0\x7a"
VERSION = 1
FIRST = 0x01
LAST = 0x02
ABORT = 0x04
_FLAGS = FIRST | LAST | ABORT

#: the largest write the kernel keeps whole (POSIX minimum 512; 4096 on Linux)
PIECE_MAX = 4096
#: the largest payload of one piece: a piece over PIECE_MAX bytes is written only where
#: the kernel never interleaves a write (Linux, non-blocking) and is sent again whole if
#: the write was cut short (see the module docstring)
MAX_PIECE_PAYLOAD = 256 * 1024
_HEAD = struct.Struct("<4sBBHIIII")  # bytes 0-23: what the header CRC covers
_U32 = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + 4  # 28
TRAILER_SIZE = 4
OVERHEAD = HEADER_SIZE + TRAILER_SIZE  # 32
MAX_PAYLOAD = PIECE_MAX - OVERHEAD  # 4064: the payload of a piece that is always whole
#: a reader of frames (join=False) copies a piece payload of at least this many bytes
#: into a buffer it reuses, not into a new bytes: a new object this big is a fresh
#: mapping from malloc, whose pages fault in during the copy and go back to the kernel
#: when it is freed (about 300 µs per MiB on the 1 MiB one-way row, against 20 µs for
#: the copy itself)
POOL_MIN = 64 * 1024
POOL_KEEP = 8  # such buffers kept for reuse (of MAX_PIECE_PAYLOAD bytes each: 2 MiB)
#: a piece's payload as the reader keeps it: bytes, or a view of a reused buffer
Payload = bytes | memoryview
_SEQ_MASK = 0xFFFFFFFF
_PARSE = struct.Struct("<4sBBHIIIII")  # the whole header, its CRC included
_unpack_header = _PARSE.unpack_from
_unpack_u32 = _U32.unpack_from
_pack_head = _HEAD.pack
_pack_u32 = _U32.pack


def envelope(flags: int, payload: Buffer, pid: int, nonce: int, seq: int) -> tuple[bytes, bytes]:
    """The header and trailer that wrap ``payload`` (at most :data:`MAX_PIECE_PAYLOAD`
    bytes) into a piece: write ``header + payload + trailer`` with one call."""
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    head = _pack_head(MAGIC, VERSION, flags, 0, size, pid, nonce, seq)
    head += _pack_u32(crc32c(head, 0))
    return head, _pack_u32(crc32c(payload, crc32c(head, 0)))


def piece(flags: int, payload: Buffer, pid: int, nonce: int, seq: int) -> bytes:
    """One enveloped piece (``payload`` at most :data:`MAX_PIECE_PAYLOAD` bytes)."""
    head, trailer = envelope(flags, payload, pid, nonce, seq)
    return b"".join((head, payload, trailer))


def _wrap_py(flags: int, bufs: Sequence[Buffer], pid: int, nonce: int, seq: int) -> bytes:
    return piece(flags, bufs[0] if len(bufs) == 1 else b"".join(bufs), pid, nonce, seq)


#: ``wrap(flags, bufs, pid, nonce, seq)``: one piece whose payload is ``bufs`` joined
#: (at most :data:`MAX_PIECE_PAYLOAD` bytes); the C function when it is built
#: :func:`wrap` is the C ``piece`` (protocol/_envelope.c)
ENVELOPE_IN_C = _c is not None
wrap: Callable[[int, Sequence[Buffer], int, int, int], bytes] = (
    _c.piece if _c is not None else _wrap_py
)


class Encoder:
    """One writer's side: cuts messages into enveloped pieces of at most ``PIECE_MAX``
    bytes, each to be written with one ``write`` call (which the kernel keeps whole).

    ``accelerated=False`` keeps to the Python code (the reference the C speedup is
    tested against); the bytes are the same either way.
    """

    def __init__(self, pid: int, nonce: int, *, accelerated: bool = True) -> None:
        self.pid = pid & _SEQ_MASK
        self.nonce = nonce & _SEQ_MASK
        self.seq = 0
        self._c = _c if accelerated else None

    def _piece(self, flags: int, payload: Buffer) -> bytes:
        seq = self.seq
        self.seq = (seq + 1) & _SEQ_MASK
        return piece(flags, payload, self.pid, self.nonce, seq)

    def encode(self, bufs: Sequence[Buffer]) -> list[bytes]:
        """The pieces of one message made of ``bufs`` (in order; each one ``write``)."""
        c = self._c
        if c is not None:
            first = bufs[0]
            if len(bufs) == 1 and type(first) is bytes and len(first) <= MAX_PAYLOAD:
                seq = self.seq
                self.seq = (seq + 1) & _SEQ_MASK
                return [c.piece(FIRST | LAST, bufs, self.pid, self.nonce, seq)]
        data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
        if type(data) is bytes and len(data) <= MAX_PAYLOAD:  # the common small message
            return [self._piece(FIRST | LAST, data)]
        view = memoryview(data).cast("B")
        n = view.nbytes
        if n <= MAX_PAYLOAD:
            return [self._piece(FIRST | LAST, view)]
        # a large message: the same steps as _piece, inlined (256 pieces per MiB)
        pid, nonce, seq = self.pid, self.nonce, self.seq
        crc, pack, u32, join = crc32c, _pack_head, _pack_u32, b"".join
        pieces = []
        pos = 0
        flags = FIRST
        while pos < n:
            chunk = view[pos : pos + MAX_PAYLOAD]
            pos += MAX_PAYLOAD
            if pos >= n:
                flags |= LAST
            head = pack(MAGIC, VERSION, flags, 0, len(chunk), pid, nonce, seq)
            seq = (seq + 1) & _SEQ_MASK
            head += u32(crc(head, 0))
            pieces.append(join((head, chunk, u32(crc(chunk, crc(head, 0))))))
            flags = 0
        self.seq = seq
        return pieces

    def pack(
        self, messages: Sequence[Sequence[Buffer]], start: int = 0, limit: int = PIECE_MAX
    ) -> tuple[bytes, int, int]:
        """Several small messages for one ``write``: ``(data, end, seq)`` where
        ``data`` is ``messages[start:end]`` as one-piece messages back to back, at most
        ``limit`` bytes (``PIECE_MAX``: a write the kernel keeps whole). It stops at a
        message of more than :data:`MAX_PAYLOAD` bytes (``end`` is then that message:
        send it with :meth:`encode`). ``seq`` is this writer's piece number once
        ``data`` is written: set :attr:`seq` to it then (a write that failed used
        none)."""
        c = self._c
        if c is not None:
            data, end, seq = c.pack(messages, start, self.pid, self.nonce, self.seq, limit)
            return data, end, seq
        out: list[bytes] = []
        used = 0
        seq = self.seq
        end = min(start, len(messages))
        while end < len(messages):
            bufs = messages[end]
            data = bufs if isinstance(bufs, bytes) else b"".join(bufs)
            if len(data) > MAX_PAYLOAD or used + OVERHEAD + len(data) > limit:
                break
            out.append(piece(FIRST | LAST, data, self.pid, self.nonce, seq))
            seq = (seq + 1) & _SEQ_MASK
            used += OVERHEAD + len(data)
            end += 1
        return b"".join(out), end, seq

    def abort(self) -> bytes:
        """The piece that tells the reader to drop this writer's unfinished message."""
        return self._piece(ABORT, b"")


@dataclass(slots=True)
class _Partial:
    """A message of one writer, part reassembled."""

    next_seq: int
    parts: list[Payload] = field(default_factory=list)
    size: int = 0
    touched: float = 0.0


class Reassembler:
    """The reader's side: envelopes in (a byte stream), whole messages out.

    Feed bytes with :meth:`get_buffer` then :meth:`buffer_updated` (or :meth:`feed`);
    complete messages collect in :attr:`messages`, in the order their last pieces
    arrived (``join=False``: a message of several pieces as the list of their
    payloads). :meth:`expire` drops messages whose writer went quiet; :meth:`deadline`
    says when to call it next.

    ``frames=True``: every message must be exactly one buzon frame
    (``protocol/frames.py``); one that is not is refused (counted in
    :attr:`refused` and as a rejected frame), so one writer's bad message never gets
    into the stream of the others. :meth:`read_into` then hands the messages out as
    one byte stream of frames; with the C speedup (``accelerated=True``, when built)
    the common piece, a whole small frame, goes from the input to that stream in one
    C call per buffer of input, everything else the Python way (same results).
    """

    def __init__(
        self,
        max_frame: int,
        *,
        frame_timeout: float | None = 30.0,
        max_writers: int = 64,
        max_pending: int | None = None,
        buffer_size: int = 0,
        join: bool = True,
        frames: bool = False,
        accelerated: bool = True,
    ) -> None:
        self.max_frame = max_frame
        self.frame_timeout = frame_timeout
        self.max_writers = max_writers
        self.max_pending = max_pending if max_pending is not None else 2 * max_frame
        self.join = join
        self.frames = frames
        #: the C scan (``protocol/_envelope.c``: ``scan(buf, start, end, dst, filled,
        #: max_frame, codecs) -> (pos, filled)``), None without it
        self.scan: Callable[..., tuple[int, int]] | None = (
            _c.scan if _c is not None and accelerated and _SCAN_FRAMES else None
        )
        self.refused = 0  # frames=True: whole messages that were no buzon frame, dropped
        self._off = 0  # read_into: bytes of the first message (or part) handed out
        self._part = 0  # of a message of several pieces: parts handed out
        # complete messages; with join=False a message of several pieces is the list of
        # its payloads (a reader that copies them on spares joining them first)
        self.messages: deque[Payload | list[Payload]] = deque()
        self.rejected_frames = 0  # runs of bytes that were no envelope, and dropped messages
        self.rejected_bytes = 0
        self.abandoned = 0  # messages dropped unfinished (a part of rejected_frames)
        # frames=True, join=False: big piece payloads go into reused buffers, handed out
        # as views of them, and given back once a message was handed out (POOL_MIN)
        self._pool: list[bytearray] | None = [] if frames and not join else None
        self._partial: dict[tuple[int, int], _Partial] = {}
        self._pending = 0  # payload bytes held in _partial
        # room for the largest piece whole, and more to read into
        self._buf = bytearray(max(buffer_size, 2 * (MAX_PIECE_PAYLOAD + OVERHEAD)))
        self._view = memoryview(self._buf)  # it never changes size
        #: the largest read :meth:`received_in_place` takes (the input buffer's size)
        self.input_size = len(self._buf)
        # a read may go straight into the output (received_in_place): nothing is held
        # and the C scan is there; kept up to date by the methods that read_into uses
        self.direct = self.scan is not None and frames
        self._start = 0  # unparsed bytes are _buf[_start:_end]
        self._end = 0
        self._garbage = False  # inside a run of rejected bytes
        # pieces over PIPE_BUF whose write was cut short (their writers send them again
        # whole): counted apart, they are no one's garbage
        self.stumps = 0
        self.stump_bytes = 0
        self._stump = False  # inside the rest of such a piece

    # -- input ------------------------------------------------------------------------

    def get_buffer(self, limit: int = 0) -> memoryview:
        """Where the next read goes (at least one piece's room; no more than
        ``limit`` bytes if given). The unparsed bytes move to the front only when the
        largest piece could not fit behind their start, or too little is left to read
        into: the rest of a big piece is read in place, not moved first."""
        start = self._start
        if start and (
            start + MAX_PIECE_PAYLOAD + OVERHEAD > len(self._buf)
            or len(self._buf) - self._end < PIECE_MAX
        ):
            self._compact()
        end = self._end
        if limit and end + limit < len(self._buf):
            return self._view[end : end + limit]
        return self._view[end:]

    def buffer_updated(self, n: int, now: float = 0.0, *, parse: bool = True) -> None:
        """``n`` bytes were written into :meth:`get_buffer`'s view: parse them
        (``parse=False``: leave them to the next :meth:`read_into`)."""
        self._end += n
        if parse:
            self._parse(now)
        self._settle()

    def feed(self, data: Buffer, now: float = 0.0) -> None:
        """Parse ``data`` (any size, any cut)."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            buf = self.get_buffer()
            n = min(buf.nbytes, view.nbytes)
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n, now)

    @property
    def buffered(self) -> int:
        """Bytes held: unparsed input and messages being reassembled."""
        return self._end - self._start + self._pending

    @property
    def unfinished(self) -> bool:
        """Messages are being reassembled (:meth:`expire` may drop some)."""
        return bool(self._partial)

    def _compact(self) -> None:
        buf = self._buf
        start, end = self._start, self._end
        if end > start:
            buf[: end - start] = buf[start:end]
        self._end = end - start
        self._start = 0

    def _reject(self, n: int) -> None:
        if n <= 0:
            return
        if self._stump:  # the rest of a piece whose write was cut short: not garbage
            self.stump_bytes += n
            return
        if not self._garbage:
            self._garbage = True
            self.rejected_frames += 1
        self.rejected_bytes += n

    def _parse(self, now: float, one: bool = False) -> None:
        """Parse the input (``one``: only until a message is complete)."""
        buf = self._buf
        view = memoryview(buf)  # the buffer never changes size: views of it are safe
        pos = self._start
        end = self._end
        messages = self.messages
        partial = self._partial
        max_frame = self.max_frame
        deliver = self._deliver if self.frames else messages.append
        while pos < end and not (one and messages):
            if not buf.startswith(MAGIC, pos):
                avail = end - pos
                if avail < 4 and buf[pos:end] == MAGIC[:avail]:
                    break  # may be the start of an envelope: wait for more
                found = buf.find(MAGIC, pos + 1, end)
                if found < 0:  # keep a tail that may start the next magic
                    found = end
                    for k in (3, 2, 1):
                        if end - k > pos and buf[end - k : end] == MAGIC[:k]:
                            found = end - k
                            break
                self._reject(found - pos)
                pos = found
                continue
            if end - pos < HEADER_SIZE:
                break
            _, version, flags, zero, length, pid, nonce, seq, hcrc = _unpack_header(buf, pos)
            stop = pos + HEADER_SIZE + length
            if (
                version != VERSION
                or flags & ~_FLAGS
                or zero
                or length > MAX_PIECE_PAYLOAD
                or (flags & ABORT and (length or flags & (FIRST | LAST)))
            ):
                self._reject(1)  # not an envelope after all: look further
                pos += 1
                continue
            if stop + TRAILER_SIZE > end:
                if crc32c(view[pos : pos + 24], 0) != hcrc:
                    self._reject(1)
                    pos += 1
                    continue
                break  # a true header: its payload is on the way
            if crc32c(view[pos:stop], 0) != _unpack_u32(buf, stop)[0]:
                if not self._stump and crc32c(view[pos : pos + 24], 0) == hcrc:
                    # a true header with the wrong bytes after it: a write cut short
                    self._stump = True
                    self.stumps += 1
                self._reject(1)
                pos += 1
                continue
            self._garbage = self._stump = False
            payload = self._payload(view, pos + HEADER_SIZE, stop)
            pos = stop + TRAILER_SIZE
            if flags == FIRST | LAST and not partial:
                deliver(payload)  # the common small message: no state at all
                continue
            if not flags & (FIRST | ABORT):  # the next piece of a message: inlined
                key = (pid, nonce)
                cur = partial.get(key)
                if cur is not None and seq == cur.next_seq and cur.size + length <= max_frame:
                    cur.parts.append(payload)
                    cur.size += length
                    cur.next_seq = (seq + 1) & _SEQ_MASK
                    cur.touched = now
                    self._pending += length
                    if flags & LAST:
                        del partial[key]
                        self._pending -= cur.size
                        deliver(b"".join(cur.parts) if self.join else cur.parts)
                    elif self._pending > self.max_pending:
                        self._bound(key)
                    continue
            self._piece(flags, (pid, nonce), seq, payload, now)
        view.release()
        if pos == end:
            self._start = self._end = 0
        else:
            self._start = pos

    def _payload(self, view: memoryview, start: int, stop: int) -> Payload:
        """The payload ``view[start:stop]`` of a piece that passed its checks: bytes,
        or (a big one, for a reader of frames) a view of a reused buffer (POOL_MIN)."""
        pool = self._pool
        n = stop - start
        if pool is None or n < POOL_MIN:
            return bytes(view[start:stop])
        buf = pool.pop() if pool else bytearray(MAX_PIECE_PAYLOAD)
        buf[:n] = view[start:stop]  # the same length: the buffer keeps its size
        return memoryview(buf)[:n]

    def _recycle(self, message: Payload | list[Payload]) -> None:
        """``message`` was handed out whole: its reused buffers go back to the pool."""
        pool = self._pool
        if pool is None:
            return
        for part in message if isinstance(message, list) else (message,):
            if isinstance(part, memoryview) and len(pool) < POOL_KEEP:
                buf = part.obj
                if isinstance(buf, bytearray) and len(buf) == MAX_PIECE_PAYLOAD:
                    pool.append(buf)

    def drained(self) -> None:
        """The byte source is empty for now (a read found the FIFO drained). Every
        piece a writer wrote is then wholly here (a write is never interleaved or
        left half-visible), so an unfinished piece left in the input is the stump of
        a write cut short (its writer sends the piece again whole) or garbage: it is
        skipped and counted, and holds nothing back."""
        start, end = self._start, self._end
        if end > start:
            buf = self._buf
            if (
                not self._stump
                and end - start >= HEADER_SIZE
                and buf.startswith(MAGIC, start)
                and crc32c(memoryview(buf)[start : start + 24], 0)
                == _unpack_u32(buf, start + 24)[0]
            ):
                self._stump = True
                self.stumps += 1
            self._reject(end - start)
            self._start = self._end = 0
        self._stump = False
        self._settle()

    # -- output as a stream of frames (frames=True) ------------------------------------

    def received(
        self, n: int, dst: memoryview, filled: int = 0, now: float = 0.0, drained: bool = False
    ) -> int:
        """``n`` bytes were written into :meth:`get_buffer`'s view: parse them and hand
        the messages out into ``dst[filled:]`` (see :meth:`read_into`); returns the
        new ``filled``. ``drained``: the read found the source empty (then
        :meth:`drained`), and expired messages are dropped (:meth:`expire`). One
        call per read, for ``frames=True`` readers."""
        end = self._end = self._end + n
        scan = self.scan
        if scan is not None and not self.messages and not self._partial:
            # the common case at once: the read brought whole small frames, nothing else
            start = self._start
            pos, filled = scan(self._buf, start, end, dst, filled, self.max_frame, CODEC_BITS)
            if pos != start:
                self._garbage = self._stump = False
                if pos == end:
                    self._start = self._end = 0
                    self.direct = self.frames  # and the flags are clear
                    return filled
                self._start = pos
        filled = self._read_into(dst, filled, now)
        if drained:
            self.drained()
        if self._partial:
            self.expire(now)
        self._settle()
        return filled

    def received_in_place(
        self, dst: memoryview, n: int, now: float = 0.0, drained: bool = False
    ) -> int:
        """Like :meth:`received` for a read that went straight into ``dst[:n]``
        (allowed while :attr:`direct`, at most :attr:`input_size` bytes): whole
        small frames are unwrapped in place, in one C call; anything else is taken
        into the input and parsed the usual way. Returns the bytes of ``dst`` filled."""
        scan = self.scan
        assert scan is not None  # and direct, n <= input_size: the caller checked
        pos, filled = scan(dst, 0, n, dst, 0, self.max_frame, CODEC_BITS)
        if pos == n:
            return filled
        return self.received_rest(dst, n, pos, filled, now, drained)

    def received_rest(
        self, dst: memoryview, n: int, pos: int, filled: int, now: float, drained: bool
    ) -> int:
        """The rest of :meth:`received_in_place`, for a reader that made its first
        step itself (``pos, filled = scan(dst, 0, n, dst, 0, max_frame,
        CODEC_BITS)`` while :attr:`direct`; ``pos < n``): what is left of the read
        goes into the input, and is parsed the usual way."""
        if pos:
            self._garbage = self._stump = False
        self._view[: n - pos] = dst[pos:n]  # direct: the input was empty
        return self.received(n - pos, dst, filled, now, drained)

    def idle(self, now: float) -> None:
        """A read found the source empty: :meth:`drained`, and :meth:`expire`."""
        self.drained()
        if self._partial:
            self.expire(now)
        self._settle()

    def _settle(self) -> None:
        self.direct = (
            self.scan is not None
            and self.frames
            and not self.messages
            and self._start == self._end
            and not self._partial
            and not self._garbage  # so a whole read of pieces leaves them as they are
            and not self._stump
        )

    def read_into(self, dst: memoryview, filled: int = 0, now: float = 0.0) -> int:
        """Parse the input held and hand the messages out into ``dst[filled:]``, one
        after the other (a message ``dst`` has no room for is cut, its rest comes
        next); returns the new ``filled``. Everything held is parsed: what ``dst``
        cannot take waits in :attr:`messages`. For ``frames=True`` readers (the
        output is a byte stream only a frame decoder can cut again)."""
        filled = self._read_into(dst, filled, now)
        self._settle()
        return filled

    def _read_into(self, dst: memoryview, filled: int, now: float) -> int:
        messages = self.messages
        scan = self.scan
        room = dst.nbytes
        while True:
            if messages:
                filled = self._hand_out(dst, filled)
                if filled == room:
                    if self._start < self._end:
                        self._parse(now)  # the rest waits as messages
                    return filled
            if self._start >= self._end:
                return filled
            if scan is not None and not self._partial:
                start = self._start
                pos, filled = scan(
                    self._buf, start, self._end, dst, filled, self.max_frame, CODEC_BITS
                )
                if pos != start:
                    self._garbage = self._stump = False
                    if pos == self._end:
                        self._start = self._end = 0
                        return filled
                    self._start = pos
            # the piece there is anything else: the Python way, up to a message
            self._parse(now, one=True)
            if not messages:
                return filled  # all parsed, or a piece waits for the rest of its bytes

    def _hand_out(self, dst: memoryview, filled: int) -> int:
        """Copy whole messages (then part of one) from :attr:`messages` into ``dst``."""
        messages = self.messages
        room = dst.nbytes
        while messages and filled < room:
            head = messages[0]
            if isinstance(head, list):  # a message's pieces, one after the other
                i, off = self._part, self._off
                while i < len(head) and filled < room:
                    part = head[i]
                    k = len(part) - off
                    if k <= room - filled:
                        dst[filled : filled + k] = memoryview(part)[off:] if off else part
                        filled += k
                        i += 1
                        off = 0
                    else:
                        k = room - filled
                        dst[filled:room] = memoryview(part)[off : off + k]
                        filled = room
                        off += k
                if i == len(head):
                    self._recycle(messages.popleft())
                    i = 0
                self._part, self._off = i, off
                continue
            off = self._off
            k = min(len(head) - off, room - filled)
            if off or k < len(head):
                dst[filled : filled + k] = memoryview(head)[off : off + k]
            else:
                dst[filled : filled + k] = head
            filled += k
            if off + k == len(head):
                self._recycle(messages.popleft())
                self._off = 0
            else:
                self._off = off + k
        return filled

    def _deliver(self, message: Payload | list[Payload]) -> None:
        """A message is complete: queue it, or refuse it (``frames=True``) when it is
        not exactly one buzon frame."""
        if self.frames:
            if isinstance(message, list):
                head, size = message[0], sum(map(len, message))
            else:
                head, size = message, len(message)
            try:
                ok = frame_length(head, self.max_frame) == size
            except FrameError:
                ok = False
            if not ok:
                self.refused += 1
                self.rejected_frames += 1
                self.rejected_bytes += size
                return
        self.messages.append(message)

    # -- pieces -----------------------------------------------------------------------

    def _piece(
        self, flags: int, writer: tuple[int, int], seq: int, payload: Payload, now: float
    ) -> None:
        partial = self._partial
        current = partial.get(writer)
        if flags & (FIRST | ABORT):
            if current is not None:
                self._drop(writer)
            if flags & ABORT:
                return
            if flags & LAST:
                self._deliver(payload)
                return
            self._start_message(writer, seq, payload, now)
            return
        if current is None or seq != current.next_seq:
            # a piece of a message whose start we never saw (or a gap): nothing to add it to
            if current is not None:
                self._drop(writer)
            self._abandon(len(payload))
            return
        size = current.size + len(payload)
        if size > self.max_frame:
            self._drop(writer)
            self._abandon(len(payload))
            return
        current.parts.append(payload)
        current.size = size
        current.next_seq = (seq + 1) & _SEQ_MASK
        current.touched = now
        self._pending += len(payload)
        if flags & LAST:
            del partial[writer]
            self._pending -= size
            self._deliver(b"".join(current.parts) if self.join else current.parts)
            return
        self._bound(writer)

    def _start_message(
        self, writer: tuple[int, int], seq: int, payload: Payload, now: float
    ) -> None:
        if len(payload) > self.max_frame:
            self._abandon(len(payload))
            return
        partial = self._partial
        while len(partial) >= self.max_writers:
            idlest = self._idlest(but=None)
            assert idlest is not None
            self._drop(idlest)
        partial[writer] = _Partial((seq + 1) & _SEQ_MASK, [payload], len(payload), now)
        self._pending += len(payload)
        self._bound(writer)

    def _bound(self, writer: tuple[int, int]) -> None:
        """Keep the bytes in reassembly under ``max_pending``: drop the idlest others
        (then this writer's own message, if it alone is too big)."""
        while self._pending > self.max_pending and self._partial:
            idlest = self._idlest(but=writer)
            self._drop(idlest if idlest is not None else writer)

    def _idlest(self, but: tuple[int, int] | None) -> tuple[int, int] | None:
        best: tuple[int, int] | None = None
        oldest = 0.0
        for key, p in self._partial.items():
            if key != but and (best is None or p.touched < oldest):
                best, oldest = key, p.touched
        return best

    def _drop(self, writer: tuple[int, int]) -> None:
        p = self._partial.pop(writer)
        self._pending -= p.size
        self._abandon(p.size)

    def _abandon(self, nbytes: int) -> None:
        self.abandoned += 1
        self.rejected_frames += 1
        self.rejected_bytes += nbytes

    # -- time -------------------------------------------------------------------------

    def deadline(self) -> float | None:
        """When the oldest unfinished message expires (``None``: none is unfinished)."""
        if not self._partial or self.frame_timeout is None:
            return None
        return min(p.touched for p in self._partial.values()) + self.frame_timeout

    def expire(self, now: float) -> None:
        """Drop the messages whose writer sent nothing for ``frame_timeout`` seconds."""
        if not self._partial or self.frame_timeout is None:
            return
        limit = now - self.frame_timeout
        for key in [k for k, p in self._partial.items() if p.touched <= limit]:
            self._drop(key)
        self._settle()
