"""The transport contract: one OS mechanism, non-blocking, with readiness fds.

A transport never waits. Every operation either completes at once or reports
"would block" through its return value (``None``/``-1``/``False``); the drivers in
:mod:`buzon.sync` and :mod:`buzon.aio` wait on :meth:`Transport.read_fileno` /
:meth:`Transport.write_fileno` and call again.

Two shapes exist:

* **stream** transports (pipe, FIFO, Unix stream, TCP) move bytes:
  :meth:`recv_into` and :meth:`send_buffers` (a vectored write that may be partial);
* **message** transports (POSIX queue, Unix datagram, UDP) move whole messages:
  :meth:`recv_message` and :meth:`send_message`, all or nothing.

Establishing links is split the same way: a :class:`Connector` is polled until it
yields a transport, and a :class:`ListenerTransport` is polled for accepted ones.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

from .._record import Record, field
from ..address import Address
from ..errors import UnsupportedOperation, from_oserror

if TYPE_CHECKING:
    import ssl  # annotations only: importing buzon does not load ssl

    from ..protocol._dgram import MessageSender, Receiver
    from ._tokens import TokenPool
    from .fifo import FifoWaiter

__all__ = [
    "Buffer",
    "Connector",
    "LinkProperties",
    "ListenerTransport",
    "MessageTransport",
    "PeerInfo",
    "StreamTransport",
    "Transport",
    "WAIT_BLOCK",
    "WAIT_SOCKET",
    "WOULD_BLOCK",
    "nbytes",
]

Buffer = bytes | bytearray | memoryview
WOULD_BLOCK = -1


class LinkProperties(Record, frozen=True):
    """What a link really guarantees; the docs' transport table is generated from these.

    ``boundaries`` describes what the *transport* keeps: buzon frames give every
    channel message boundaries unless it was opened ``raw=True``.
    """

    transport: str
    direction: Literal["simplex", "duplex"]
    boundaries: Literal["message", "stream"]
    connection_oriented: bool
    reliable: bool
    ordered: bool
    local: bool
    max_message: int | None = None
    priorities: bool = False
    credentials: bool = False
    notes: str = ""
    # a channel's capacity: 0 rendezvous, N bounded, None unbounded, -1 the transport's
    # own buffer (the default; transports leave it so, the channel fills it in)
    capacity: int | None = -1


class PeerInfo(Record, frozen=True):
    """Who is at the other end, as far as the transport can tell."""

    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    address: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class RingOps(NamedTuple):
    """A transport whose messages are records of shared-memory rings lends the channel
    these C calls, so a small send or receive is one call (``buzon.protocol._frames``
    over ``buzon._core.Ring``); the calls count what they move themselves (``counts``:
    frames and bytes sent, received)."""

    send_frame: Callable[[Buffer, int], bool]  # (body, codec or -1: a frame) -> False: full
    send_frames: Callable[[Sequence[object], int, int], int]  # (bodies, codec, start) -> end
    recv_frame: Callable[[int], tuple[int, bytes] | None]  # (max_frame) -> see RingFrames
    spin: Callable[[float], bool]  # busy-wait for a record, GIL released
    record_message: Callable[[int, bytes], bytes | memoryview]  # a non-plain record -> its message
    counts: Callable[[], tuple[int, int, int, int]]  # what the calls above moved
    stop_send: Callable[[], None]  # send_frame(s) off for good: every send is numbered
    stop_recv: Callable[[], None]  # recv_frame returns every record whole from now on
    max_record: int  # the largest record the ring takes


class Transport(abc.ABC):
    """Base of every transport: identity, properties, readiness fds and close."""

    scheme: str = ""
    message_oriented: ClassVar[bool] = False

    properties: LinkProperties
    peer: PeerInfo = PeerInfo()
    closed: bool = False
    # credits of a simplex link with a capacity (the channel closes it with the link)
    tokens: TokenPool | None = None
    # a capacity the mechanism enforces itself (a POSIX queue's maxmsg), -1 if none
    native_capacity: int = -1
    # shared-memory rings: the C calls of the channel's hot path (see RingOps)
    ring_ops: RingOps | None = None
    # set by a listener on a connection it turns away (a peer of another user): the
    # accept engine tells the peer this reason where it can, then closes the link
    refused: str = ""

    # -- what the channel core asks of a transport: declared here, never probed ------
    #: a message transport that tells more about the message it returned last: its
    #: ``last_priority`` (POSIX queues), its sender ``last_peer`` (a bound datagram
    #: socket) and ``dropped``, what the link lost and knows it lost
    reports_messages: ClassVar[bool] = False
    last_priority: int = 0
    last_peer: Any = None
    #: lends message space in place (:meth:`loan_message`, :meth:`recv_view_message`)
    #: and reuses out-of-line blocks (:meth:`block_counters`): ``shm:``
    lends: ClassVar[bool] = False
    #: ``capacity=0`` is kept by the rings themselves (:meth:`start_rendezvous`):
    #: ``shm:``; elsewhere it is CREDIT frames (``protocol/credit.py``) or tokens
    ring_rendezvous: ClassVar[bool] = False
    #: set by the channel: its messages are buzon frames (False: ``raw=True``)
    framed: bool = True
    #: a stream on which the rest of a big frame comes right behind its first part, a
    #: kernel buffer at a time: a receive inside one spins before each sleep (pipes,
    #: Unix sockets). Not TCP: there a receiver polling and reading the segments as
    #: they come made the 1 MiB one-way 2x slower (docs/benchmarks.md)
    spins_inside_frames: bool = False
    #: a message transport that takes a whole batch in one call
    #: (:meth:`MessageTransport.send_messages`): ``send_many`` hands it the batch
    #: (``fifo:`` packs many messages into each write)
    sends_batches: ClassVar[bool] = False
    #: a stream whose :meth:`StreamTransport.recv_into` is read(2) on
    #: :meth:`read_fileno` and nothing else (no bytes held in user space): a plain
    #: receive may wait and read there in one C call (``ChannelCore.wait_read``)
    plain_reads: ClassVar[bool] = False
    #: a message transport whose receive is a C ``protocol._dgram.Receiver`` (datagram
    #: sockets, POSIX queues): a plain receive may wait and take there in one C call
    #: (``ChannelCore.wait_message``); None: the engine's loop does it
    receiver: Receiver | None = None
    #: a TLS handshake is still to be driven (``handshake_step``; TLS streams only)
    tls_pending: bool = False

    @property
    def dropped(self) -> int:
        """Messages the link lost and knows it lost (``reports_messages`` transports)."""
        return 0

    def loan_message(self, prefix: bytes, nbytes: int) -> Any:
        """Lend writable space for one message (``lends`` transports; ``None``: no room
        now). Others never get the call: the core checks ``lends`` first."""
        raise UnsupportedOperation(f"{self.scheme} lends no message space (shm: does)")

    def recv_view_message(self) -> Any:
        """The next message lent in place (``lends`` transports; ``None``: none ready)."""
        raise UnsupportedOperation(f"{self.scheme} lends no message space (shm: does)")

    def block_counters(self) -> dict[str, int]:
        """Counts of out-of-line blocks (``lends`` transports): statistics fields."""
        return {}

    def start_rendezvous(self) -> Any:
        """``capacity=0`` kept by the rings (``ring_rendezvous`` transports: a
        ``transport.shm._rendezvous.RingRendezvous``). Others never get the call."""
        raise UnsupportedOperation(f"{self.scheme} keeps no rendezvous itself (shm: does)")

    def set_limits(self, max_frame: int, frame_timeout: float | None) -> None:  # noqa: B027
        """The channel's frame cap and frame-progress limit, for a transport that
        reassembles messages itself (``fifo:`` readers); the default ignores them."""

    def read_fileno(self) -> int:
        """fd that becomes readable when :meth:`recv_into`/:meth:`recv_message` may progress."""
        return -1

    def write_fileno(self) -> int:
        """fd that becomes writable when sending may progress, -1 if this end cannot send."""
        return -1

    @property
    def can_send(self) -> bool:
        return self.write_fileno() >= 0

    @property
    def can_recv(self) -> bool:
        return self.read_fileno() >= 0

    def close(self) -> None:
        self.closed = True

    # -- a lingering close ----------------------------------------------------------------

    def unacknowledged(self) -> int:
        """Bytes written that the peer's kernel has not acknowledged yet, where a close
        with unread input makes the kernel reset the connection and drop them (TCP);
        0 elsewhere (a Unix socket or pipe hands bytes over whole: nothing is dropped)."""
        return 0

    def drop_input(self) -> bool:
        """Read away the input that is there (a closing end: nothing read matters any
        more, but unread input would make its close a reset); False at end of stream."""
        return True

    # -- handing an end to a forked child (serve(mode="process")) -----------------------

    def close_in_parent(self) -> None:
        """In the parent, after a ``fork`` that handed this end to the child: release
        this process's copy, and leave to the child what only the end's last holder
        may do (remove what the end created). The default is :meth:`close`."""
        self.close()

    def adopt_in_child(self) -> None:  # noqa: B027 - optional hook
        """In the child that took this end over (its parent calls
        :meth:`close_in_parent` and never uses it again): the child is now its only
        user, and cleans up after it as if it had never been shared."""

    # -- optional hooks: transports that run a delivery protocol of their own --------
    # (reliable datagrams). Ordinary transports keep these defaults; the channel core
    # reads ``delivery_acks`` once per channel, so their hot paths never call them.
    # Buffered input and protocol timers need no hook: such a transport folds them into
    # its read fd (an epoll fd over its socket, a timerfd and an eventfd).

    #: True: what was sent is done only once the peer acknowledges it. A sender
    #: blocked by a full transport, ``flush`` (until :meth:`delivered`) and ``close``
    #: (:meth:`shutdown`, then lingering up to ``close_timeout`` until delivered) wait
    #: for :meth:`write_fileno` to become *readable*: acks are input.
    delivery_acks: ClassVar[bool] = False

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Send no more: let the peer learn the end after everything already sent."""

    def delivered(self) -> bool:
        """True when everything sent (and, after :meth:`shutdown`, the end) is
        acknowledged; False: wait (readable) and ask again. Never waits itself."""
        return True

    def current_peer_address(self) -> Any:
        """The peer's address now, where the link follows a peer that moves (reliable
        datagrams: a restarted relay, a NAT rebinding); None where it never changes."""
        return None

    def cork(self, on: bool) -> None:  # noqa: B027 - optional hook
        """``send_many`` on a message transport brackets its messages with ``cork(True)``
        and ``cork(False)``: the transport may hold them back meanwhile and send them
        together (fewer, fuller datagrams). Nothing is held once uncorked."""

    def counters(self) -> dict[str, int]:
        """Link counters that overlay the channel's :class:`Statistics` fields."""
        return {}


