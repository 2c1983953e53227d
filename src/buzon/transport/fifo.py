"""Named pipes (FIFOs): a pipe with a name in the file system.

* ``listen`` creates the FIFO (mode 0600; an existing FIFO is reused only if nobody is
  reading it) and ``accept`` returns its single reader channel. The reader also keeps
  a write end of its own open, so it does not see end-of-file each time the last
  writer leaves: a FIFO endpoint is a place many writers come and go.
* ``connect`` opens the write end. A FIFO with no reader cannot be opened for writing
  (``ENXIO``) and offers no fd to wait on, so the driver retries until its timeout.
* **Several writers, framed** (the default): every message goes as pieces of at most
  ``PIPE_BUF`` (4096) bytes, each written whole by one ``write`` and carrying an
  envelope (writer id, piece number, CRC32C: ``protocol/fifo.py``). The reader sorts the
  pieces per writer and delivers each message whole, so messages of any size from
  concurrent writers arrive whole and in each writer's order; bytes that are no
  envelope (a shell writing text, a writer killed mid-message) are skipped and counted
  (``statistics().rejected_frames``; :meth:`FifoReader.counters` has the bytes). Both
  ends present themselves to the channel as message transports: one message, one frame.
  A send that gives up in the middle of a message (timeout, cancellation) delivers
  nothing: the reader drops the writer's unfinished message.
* **raw=True** moves the bytes exactly as they are (no envelope), as a shell writing
  into the FIFO does; writes over ``PIPE_BUF`` bytes from concurrent writers may then
  interleave. A raw reader behaves like ``cat``: once bytes have arrived, it sees the
  end of the channel when the last writer closes.
"""

from __future__ import annotations

import errno
import os
import secrets
import select
import stat
import time
from collections.abc import Sequence

