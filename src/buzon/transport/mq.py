"""POSIX message queues: ``mq:NAME`` (private) and ``mq:/NAME`` (exactly that queue).

Theory of operation
-------------------
A POSIX queue is a kernel object with a name, a fixed capacity (``maxmsg`` messages)
and a fixed message size (``msgsize`` bytes), both chosen when it is created. Every
message carries a priority; the kernel hands out the oldest message of the highest
priority first. On Linux a queue descriptor is a file descriptor, so the drivers wait
on it like on any other transport: readable while a message waits, writable while the
queue has room.

A queue is one simplex channel, not one channel per sender:

* :func:`listen` creates the queue (``O_CREAT|O_EXCL``, mode 0600) and opens it for
  reading. Its :class:`MQListener` is readable at once and :meth:`~MQListener.accept`
  returns the single reading :class:`MQTransport` the first time, ``None`` afterwards.
  Closing the listener unlinks a queue it created (the reader keeps working, as an
  accepted socket outlives its listening socket) and never one it merely opened.
* :func:`connect` opens the queue for writing. There is no readiness fd for "the queue
  now exists", so the :class:`MQConnector` asks the driver to ``"retry"`` and raises
  :class:`~buzon.errors.NoSuchEndpoint` until it does.
* Several senders may share one queue: whole messages interleave, never bytes.

buzon never splits a message: one larger than the queue's ``msgsize`` raises
:class:`~buzon.errors.MessageTooLarge` before the kernel sees it.

Names. ``mq:NAME`` is the queue ``/buzon-UID-NAME``. The queue namespace is shared by
every user of the host, so :func:`connect` refuses a private name that another user
owns or that group/others may access (someone planted it to read our messages).
``mq:/NAME`` means exactly ``/NAME``, to meet programs that know nothing about buzon:
:func:`listen` creates it, or opens it for reading if it already exists and belongs to
this user (so ``buzon recv mq:/jobs`` reads a queue a C program made).

Listing. Linux lists queues only through a mounted mqueue file system
(``mount -t mqueue none /dev/mqueue``). :func:`list_queues` uses one if it is mounted
and otherwise falls back to the queues that this user's processes hold open.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Sequence
from typing import Literal

from .. import _posixmq
from .._record import replace
from .._runtime import runtime_dir
from ..address import Address, parse_address
from ..errors import (
    ChannelClosed,
    EndpointInUse,
    HandshakeError,
    MessageTooLarge,
    UnsafePath,
    UnsupportedOperation,
    from_oserror,
)
from ..protocol._dgram import KICK, MessageSender, Receiver
from ..protocol._dgram import MQ as _MQ
from ._tokens import TokenPool, find_pool, remove_pools
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
    "MQConnector",
    "MQListener",
    "MQTransport",
    "PRIO_MAX",
    "connect",
    "list_queues",
    "listen",
    "queue_exists",
    "remove_queue",
]

PRIO_MAX = _posixmq.PRIO_MAX
"""Priorities run from 0 to ``PRIO_MAX - 1``; higher ones are received first."""

_LIMITS_DIR = "/proc/sys/fs/mqueue"
_MOUNT_HINT = "mount -t mqueue none /dev/mqueue"


def _limit(name: str, fallback: int) -> int:
    """A value from /proc/sys/fs/mqueue (msg_max, msgsize_max, msg_default, ...)."""
    try:
        with open(os.path.join(_LIMITS_DIR, name), encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return fallback


def _buffer_size(buf: Buffer) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


class MQTransport(MessageTransport):
    """One open descriptor of a POSIX queue, for reading or for writing.

    ``max_message`` and ``capacity`` are the queue's real ``msgsize`` and ``maxmsg``;
    ``last_priority`` is the priority of the message :meth:`recv_message` returned last.
    The transport owns the descriptor; closing it never unlinks the queue.
    """

    reports_messages = True  # last_priority

    scheme = "mq"

    def __init__(self, mqd: int, address: Address, *, mode: Literal["r", "w"]) -> None:
        try:
            _flags, maxmsg, msgsize, _cur = _posixmq.getattr(mqd)
        except OSError as exc:
            raise from_oserror(exc, f"inspecting {address}") from exc
        self._mqd = mqd
        self._reading = mode == "r"
        self.address = address
        self.name = address.mq_name()
        self.max_message = msgsize
        self.capacity = maxmsg
        # the reading end's one receive (protocol/_dgram.c): the last priority, and a
        # plain receive's wait and take in one C call (ChannelCore.wait_message)
        self.receiver = Receiver(mqd, _MQ, msgsize) if self._reading else None
        # a plain receive with no deadline sleeps in mq_timedreceive itself (the
        # descriptor in blocking mode; every other call never sleeps: an expired
        # timeout): a close() from another thread ends it with a KICK sent to the
        # queue through a descriptor of its own (interrupt_reads)
        self._kick = self._open_kick() if self._reading and msgsize >= len(KICK) else -1
        if self._kick >= 0:
            _posixmq.setblocking(mqd, True)
            self.receiver.blocks = True  # type: ignore[union-attr]
        self.properties = LinkProperties(
            transport="mq",
            direction="simplex",
            boundaries="message",
            connection_oriented=False,
            reliable=True,
            ordered=True,
            local=True,
            max_message=msgsize,
            priorities=True,
            notes=(
                f"POSIX queue {self.name}: at most {maxmsg} messages of at most {msgsize} "
                "bytes; ordered within a priority, higher priorities are received first; "
                "messages stay in the queue until read or unlinked, even with no process "
                "attached; several senders interleave whole messages"
            ),
        )

    def _open_kick(self) -> int:
        """A descriptor that writes to this very queue (-1: none: the name is gone or
        names another queue now, or it refuses us)."""
        try:
            kick = _posixmq.open(self.name, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return -1
        try:
            if os.fstat(kick).st_ino == os.fstat(self._mqd).st_ino:
                return kick
        except OSError:
            pass
        _posixmq.close(kick)
        return -1

    def interrupt_reads(self) -> None:
        """End a receive another thread sleeps in inside ``mq_timedreceive`` (the
        channel is closing and its wake fd was written): one KICK message to the
        queue, which every receive skips (a full queue needs none: it wakes the
        receive with a message)."""
        receiver = self.receiver
        if self._kick < 0 or receiver is None or not (receiver.blocks or receiver.in_block):
            return
        with contextlib.suppress(OSError):
            _posixmq.send(self._kick, KICK, 0)

    def __repr__(self) -> str:
        state = "closed" if self._mqd < 0 else ("reading" if self._reading else "writing")
        return f"<MQTransport {self.address} {state}>"

    def read_fileno(self) -> int:
        return self._mqd if self._reading else -1

    def write_fileno(self) -> int:
        return -1 if self._reading else self._mqd

    def depth(self) -> int:
        """Messages waiting in the queue right now (``mq_curmsgs``)."""
        self._check_open()
        try:
            return _posixmq.getattr(self._mqd)[3]
        except OSError as exc:
            raise from_oserror(exc, f"inspecting {self.address}") from exc

    @property
    def last_priority(self) -> int:  # type: ignore[override]
        """The priority of the message received last (0 before the first)."""
        receiver = self.receiver
        return receiver.priority if receiver is not None else 0

    def recv_message(self) -> bytes | None:
        self._check_open()
        receiver = self.receiver
        if receiver is None:
            raise UnsupportedOperation(f"this end of {self.address} was opened for sending")
        try:
            return receiver.recv()
        except OSError as exc:
            raise self.recv_error(exc) from exc

    def recv_error(self, exc: OSError) -> Exception:
        return from_oserror(exc, f"receiving from {self.address}")

    def small_sender(self, core: object, lock: object, limit: int) -> MessageSender | None:
        limit = min(limit, self.max_message - 8)
        if self._reading or self._mqd < 0 or limit < 0:
            return None
        return MessageSender(self._mqd, _MQ, core, lock, limit)

    def send_message(self, bufs: Sequence[Buffer], priority: int = 0) -> bool:
        self._check_open()
        if self._reading:
            raise UnsupportedOperation(f"this end of {self.address} was opened for receiving")
        size = sum(_buffer_size(b) for b in bufs)
        if size > self.max_message:
            raise MessageTooLarge(
                f"message of {size} bytes exceeds the queue's msgsize {self.max_message} "
                f"({self.address}); buzon does not split messages: create the queue with a "
                "larger mq_msgsize (limit: /proc/sys/fs/mqueue/msgsize_max = "
                f"{_limit('msgsize_max', 8192)}) or use a stream transport"
            )
        if not 0 <= priority < PRIO_MAX:
            raise ValueError(f"priority must be in 0..{PRIO_MAX - 1}, not {priority}")
        try:
            return _posixmq.sendv(self._mqd, bufs, priority)
        except OSError as exc:
            raise from_oserror(exc, f"sending to {self.address}") from exc

    def close(self) -> None:
        """Close the descriptor (idempotent). The queue itself stays; see MQListener."""
        mqd, self._mqd = self._mqd, -1
        self.closed = True
        if self.receiver is not None:
            self.receiver.close()
        if self._kick >= 0:
            kick, self._kick = self._kick, -1
            with contextlib.suppress(OSError):
                _posixmq.close(kick)
        if mqd >= 0:
            try:
                _posixmq.close(mqd)
            except OSError as exc:
                raise from_oserror(exc, f"closing {self.address}") from exc

    def _check_open(self) -> None:
        if self._mqd < 0:
            raise ChannelClosed(f"{self.address} is closed")


class MQListener(ListenerTransport):
    """The reading end of a queue, handed out once by :meth:`accept`.

    :meth:`fileno` is an eventfd that is readable until :meth:`accept` has returned
    the reader. :meth:`close` unlinks the queue if this listener created it.
    """

    def __init__(
        self,
        address: Address,
        mqd: int,
        *,
        created: bool,
        owner: _OwnerLock | None = None,
        tokens: TokenPool | None = None,
        capacity: int = -1,
    ) -> None:
        self._tokens = tokens
        self._capacity = capacity
        self.address = address
        self.name = address.mq_name()
        self.created = created
        self._owner = owner
        self.closed = False
        self._mqd = mqd
        self._ino = os.fstat(mqd).st_ino
        self._ready = os.eventfd(1, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def __repr__(self) -> str:
        return f"<MQListener {self.address}{' closed' if self.closed else ''}>"

    def fileno(self) -> int:
        return -1 if self.closed else self._ready

    def accept(self) -> Transport | None:
        if self.closed:
            raise ChannelClosed(f"the listener on {self.address} is closed")
        if self._mqd < 0:
            return None  # one queue, one reader: it was handed out already
        transport = MQTransport(self._mqd, self.address, mode="r")
        transport.tokens, self._tokens = self._tokens, None
        transport.native_capacity = self._capacity if self._capacity > 0 else -1
        self._mqd = -1
        try:
            os.eventfd_read(self._ready)  # no longer readable: nothing more to accept
        except BlockingIOError:
            pass
        return transport

    def close(self) -> None:
        """Unlink the queue if we created it and close what we hold (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._tokens is not None:
            self._tokens.close()
            self._tokens = None
        os.close(self._ready)
        if self._mqd >= 0:
            mqd, self._mqd = self._mqd, -1
            _posixmq.close(mqd)
        if self.created:
            _unlink_if_same(self.name, self._ino)
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def close_in_child(self) -> None:
        """A forked child drops its descriptors; the queue stays the parent's."""
        self.created = False
        self._owner = None  # the lock is the parent's open file description: keep it
        self.close()


def _unlink_if_same(name: str, ino: int) -> None:
    """Unlink ``name`` unless it now names another queue (ours was removed and remade)."""
    try:
        mqd = _posixmq.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return  # already gone, or no longer one we can read: not ours to remove
    try:
        same = os.fstat(mqd).st_ino == ino
    finally:
        _posixmq.close(mqd)
    if same:
        try:
            _posixmq.unlink(name)
        except FileNotFoundError:
            pass


def _sizes(opts: TransportOptions) -> tuple[int, int]:
    """(maxmsg, msgsize) for mq_open; (0, 0) asks for the system defaults."""
    if opts.mq_maxmsg is None and opts.mq_msgsize is None:
        return 0, 0
    maxmsg = opts.mq_maxmsg if opts.mq_maxmsg is not None else _limit("msg_default", 10)
    msgsize = opts.mq_msgsize if opts.mq_msgsize is not None else _limit("msgsize_default", 8192)
    if maxmsg < 1 or msgsize < 1:
        raise ValueError(
            f"mq_maxmsg and mq_msgsize must be at least 1 (got {maxmsg} and {msgsize}); "
            "a POSIX queue cannot have capacity 0"
        )
    return maxmsg, msgsize


def listen(addr: Address, opts: TransportOptions) -> MQListener:
    """Create the queue of ``addr`` and return the listener that hands out its reader.

    A private queue is owned through a lock file beside the other endpoints
    (``NAME.mq.lock`` in the runtime dir, ``flock``-ed for the listener's life, released
    by the kernel when its process dies). An existing private queue whose owner is alive
    raises :class:`EndpointInUse`; one whose owner died is *reclaimed*: opened as is,
    so messages sent while nobody listened are not lost. An existing ``mq:/NAME`` queue
    of this user is opened, not created, and its real size applies instead of ``opts``;
    one of another user raises :class:`UnsafePath`.
    """
    name = addr.mq_name()
    capacity = -1 if opts.capacity is None else opts.capacity
    if capacity >= 0:
        if capacity == 0 and not addr.private:
            raise UnsupportedOperation(
                f"capacity=0 on {addr}: its credit pool lives in buzon's runtime dir, so it "
                "needs a private queue name (mq:NAME)"
            )
        want = max(capacity, 1)  # capacity 0: one message in the queue, under an offer
        if opts.mq_maxmsg is not None and opts.mq_maxmsg != want:
            raise ValueError(
                f"capacity={capacity} makes the queue's maxmsg {want}; mq_maxmsg="
                f"{opts.mq_maxmsg} contradicts it"
            )
        opts = replace(opts, mq_maxmsg=want)
    maxmsg, msgsize = _sizes(opts)
    flags = os.O_RDONLY | os.O_NONBLOCK
    owner = _OwnerLock.acquire(addr, opts) if addr.private else None
    created = True
    try:
        try:
            mqd = _posixmq.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, maxmsg, msgsize)
        except FileExistsError:
            # private: we hold the owner lock, so whoever made it is gone (reclaim it);
            # exact: a queue another program made, read in place and left there
            mqd = _open_existing(addr, name, flags, private=owner is not None)
            created = owner is not None
        except OSError as exc:
            size = f"maxmsg={maxmsg}, msgsize={msgsize}" if maxmsg else "default size"
            what = f"creating {addr} (queue {name}, {size}"
            if exc.errno in (errno.EINVAL, errno.EMFILE, errno.ENOSPC, errno.ENOMEM):
                what += (
                    f"; limits: msg_max={_limit('msg_max', 10)}, "
                    f"msgsize_max={_limit('msgsize_max', 8192)}, "
                    f"queues_max={_limit('queues_max', 256)} in {_LIMITS_DIR} "
                    "and RLIMIT_MSGQUEUE"
                )
            raise from_oserror(exc, what + ")") from exc
    except BaseException:
        if owner is not None:
            owner.release()
        raise
    tokens = None
    try:
        if capacity >= 0:
            real = _posixmq.getattr(mqd)[1]
            if real != max(capacity, 1):
                raise EndpointInUse(
                    f"{addr}: the existing queue holds maxmsg={real}, not the "
                    f"{max(capacity, 1)} capacity={capacity} needs"
                )
        if owner is not None:
            base = _pool_base(addr, opts)
            if capacity == 0:
                tokens = TokenPool.create_fifos(base, 0)
            else:
                remove_pools(base)  # a dead listener's
        return MQListener(addr, mqd, created=created, owner=owner, tokens=tokens, capacity=capacity)
    except BaseException:
        if tokens is not None:
            tokens.close()
        _posixmq.close(mqd)
        if created:
            _posixmq.unlink(name)
        if owner is not None:
            owner.release()
        raise