#: ``StreamTransport.wait_mode`` bits, ``protocol._stream.wait_frame``'s ``mode``: the
#: fd is a socket read with recv(MSG_DONTWAIT); with no deadline the sleep may be a
#: blocking recv itself
WAIT_SOCKET = 1
WAIT_BLOCK = 2


class StreamTransport(Transport):
    """Moves bytes; buzon frames them (or not, with ``raw=True``)."""

    @abc.abstractmethod
    def recv_into(self, buf: memoryview) -> int:
        """Read into ``buf``: bytes read, 0 at end of stream, ``WOULD_BLOCK`` if none ready."""

    @abc.abstractmethod
    def send_buffers(self, bufs: Sequence[Buffer]) -> int:
        """Vectored write; returns bytes accepted (possibly partial) or ``WOULD_BLOCK``."""

    def write_call(self) -> Callable[[bytes], int] | None:
        """The hot path of a one-buffer :meth:`send_buffers`: the builtin under it,
        bound to the fd (``socket.send``, ``os.write``), which raises ``OSError`` as
        is (``BlockingIOError`` when it would block: the caller's WOULD_BLOCK; any
        other through :meth:`io_error`). A transport that gives one writes bytes to
        :meth:`write_fileno` unchanged: the channel may write there itself (one
        ``writev`` of a frame's header and payload). None: no such call (the caller
        uses :meth:`send_buffers`)."""
        return None

    def read_call(self) -> Callable[[memoryview], int] | None:
        """The hot path of :meth:`recv_into`: the builtin under it, bound to the fd
        (``socket.recv_into``), raising ``OSError`` as is (as :meth:`write_call`).
        None: no such call (the caller uses :meth:`recv_into`)."""
        return None

    def room_for(self, nbytes: int) -> bool:
        """False if the kernel would take a write of ``nbytes`` bytes only in part now
        but could take it whole once the peer read more (a ``*_nowait`` send then
        raises ``Full`` instead of beginning a frame it cannot finish). True if it has
        room, if it cannot tell, or if its buffer is empty (a write larger than the
        whole buffer goes in parts whenever it goes)."""
        return True

    def frame_waiter(self, decoder: Any) -> FifoWaiter | None:
        """A stream that is no plain read(2) (``fifo:``: envelopes to unwrap) but
        whose plain receive may still wait and read in one C call: its waiter, which
        reads into ``decoder``'s idle buffer (``ChannelCore.wait_message``). None:
        the engine's loop does it (or ``plain_reads`` and ``wait_read`` do)."""
        return None

    def io_error(self, exc: OSError, writing: bool) -> Exception:
        """The typed error :meth:`send_buffers` (``writing``) or :meth:`recv_into`
        raises for ``exc``."""
        return from_oserror(exc, f"{self.scheme} {'send' if writing else 'recv'}")

    #: a socket kept in blocking mode: every call that must not wait passes
    #: MSG_DONTWAIT, so the channel's own writes to :meth:`write_fileno` are
    #: ``sendmsg(MSG_DONTWAIT)`` (``write_frame``/``SmallWriter`` with ``sock``)
    dontwait: ClassVar[bool] = False

    def wait_mode(self) -> int:
        """``protocol._stream.wait_frame``'s ``mode`` for :meth:`read_fileno` (a
        ``plain_reads`` stream): 0 (a read(2) after poll), ``WAIT_SOCKET``, or
        ``WAIT_SOCKET | WAIT_BLOCK`` (transport/_fdstream.py). The core asks only a
        :attr:`dontwait` stream; any other's mode is 0."""
        return 0

    def interrupt_reads(self) -> None:
        """End a blocking read a :meth:`wait_mode` with ``WAIT_BLOCK`` let another
        thread begin (the channel is closing); the default has none to end."""


