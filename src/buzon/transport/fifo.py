"""Named pipes (FIFOs): a pipe with a name in the file system.

* ``listen`` creates the FIFO (mode 0600; an existing FIFO is reused only if nobody is
  reading it) and ``accept`` returns its single reader channel. The reader also keeps
  a write end of its own open, so it does not see end-of-file each time the last
  writer leaves: a FIFO endpoint is a place many writers come and go.
* ``connect`` opens the write end. A FIFO with no reader cannot be opened for writing
  (``ENXIO``: :class:`ConnectionRefused`) and offers no fd to wait on, so ``connect``
  tries again with a short back-off until its timeout, as for any absent endpoint.
* **Several writers, framed** (the default): every message goes as pieces in an
  envelope (writer id, piece number, CRC32C: ``protocol/fifo.py``), each written by one
  non-blocking ``write``: small ones of at most ``PIPE_BUF`` (4096) bytes, which the
  kernel keeps whole, large ones sized to the FIFO's free space (Linux never
  interleaves a non-blocking pipe write; one cut short is sent again whole). The reader
  sorts the pieces per writer and delivers each message whole, so messages of any size
  from concurrent writers arrive whole and in each writer's order; bytes that are no
  envelope (a shell writing text, a writer killed mid-message) are skipped and counted
  (``statistics().rejected_frames``; :meth:`FifoReader.counters` has the bytes). The
  writer presents itself to the channel as a message transport (one message, one
  frame), the reader as a stream of whole frames. A send that gives up in the middle
  of a message (timeout, cancellation) delivers nothing: the reader drops the
  writer's unfinished message.
* **raw=True** moves the bytes exactly as they are (no envelope), as a shell writing
  into the FIFO does; writes over ``PIPE_BUF`` bytes from concurrent writers may then
  interleave. A raw reader behaves like ``cat``: once bytes have arrived, it sees the
  end of the channel when the last writer closes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import select
import stat
import struct
import termios
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._exitclean import disown, own
from .._runtime import check_endpoint_path
from ..address import Address
from ..errors import (
    BuzonError,
    ConnectionRefused,
    EndpointInUse,
    NoSuchEndpoint,
    UnsafePath,
    UnsupportedOperation,
    from_oserror,
)
from ..protocol.fifo import (
    CODEC_BITS,
    ENVELOPE_IN_C,
    FIRST,
    LAST,
    MAX_PAYLOAD,
    MAX_PIECE_PAYLOAD,
    OVERHEAD,
    PIECE_MAX,
    Encoder,
    Reassembler,
    envelope,
    wrap,
)
from ..protocol.frames import DEFAULT_MAX_FRAME
from ._tokens import TokenPool, remove_pools
from .base import (
    WOULD_BLOCK,
    Buffer,
    Connector,
    LinkProperties,
    ListenerTransport,
    MessageTransport,
    StreamTransport,
    Transport,
    TransportOptions,
    nbytes,
)

__all__ = [
    "PIPE_BUF",
    "FifoConnector",
    "FifoListener",
    "FifoReader",
    "FifoWriter",
    "connect",
    "listen",
]

PIPE_BUF = select.PIPE_BUF
_monotonic = time.monotonic
_readv = os.readv

PROPERTIES = LinkProperties(
    transport="fifo",
    direction="simplex",
    boundaries="stream",
    connection_oriented=False,
    reliable=True,
    ordered=True,
    local=True,
    notes="many writers, one reader; each writer's messages whole and in order",
)


_NUDGE = Encoder(0, 0).abort()

try:  # a plain receive's wait, read and unwrap in one C call (protocol/_dgram.c)
    from ..protocol._dgram import FIFO as _FIFO
    from ..protocol._dgram import MessageSender, wait_fifo
except ImportError:  # pragma: no cover - the extension is always built
    wait_fifo = MessageSender = None  # type: ignore[assignment,misc]
    _FIFO = 2


class FifoWaiter:
    """A framed reader's plain blocking receive in one C call (``wait_fifo``): sleep
    until the FIFO is readable, read into the channel decoder's idle buffer, unwrap
    the envelopes there; one plain frame comes back whole, anything else is left to
    the reassembler (:meth:`Reassembler.received_rest`) exactly as
    :meth:`FifoReader.recv_into` leaves it. ``room``: the buffer's size, for the
    channel's ``after_wait``."""

    def __init__(self, reader: FifoReader, decoder: Any) -> None:
        self._reader = reader
        self._r = reader.reassembler
        self._idle_buffer = decoder.idle_buffer
        self._fd = reader.read_fileno()
        self._scan = reader._scan
        self.room = 0

    def wait(
        self, deadline: float | None, spin: float, limit: int, wake: int = -1
    ) -> tuple[int, bytes] | int | None:
        """``(flags, body)``, or the bytes of frames now in the decoder's buffer (0:
        none yet, or the call does not apply: the engine's loop goes on), or None:
        ``deadline`` passed or ``wake`` became readable first."""
        reader = self._reader
        r = self._r
        buf = self._idle_buffer()
        if (
            buf is None
            or not (r.direct and reader.framed and reader._keepalive >= 0)
            or not PIECE_MAX <= len(buf) <= r.input_size
        ):
            return 0
        got = wait_fifo(
            self._fd,
            buf,
            deadline,
            spin,
            limit,
            wake,
            self._scan,
            reader.max_frame,
            CODEC_BITS,
            reader._bfd,
        )
        if got is None or len(got) == 2:
            return got
        n, pos, filled = got
        room = self.room = len(buf)
        if n <= 0:
            return 0  # only without the keepalive: the engine's read meets the end
        if pos != n:
            filled = r.received_rest(memoryview(buf), n, pos, filled, _monotonic(), n < room)
            if r.messages:
                reader._nudge()
        return filled

    @property
    def blocks(self) -> bool:
        """A wait with no deadline sleeps in read(2) itself (on the reader's blocking
        descriptor of the FIFO), so a receive never reads first."""
        reader = self._reader
        return reader._bfd >= 0 and reader._keepalive >= 0 and reader.framed