def _pool_base(addr: Address, opts: TransportOptions) -> str:
    """Where a private queue's credit pool lives (beside its owner lock)."""
    return os.path.join(opts.runtime_dir or runtime_dir(), f"{addr.name}.mq")


class _OwnerLock:
    """``NAME.mq.lock`` in the runtime dir, ``flock``-ed by the queue's listener."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, addr: Address, opts: TransportOptions) -> _OwnerLock:
        rdir = opts.runtime_dir or runtime_dir()
        path = os.path.join(rdir, f"{addr.name}.mq.lock")
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise from_oserror(exc, f"owner lock of {addr}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                err = EndpointInUse(
                    f"{addr}: another process listens on this queue (it holds {path}); "
                    "choose another name"
                )
                err.errno = errno.EEXIST
                raise err from None
            # the previous owner may have removed the file between our open and flock
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return cls(path, fd)
            os.close(fd)

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1


def _open_existing(addr: Address, name: str, flags: int, *, private: bool = False) -> int:
    try:
        mqd = _posixmq.open(name, flags)
    except OSError as exc:
        raise from_oserror(exc, f"opening the existing queue {addr}") from exc
    try:
        st = os.fstat(mqd)
        owner = st.st_uid
        if owner != os.getuid():
            raise UnsafePath(
                f"{addr}: the queue belongs to uid {owner}; buzon reads only queues of its own user"
            )
        if private and st.st_mode & 0o077:
            raise UnsafePath(
                f"{addr}: the leftover queue {name} is open to other users "
                f"(mode {st.st_mode & 0o777:o}); buzon does not reclaim it"
            )
    except BaseException:
        _posixmq.close(mqd)
        raise
    return mqd


class MQConnector(Connector):
    """Opens the queue for writing; raises NoSuchEndpoint until it exists."""

    want: Literal["read", "write", "retry"] = "retry"

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.name = addr.mq_name()
        self.opts = opts

    def _credits(self, transport: MQTransport) -> None:
        """Agree on the capacity: a queue's maxmsg is a capacity N of its own; a
        rendezvous queue has a credit pool beside its owner lock."""
        mine = self.opts.capacity
        pool = None
        if self.address.private:
            base = _pool_base(self.address, self.opts)
            theirs = find_pool(base)
            if theirs is not None or mine == 0:
                pool = TokenPool.open_fifos(base, mine, str(self.address))
        if pool is not None:
            transport.tokens = pool
            return
        if mine is not None and mine >= 1:
            if transport.capacity != mine:
                raise HandshakeError(
                    f"capacity mismatch: this end (the connecting sender) has "
                    f"capacity={mine}, the queue {self.name} holds {transport.capacity} "
                    "messages (its maxmsg, set by the listener)"
                )
            transport.native_capacity = mine

    def step(self) -> MQTransport:
        try:
            mqd = _posixmq.open(self.name, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise from_oserror(exc, f"connecting to {self.address} (queue {self.name})") from exc
        try:
            if self.address.private:
                st = os.fstat(mqd)
                if st.st_uid != os.getuid() or st.st_mode & 0o077:
                    raise UnsafePath(
                        f"{self.address}: the queue {self.name} belongs to uid {st.st_uid} "
                        f"with mode {st.st_mode & 0o777:o}; buzon sends to private queues "
                        "only when they are its own user's and mode 0600"
                    )
            transport = MQTransport(mqd, self.address, mode="w")
            self._credits(transport)
            return transport
        except BaseException:
            _posixmq.close(mqd)
            raise


def connect(addr: Address, opts: TransportOptions) -> MQConnector:
    """A connector that opens ``addr``'s queue for writing (``want == "retry"``)."""
    return MQConnector(addr, opts)