def nbytes(bufs: Sequence[Buffer]) -> int:
    """The size of a message given as buffers (one ``bytes`` costs a ``len``)."""
    if len(bufs) == 1 and type(bufs[0]) is bytes:
        return len(bufs[0])
    return sum(memoryview(b).nbytes for b in bufs)


class MessageTransport(Transport):
    """Moves whole messages; each carries exactly one frame."""

    message_oriented = True
    max_message: int = 65507

    @abc.abstractmethod
    def recv_message(self) -> bytes | memoryview | None:
        """One whole message, or ``None`` if none is ready (a read-only view where the
        transport lends the message in place: ``shm:`` out-of-line blocks)."""

    def small_sender(self, core: object, lock: object, limit: int) -> MessageSender | None:
        """The C hot path of the sync driver's ``send_bytes`` on this link (a
        ``protocol._dgram.MessageSender`` checking ``core`` and ``lock`` itself, for
        bytes of at most ``limit``), or None: every send goes the general way."""
        return None

    def recv_error(self, exc: OSError) -> Exception:
        """The typed error for a receive that failed (:attr:`receiver`'s, or
        :meth:`recv_message`'s)."""
        return from_oserror(exc, f"{self.scheme} recv")

    def interrupt_reads(self) -> None:
        """End a wait another thread sleeps in inside the receive itself (the
        :attr:`receiver`'s ``wait`` with no deadline; the channel is closing and its
        wake fd was written); the default has none to end."""

    @abc.abstractmethod
    def send_message(self, bufs: Sequence[Buffer], priority: int = 0) -> bool:
        """Send one whole message made of ``bufs``; False if it would block."""

    def send_messages(
        self, messages: Sequence[Sequence[Buffer]], start: int = 0
    ) -> tuple[int, int]:
        """Send whole messages from ``messages[start]`` on, in order, as many as the
        link takes now: ``(end, nbytes)``, ``messages[start:end]`` went, ``nbytes``
        their bytes. ``end`` short of the end: that message is for :meth:`send_message`
        (no room now, or too large for a batch). The channel calls this only on a
        ``sends_batches`` transport; this default sends them one by one."""
        end = start
        size = 0
        while end < len(messages) and self.send_message(messages[end]):
            size += nbytes(messages[end])
            end += 1
        return end, size