def _scan_nothing(*args: object) -> tuple[int, int]:
    """No C scan: unwrap nothing here, leave every byte to the reassembler."""
    return 0, 0


class FifoReader(StreamTransport):
    """The reading end: reassembles each writer's enveloped pieces into whole messages
    and hands the channel their frames, one after the other, as a clean byte stream
    (``raw=True``: the FIFO's bytes as they come). Owns ``rfd`` and ``keepalive`` (a
    write end of its own, so the last writer leaving is not the end).

    A stream, not a message transport, so messages read ahead wait in the channel's
    frame decoder, where a receive finds them without a system call; and since
    :meth:`recv_into` fills the buffer it is given whenever more is held here, the
    channel never sleeps on the FIFO while a message waits in this object.
    """

    def __init__(
        self,
        rfd: int,
        keepalive: int,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        frame_timeout: float | None = 30.0,
    ) -> None:
        self._rfd = rfd
        self._keepalive = keepalive
        self.properties = PROPERTIES
        self.scheme = "fifo"
        self.framed = True
        self.max_frame = max_frame
        self.reassembler = Reassembler(
            max_frame, frame_timeout=frame_timeout, join=False, frames=True
        )
        # the C scan (the reassembler is never direct without it)
        self._scan: Callable[..., tuple[int, int]] = self.reassembler.scan or _scan_nothing
        os.set_blocking(rfd, False)
        # a blocking descriptor of its own on the same FIFO: a plain wait with no
        # deadline sleeps in read(2) itself, one system call (wait_fifo's ``bfd``);
        # a close() from another thread ends it with a nudge (interrupt_reads)
        self._bfd = self._open_blocking() if keepalive >= 0 else -1

    def read_fileno(self) -> int:
        return self._rfd

    def _open_blocking(self) -> int:
        """A second open file of this FIFO, in blocking mode (-1: none); O_NONBLOCK
        belongs to the open file, which another process may share."""
        try:
            fd = os.open(f"/proc/self/fd/{self._rfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return -1
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.set_blocking(fd, True)
                return fd
        except OSError:
            pass
        os.close(fd)
        return -1

    def interrupt_reads(self) -> None:
        """End a wait another thread sleeps in inside read(2) (the channel is closing
        and its wake fd was written): a nudge, which every reader ignores (another
        process sharing the FIFO too)."""
        if self._bfd >= 0 and not self.closed:
            self._nudge()

    def frame_waiter(self, decoder: Any) -> FifoWaiter | None:
        if wait_fifo is None or self._scan is _scan_nothing:
            return None
        return FifoWaiter(self, decoder)

    def recv_into(self, buf: memoryview) -> int:
        if not self.framed:
            return self._recv_raw(buf)
        r = self.reassembler
        room = buf.nbytes
        rfd = self._rfd
        if r.direct and PIECE_MAX <= room <= r.input_size:
            # nothing held here: read straight into the channel's buffer and unwrap
            # the pieces there (one C call when they are whole small frames)
            try:
                n = _readv(rfd, (buf,))
            except (BlockingIOError, InterruptedError):
                r.idle(_monotonic())
                return WOULD_BLOCK
            except OSError as exc:
                raise from_oserror(exc, "fifo read") from exc
            if n <= 0:
                return n  # 0: only without the keepalive, after close
            pos, filled = self._scan(buf, 0, n, buf, 0, self.max_frame, CODEC_BITS)
            if pos == n:
                return filled
            filled = r.received_rest(buf, n, pos, filled, _monotonic(), n < room)
            if r.messages:
                self._nudge()
            return filled if filled else WOULD_BLOCK
        now = _monotonic()
        # held here: messages (unparsed input is only ever a piece's first part)
        filled = r.read_into(buf, 0, now) if r.messages else 0
        while filled < room:
            # read no more than the channel has room for (whole pieces shrink as they
            # are unwrapped), so little is left here when we return
            view = r.get_buffer(max(room - filled, PIECE_MAX))
            space = view.nbytes
            try:
                n = _readv(rfd, (view,))
            except (BlockingIOError, InterruptedError):
                n = -1
            except OSError as exc:
                raise from_oserror(exc, "fifo read") from exc
            finally:
                view.release()
            if n > 0:  # parsed, the common pieces unwrapped into buf in one C call; the
                # FIFO drained (n < space): every whole write is in, the unfinished is junk
                filled = r.received(n, buf, filled, now, n < space)
                if n < space:
                    break
            elif n < 0:
                r.idle(now)
                break
            else:  # only without the keepalive: after close
                break
        if r.messages:
            self._nudge()
        return filled if filled else WOULD_BLOCK

    def _nudge(self) -> None:
        """Bytes are held here that the channel had no room for, and the channel waits
        for the FIFO to become readable before it reads again: make it readable, with
        a piece the reassembler ignores (an ABORT of writer 0, which has no message).
        A full FIFO refuses it, and is readable anyway."""
        if self._keepalive >= 0:
            try:
                os.write(self._keepalive, _NUDGE)
            except OSError:
                pass

    @property
    def refused_messages(self) -> int:
        """Whole messages that were no buzon frame, dropped."""
        return self.reassembler.refused

    def _recv_raw(self, buf: memoryview) -> int:
        try:
            n = os.readv(self._rfd, (buf,))
        except (BlockingIOError, InterruptedError):
            return WOULD_BLOCK
        except OSError as exc:
            raise from_oserror(exc, "fifo read") from exc
        if n and self._keepalive >= 0:
            # like cat: from the first bytes on, the last writer leaving ends the stream
            os.close(self._keepalive)
            self._keepalive = -1
        return n

    def send_buffers(self, bufs: Sequence[Buffer]) -> int:
        raise UnsupportedOperation("this end of the fifo channel only receives")

    def counters(self) -> dict[str, int]:
        """``rejected_frames``: runs of bytes that were no valid envelope, messages
        dropped unfinished and messages that were no frame; ``rejected_bytes``: their
        bytes; ``cut_pieces``: large pieces whose write a full FIFO cut short (their
        writers sent them again whole: nothing lost)."""
        r = self.reassembler
        return {
            "rejected_frames": r.rejected_frames,
            "rejected_bytes": r.rejected_bytes,
            "cut_pieces": r.stumps,
        }

    def set_limits(self, max_frame: int, frame_timeout: float | None) -> None:
        """Reassemble with the channel's frame cap and frame-progress limit."""
        self.max_frame = max_frame
        self.reassembler.max_frame = max_frame
        self.reassembler.max_pending = 2 * max_frame
        self.reassembler.frame_timeout = frame_timeout

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self._rfd, self._keepalive, self._bfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._keepalive = self._bfd = -1


class FifoWriter(MessageTransport):
    """A writing end: each message as enveloped pieces of at most ``PIPE_BUF`` bytes,
    one ``write`` each (``raw=True``: the bytes as they are). Owns ``wfd``.

    A message that does not fit at once is kept in progress and :meth:`send_message`
    returns False (wait for room, then call again *with the same buffers* to go on);
    only when its last piece is written does it return True. Called with other buffers
    instead, it leaves the unfinished message behind: the reader drops it.
    """

    max_message = DEFAULT_MAX_FRAME
    sends_batches = True

    def __init__(self, wfd: int) -> None:
        self._wfd = wfd
        self.properties = PROPERTIES
        self.scheme = "fifo"
        self.framed = True
        self.encoder = Encoder(os.getpid(), secrets.randbits(32))
        # the message in progress: its buffers (held, so identity means the same
        # message), what is left to write, and whether any of it was written
        self._job: list[Buffer] | None = None
        self._views: list[memoryview] = []  # framed: the message in progress
        self._size = 0
        self._pos = 0  # its bytes written in whole pieces
        self._left: list[memoryview] = []  # raw: the bytes not written yet
        try:
            self._pipe_size = fcntl.fcntl(wfd, fcntl.F_GETPIPE_SZ)
        except OSError:
            self._pipe_size = 65536
        self.cuts = 0  # large pieces whose write was cut short (each sent again whole)
        self._started = False
        # send_many (corked): small messages' pieces gather into one write of at most
        # PIPE_BUF bytes, which the kernel keeps whole like a single piece
        self._corked = False
        self._batch: list[bytes] = []
        self._batch_size = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of accepted messages this end still holds: pieces of a ``send_many``
        whose last write found the FIFO full. The next send writes them first, and
        ``close`` waits for room for them (5 s at most). 0 almost always."""
        return self._batch_size

    def write_fileno(self) -> int:
        return self._wfd

    def cork(self, on: bool) -> None:
        """``send_many``: gather small messages into writes of up to PIPE_BUF bytes."""
        self._corked = on and self.framed
        if not on and self._batch:
            self._write_batch()

    def send_messages(
        self, messages: Sequence[Sequence[Buffer]], start: int = 0
    ) -> tuple[int, int]:
        """``send_many``'s batch (``sends_batches``): small messages from ``start`` on,
        packed as one-piece messages into writes of at most ``PIPE_BUF`` bytes (each
        kept whole by the kernel, as a single piece is), as many as the FIFO takes
        now. Stops at a message of more than one piece: :meth:`send_message` sends it.
        Returns ``(end, nbytes)`` (see :meth:`MessageTransport.send_messages`)."""
        if not self.framed:  # bytes as they are: one message at a time
            return super().send_messages(messages, start)
        if self._job is not None:
            self._job = None  # the send that wrote part of it gave up: the reader drops it
            self._views = []
            self._started = False
        if self._batch and not self._write_batch():
            return start, 0  # what send_many gathered goes first
        enc = self.encoder
        wfd = self._wfd
        end = start
        size = 0
        while end < len(messages):
            data, stop, seq = enc.pack(messages, end, PIPE_BUF)
            if stop == end:
                break  # a message of several pieces
            try:
                os.write(wfd, data)  # PIPE_BUF bytes at most: all or nothing
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise from_oserror(exc, "fifo write") from exc
            enc.seq = seq
            size += len(data) - OVERHEAD * (stop - end)
            end = stop
        return end, size

    def _write_batch(self) -> bool:
        """Write the gathered pieces (one atomic write); False if the FIFO is full."""
        try:
            os.write(self._wfd, b"".join(self._batch))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise from_oserror(exc, "fifo write") from exc
        self._batch = []
        self._batch_size = 0
        return True

    def recv_message(self) -> bytes | None:
        raise UnsupportedOperation("this end of the fifo channel only sends")

    def small_sender(self, core: object, lock: object, limit: int) -> MessageSender | None:
        # one small message, nothing in progress: its one piece in one write, in C
        # (the piece made by the envelope's C code, numbered by this writer's encoder)
        if MessageSender is None or not ENVELOPE_IN_C:
            return None
        return MessageSender(
            self._wfd, _FIFO, core, lock, min(limit, MAX_PAYLOAD - 8), None, self, wrap
        )

    def send_message(self, bufs: Sequence[Buffer], priority: int = 0) -> bool:
        first = bufs[0]
        if (  # the common small message, nothing in progress: one piece, one write
            len(bufs) == 1
            and type(first) is bytes
            and len(first) <= MAX_PAYLOAD
            and self._job is None
            and not self._batch
            and not self._corked
            and self.framed
        ):
            enc = self.encoder
            seq = enc.seq
            try:
                os.write(self._wfd, wrap(FIRST | LAST, bufs, enc.pid, enc.nonce, seq))
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                raise from_oserror(exc, "fifo write") from exc
            enc.seq = (seq + 1) & 0xFFFFFFFF
            return True
        job = self._job
        if job is not None:
            if len(job) == len(bufs) and all(a is b for a, b in zip(job, bufs, strict=True)):
                return self._advance()
            self._job = None  # the send that wrote part of it gave up: the reader drops it
        if self._batch and not self._corked and not self._write_batch():
            return False  # what send_many gathered goes first
        if self.framed:
            size = nbytes(bufs)
            # large: cut into pieces as it is written
            pieces = [] if size > MAX_PAYLOAD else self.encoder.encode(bufs)
            if len(pieces) == 1:  # the common small message: one write, no state
                piece = pieces[0]
                if self._corked:
                    if self._batch_size + len(piece) > PIPE_BUF and not self._write_batch():
                        return False
                    self._batch.append(piece)
                    self._batch_size += len(piece)
                    return True
                try:
                    os.write(self._wfd, piece)
                except (BlockingIOError, InterruptedError):
                    return False
                except OSError as exc:
                    raise from_oserror(exc, "fifo write") from exc
                self._started = False
                return True
            if self._batch and not self._write_batch():
                return False
            self._views = [memoryview(b).cast("B") for b in bufs]
            self._size = size
            self._pos = 0
        else:
            self._left = [memoryview(b).cast("B") for b in bufs]
        self._job = list(bufs)
        self._started = False
        return self._advance()

    def _room(self) -> int:
        """Bytes a large piece may take now without its write being cut short: three
        quarters of the FIFO's free space (the kernel keeps bytes in pages, not all
        full), less two pages."""
        try:
            got = fcntl.ioctl(self._wfd, termios.FIONREAD, b"\0" * 4)
            queued: int = struct.unpack("i", got)[0]
        except OSError:
            return 0
        return (self._pipe_size - queued) * 3 // 4 - 2 * PIPE_BUF

    def _write_pieces(self) -> bool:
        """Write the message in progress as pieces from ``_pos`` on; False: no room.

        Pieces of up to PIPE_BUF bytes are kept whole by the kernel. Larger pieces
        (fewer system calls and checks per MiB) are sized to the FIFO's free space; the
        kernel never interleaves a non-blocking write with another (Linux holds the
        pipe's lock through it), but may cut it short when the FIFO fills: the stump
        is junk to the reader (its CRC fails, it is skipped), and the piece is sent
        again whole, with the same number, once there is room."""
        n = self._size
        pos = self._pos
        enc = self.encoder
        wfd = self._wfd
        while pos < n:
            chunk = min(n - pos, MAX_PIECE_PAYLOAD)
            if chunk > MAX_PAYLOAD:
                chunk = min(chunk, max(MAX_PAYLOAD, self._room() - OVERHEAD))
            end = pos + chunk
            payload = self._slice(pos, end)
            flags = (FIRST if pos == 0 else 0) | (LAST if end == n else 0)
            head, trailer = envelope(flags, payload, enc.pid, enc.nonce, enc.seq)
            try:
                written = os.writev(wfd, (head, payload, trailer))
            except (BlockingIOError, InterruptedError):
                self._pos = pos
                return False
            self._started = True
            if written < chunk + OVERHEAD:  # cut short: this piece goes again, whole
                self.cuts += 1
                self._pos = pos
                return False
            enc.seq = (enc.seq + 1) & 0xFFFFFFFF
            pos = end
        self._pos = pos
        return True

    def _slice(self, start: int, end: int) -> Buffer:
        """Bytes ``start:end`` of the message in progress (a view where they lie in
        one of its buffers)."""
        parts = []
        offset = 0
        for v in self._views:
            size = v.nbytes
            if offset + size > start and offset < end:
                parts.append(v[max(0, start - offset) : min(size, end - offset)])
            offset += size
            if offset >= end:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _advance(self) -> bool:
        left = self._left
        wfd = self._wfd
        try:
            if self.framed:
                if not self._write_pieces():
                    return False
                self._views = []
            else:
                while left:
                    n = os.writev(wfd, left[:1024])
                    self._started = True
                    while n and left:
                        if n >= left[0].nbytes:
                            n -= left.pop(0).nbytes
                        else:
                            left[0] = left[0][n:]
                            n = 0
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise from_oserror(exc, "fifo write") from exc
        self._job = None
        self._started = False
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._batch:  # accepted messages: wait a little for room for them
            deadline = time.monotonic() + 5.0
            poller = select.poll()
            poller.register(self._wfd, select.POLLOUT)
            try:
                while not self._write_batch():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    poller.poll(int(left * 1000) + 1)
            except BuzonError:
                pass  # the reader is gone: nobody to deliver to
        if self._job is not None and self._started and self.framed:
            try:  # tell the reader at once that the message will not be finished
                os.write(self._wfd, self.encoder.abort())
            except OSError:
                pass  # no room: the reader's frame timeout drops it
        self._job = None
        self._views = []
        self._left = []
        if self._wfd >= 0:
            os.close(self._wfd)
        self._wfd = -1


class FifoListener(ListenerTransport):
    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.path = addr.fs_path(opts.runtime_dir)
        check_endpoint_path(self.path, must_exist=False)
        self._created = False
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISFIFO(st.st_mode):
                raise EndpointInUse(f"{addr}: {self.path!r} exists and is not a FIFO")
            if _has_reader(self.path):
                raise EndpointInUse(f"{addr}: another process is already reading this FIFO")
            # nobody reads it: left by a crashed listener; a private one is ours now
            self._created = addr.private
            if self._created:
                own(self.path, st)
        else:
            try:
                os.mkfifo(self.path, 0o600)
            except OSError as exc:
                raise from_oserror(exc, f"mkfifo {self.path}") from exc
            self._created = True
            own(self.path)  # removed at interpreter exit if close() never runs
        try:
            os.chmod(self.path, 0o600)
            self._rfd = os.open(
                self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
            )
            # Our own write end keeps the reader from seeing EOF between writers.
            self._keepalive = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            _grow_pipe(self._rfd)
        except OSError as exc:
            if getattr(self, "_rfd", -1) >= 0:
                os.close(self._rfd)
            self._cleanup_path()
            raise from_oserror(exc, f"open {self.path}") from exc
        self._tokens: TokenPool | None = None
        if opts.capacity is not None and opts.capacity >= 0:
            try:
                self._tokens = TokenPool.create_fifos(self.path, opts.capacity)
            except BaseException:
                os.close(self._rfd)
                os.close(self._keepalive)
                self._cleanup_path()
                raise
        elif self._created:
            remove_pools(self.path)  # a dead listener's, with a capacity we do not have
        self._ready_r, self._ready_w = os.pipe()
        os.write(self._ready_w, b"!")  # accept() is ready at once, exactly one time
        self._accepted = False

    def fileno(self) -> int:
        return self._ready_r

    def accept(self) -> Transport | None:
        if self._accepted:
            return None
        self._accepted = True
        os.read(self._ready_r, 1)
        rfd, self._rfd = self._rfd, -1
        keepalive, self._keepalive = self._keepalive, -1
        transport = FifoReader(rfd, keepalive)
        transport.tokens, self._tokens = self._tokens, None  # the reader owns the pool now
        return transport

    def _cleanup_path(self) -> None:
        if self._created:
            disown(self.path)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._created = False

    def close(self) -> None:
        if getattr(self, "_tokens", None) is not None:
            assert self._tokens is not None
            self._tokens.close()
            self._tokens = None
        for name in ("_rfd", "_keepalive", "_ready_r", "_ready_w"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self._cleanup_path()


#: the FIFO's kernel buffer we ask for (Linux: up to /proc/sys/fs/pipe-max-size,
#: 1 MiB by default; pages are taken only while bytes wait in it)
PIPE_SIZE = 1024 * 1024


def _grow_pipe(fd: int) -> None:
    """Ask for a larger kernel buffer: writers of pieces of PIPE_BUF bytes then wait
    for the reader far less often (64 KiB is 16 pieces). Best effort: a system limit
    (``pipe-max-size``, a user's ``pipe-user-pages-soft``) may refuse, and the default
    buffer works too."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            max_size = int(f.read())
    except (OSError, ValueError):
        max_size = PIPE_SIZE
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(PIPE_SIZE, max_size))
    except OSError:
        pass


def _has_reader(path: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


class FifoConnector(Connector):
    want = "retry"

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.path = addr.fs_path(opts.runtime_dir)
        self.capacity = opts.capacity

    def step(self) -> Transport | None:
        check_endpoint_path(self.path, must_exist=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchEndpoint(f"{self.address}: no FIFO at {self.path!r}") from None
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nobody reads yet: connect tries again
                raise ConnectionRefused(f"{self.address}: no process reads the FIFO") from None
            raise from_oserror(exc, f"{self.address}") from exc
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePath(f"{self.address}: {self.path!r} is not a FIFO")
        try:
            tokens = TokenPool.open_fifos(self.path, self.capacity, str(self.address))
        except BaseException:
            os.close(fd)
            raise
        transport = FifoWriter(fd)
        transport.tokens = tokens
        return transport


def listen(addr: Address, opts: TransportOptions) -> FifoListener:
    return FifoListener(addr, opts)


def connect(addr: Address, opts: TransportOptions) -> FifoConnector:
    return FifoConnector(addr, opts)