from .._runtime import check_endpoint_path
from ..address import Address
from ..errors import EndOfChannel, EndpointInUse, NoSuchEndpoint, UnsafePath, from_oserror
from ..protocol.fifo import Encoder, Reassembler
from ..protocol.frames import DEFAULT_MAX_FRAME
from ._tokens import TokenPool, remove_pools
from .base import (
    Buffer,
    Connector,
    LinkProperties,
    ListenerTransport,
    MessageTransport,
    Transport,
    TransportOptions,
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

_RAW_READ = 256 * 1024  # raw=True: bytes read at most per chunk


class FifoReader(MessageTransport):
    """The reading end: reassembles each writer's enveloped pieces into whole messages
    (``raw=True``: hands out the bytes as they come). Owns ``rfd`` and ``keepalive``
    (a write end of its own, so the last writer leaving is not the end)."""

    max_message = DEFAULT_MAX_FRAME

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
        self._framed = True
        self.reassembler = Reassembler(max_frame, frame_timeout=frame_timeout)
        self._raw_buf: bytearray | None = None
        os.set_blocking(rfd, False)
        # messages read ahead must wake a waiting receiver although the FIFO may be
        # drained: the read fd is an epoll fd over the FIFO and an eventfd that is set
        # while messages wait here
        self._ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._signalled = False
        self._epoll = select.epoll()
        self._epoll.register(rfd, select.EPOLLIN)
        self._epoll.register(self._ready, select.EPOLLIN)
        self._epfd = self._epoll.fileno()

    @property
    def framed(self) -> bool:
        """False (set by a ``raw=True`` channel): bytes as they are, no envelope, and
        the end of the channel once the last writer leaves (after the first bytes)."""
        return self._framed

    @framed.setter
    def framed(self, value: bool) -> None:
        self._framed = value

    def read_fileno(self) -> int:
        return self._epfd

    def _signal(self, on: bool) -> None:
        """Set or clear the eventfd that says messages wait here."""
        if on:
            os.eventfd_write(self._ready, 1)
        else:
            try:
                os.eventfd_read(self._ready)
            except BlockingIOError:
                pass
        self._signalled = on

    def recv_message(self) -> bytes | None:
        if not self._framed:
            return self._recv_raw()
        messages = self.reassembler.messages
        if messages:
            msg = messages.popleft()
            if not messages and self._signalled:
                self._signal(False)
            return msg
        if self._signalled:
            self._signal(False)
        return self._read_messages()

    def _read_messages(self) -> bytes | None:
        r = self.reassembler
        messages = r.messages
        rfd = self._rfd
        while True:
            view = r.get_buffer()
            room = view.nbytes
            try:
                n = os.readv(rfd, (view,))
            except (BlockingIOError, InterruptedError):
                n = -1
            except OSError as exc:
                raise from_oserror(exc, "fifo read") from exc
            finally:
                view.release()
            if n == 0:
                # no writer and no keepalive: only after close() of a raw reader
                raise EndOfChannel("every writer closed the FIFO")
            now = time.monotonic()
            if n > 0:
                r.buffer_updated(n, now)
            if r.deadline() is not None:
                r.expire(now)
            if messages:
                msg = messages.popleft()
                if messages:
                    self._signal(True)
                return msg
            if n < room:
                return None

    def _recv_raw(self) -> bytes | None:
        buf = self._raw_buf
        if buf is None:
            buf = self._raw_buf = bytearray(_RAW_READ)
        try:
            n = os.readv(self._rfd, (buf,))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise from_oserror(exc, "fifo read") from exc
        if n == 0:
            raise EndOfChannel("the last writer closed the FIFO")
        if self._keepalive >= 0:
            # like cat: from the first bytes on, the last writer leaving ends the stream
            os.close(self._keepalive)
            self._keepalive = -1
        return bytes(memoryview(buf)[:n])

    def send_message(self, bufs: Sequence[Buffer], priority: int = 0) -> bool:
        from ..errors import UnsupportedOperation

        raise UnsupportedOperation("this end of the fifo channel only receives")

    def counters(self) -> dict[str, int]:
        """``rejected_frames``: runs of bytes that were no valid envelope plus messages
        dropped unfinished; ``rejected_bytes``: their bytes."""
        r = self.reassembler
        return {"rejected_frames": r.rejected_frames, "rejected_bytes": r.rejected_bytes}

    def block_counters(self) -> dict[str, int]:
        """The counters today's channel core overlays on its statistics (those it has
        fields for): ``rejected_frames``."""
        return {"rejected_frames": self.reassembler.rejected_frames}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._epoll.close()
        for fd in (self._rfd, self._keepalive, self._ready):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._keepalive = self._ready = self._epfd = -1


class FifoWriter(MessageTransport):
    """A writing end: each message as enveloped pieces of at most ``PIPE_BUF`` bytes,
    one ``write`` each (``raw=True``: the bytes as they are). Owns ``wfd``.

    A message that does not fit at once is kept in progress and :meth:`send_message`
    returns False (wait for room, then call again *with the same buffers* to go on);
    only when its last piece is written does it return True. Called with other buffers
    instead, it leaves the unfinished message behind: the reader drops it.
    """

    max_message = DEFAULT_MAX_FRAME

    def __init__(self, wfd: int) -> None:
        self._wfd = wfd
        self.properties = PROPERTIES
        self.scheme = "fifo"
        self.framed = True
        self.encoder = Encoder(os.getpid(), secrets.randbits(32))
        # the message in progress: its buffers (held, so identity means the same
        # message), what is left to write, and whether any of it was written
        self._job: list[Buffer] | None = None
        self._pieces: list[bytes] = []  # framed: the pieces, written up to _next
        self._next = 0
        self._left: list[memoryview] = []  # raw: the bytes not written yet
        self._started = False

    def write_fileno(self) -> int:
        return self._wfd

    def recv_message(self) -> bytes | None:
        from ..errors import UnsupportedOperation

        raise UnsupportedOperation("this end of the fifo channel only sends")

    def send_message(self, bufs: Sequence[Buffer], priority: int = 0) -> bool:
        job = self._job
        if job is not None:
            if len(job) == len(bufs) and all(a is b for a, b in zip(job, bufs, strict=True)):
                return self._advance()
            self._job = None  # the send that wrote part of it gave up: the reader drops it
        if self.framed:
            pieces = self.encoder.encode(bufs)
            if len(pieces) == 1:  # the common small message: one write, no state
                try:
                    os.write(self._wfd, pieces[0])
                except (BlockingIOError, InterruptedError):
                    return False
                except OSError as exc:
                    raise from_oserror(exc, "fifo write") from exc
                self._started = False
                return True
            self._pieces = pieces
            self._next = 0
        else:
            self._left = [memoryview(b).cast("B") for b in bufs]
        self._job = list(bufs)
        self._started = False
        return self._advance()

    def _advance(self) -> bool:
        left = self._left
        wfd = self._wfd
        try:
            if self.framed:
                pieces = self._pieces
                while self._next < len(pieces):
                    os.write(wfd, pieces[self._next])  # at most PIPE_BUF bytes: all or none
                    self._next += 1
                    self._started = True
                self._pieces = []
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
        if self._job is not None and self._started and self.framed:
            try:  # tell the reader at once that the message will not be finished
                os.write(self._wfd, self.encoder.abort())
            except OSError:
                pass  # no room: the reader's frame timeout drops it
        self._job = None
        self._pieces = []
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
        else:
            try:
                os.mkfifo(self.path, 0o600)
            except OSError as exc:
                raise from_oserror(exc, f"mkfifo {self.path}") from exc
            self._created = True
        try:
            os.chmod(self.path, 0o600)
            self._rfd = os.open(
                self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
            )
            # Our own write end keeps the reader from seeing EOF between writers.
            self._keepalive = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
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
            if exc.errno == errno.ENXIO:  # nobody reads yet; the driver retries
                return None
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
