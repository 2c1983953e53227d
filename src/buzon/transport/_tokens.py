"""Credits for simplex links (one-way pipes, FIFOs, POSIX queues): tokens in a pipe.

A simplex link has no way back for CREDIT frames, and a FIFO or a queue may have many
writers. So the receiver keeps its credits in a pipe of its own (an anonymous pipe,
or a FIFO beside the endpoint) as bytes: **one byte lets one message go**. A sender
takes a byte (a non-blocking ``read`` of one byte: the kernel gives each byte to
exactly one reader, however many writers compete) before it writes its message; the
pipe's readability is what a blocked sender waits on.

``capacity=N``
    The receiver puts N tokens in the pool when it creates it and one more each time
    it takes a message: tokens + messages sent but not taken + tokens held by senders
    about to write = N, for any number of writers.
``capacity=0``
    The receiver puts one token — an *offer*, numbered 1..255 — when it begins to wait,
    and takes it back if it gives up (if a sender took it first, that sender's message
    is on its way and the next receive takes it). Taking a message writes the offer's
    number into a second pipe, the *ack* pipe; the one sender that took the offer waits
    there for its number, so its ``send`` returns only once the message was taken
    (acknowledgements of senders that gave up are stale and skipped).

    Withdrawing: a third pipe, the *stake* pipe, decides between a take and a sender
    that gives up. The sender that took the offer puts one byte there before it writes
    its message; the receiver, before it takes the message, reads one byte from it (its
    claim), and a sender that gives up after writing reads one byte from it too. The
    kernel gives the byte to exactly one of them: the receiver (it takes the message and
    acknowledges; the sender waits for that acknowledgement and its ``send`` returns)
    or the sender (it withdrew: the receiver finds the pipe empty and drops the
    message, its ``send`` raises). Only one offer is out at a time, so the pipe holds
    at most one byte.

Files: a FIFO endpoint at ``PATH`` keeps its pools at ``PATH.capN.credit`` (and
``PATH.cap0.ack``, ``PATH.cap0.stake``), 0600 like the endpoint; the capacity in the name is how a
connecting end learns it (and refuses a different one). A sender killed between taking
a token and writing its message loses that token (the window shrinks by one until the
endpoint is recreated): a hazard of microseconds, documented rather than hidden.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from .._exitclean import disown, own
from ..errors import EndOfChannel, HandshakeError, UnsafePath, from_oserror

__all__ = ["TokenPool", "fifo_pool_paths", "find_pool", "remove_pools"]

_O = os.O_NONBLOCK | os.O_CLOEXEC
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def fifo_pool_paths(base: str, capacity: int) -> tuple[str, str | None, str | None]:
    """(credit, ack, stake) FIFO paths of an endpoint whose own path is ``base``."""
    if capacity:
        return f"{base}.cap{capacity}.credit", None, None
    return f"{base}.cap0.credit", f"{base}.cap0.ack", f"{base}.cap0.stake"


def remove_pools(base: str) -> None:
    """Remove the pools of an endpoint (a listener's close, or a dead one's reclaim)."""
    import glob  # (glob and fnmatch only when a pool is looked for: import time)

    base = glob.escape(base)
    found = [glob.glob(base + end) for end in (".cap*.credit", ".cap0.ack", ".cap0.stake")]
    for path in [p for paths in found for p in paths]:
        try:
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass


def find_pool(base: str) -> int | None:
    """The capacity the listener at ``base`` stated (its pool's name), or None."""
    import glob

    found = glob.glob(glob.escape(base) + ".cap*.credit")
    if not found:
        return None
    text = found[0][len(base) + 4 : -len(".credit")]
    return int(text) if text.isdigit() else None


class TokenPool:
    """One end's view of the pools: the receiver (``owner``) or a sender."""

    def __init__(
        self,
        capacity: int,
        credit_fd: int,
        ack_fd: int = -1,
        *,
        owner: bool,
        paths: tuple[str, ...] = (),
        stake_fd: int = -1,
    ) -> None:
        self.capacity = capacity
        self.credit_fd = credit_fd
        self.ack_fd = ack_fd
        self.stake_fd = stake_fd  # capacity 0: read (claim, withdraw) and, a FIFO's, write
        self.owner = owner
        self.paths = paths  # FIFOs the owner removes at close
        self.offering = False  # receiver, capacity 0: an offer is out (or being used)
        self.seq = 0  # receiver: number of the latest offer
        self.held: int | None = None  # sender: a token taken, its message not yet written
        self.awaiting: int | None = None  # sender, capacity 0: the ack we wait for

    # -- creating -----------------------------------------------------------------------

    @classmethod
    def anonymous(cls, capacity: int) -> tuple[TokenPool, TokenPool]:
        """(receiver's, sender's) pools over anonymous pipes (``buzon.pipe``)."""
        cr, cw = os.pipe2(_O)
        ar, aw = os.pipe2(_O) if capacity == 0 else (-1, -1)
        sr, sw = os.pipe2(_O) if capacity == 0 else (-1, -1)
        owner = cls(capacity, cr, ar, owner=True, stake_fd=sr)
        owner._wfd = cw
        owner._ack_w = aw
        dup = [os.dup(fd) if fd >= 0 else -1 for fd in (cr, ar, sr)]
        sender = cls(capacity, dup[0], dup[1], owner=False, stake_fd=dup[2])
        sender._stake_w = sw
        owner._prime()
        return owner, sender

    @classmethod
    def create_fifos(cls, base: str, capacity: int) -> TokenPool:
        """The receiver's pools as FIFOs beside ``base`` (created 0600, opened O_RDWR
        so they never see end-of-file and keep their bytes while the owner lives)."""
        remove_pools(base)  # a dead listener's, or another capacity's
        made: list[str] = []
        fds: list[int] = []
        try:
            for path in fifo_pool_paths(base, capacity):
                if path is None:
                    continue
                os.mkfifo(path, 0o600)
                own(path)  # removed at interpreter exit if close() never runs
                made.append(path)
                fds.append(os.open(path, os.O_RDWR | os.O_NOFOLLOW | _O))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            for path in made:
                disown(path)
                os.unlink(path)
            raise from_oserror(exc, f"creating the credit pool of {base}") from exc
        pool = cls(
            capacity,
            fds[0],
            fds[1] if len(fds) > 1 else -1,
            owner=True,
            stake_fd=fds[2] if len(fds) > 2 else -1,
        )
        pool._wfd = fds[0]
        pool._ack_w = fds[1] if len(fds) > 1 else -1
        pool.paths = tuple(made)
        pool._prime()
        return pool

    @classmethod
    def open_fifos(cls, base: str, capacity: int | None, what: str) -> TokenPool | None:
        """A sender's view of the pools beside ``base``; ``capacity`` is what this end
        stated (-1: nothing). Raises HandshakeError if the listener stated another."""
        theirs = find_pool(base)
        if theirs is None:
            if capacity is not None and capacity >= 0:
                raise HandshakeError(
                    f"capacity mismatch: this end (the connecting sender) has "
                    f"capacity={capacity}, the listener of {what} stated none (its kernel "
                    "buffer); state the same capacity= on both ends, or on one only"
                )
            return None
        if capacity is not None and capacity >= 0 and capacity != theirs:
            raise HandshakeError(
                f"capacity mismatch: this end (the connecting sender) has "
                f"capacity={capacity}, the listener of {what} has capacity={theirs}; "
                "state the same capacity= on both ends, or on one only"
            )
        if capacity is None:
            raise HandshakeError(
                "capacity mismatch: this end (the connecting sender) has capacity=None "
                f"(unbounded), the listener of {what} has capacity={theirs}; state the "
                "same capacity= on both ends, or on one only"
            )
        fds: list[int] = []
        try:
            for i, path in enumerate(fifo_pool_paths(base, theirs)):
                if path is None:
                    continue
                mode = os.O_RDWR if i == 2 else os.O_RDONLY  # the stake: put and take
                fd = os.open(path, mode | os.O_NOFOLLOW | _O)
                fds.append(fd)
                st = os.fstat(fd)
                if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.getuid():
                    raise UnsafePath(f"{path!r} is not a FIFO of this user")
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise from_oserror(exc, f"opening the credit pool of {what}") from exc
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        pool = cls(theirs, fds[0], fds[1] if len(fds) > 1 else -1, owner=False)
        if len(fds) > 2:
            pool.stake_fd = pool._stake_w = fds[2]
        return pool

    _wfd = -1
    _ack_w = -1
    _stake_w = -1

    def _prime(self) -> None:
        n = self.capacity
        if n <= 0:
            return
        if n > 65536:  # the default pipe size: grow it (up to fs.pipe-max-size)
            try:
                fcntl.fcntl(self._wfd, _F_SETPIPE_SZ, n)
            except OSError as exc:
                raise from_oserror(
                    exc, f"capacity={n} needs a pipe of {n} bytes for its credits"
                ) from exc
        written = os.write(self._wfd, b"\0" * n)
        if written != n:
            raise ValueError(f"capacity={n}: only {written} credits fit the credit pipe")

    # -- a sender -----------------------------------------------------------------------

    def take(self) -> bool:
        """Take one token if one is there (kept until :meth:`sent`)."""
        if self.held is not None:
            return True
        try:
            got = os.read(self.credit_fd, 1)
        except BlockingIOError:
            return False
        if not got:
            raise EndOfChannel("the receiving end is gone (its credit pool was closed)")
        if self.capacity == 0 and self._stake_w >= 0:
            _write(self._stake_w, got)  # our stake, before the message (see withdraw)
        self.held = got[0]
        return True

    def sent(self) -> None:
        """The message of the held token was written."""
        if self.capacity == 0:
            self.awaiting = self.held
        self.held = None

    def acked(self) -> bool:
        """Capacity 0: has the receiver taken our message? (reads acknowledgements,
        skips stale ones)."""
        if self.awaiting is None:
            return True
        while True:
            try:
                data = os.read(self.ack_fd, 256)
            except BlockingIOError:
                return False
            if not data:
                raise EndOfChannel("the receiving end is gone (its ack pool was closed)")
            if self.awaiting in data:
                self.awaiting = None
                return True

    def give_up(self) -> None:
        """The sender stopped waiting for its acknowledgement."""
        self.awaiting = None

    def withdraw_message(self) -> bool:
        """Capacity 0: the sender gives its written message up. True if it took its
        stake back (the receiver will drop the message); False if the receiver claimed
        it first (it takes the message: wait for the acknowledgement)."""
        if self.stake_fd < 0:
            return False
        try:
            got = os.read(self.stake_fd, 1)
        except BlockingIOError:
            return False
        if got:
            self.awaiting = None
        return bool(got)

    # -- the receiver -------------------------------------------------------------------

    def on_take(self) -> None:
        """The receiver took a message: one more token (N), or the ack (0)."""
        if self.capacity > 0:
            _write(self._wfd, b"\0")
            return
        self.offering = False
        if self._ack_w >= 0 and self.seq:
            try:  # whatever is there is stale: only the latest offer's sender waits
                while os.read(self.ack_fd, 4096):
                    pass
            except BlockingIOError:
                pass
            _write(self._ack_w, bytes([self.seq]))

    def claim(self) -> bool:
        """Capacity 0: the receiver is about to take the message that came under its
        offer. False if its sender withdrew it (drop it); the offer is used up."""
        self.offering = False
        if self.stake_fd < 0:
            return True
        try:
            return bool(os.read(self.stake_fd, 1))
        except BlockingIOError:
            return False

    def offer(self) -> None:
        """Capacity 0: the receiver begins to wait."""
        if self.capacity == 0 and not self.offering:
            self.seq = self.seq % 255 + 1
            _write(self._wfd, bytes([self.seq]))
            self.offering = True

    def withdraw(self) -> None:
        """Capacity 0: the receiver gave up waiting; take the offer back if no sender
        took it (else its message is on the way and the next receive takes it)."""
        if self.capacity != 0 or not self.offering:
            return
        try:
            if os.read(self.credit_fd, 1):
                self.offering = False
        except BlockingIOError:
            pass

    # -- both ---------------------------------------------------------------------------

    def close(self) -> None:
        names = ("credit_fd", "ack_fd", "_wfd", "_ack_w", "stake_fd", "_stake_w")
        for name in names:
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, -1)
                for other in names:
                    if getattr(self, other) == fd:
                        setattr(self, other, -1)
        if self.owner:
            for path in self.paths:
                disown(path)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            self.paths = ()


def _write(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except BlockingIOError:
        # a pool holds at most its capacity (N <= the pipe size, checked at creation)
        # plus one offer: full means senders are gone and stale bytes piled up
        pass
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