def queue_exists(addr: Address | str) -> bool:
    """True if the queue of ``addr`` exists (whoever owns it)."""
    name = parse_address(addr).mq_name()
    try:
        mqd = _posixmq.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True
    except OSError as exc:
        raise from_oserror(exc, f"looking up {addr}") from exc
    _posixmq.close(mqd)
    return True


def remove_queue(addr: Address | str) -> bool:
    """Unlink the queue of ``addr``; False if there was none. Readers keep their messages."""
    address = parse_address(addr)
    try:
        _posixmq.unlink(address.mq_name())
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise from_oserror(exc, f"removing {address}") from exc
    return True


def list_queues() -> list[str]:
    """Sorted names (``/buzon-UID-NAME``) of this user's private buzon queues.

    Linux lists queues only through a mounted mqueue file system
    (``mount -t mqueue none /dev/mqueue``); buzon never mounts one. Without it, this
    returns the queues that processes of this user hold open (from ``/proc/PID/fd``),
    which misses queues nobody has open.
    """
    prefix = f"buzon-{os.getuid()}-"
    mount = _mqueue_mount()
    if mount is not None:
        try:
            return sorted("/" + n for n in os.listdir(mount) if n.startswith(prefix))
        except OSError:
            pass
    found: set[str] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or another user's process
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            # A queue descriptor links to "/NAME" on the internal mqueue mount.
            if target.startswith("/" + prefix) and "/" not in target[1:]:
                found.add(target)
    return sorted(found)


def _mqueue_mount() -> str | None:
    """Where an mqueue file system is mounted, if anywhere."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "mqueue":
                    return fields[1]
    except OSError:
        pass
    return None