class Connector(abc.ABC):
    """A connection being established: poll :meth:`step` whenever :attr:`want` is ready.

    ``want`` is ``"read"`` or ``"write"`` with :meth:`fileno` to wait on, or ``"retry"``
    when the mechanism offers no readiness fd (opening a FIFO that has no reader yet):
    the driver then retries with a short back-off.
    """

    want: str = "write"  # "read", "write" or "retry"

    def fileno(self) -> int:
        return -1

    @abc.abstractmethod
    def step(self) -> Transport | None:
        """Advance; return the transport once connected. Raises BuzonError on failure."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Abandon the attempt and release its fds."""


class ListenerTransport(abc.ABC):
    """A bound endpoint: :meth:`fileno` readable means :meth:`accept` may return one."""

    address: Address

    @abc.abstractmethod
    def fileno(self) -> int:
        """fd that is readable when a connection (or the single channel) is pending."""

    @abc.abstractmethod
    def accept(self) -> Transport | None:
        """An accepted transport, or ``None`` if none is pending."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening and remove what was created (socket file, FIFO, queue)."""

    def close_in_child(self) -> None:
        """In a forked child: release this process's fds, leave the endpoint in place."""
        raise UnsupportedOperation(f"{type(self).__name__} cannot be shared with a child")


class TransportOptions(Record, frozen=True):
    """Options the transports understand; the channel API passes them through.

    ``mq_maxmsg``/``mq_msgsize`` size a POSIX queue when it is created (``None`` takes the
    system defaults from ``/proc/sys/fs/mqueue``). ``backlog`` is the listen queue of
    stream sockets. ``insecure`` allows a non-loopback TCP/UDP bind without authentication
    (the channel layer decides; transports only carry it). ``allow_uids`` lists the extra
    user ids a Unix socket accepts besides our own (``SO_PEERCRED``).
    """

    backlog: int = 128
    mq_maxmsg: int | None = None
    mq_msgsize: int | None = None
    insecure: bool = False
    allow_uids: frozenset[int] = frozenset()
    runtime_dir: str | None = None
    tls: ssl.SSLContext | None = None  # TCP only: wrap every connection in TLS
    # simplex endpoints keep credits in token pools (transport/_tokens.py): -1 none
    capacity: int | None = -1
    # udp/unixgram only: False, True (default limits) or a protocol.reliable.ReliableConfig
    reliable: Any = False
    # shm listeners only: bytes of each ring they create (None: transport.shm.CAPACITY)
    ring_size: int | None = None
