"""The channel core: every channel operation in its non-blocking form.

This is what the two drivers share. :class:`ChannelCore` joins a transport (which
never blocks), the framing (sans-IO decoder) and a codec, and offers only operations
that complete at once or say they cannot: ``try_send``, ``flush``, ``poll_frame``.
The sync driver (:mod:`buzon.sync`) and the asyncio driver (:mod:`buzon.aio`) turn each
into a blocking or awaitable call by waiting on the transport's fds — and nothing
else, so the two cannot drift apart in semantics.

Partial writes: a stream transport may take only part of a frame. The rest is kept
in order in :attr:`ChannelCore.pending` and must go out before any later frame; it is
flushed by the next send, by every wait of the drivers (also while receiving), and
by ``close``. A message accepted by ``send_nowait`` is therefore never lost or torn.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from types import MethodType
from typing import TYPE_CHECKING, Any, cast

from . import _reduction
from ._record import Record, fields, replace
from .address import Address
from .codec import Codec
from .errors import (
    ChannelClosed,
    CodecError,
    EndOfChannel,
    FrameError,
    Full,
    MessageTooLarge,
    ProtocolError,
    Timeout,
    Undelivered,
    UnsupportedOperation,
    frame_cap_exceeded,
)
from .protocol import mpcompat
from .protocol.credit import (
    RECEIPT_FLAG,
    REPORT_EVERY,
    WITHDRAW_CODEC,
    WITHDRAWN_CODEC,
    ReceiptCore,
    ReceiptWriter,
    RecvFlow,
    RvStream,
    SendFlow,
    decode_credit,
    encode_withdraw,
)
from .protocol.frames import (
    DEFAULT_MAX_FRAME,
    CodecId,
    Frame,
    FrameDecoder,
    Kind,
    SmallWriter,
    abort_marker,
    chunk_frame,
    data_frame,
    data_header,
    encode_frame,
    loan_header,
    parse_frame,
    plain_data_flags,
    send_frame,
    wait_frame,
    write_frame,
)
from .transport._tokens import TokenPool
from .transport.base import (
    WAIT_BLOCK,
    WOULD_BLOCK,
    Buffer,
    LinkProperties,
    MessageTransport,
    PeerInfo,
    StreamTransport,
    Transport,
)

try:  # _pop in C (protocol/_pop.c): a read message's take, receipts counted
    from .protocol._pop import pop as _c_pop
except ImportError:  # pragma: no cover - a build without the extension
    _c_pop = None  # type: ignore[assignment]

if TYPE_CHECKING:  # annotations only
    from .protocol._dgram import MessageSender, Receiver
    from .transport.fifo import FifoWaiter

__all__ = [
    "DEFAULT_CAPACITY",
    "ChannelCore",
    "ChannelIdentity",
    "ChannelOptions",
    "Receipt",
    "Statistics",
]

#: ``capacity`` not stated: the transport's own buffering (its kernel buffer), no credits
DEFAULT_CAPACITY = -1
DEFAULT_MAX_QUEUE = 64 * 1024 * 1024
#: on a stream, a frame larger than this goes CHUNKED (protocol/frames.py): a send that
#: gives up half-way can then end it with an abort instead of delivering it. Up to
#: PIPE_BUF a write to a pipe or FIFO is all or nothing, so a plain frame this small is
#: never left half-written there (nor, in practice, on a Unix socket).
PLAIN_MAX = 4096
#: a receipt-asking take below this count of unreported ones only counts (see _pop)
_REPORT_LAST = REPORT_EVERY - 1
#: the longest a blocking receiver that caught up with a busy stream of receipted
#: messages watches for the next one before it acknowledges (ChannelCore._more_coming)
RECEIPT_LINGER = 20e-6


def weak_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, a bound method of a channel or its core, called through a weak
    reference to its object. The C writers sit in their owner's ``__dict__``
    (protocol/_writer.h): a strong callback to the owner would make a reference cycle,
    and a channel dropped without ``close()`` would then live (with its fds) until the
    cyclic garbage collector ran. Raises :class:`ChannelClosed` once the object is
    gone."""
    bound = cast(MethodType, method)
    func = bound.__func__
    ref = weakref.ref(bound.__self__)

    def call(*args: Any, **kwargs: Any) -> Any:
        obj = ref()
        if obj is None:
            raise ChannelClosed("the channel was dropped without close()")
        return func(obj, *args, **kwargs)

    return call


def _no_write(flags: int, data: bytes) -> int:
    raise AssertionError("send_small on a channel whose small_limit is -1")


#: cores that kept bytes in user space at some point (weakly): what an interpreter exit
#: without close() still has to write (sync/_channel.py flushes them, bounded)
OWING: weakref.WeakSet[ChannelCore] = weakref.WeakSet()


class _OpenFrame(Record):
    """A frame whose write is under way: its tail is the tail of ``pending``."""

    serial: int  # which accepted frame (ChannelCore.serial when it was accepted)
    size: int  # its bytes on the wire
    points: Sequence[int]  # where it may be aborted (chunk_frame); () for a plain frame
    payload: int  # its size before chunking (statistics)


class ChannelOptions(Record, frozen=True):
    """Per-channel behaviour chosen at ``connect``/``listen``/``pipe`` time."""

    codec: str = "msgpack"
    pickle: bool = False
    raw: bool = False
    max_frame: int = DEFAULT_MAX_FRAME
    spin: float = 50e-6
    handshake_timeout: float = 10.0
    frame_timeout: float | None = 30.0
    idle_timeout: float | None = None
    close_timeout: float = 5.0
    compat: str | None = None
    capacity: int | None = DEFAULT_CAPACITY  # 0 rendezvous, N bounded, None unbounded
    max_queue: int = DEFAULT_MAX_QUEUE  # capacity=None: bytes queued in user space at most
    hello: tuple[tuple[str, Any], ...] = ()  # extra entries of this end's HELLO options


class Statistics(Record):
    """Counters of one channel (``channel.statistics()`` returns a copy)."""

    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    send_would_block: int = 0
    recv_would_block: int = 0
    rejected_frames: int = 0
    # bytes skipped to find the next message again (a fifo: reader resynchronising)
    rejected_bytes: int = 0
    # sends that gave up half-way (timeout, cancellation): ended with an abort marker
    # (or never started), so the receiver dropped them whole; receivers count the
    # aborted messages they dropped in the same field
    aborted: int = 0
    dropped: int = 0  # lost by the link and known to be: full UDP queue, over-unit datagrams
    queued_bytes: int = 0  # capacity=None: bytes accepted and still held in user space
    credits_sent: int = 0  # CREDIT frames (capacity, receipts) written
    credits_received: int = 0
    # reliable links (reliable=True) only: datagrams sent again, datagrams dropped for a bad
    # CRC32C (both recovered by the protocol, so not "dropped")
    retransmits: int = 0
    damaged: int = 0
    # shm: channels only: messages sent through ``loan`` / received through
    # ``recv_view``, and out-of-line blocks this end created / reused for its messages
    loans: int = 0
    views: int = 0
    blocks_created: int = 0
    blocks_reused: int = 0


#: transport counters added to the channel's own count of the same name (the rest of
#: ``Transport.counters()`` replaces the field: a reliable link counts for the channel)
_ADDED_COUNTERS = frozenset({"rejected_frames", "rejected_bytes"})
_STAT_FIELDS = frozenset(fields(Statistics))


class Receipt(ReceiptCore):
    """The fate of one message sent with ``send_async``.

    :meth:`done` says whether the receiver has taken it (without waiting),
    :meth:`wait` waits (``timeout`` like everywhere; :class:`Timeout` when it passes),
    ``await receipt`` does the same in asyncio, and :attr:`receiver` is the
    receiving process's pid once delivered (``None`` where the link cannot tell).
    If the channel breaks or closes first, the receipt fails with
    :class:`Undelivered`: it never waits for ever on a dead link.

    A receipt keeps no state of its own: it is its message's number, read against the
    channel's cumulative count of messages taken (so a million receipts cost nothing
    to complete). Its data (``ReceiptCore``: the channel, the flow, ``number``) is a C
    struct, so the blocking driver's C send (``protocol/_credit.c``) makes it at once.
    """

    __slots__ = ()

    def _settled(self) -> bool:
        flow = self._flow
        return flow.taken >= self.number or (
            flow.error is not None and self.number > flow.failed_after
        )

    @property
    def failed(self) -> bool:
        flow = self._flow
        return flow.taken < self.number and flow.error is not None

    @property
    def receiver(self) -> int | None:
        """The receiving process's pid once the message was taken."""
        return self._flow.receiver if self._flow.taken >= self.number else None

    def done(self) -> bool:
        """True once the receiver took the message (or the receipt failed); reads
        acknowledgements that already arrived, never waits."""
        if not self._settled():
            from ._engine import receipt_poll_steps

            self._channel._run_now(receipt_poll_steps(self._channel._core))
        return self._settled()

    def delivered(self) -> bool:
        """True if the receiver took the message (raises if the receipt failed)."""
        self.done()
        self._raise()
        return self._flow.taken >= self.number

    def _raise(self) -> None:
        flow = self._flow
        if flow.taken < self.number and flow.error is not None:
            raise Undelivered(f"message #{self.number} was not taken: {flow.error}")

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the receiver took the message; :class:`Undelivered` if it
        never can, :class:`Timeout` if ``timeout`` passes first."""
        if not self.done():
            from ._engine import receipt_steps

            self._channel._run_op(receipt_steps(self._channel._core, self._settled), timeout)
        self._raise()

    def __await__(self) -> Any:
        """``await receipt``: the same wait, run by the channel's driver without
        blocking the event loop (a blocking channel's too, without a thread)."""
        if not self.done():
            from ._engine import receipt_steps

            steps = receipt_steps(self._channel._core, self._settled)
            yield from self._channel._arun_op(steps).__await__()
        self._raise()
        return None

    def __repr__(self) -> str:
        state = "pending"
        if self._flow.taken >= self.number:
            state = "delivered"
        elif self.failed:
            state = "failed"
        return f"<buzon.Receipt #{self.number} {state}>"


class ChannelCore:
    """Non-blocking channel state over one transport. Not thread-safe by itself."""

    def __init__(
        self,
        transport: Transport,
        options: ChannelOptions,
        *,
        address: Address | None = None,
        peer: PeerInfo | None = None,
    ) -> None:
        _reduction.register()  # this channel may be handed to a child process
        self.transport = transport
        self.options = options
        # a receive inside a big frame spins before each sleep (read by _engine)
        self.spin_partial = transport.spins_inside_frames
        self.address = address
        self.passed = False  # handed to another process (buzon._reduction): no lingering
        self.peer = peer if peer is not None else transport.peer
        self.message_oriented = transport.message_oriented
        self.raw = options.raw
        self.codec = Codec(options.codec, allow_pickle=options.pickle)  # type: ignore[arg-type]
        self.max_frame = options.max_frame
        self.compat = options.compat
        self.decoder: FrameDecoder | _MpDecoder | None = None
        if not (self.message_oriented or self.raw):
            if self.compat == "multiprocessing":
                self.decoder = _MpDecoder(options.max_frame)
            else:
                self.decoder = FrameDecoder(options.max_frame)
        self.pending: deque[memoryview] = deque()
        # the frame being written (its tail in ``pending``), and a count of accepted
        # frames that names it: only the operation that wrote it may abandon it
        self.open_frame: _OpenFrame | None = None
        self.serial = 0
        self._chunking = not (self.message_oriented or self.raw or self.compat is not None)
        # the read fd alone says when a receive may progress: no ring to arm and no
        # delivery protocol to pump by a poll before sleeping (engine.recv_steps)
        self.plain_readiness = transport.ring_ops is None and not transport.delivery_acks
        # the read fd, when a plain receive's wait and read can be one C call (a framed
        # buzon stream read with read(2) itself, nothing in between): see wait_read
        self.wait_fd: int | None = None
        rfd = transport.read_fileno()
        if (
            wait_frame is not None
            and transport.plain_reads
            and self.plain_readiness
            and isinstance(self.decoder, FrameDecoder)
            and rfd >= 0
        ):
            self.wait_fd = rfd
        # a message transport's receive in C (datagram sockets, POSIX queues): a plain
        # receive's wait and take may be one call there too (see wait_message)
        self.wait_receiver: Receiver | FifoWaiter | None = None
        if self.plain_readiness and not options.raw and options.compat is None:
            if self.message_oriented:
                self.wait_receiver = transport.receiver
            elif isinstance(transport, StreamTransport) and self.wait_fd is None:
                self.wait_receiver = transport.frame_waiter(self.decoder)  # fifo:
        self._aborts_seen = 0
        self.backlog: deque[tuple[list[Buffer], int]] = deque()  # message transports, None
        self.raw_chunks: deque[bytes] = deque()  # raw stream bytes read by ready()
        self.inbox: deque[bytes] = deque()  # message-transport messages read ahead
        self.eof = False
        self.closed = False
        self._released = False  # close() ran: the fds are gone (see released)
        self.stats = Statistics()
        self._counted_error: BaseException | None = None
        self._can_send = transport.can_send
        # the fast path of encode_bytes: framed buzon, a small bytes payload
        self._plain = not self.raw and self.compat is None
        self._small = min(4096, options.max_frame - 8)
        # the two shapes (transport/base.py): a stream's calls, or a message link's
        stream = transport if isinstance(transport, StreamTransport) else None
        messages = transport if isinstance(transport, MessageTransport) else None
        self._stream = stream
        # a hint for the driver: that wait sleeps in recv itself when it has no deadline
        # (wait_read's mode says so for each wait: the socket may become shared later)
        self._wait_buf: bytearray | None = None  # wait_read's last buffer and its limit
        self._wait_limit = 0
        self.wait_blocks = (
            self.wait_fd is not None
            and stream is not None
            and bool(stream.wait_mode() & WAIT_BLOCK)
        )
        self._send_buffers: Any = stream.send_buffers if stream is not None else None
        self._room_for: Any = stream.room_for if stream is not None else None
        self._recv_into: Any = stream.recv_into if stream is not None else None
        self._read = stream.read_call() if stream is not None else None
        self._recv_message: Any = messages.recv_message if messages is not None else None
        self._send_message: Any = messages.send_message if messages is not None else None
        batches = transport.sends_batches and self._plain  # send_many: whole batches
        self._send_messages: Any = (
            messages.send_messages if messages is not None and batches else None
        )
        self._track_message_meta = transport.reports_messages
        # shm: lends message space (loans, received views) and reuses out-of-line blocks
        lends = transport.lends
        self._loan_message: Any = transport.loan_message if lends else None
        self._block_counters: Any = transport.block_counters if lends else None
        transport.framed = not self.raw and self.compat is None
        transport.set_limits(options.max_frame, options.frame_timeout)
        self.last_priority = 0
        self._rbuf = bytearray(256 * 1024) if self.raw and not self.message_oriented else None
        # a transport whose sends complete with the peer's acks (reliable datagrams):
        # the drivers wait for its write fd to become readable for room, flush waits
        # until delivered, close lingers (see Transport.delivery_acks)
        self.acked = transport.delivery_acks
        self._counters: dict[str, int] = {}
        # capacity and receipts (protocol/credit.py); all None/False on a default channel
        self.capacity: int | None = DEFAULT_CAPACITY
        self.sflow: SendFlow | None = None
        self.rflow: RecvFlow | None = None
        self.unbounded = False
        self.taken = 0  # DATA messages taken by this end's receiver (numbering receipts)
        self.credit_out: bytes | None = None  # the latest CREDIT not yet written
        # receipts on a busy stream: the driver's short watch of the read fd before a
        # receiver that caught up answers (the blocking driver's; see _more_coming)
        self.receipt_watch: Callable[[], bool] | None = None
        self._watch_hit = False
        self.credit_blocked = False  # the last try_send failed for want of credit
        self.io_lock: Any = contextlib.nullcontext()  # the sync driver's write lock
        # made by use_write_lock (a message transport's: protocol/_dgram.c MessageSender)
        self._small_writer: SmallWriter | MessageSender | None = None
        self._receipt_writer: ReceiptWriter | None = None  # made by receipt_writer
        # the sync driver's recv_bytes in C (protocol/_take.c) counts what it takes there
        self.recv_counts: Callable[[], tuple[int, int]] | None = None
        # what the sync driver's rendezvous calls in C counted (protocol/_rv.c counts())
        self.rv_counts: Callable[[], tuple[int, int, int, int, int, int, int]] | None = None
        self.on_credit: Callable[[], None] | None = None  # the driver's wake-up
        # capacity=0 on a credit link: takes pass the rendezvous gate (_rv_gate); a read
        # that found the link empty since this end's latest offer was written
        self._rv = False
        self._rv_valid = True
        self._rv_void = 0  # a withdrawn message not met yet: drop it when it comes
        self._rv_drained = False  # the sender side read everything after its WITHDRAW
        self._stake_back = False  # close() took a simplex sender's stake back
        # a blocking rendezvous send waits for the take of this message (the engine's
        # way), and the serial of the last C rendezvous send the driver finished (_rv.c):
        # what close() may withdraw (withdraw_at_close)
        self.rv_waiting = 0
        self.rv_over = -1
        self._rv_reply = True  # request/response seen: a send spins for the reply
        self._rv_after_send = False
        self._local_order = transport.properties.local and not transport.delivery_acks
        # capacity=0 kept by the transport's rings (shm:): no CREDIT frames, a send
        # waits for its record's take (buzon._ring_rv); None elsewhere
        self.rv_ring: Any = None
        # simplex links keep credits in a token pool (transport/_tokens.py)
        self.tokens: TokenPool | None = transport.tokens
        self.taking = False  # takes must be reported (credits, receipts or tokens)
        if self.tokens is not None:
            self.capacity = self.tokens.capacity  # stated here, or adopted from the pool
            self.taking = True
            self._rv = self.capacity == 0
        elif transport.native_capacity >= 0:
            self.capacity = transport.native_capacity  # the mechanism bounds it itself
        elif options.capacity != DEFAULT_CAPACITY:
            self.set_capacity(options.capacity)
        self._fast_paths()

    def use_write_lock(self, lock: Any) -> None:
        """The sync driver's write lock: held around every write but the C one of
        :attr:`small_send`, which writes only while it is free (the GIL held)."""
        self.io_lock = lock
        stream = self._stream
        if SmallWriter is not None and stream is not None and stream.write_fileno() >= 0:
            self._small_writer = SmallWriter(
                stream.write_fileno(),
                self,
                lock,
                min(PLAIN_MAX, self.max_frame) - 8,
                weak_method(self._small_part),
                stream.dontwait,
            )
            self._fast_paths()
        elif isinstance(self.transport, MessageTransport) and self._plain and self._can_send:
            # a datagram or queue message: protocol/_dgram.c MessageSender, the same role
            self._small_writer = self.transport.small_sender(
                self, lock, min(PLAIN_MAX, self.max_frame) - 8
            )
            self._fast_paths()

    def receipt_writer(
        self,
        channel: Any,
        reap: Callable[[], None],
        fallback: Callable[..., Receipt],
        finish: Callable[[int, int], Receipt],
    ) -> ReceiptWriter | None:
        """The sync driver's ``send_bytes_async`` in C (``protocol/_credit.c``
        ReceiptWriter): small bytes on a quiet framed stream in one call (the write,
        the count in ``sflow``, the :class:`Receipt` of ``channel``; ``reap`` reads
        acknowledgements now and then), anything else through ``fallback`` (the
        driver's general way), a partial write finished by ``finish(number, serial)``.
        Where :attr:`small_send` applies (the writer checks what may change per call
        itself, ``small_limit`` too); None elsewhere. The first receipt it sends makes
        the receipt flow (:meth:`receipt_flow`)."""
        stream = self._stream
        if (
            ReceiptWriter is None
            or stream is None
            or self.small_limit < 0
            or self._small_writer is None  # no write lock given (the asyncio driver)
        ):
            return None
        self._receipt_writer = ReceiptWriter(
            stream.write_fileno(),
            self,
            self.io_lock,
            weak_method(self.receipt_flow),
            channel,
            Receipt,
            weak_method(self._small_part),
            weak_method(reap),
            weak_method(fallback),
            weak_method(finish),
            stream.dontwait,
        )
        return self._receipt_writer

    def rv_stream(self) -> RvStream | None:
        """The sync driver's rendezvous ``send``/``recv`` in C (``protocol/_rv.c``):
        ``capacity=0`` on a framed stream whose reads are plain (pipe:, unix:, tcp:),
        credits on the link itself (no token pool), the write lock given. It does the
        common case of :func:`buzon._engine.send_steps` and the rendezvous receive
        (``protocol/credit.py`` stays the reference) and hands anything else back
        (:meth:`rv_read`). None elsewhere."""
        stream = self._stream
        if (
            RvStream is None
            or not self._rv
            or self.tokens is not None
            or self.rv_ring is not None
            or self.wait_fd is None
            or stream is None
            or not self._can_send
            or stream.write_fileno() < 0
            or self._small_writer is None  # no write lock given (the asyncio driver)
        ):
            return None
        return RvStream(
            self.wait_fd,
            stream.write_fileno(),
            self,
            self.io_lock,
            min(PLAIN_MAX, self.max_frame) - 8,
            self._rv_part,
            stream.dontwait,
        )

    def _rv_part(self, offer: bytes | None, flags: int, data: bytes, written: int) -> int:
        """:meth:`rv_stream`'s send wrote ``written`` bytes of ``offer`` (a CREDIT, or
        None) and the DATA frame of ``data``: keep the tail and count the frame as
        :meth:`try_send` does; return its serial."""
        size = len(data) + 8
        out: list[Buffer] = [data_header(len(data), flags), data]
        if offer is not None:
            out.insert(0, offer)
        self._keep_tail(out, written)
        self.serial += 1
        self.open_frame = _OpenFrame(self.serial, size, (), size)
        self.stats.messages_sent += 1
        self.stats.bytes_sent += size
        return self.serial

    def rv_read(self, n: int, err: int) -> None:
        """A read :meth:`rv_stream`'s calls left to the decoder: ``n`` bytes at the start
        of its empty buffer (0: the end of the stream), or (``n`` -1) the read failed
        with ``err`` (0: no read). Raises as a read of :meth:`pump` does."""
        if err:
            raise self.read_error(OSError(err, os.strerror(err)))
        decoder = self.decoder
        if n >= 0 and isinstance(decoder, FrameDecoder):
            room = len(decoder.idle_buffer() or b"") or n
            self._read_bytes(decoder, n, room)

    def _small_part(self, flags: int, data: bytes, written: int) -> int:
        """:attr:`small_send` wrote ``written`` bytes of the frame of ``data`` (flags
        -1: ``data`` is the whole frame, ``small_send(frame, True)``): keep its tail and
        count it, as :meth:`send_small` does; return the frame's serial."""
        self.serial += 1
        if flags < 0:
            size = len(data)
            self._keep_tail((data,), written)
        else:
            size = len(data) + 8
            self._keep_tail((data_header(size - 8, flags), data), written)
        self.open_frame = _OpenFrame(self.serial, size, (), size)
        self.stats.messages_sent += 1
        self.stats.bytes_sent += size
        return self.serial

    def _fast_paths(self) -> None:
        """Lend the drivers a shared-memory ring's C calls while nothing else needs the
        general path: ``fast_send(body, codec)`` (codec -1: body is a whole frame),
        ``fast_send_frames(bodies, codec, start)``, ``fast_recv(max_frame)`` and
        ``fast_spin(seconds)`` (see ``RingOps``). They count what they move in C;
        :meth:`statistics` adds it in. Sending the fast way stops for good once this end
        numbers its messages (credits, receipts: ``sflow``), receiving once it reports
        its takes (``taking``); see :meth:`_stop_fast`."""
        ops = self.transport.ring_ops
        # the largest body a ring record carries as one plain DATA frame
        self.ring_body_limit = 0 if ops is None else min(self.max_frame, ops.max_record) - 8
        plain = ops is not None and not self.closed and self._plain and not self.unbounded
        if (
            plain
            and ops is not None
            and self.sflow is None
            and self._can_send
            and self.rv_ring is None
        ):
            self.fast_send: Callable[[Buffer, int], bool] | None = ops.send_frame
            self.fast_send_frames: Callable[[Sequence[object], int, int], int] | None = (
                ops.send_frames
            )
            self.fast_limit = min(self._small + 8, ops.max_record)  # an encoded frame
            self.fast_bytes_limit = min(self.max_frame, ops.max_record) - 8  # a body
        else:
            self.fast_send = self.fast_send_frames = None
            self.fast_limit = self.fast_bytes_limit = 0
        # a rendezvous send on the rings puts with the same C call, then waits (_ring_rv)
        if plain and ops is not None and self.rv_ring is not None and self._can_send:
            self.rv_frame_limit = min(self._small + 8, ops.max_record)  # an encoded frame
            self.rv_body_limit = min(self.max_frame, ops.max_record) - 8  # a body
        else:
            self.rv_frame_limit = self.rv_body_limit = -1
        if plain and ops is not None and not self.taking:
            self.fast_recv: Callable[[int], tuple[int, bytes] | None] | None = ops.recv_frame
            self.fast_spin: Callable[[float], bool] | None = ops.spin
        else:
            self.fast_recv = self.fast_spin = None
        # send_small: a framed buzon stream whose sends need no bookkeeping beyond the
        # counts (no token pool, no user-space queue); -1 turns it off
        quiet = (
            isinstance(self.decoder, FrameDecoder)
            and self._can_send
            and self.tokens is None
            and not self.unbounded
            and not self.closed
            and self.capacity != 0  # a rendezvous send waits for its take: the engine's
        )
        stream = self._stream
        write = stream.write_call() if quiet and stream is not None else None
        self._write: Callable[[int, bytes], int] = _no_write
        if write is not None and stream is not None:
            if write_frame is not None:  # header and payload in one C call (one writev)
                put = send_frame if stream.dontwait else write_frame  # a socket: MSG_DONTWAIT
                self._write = functools.partial(put, stream.write_fileno())
            else:

                def python_write(flags: int, data: bytes) -> int:
                    return write(data_header(len(data), flags) + data)

                self._write = python_write
        self.small_limit = min(PLAIN_MAX, self.max_frame) - 8 if write is not None else -1
        # the sync driver's send_bytes in one C call (protocol/_stream.c SmallWriter),
        # while the same holds; it checks what may change per call itself
        # (a message transport's sends need no tail kept: one datagram, all or nothing)
        quiet_messages = (
            self.message_oriented
            and self._plain
            and self._can_send
            and self.tokens is None
            and not self.unbounded
            and not self.closed
            and self.capacity != 0
        )
        self.small_send: Callable[[bytes], bool | int] | None = (
            self._small_writer if write is not None or quiet_messages else None
        )

    def _stop_fast(self) -> tuple[int, int]:
        """This end starts numbering messages (its first receipt, or its first receipt
        asked of it): turn the ring calls off for good, in C too, so a call another
        thread is in the middle of cannot slip past the count; then return how many
        messages went the fast way (sent, taken), to be counted in."""
        ops = self.transport.ring_ops
        if ops is None:  # a stream: what small_send wrote (it stops once sflow is set)
            small = self._small_writer
            return (small.counts()[0] if small is not None else 0), 0
        if self.sflow is not None:
            ops.stop_send()
        if self.taking:
            ops.stop_recv()
        self._fast_paths()
        sent, _, taken, _ = ops.counts()
        return sent, taken

    def fast_batch(self, items: Iterable[Any], as_bytes: bool) -> tuple[list[Any], int]:
        """A batch for ``fast_send_frames``: the bodies (``as_bytes``; codec 0) or each
        object's encoded frame (codec -1), a frame of several buffers as their list (the
        ring call stops there, and the driver sends it the general way)."""
        if as_bytes:
            return (items if type(items) is list else list(items)), 0
        frames: list[Any] = []
        for obj in items:
            bufs = self.encode(obj)
            frames.append(bufs[0] if len(bufs) == 1 else bufs)
        return frames, -1

    def fast_other(self, got: tuple[int, bytes]) -> Frame | tuple[int, bytes] | None:
        """What ``fast_recv`` returned for a record that is not a plain DATA frame."""
        ops = self.transport.ring_ops
        assert ops is not None
        msg: Any = ops.record_message(got[0], got[1])  # a view: an out-of-line block
        if len(msg) >= 2 and msg[1] == Kind.CREDIT:
            self._credit_message(msg)
            return None
        return self._message_item(msg, None)

    # -- capacity -----------------------------------------------------------------------

    def check_flow(self, what: str) -> None:
        """Credits need buzon framing, and a reverse path that loses nothing."""
        if self.raw or self.compat is not None:
            raise UnsupportedOperation(f"{what} needs buzon framing (not raw=True or compat=)")
        props = self.transport.properties
        if props.direction != "duplex" or not (props.reliable and props.ordered):
            raise UnsupportedOperation(
                f"{what} needs a duplex link that loses nothing; {self.transport.scheme} "
                + (
                    "is simplex here"
                    if props.direction != "duplex"
                    else "may lose or reorder datagrams (use reliable=True)"
                )
            )
        if not props.connection_oriented and not self.message_oriented:
            raise UnsupportedOperation(f"{what} needs a connection")

    def set_capacity(self, capacity: int | None) -> None:
        """Adopt the channel's capacity (before any message moved)."""
        self.capacity = capacity
        if capacity is None:
            if self.raw or self.compat is not None:
                raise UnsupportedOperation("capacity=None needs buzon framing")
            self.unbounded = True
            self._fast_paths()
            return
        if capacity == DEFAULT_CAPACITY:
            return
        self.check_flow(f"capacity={capacity}")
        if capacity == 0 and self.transport.ring_rendezvous:
            self.rv_ring = self.transport.start_rendezvous()  # no credits: the rings' own
            self._fast_paths()
            return
        self.sflow = SendFlow(capacity)
        self.rflow = RecvFlow(capacity)
        self.taking = True
        self._rv = capacity == 0
        self._fast_paths()

    # -- identity ---------------------------------------------------------------------

    @property
    def properties(self) -> LinkProperties:
        """The transport's properties; framing gives a stream message boundaries."""
        props = self.transport.properties
        if not self.raw and props.boundaries == "stream":
            props = replace(props, boundaries="message")
        if self.capacity != props.capacity:
            props = replace(props, capacity=self.capacity)
        return props

    def read_fileno(self) -> int:
        return self.transport.read_fileno()

    def write_fileno(self) -> int:
        return self.transport.write_fileno()

    def check_open(self) -> None:
        if self.closed:
            raise ChannelClosed("the channel is closed")

    # -- sending ----------------------------------------------------------------------

    def encode(self, obj: Any, receipt: bool = False) -> list[Buffer]:
        if self.compat is not None:
            return self._encode_compat(obj)
        codec, body, buffers = self.codec.encode(obj)
        if receipt:
            codec |= RECEIPT_FLAG
        return encode_frame(Kind.DATA, codec, body, buffers, max_frame=self.max_frame)

    def _encode_compat(self, obj: Any) -> list[Buffer]:
        if not self.codec.allow_pickle:
            raise UnsupportedOperation(
                "multiprocessing peers exchange pickled objects: use send_bytes/recv_bytes, "
                "or pickle=True (with an authkey on TCP)"
            )
        import pickle  # (not at import: only multiprocessing peers need it)

        body = pickle.dumps(obj, protocol=pickle.DEFAULT_PROTOCOL)
        return list(mpcompat.encode_message(body, max_message=self.max_frame))

    def encode_bytes(self, data: Buffer, receipt: bool = False) -> list[Buffer]:
        if type(data) is bytes and self._plain and len(data) <= self._small:
            # DATA, codec raw (8: a receipt is asked for)
            return [data_frame(data, 8 if receipt else 0)]
        if self.raw:
            return [data]
        if self.compat is not None:
            return list(mpcompat.encode_message(data, max_message=self.max_frame))
        flags = CodecId.RAW | (RECEIPT_FLAG if receipt else 0)
        n = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        if n <= 4096:  # small: one buffer, header and payload joined
            if n + 8 > self.max_frame:
                raise frame_cap_exceeded(n + 8, self.max_frame)
            return [data_frame(data, flags)]
        view = memoryview(data).cast("B")
        if n <= self.ring_body_limit:
            # a ring record: header and body as one plain DATA frame (the receiver's
            # one-call path copies it out once), not a frame with a buffer to parse
            return [data_header(n, flags), view]
        return encode_frame(Kind.DATA, flags, b"", [view], max_frame=self.max_frame)

    def encode_batch(self, items: Iterable[Any], as_bytes: bool) -> tuple[list[Buffer], int]:
        """Encode many messages into as few buffers as possible for one vectored write:
        small frames are joined, large payloads stay separate (not copied)."""
        out: list[Buffer] = []
        small: list[Buffer] = []
        count = 0
        encode = self.encode_bytes if as_bytes else self.encode
        for item in items:
            count += 1
            for b in encode(item):
                if isinstance(b, bytes) and len(b) <= 4096:
                    small.append(b)
                    continue
                if small:
                    out.append(b"".join(small))
                    small = []
                out.append(b)
        if small:
            out.append(b"".join(small))
        return out, count

    @property
    def batches(self) -> bool:
        """``send_many`` may hand a whole batch to the transport (:meth:`try_send_messages`):
        it takes batches (``sends_batches``) and nothing counts messages one at a time
        (credits, tokens, an unbounded queue)."""
        return (
            self._send_messages is not None
            and self.sflow is None
            and self.tokens is None
            and not self.unbounded
        )

    def try_send_messages(self, batch: list[list[Buffer]], start: int) -> int:
        """Hand ``batch[start:]`` (encoded messages) to the transport in one call while
        :attr:`batches`; return where it stopped (short of the end: the driver sends
        that message the usual way, waiting for room, then calls again after it)."""
        if self.closed or not self._can_send:
            self._check_send(0)
        end: int
        end, size = self._send_messages(batch, start)
        if end > start:
            self.serial += end - start
            self.stats.messages_sent += end - start
            self.stats.bytes_sent += size
        return end

    def try_send(
        self, bufs: list[Buffer], priority: int = 0, *, single: bool = True, whole: bool = False
    ) -> bool:
        """Hand one encoded message to the transport; False if it cannot take it now.

        On a stream transport a partial write keeps the remainder in :attr:`pending`
        (the message is then accepted: True, and :attr:`open_frame` names it until it
        is written whole, see :meth:`abandon`). Nothing is written while older bytes
        are still pending. A message above ``PLAIN_MAX`` bytes goes CHUNKED on a
        stream; ``single=False`` (a batch of joined frames) never does.

        ``whole`` (the ``*_nowait`` sends, which nothing finishes afterwards): first
        write what is pending (an earlier frame's tail: also when this message then
        cannot go), and begin no frame of more than ``PLAIN_MAX`` bytes that the
        kernel could take whole later but only in part now
        (:meth:`~buzon.transport.base.StreamTransport.room_for`).
        """
        if self.closed or priority or not self._can_send:
            self._check_send(priority)
        if whole and self.pending:
            self.flush()
        if self._rv and self.rflow is not None and self.rflow.owed:
            self.credit_out = self.rflow.confirm()  # a deferred take rides with it
        sflow = self.sflow
        if sflow is not None and sflow.sent >= sflow.limit:
            self._credit_wanted(sflow)
            return False
        tokens = self.tokens
        if tokens is not None:
            if not tokens.take():
                self.credit_blocked = True  # wait for a token (the pool's fd)
                self.stats.send_would_block += 1
                return False
            self.credit_blocked = False
        if self.pending and not self.flush():
            if self.unbounded:
                return self._queue(bufs, priority)
            self.stats.send_would_block += 1
            return False
        first = bufs[0]
        if len(bufs) == 1:
            size = len(first) if type(first) is bytes else memoryview(first).nbytes
        else:
            size = 0
            for b in bufs:
                size += memoryview(b).nbytes
        if self.message_oriented:
            if (self.backlog and not self.flush()) or not self._send_message(bufs, priority):
                if self.unbounded:
                    return self._queue(bufs, priority)
                self.stats.send_would_block += 1
                return False
        else:
            payload = size
            points: Sequence[int] = ()
            if size > PLAIN_MAX and single and self._chunking and not self.unbounded:
                bufs, points = chunk_frame(bufs)
                size = sum(memoryview(b).nbytes for b in bufs)
            credit = self.credit_out  # owed: written with the message, one system call
            if credit is None:
                out, total = bufs, size
            else:
                out, total = [credit, *bufs], size + len(credit)
            if whole and total > PLAIN_MAX and not self._room_for(total):
                n = WOULD_BLOCK  # it would stop half-way: the receiver would wait for us
            else:
                n = self._send_buffers(out)
            if n == WOULD_BLOCK:
                if self.unbounded:
                    return self._queue(bufs, priority)  # a CREDIT owed stays owed
                self.stats.send_would_block += 1
                return False
            if credit is not None:
                self.credit_out = None
                self.stats.credits_sent += 1
            if n != total:  # the frame's tail ends ``pending`` (see abandon)
                self._keep_tail(out, n)
                self.open_frame = _OpenFrame(self.serial + 1, size, points, payload)
            size = payload
        self.serial += 1
        stats = self.stats
        stats.messages_sent += 1
        stats.bytes_sent += size
        if sflow is not None:
            sflow.sent += 1
        if tokens is not None:
            tokens.sent()
        return True

    def send_small(self, data: bytes, flags: int = 0) -> bool:
        """The hot path of ``send_bytes`` (and, ``flags`` 8, ``send_bytes_async``):
        ``data`` (bytes of at most :attr:`small_limit`; the caller checked) as one
        plain DATA frame, header and payload in one write, when nothing is in the way
        (no bytes or CREDIT owed, credit left). False: nothing was written, take the
        general way (:meth:`try_send`). True: accepted (and counted in ``sflow``); if
        the kernel took only part of it the rest is in :attr:`pending` and
        :attr:`open_frame` names it, as after :meth:`try_send`."""
        if self.pending or self.credit_out is not None or self.closed:
            return False
        sflow = self.sflow
        if sflow is not None and sflow.sent >= sflow.limit:
            return False  # try_send tells the receiver, and the engine waits
        size = len(data)
        try:
            n = self._write(flags, data)  # DATA, codec raw (flags 8: a receipt is asked)
        except BlockingIOError:
            self.stats.send_would_block += 1
            return False
        except OSError as exc:
            assert self._stream is not None
            raise self._stream.io_error(exc, True) from exc
        size += 8
        self.serial += 1
        if n != size:
            self._keep_tail((data_header(size - 8, flags), data), n)
            self.open_frame = _OpenFrame(self.serial, size, (), size)
        stats = self.stats
        stats.messages_sent += 1
        stats.bytes_sent += size  # frames on the wire, as try_send counts them
        if sflow is not None:
            sflow.sent += 1
        return True

    def _credit_wanted(self, sflow: SendFlow) -> None:
        """No credit left: the sender will wait for a CREDIT (readable), not for room."""
        if not self.credit_blocked:
            self.credit_blocked = True
            if sflow.capacity and self.rflow is not None and not self.closed:
                # tell the receiver, so it answers its next take at once (the caller
                # holds the write lock: write directly)
                self.credit_out = self.rflow.blocked_notice()
                if not (self.pending or self.backlog):
                    self._write_credit()
        self.stats.send_would_block += 1

    def _queue(self, bufs: list[Buffer], priority: int) -> bool:
        """capacity=None: keep the message in user space (copied: the caller may reuse
        its buffers) up to ``max_queue`` bytes; later operations write it out."""
        size = sum(memoryview(b).nbytes for b in bufs)
        stats = self.stats
        if stats.queued_bytes + size > self.options.max_queue:
            raise Full(
                f"capacity=None: {stats.queued_bytes} bytes are already queued in this "
                f"process and this message would pass max_queue={self.options.max_queue}; "
                "the receiver is not keeping up (raise max_queue, or use a bounded capacity)"
            )
        OWING.add(self)
        copies: list[Buffer] = [b if type(b) is bytes else bytes(b) for b in bufs]
        if self.message_oriented:
            self.backlog.append((copies, priority))
        else:
            self.pending.extend(memoryview(b) for b in copies)
        stats.queued_bytes += size
        stats.messages_sent += 1
        stats.bytes_sent += size
        if self.sflow is not None:
            self.sflow.sent += 1
        return True

    def _check_send(self, priority: int) -> None:
        self.check_open()
        if not self.transport.can_send:
            raise UnsupportedOperation(
                f"this end of the {self.transport.scheme} channel only receives"
            )
        if priority and not self.transport.properties.priorities:
            raise UnsupportedOperation(
                f"{self.transport.scheme} channels have no message priorities"
            )

    def _keep_tail(self, bufs: Sequence[Buffer], written: int) -> None:
        OWING.add(self)  # flushed at interpreter exit if nothing else does it
        for b in bufs:
            view = memoryview(b).cast("B")
            if written >= view.nbytes:
                written -= view.nbytes
                continue
            self.pending.append(view[written:])
            self.stats.queued_bytes += view.nbytes - written
            written = 0

    def abandon(self, serial: int) -> bool:
        """The operation that wrote frame ``serial`` gives up on it (its deadline passed,
        it was cancelled or interrupted) while part of it is still unwritten. Returns
        True if the message will not be delivered: nothing of it was written (it is
        withdrawn), or it is CHUNKED and ends at its next abort point (the rest of the
        segment under way and an abort marker stay in ``pending``, to be written by
        later operations). False if it is committed: a plain frame already begun, or a
        chunked one in its last segment, is delivered once its tail is written."""
        frame = self.open_frame
        if frame is None or frame.serial != serial:
            return False  # written whole already
        pending = self.pending
        left = min(sum(v.nbytes for v in pending), frame.size)  # its tail ends pending
        written = frame.size - left
        if not left:
            self.open_frame = None
            return False
        if written == 0:
            cut = 0
        else:
            cut = next((p for p in frame.points if p >= written), -1)
            if cut < 0:
                return False  # a plain frame, or the last segment: it will complete
        self.open_frame = None
        self._drop_tail(frame.size - cut)
        if cut:
            pending.append(memoryview(abort_marker()))
            self.stats.queued_bytes += 4
        stats = self.stats
        stats.messages_sent -= 1
        stats.bytes_sent -= frame.payload
        stats.aborted += 1
        if self.sflow is not None:
            self.sflow.sent -= 1
        if self.tokens is not None:
            self.tokens.give_up()  # capacity 0: no acknowledgement will come for it
        return True

    def _drop_tail(self, nbytes: int) -> None:
        """Remove the last ``nbytes`` bytes of ``pending``."""
        pending = self.pending
        self.stats.queued_bytes = max(0, self.stats.queued_bytes - nbytes)
        while nbytes:
            last = pending[-1]
            if last.nbytes <= nbytes:
                nbytes -= last.nbytes
                pending.pop()
            else:
                pending[-1] = last[: last.nbytes - nbytes]
                nbytes = 0

    def write_control(self, data: bytes) -> bool:
        """Write handshake bytes (not a message: no statistics). False if it would block."""
        self.check_open()
        if self.message_oriented:  # one handshake frame per message (none: nothing)
            return not data or bool(self._send_message([data], 0))
        if self.pending and not self.flush():
            return False
        n = self._send_buffers([data])
        if n == WOULD_BLOCK:
            return False
        if n < len(data):
            self._keep_tail([data], n)
        return True

    def read_control(self) -> bytes | None:
        """Read raw handshake bytes, bypassing the decoder (None: nothing ready)."""
        self.check_open()
        buf = bytearray(4096)
        n = self._recv_into(memoryview(buf))
        if n == WOULD_BLOCK:
            return None
        if n == 0:
            self.eof = True
            raise EndOfChannel("the peer closed the connection")
        return bytes(buf[:n])

    @property
    def owed(self) -> bool:
        """Bytes this end still has to write (partial frames, queued messages, a CREDIT)."""
        return bool(self.pending or self.backlog) or self.credit_out is not None

    def flush(self) -> bool:
        """Write pending bytes (and a CREDIT owed); True when none are left."""
        pending = self.pending
        stats = self.stats
        while pending:
            # at most IOV_MAX/2 buffers per call (capacity=None may queue many)
            batch = list(itertools.islice(pending, 512))
            n = self._send_buffers(batch)
            if n == WOULD_BLOCK:
                return False
            stats.queued_bytes = max(0, stats.queued_bytes - n)
            while n and pending:
                head = pending[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    pending.popleft()
                else:
                    pending[0] = head[n:]
                    n = 0
        self.open_frame = None  # written whole
        backlog = self.backlog
        while backlog:
            bufs, priority = backlog[0]
            if not self._send_message(bufs, priority):
                return False
            backlog.popleft()
            stats.queued_bytes = max(0, stats.queued_bytes - sum(len(b) for b in bufs))
        if self.credit_out is not None and not self._write_credit():
            return False
        return self.transport.delivered() if self.acked else True

    def lingers(self) -> bool:
        """A close must wait for the peer's kernel to acknowledge what was written
        (TCP: see :func:`buzon._engine.linger_steps`); never for an end passed to
        another process, whose input is the other process's to read."""
        return not self.passed and self.transport.unacknowledged() > 0

    def shutdown(self) -> None:
        """Before a lingering close: tell the transport nothing more will be sent."""
        if self.acked and not self.closed:
            self.transport.shutdown()

    def statistics(self) -> Statistics:
        stats = replace(self.stats)
        for small in (self._small_writer, self._receipt_writer):
            if small is not None:
                sent, sent_bytes, would_block = small.counts()
                stats.messages_sent += sent
                stats.bytes_sent += sent_bytes
                stats.send_would_block += would_block
        if self.recv_counts is not None:  # what the driver's C recv_bytes took
            received, received_bytes = self.recv_counts()
            stats.messages_received += received
            stats.bytes_received += received_bytes
        if self.rv_counts is not None:  # the rendezvous calls in C (protocol/_rv.c)
            sent, sent_bytes, credits, credited, got_bytes, got, empty = self.rv_counts()
            stats.messages_sent += sent
            stats.bytes_sent += sent_bytes
            stats.credits_sent += credits
            stats.credits_received += credited
            stats.bytes_received += got_bytes
            stats.messages_received += got
            stats.recv_would_block += empty
        ops = self.transport.ring_ops
        if ops is not None:
            sent, sent_bytes, received, received_bytes = ops.counts()  # also after close
            stats.messages_sent += sent
            stats.bytes_sent += sent_bytes
            stats.messages_received += received
            stats.bytes_received += received_bytes
        # the transport's own counts: a reliable link's (they replace the channel's),
        # a fifo: reader's rejections (added to the channel's own)
        counters = self._counters if self.closed else self.transport.counters()
        for name, value in counters.items():
            if name in _ADDED_COUNTERS:
                setattr(stats, name, getattr(stats, name) + value)
            elif name in _STAT_FIELDS:
                setattr(stats, name, value)
        if self._block_counters is not None:
            for name, value in self._block_counters().items():
                setattr(stats, name, value)
        return stats

    # -- loans and views (shm: channels) -------------------------------------------------

    def _check_loans(self, what: str) -> None:
        if self._loan_message is None:
            raise UnsupportedOperation(
                f"{what} needs a shm: channel: {self.transport.scheme} moves every message "
                "through the kernel, so there is no shared memory to lend (use send_bytes/"
                "recv_bytes, or recv_bytes_into to receive into a buffer of your own)"
            )
        if self.compat is not None:
            raise UnsupportedOperation(f"{what} needs buzon framing (not compat=)")

    def loan_begin(self, nbytes: int) -> Any:
        """Lend the space of one ``nbytes`` message (see ``Channel.loan``); ``None`` if
        it cannot be had now (no credit, or no room: wait as for a send). Writes go
        through the caller's write lock."""
        self._check_loans("loan")
        if nbytes < 0:
            raise ValueError("a loan of a negative size")
        if self.closed or not self._can_send:
            self._check_send(0)
        if self.capacity == 0:
            raise UnsupportedOperation(
                "loans on a capacity=0 (rendezvous) channel are not supported: a loan "
                "cannot wait for its receiver; use send_bytes"
            )
        prefix = b"" if self.raw else loan_header(nbytes)
        if len(prefix) + nbytes > self.max_frame:
            raise frame_cap_exceeded(len(prefix) + nbytes, self.max_frame)
        sflow = self.sflow
        if sflow is not None and sflow.sent >= sflow.limit:
            self._credit_wanted(sflow)
            return None
        if (self.pending or self.backlog) and not self.flush():
            self.stats.send_would_block += 1  # queued messages go first
            return None
        lent = self._loan_message(prefix, nbytes)
        if lent is None:
            self.stats.send_would_block += 1
            return None
        if sflow is not None:
            sflow.sent += 1  # counted now: its place in the stream is taken
        return lent

    def loan_end(self, lent: Any, commit: bool) -> None:
        """Commit (one message) or abort what :meth:`loan_begin` lent."""
        sflow = self.sflow
        if not commit:
            if sflow is not None:
                sflow.sent -= 1
            lent.abort()
            return
        try:
            lent.commit()
        except BaseException:
            if sflow is not None:
                sflow.sent -= 1
            raise
        stats = self.stats
        stats.messages_sent += 1
        stats.bytes_sent += lent.nbytes
        stats.loans += 1

    def poll_view(self) -> tuple[Any, memoryview] | None:
        """The next message's payload lent in place: ``(lent, view)``, where ``lent``
        (``None`` for a message already read ahead) is released after ``view`` (see
        :func:`finish_view`); ``None`` if no message is ready. Counts and credits as
        ``poll`` does."""
        self._check_loans("recv_view")
        self.check_open()
        while True:
            lent: Any = None
            if self.inbox:
                view = memoryview(self.inbox.popleft())
            else:
                try:
                    lent = self.transport.recv_view_message()
                except EndOfChannel:
                    self.fail_receipts("the peer closed the channel")
                    raise
                if lent is None:
                    self.stats.recv_would_block += 1
                    return None
                view = memoryview(lent)
            if self.raw or view.nbytes < 2 or view[1] != Kind.CREDIT:
                break
            try:
                self._credit_message(view.tobytes())
            finally:
                finish_view(lent, view)
        stats = self.stats
        stats.bytes_received += view.nbytes
        stats.views += 1
        if self.raw:
            stats.messages_received += 1
            return lent, view
        try:
            frame = parse_frame(view, self.max_frame)
        except FrameError:
            stats.rejected_frames += 1
            finish_view(lent, view)
            raise
        try:
            self._take(frame)
        except FrameError:
            finish_view(lent, view)
            raise
        body = frame.body
        if not frame.buffers:
            payload = memoryview(body)
        elif not len(body) and len(frame.buffers) == 1:
            payload = frame.buffers[0]
        else:  # an object frame of several parts: joined, as recv_bytes does
            payload = memoryview(b"".join([bytes(body), *map(bytes, frame.buffers)]))
        del frame, body
        view.release()  # the payload's slice keeps the memory it needs
        return lent, payload

    # -- credits and receipts -------------------------------------------------------------

    def confirm_take(self) -> None:
        """Write the CREDIT a deferred rendezvous take still owes (protocol/_rv.c
        defers it to this end's next write), if any: before a close and at exit."""
        rflow = self.rflow
        if rflow is not None and not self.closed and rflow.owed:
            self.emit_credit(rflow.confirm())

    def report_receipts(self) -> None:
        """Before a close: acknowledge the receipt-asking takes not reported yet (taken
        while more messages were in hand), so that their receipts complete; the
        close's flush writes it if the link does not take it now."""
        rflow = self.rflow
        if rflow is not None and not self.closed and rflow.report_due:
            self.emit_credit(rflow.receipts_owed())

    def emit_credit(self, frame: bytes | None) -> None:
        """Send a CREDIT now if the link takes it, else as soon as it does (a newer
        CREDIT replaces one not yet written: their counts are cumulative)."""
        if frame is None or self.closed:
            return
        self.credit_out = frame
        with self.io_lock:
            if not (self.pending or self.backlog):
                self._write_credit()

    def _write_credit(self) -> bool:
        frame = self.credit_out
        if frame is None:
            return True
        try:
            if self.message_oriented:
                if not self._send_message([frame], 0):
                    return False
            else:
                n = self._send_buffers([frame])
                if n == WOULD_BLOCK:
                    return False
                if n < len(frame):
                    self._keep_tail([frame], n)
        except (EndOfChannel, ChannelClosed):
            self.credit_out = None  # nobody left to tell
            return True
        self.credit_out = None
        self.stats.credits_sent += 1
        return True

    def _apply_credit(self, body: Buffer, blocked: bool = False) -> None:
        taken, limit = decode_credit(body)
        if blocked and self.rflow is not None:
            self.emit_credit(self.rflow.on_peer_blocked())
        sflow = self.sflow
        if sflow is None:
            sflow = self.sflow = SendFlow(None)
            fast_sent, _ = self._stop_fast()
            sflow.sent = self.stats.messages_sent + fast_sent
        sflow.on_credit(taken, limit)
        sflow.receiver = self.peer.pid
        self.credit_blocked = False
        self.stats.credits_received += 1
        if self.on_credit is not None:
            self.on_credit()

    def _took(self, receipt: bool, more: bool) -> None:
        """A DATA message was taken by this end's receiver (numbering, credits)."""
        if self.tokens is not None:
            self.tokens.on_take()
            return
        rflow = self.rflow
        if rflow is None:
            rflow = self.rflow = RecvFlow(None)
            self.taking = True
            _, fast_taken = self._stop_fast()
            rflow.taken = rflow.reported = self.taken + fast_taken - 1
        if not more and rflow.capacity is None and (receipt or rflow.report_due):
            more = self._more_coming()
        frame = rflow.on_take(receipt, more)
        if frame is not None:
            self.emit_credit(frame)

    def _more_coming(self) -> bool:
        """Receipts are due and the last message in hand was taken: read once more
        (never waiting) before answering. On a busy stream the read brings the next
        messages, and one CREDIT answers them all later; when it finds the link empty
        the CREDIT goes now, as before. (A CREDIT costs a write, and on TCP the peer's
        kernel work: one per message when a receiver keeps up with its sender.)

        A receiver that keeps up with a streaming sender finds the link empty between
        most of its messages: with ``receipt_watch`` (the blocking driver's: it watches
        the read fd up to :data:`RECEIPT_LINGER`, at most its spin; True if something
        came) it then watches before it answers, while the stream is busy (this batch
        took several messages, or the last watch saw the next message come): the
        sender's next message usually comes meanwhile and joins the batch. A lone
        message (a sender that waits for each receipt) is answered at once, as before."""
        decoder = self.decoder
        if (
            not isinstance(decoder, FrameDecoder)
            or decoder.sink is not None  # recv_bytes_into: a big frame would flow into it
            or self.eof
            or self.closed
        ):
            return False
        try:
            if self._fill(decoder):
                return True
            watch = self.receipt_watch
            rflow = self.rflow
            if watch is None or not (
                self._watch_hit or (rflow is not None and rflow.unreported > 1)
            ):
                return False
            self._watch_hit = hit = watch()
            return hit and self._fill(decoder)
        except FrameError as exc:
            self._counted_error = exc  # counted by _fill; raised by the next read
            return False
        except (EndOfChannel, ChannelClosed):
            return False

    def before_wait(self, offer: bool = True) -> None:
        """The receiver is about to wait (``offer``) or found nothing: announce what
        the sender needs to know (a rendezvous offer, credit owed, receipts due)."""
        if self.rv_ring is not None:  # the rings announce a wait themselves (shm:)
            if not offer and not self.closed:
                self.rv_ring.stop_waiting()  # found nothing and does not wait
            return
        if self.tokens is not None:
            if offer and not self.closed:
                self.tokens.offer()
            return
        rflow = self.rflow
        if self._rv_after_send:  # a receive follows a rendezvous send: replies come
            self._rv_after_send = False
            self._rv_reply = True
        if rflow is not None and not self.closed and (offer or rflow.capacity != 0):
            frame = rflow.before_wait()
            if frame is not None and self._rv:
                self._rv_valid = False  # an offer: takes need a read after it (_rv_gate)
            self.emit_credit(frame)

    def wait_ended(self) -> None:
        """A receive gave up without a message: withdraw a rendezvous offer."""
        if self.rv_ring is not None:  # the rings' receiver-waiting word (shm:)
            if not self.closed:
                self.rv_ring.stop_waiting()
            return
        if self.tokens is not None:
            if not self.closed:
                self.tokens.withdraw()
            return
        rflow = self.rflow
        if rflow is not None and rflow.offering and not self.closed:
            self.emit_credit(rflow.on_wait_end())

    def offer_with_send(self) -> None:
        """A rendezvous ``send`` begins: this end receives next, so it offers too; on
        a stream the offer rides in the same write as the message."""
        rflow = self.rflow
        if rflow is None or rflow.offering or self.closed:
            return
        frame = rflow.before_wait()
        if frame is not None and self._rv:
            self._rv_valid = False
        if self.message_oriented:
            self.emit_credit(frame)
        else:
            self.credit_out = frame  # try_send writes it first (the caller holds no lock)

    def send_finished(self) -> None:
        """A rendezvous ``send`` returned: withdraw its offer, unless a message already
        came under it (the request/response pattern: the reply is in hand). Then the
        offer stands and the next receive takes that message; a sender that gives up
        meanwhile waits for this end's answer (its next receive, which reads the
        WITHDRAW if it came, or takes the message)."""
        rflow = self.rflow
        if rflow is None or not rflow.offering or self.closed:
            return
        decoder = self.decoder
        if (decoder is not None and decoder.frames) or self.inbox:
            self._rv_reply = True
            return
        self._rv_after_send = True
        self.emit_credit(rflow.on_wait_end())

    def pump_quietly(self) -> None:
        """Read what arrived (CREDITs applied, messages kept); a broken link is left
        for the operations that report it (a receipt reads its own state)."""
        try:
            if not self.closed:
                self.pump()
        except Exception:
            pass

    def reply_expected(self) -> bool:
        """A rendezvous ``send`` was taken: is a reply likely to come at once (this
        end's receives have followed its sends; the channel spins)?"""
        if not (self._rv_reply and self.options.spin > 0 and self.rflow is not None):
            return False
        decoder = self.decoder
        return not ((decoder is not None and decoder.frames) or self.inbox)  # in hand

    def pump_reply(self) -> None:
        """Read what arrived (a reply stays in hand for the next receive); if nothing
        did, stop expecting replies until a receive follows a send again."""
        try:
            if not self.closed:
                self.pump()
        except EndOfChannel:
            pass
        decoder = self.decoder
        if not ((decoder is not None and decoder.frames) or self.inbox):
            self._rv_reply = False

    def finish_with_reply(self) -> None:
        """:meth:`pump_reply`, then :meth:`send_finished` (idempotent): the end of a
        rendezvous send that expects a reply, in one step."""
        try:
            self.pump_reply()
        finally:
            self.send_finished()

    # -- rendezvous withdrawal (capacity=0 on a credit link; protocol/credit.py) ------

    def _rv_gate(self) -> bool:
        """May this end take a message now? Only while its offer stands and after a read,
        made since that offer was written, that found the link empty: every WITHDRAW
        written before the offer could be seen was read (and its message dropped)."""
        tokens = self.tokens
        if tokens is not None:  # a simplex link: the stake pipe decides (_tokens.py)
            if tokens.claim():
                return True
            self._drop_untaken()
            self.stats.aborted += 1
            return False
        rflow = self.rflow
        assert rflow is not None
        if not rflow.offering:  # a message kept from an offer withdrawn meanwhile
            frame = rflow.before_wait()
            self._rv_valid = False
            self.emit_credit(frame)
        if not self._rv_valid:
            if self.credit_out is not None:
                with self.io_lock:
                    self.flush()  # our offer waits behind bytes of our own: write them
                if self.credit_out is not None:
                    return False  # not written yet: the driver writes it meanwhile
            self._drain()
        if self._rv_void == rflow.taken + 1 and self._drop_untaken():
            self._rv_void = 0
        return self._rv_valid

    def _drain(self) -> None:
        """Read until the link has nothing more for now (messages stay for ``recv``)."""
        decoder = self.decoder
        try:
            if decoder is not None:
                self._rv_valid = False
                while not self.eof and self._fill(decoder) and not self._rv_valid:
                    pass
            else:
                self.pump()  # reads until the link has nothing more
                self._rv_valid = self.credit_out is None
        except EndOfChannel:  # nothing can come after the end: what is in hand is all
            self._rv_valid = self.credit_out is None
        if self.eof and self.credit_out is None:
            self._rv_valid = True

    def _drop_untaken(self) -> bool:
        """Drop the oldest message read and not taken (a withdrawn one)."""
        decoder = self.decoder
        queue: deque[Any] = decoder.frames if decoder is not None else self.inbox
        if not queue:
            return False
        queue.popleft()
        return True

    def _withdrawal(self, codec: int, body: Buffer) -> None:
        """A WITHDRAW from the peer's sender, or the WITHDRAWN answering ours."""
        number, serial = decode_credit(body)
        if codec == WITHDRAWN_CODEC:
            sflow = self.sflow
            if sflow is None:
                raise ProtocolError("a WITHDRAWN answers no withdrawal")
            if sflow.settle_withdrawal(serial):
                self._count_withdrawn()
            if self.on_credit is not None:
                self.on_credit()
            return
        rflow = self.rflow
        if codec != WITHDRAW_CODEC or rflow is None or rflow.capacity != 0:
            raise ProtocolError("a WITHDRAW on a channel without capacity=0")
        if number <= rflow.taken:  # taken already: our CREDIT tells the sender (a
            self.emit_credit(rflow.confirm())  # deferred take's: now)
            return
        if number != rflow.taken + 1:
            raise ProtocolError(f"the peer withdraws message {number}; {rflow.taken} were taken")
        if not self._drop_untaken():
            self._rv_void = number  # (not met yet: dropped when it comes)
        self.stats.aborted += 1
        with self.io_lock:
            self._queue_frame(encode_withdraw(number, serial, answer=True))

    def still_waiting(self) -> None:
        """A rendezvous receive found nothing (maybe it dropped a withdrawn message,
        which used its offer up) and waits on: its offer must stand."""
        if self._rv and not self.closed:
            self.before_wait()

    def count_withdrawn(self) -> None:
        """This end's sender withdrew a message it had counted as sent."""
        self._count_withdrawn()

    def _count_withdrawn(self) -> None:
        stats = self.stats
        stats.messages_sent -= 1
        stats.aborted += 1

    def _queue_frame(self, frame: bytes) -> None:
        """Write a control frame now or queue it behind what is pending (a CREDIT owed
        may be replaced by a newer one; this frame may not). The caller holds the write
        lock."""
        try:
            if self.message_oriented:
                if self.backlog or not self._send_message([frame], 0):
                    OWING.add(self)
                    self.backlog.append(([frame], 0))
                return
            if self.pending:
                OWING.add(self)
                self.pending.append(memoryview(frame))
                self.stats.queued_bytes += len(frame)
                return
            n = self._send_buffers([frame])
            if n != len(frame):
                self._keep_tail([frame], 0 if n == WOULD_BLOCK else n)
        except (EndOfChannel, ChannelClosed):
            pass  # nobody left to tell: nothing can be taken either

    def withdraw(self, number: int) -> int:
        """A rendezvous ``send`` gives its message ``number`` up (it was written whole
        and not known taken): write a WITHDRAW. Returns the withdrawal's serial. The
        caller holds the write lock."""
        sflow = self.sflow
        assert sflow is not None
        sflow.withdrawals += 1
        self._rv_drained = False
        self._queue_frame(encode_withdraw(number, sflow.withdrawals))
        return sflow.withdrawals

    def withdraw_at_close(self, rv: Any = None) -> None:
        """``close()``, under the write lock, before the fds go: withdraw the message a
        blocking rendezvous send still waits to see taken, so that the send, woken by
        the close, need not win the write lock first (it leaves its wait, then takes the
        lock to withdraw; the close could release the fds in between, and the receiver
        would take the message the send reports undelivered). Which send waits: the
        engine's (:attr:`rv_waiting`), or the driver's C call ``rv`` (its message
        written, the driver not done with it: :attr:`rv_over`). A message whose send
        returned (``send_nowait``, ``send_async``) stays. A CREDIT link: a WITHDRAW,
        unless one is already written, what the kernel takes now; the send then raises
        saying the withdrawal was written. A simplex link: the send's stake taken back
        if it is still there (:meth:`stake_taken_back`); if the receiver claimed it
        first, it takes the message and the send returns."""
        if self.closed:
            return
        tokens = self.tokens
        if tokens is not None:
            if self.rv_waiting and tokens.capacity == 0 and tokens.awaiting is not None:
                self._stake_back = tokens.withdraw_message()
            return
        sflow = self.sflow
        if sflow is None or sflow.capacity != 0:
            return
        number = sflow.sent
        if number <= sflow.taken or sflow.withdrawals != sflow.withdrawn:
            return  # taken, or its withdrawal written already
        waited = self.rv_waiting == number or (
            rv is not None and rv.number == number and rv.serial != self.rv_over
        )
        if waited:
            self.withdraw(number)
            if self.pending:
                self.flush()  # what the kernel takes now; a closing channel waits no more

    def stake_taken_back(self) -> bool:
        """A simplex rendezvous sender ended by ``close()``: did the close take its stake
        back (:meth:`withdraw_at_close`: the receiver drops the message)? Once."""
        back, self._stake_back = self._stake_back, False
        return back

    def drain_peer(self) -> None:
        """After a WITHDRAW was written: read everything the peer wrote so far (its
        CREDITs; messages met stay for ``recv``). Under the read lock."""
        if self.owed or self.closed:
            return
        try:
            if self.decoder is not None:
                self._drain()
            else:
                self.pump()
        except EndOfChannel:
            pass
        self._rv_drained = True

    def withdrawn(self, number: int, serial: int) -> bool | None:
        """The fate of withdrawn message ``number``: True dropped (nothing delivered),
        False taken, None not known yet."""
        sflow = self.sflow
        assert sflow is not None
        if sflow.taken >= number:
            return False
        if sflow.withdrawn >= serial:
            return True
        if sflow.error is not None and number > sflow.failed_after:
            sflow.settle_withdrawal(serial)  # the link broke: it can never be taken
            self._count_withdrawn()
            return True
        if self._rv_drained and self._local_order and sflow.limit < number:
            # no offer stands: the receiver's next take follows an offer written after
            # our WITHDRAW was in its link, and a read after that offer (_rv_gate)
            sflow.settle_withdrawal(serial)
            self._count_withdrawn()
            return True
        return None

    def current_peer(self) -> PeerInfo:
        """:attr:`peer`, with the address the link now uses where the peer may move."""
        address = self.transport.current_peer_address()
        if address is not None and address != self.peer.address:
            self.peer = replace(self.peer, address=address)
        return self.peer

    def full_reason(self) -> str:
        """Why the last ``try_send`` could not take the message (for ``Full``)."""
        if self.credit_blocked:
            if self.capacity == 0:
                return "capacity=0: no receiver is waiting"
            return f"capacity={self.capacity}: that many messages are not taken yet"
        return "the channel cannot take the message without waiting"

    def receipt_flow(self) -> SendFlow:
        """The send flow receipts are read against (made on the first ``send_async``)."""
        sflow = self.sflow
        if sflow is None:
            self.check_flow("send_async")
            sflow = self.sflow = SendFlow(None)
            fast_sent, _ = self._stop_fast()
            sflow.sent = self.stats.messages_sent + fast_sent
        return sflow

    def fail_receipts(self, why: str) -> None:
        """Every message not taken yet can no longer be: their receipts fail."""
        sflow = self.sflow
        if sflow is not None and sflow.error is None and sflow.taken < sflow.sent:
            sflow.error = why
            sflow.failed_after = sflow.taken

    def delivered(self, number: int) -> bool:
        return self.sflow is not None and self.sflow.taken >= number

    def pump(self) -> None:
        """Read what arrived without taking a message: apply CREDITs, keep messages
        for ``recv``. Raises :class:`EndOfChannel` if the peer is gone."""
        decoder = self.decoder
        if decoder is not None:
            if not self.eof:
                self._fill(decoder)
            elif self.sflow is not None:
                raise EndOfChannel("the peer closed the channel")
            return
        if self.message_oriented:
            while True:
                try:
                    msg = self._recv_message()
                except EndOfChannel:
                    self.fail_receipts("the peer closed the channel")
                    raise
                if msg is None:
                    if self.credit_out is None:
                        self._rv_valid = True  # the link found empty (rendezvous gate)
                    return
                if len(msg) >= 2 and msg[1] == Kind.CREDIT and not self.raw:
                    self._credit_message(msg)
                else:
                    self.inbox.append(msg)

    # -- receiving --------------------------------------------------------------------

    def buffered(self) -> Frame | tuple[int, bytes] | None:
        """The next message if one was already read (no system call), else ``None``."""
        decoder = self.decoder
        if decoder is not None:
            frames = decoder.frames
            if frames and self._rv and not self._rv_gate():
                return None
            return _pop(self, frames) if frames else None
        if self.inbox or self.raw_chunks:
            return self.poll()
        return None

    def more_buffered(self) -> bool:
        """True if a stream's last read brought more messages than were taken."""
        decoder = self.decoder
        return decoder is not None and bool(decoder.frames)

    def poll(self) -> Frame | tuple[int, bytes] | None:
        """The next message, reading once if none is parsed yet; ``None`` if none is
        ready. The common small frame comes as ``(codec, body)`` (no Frame object: this
        is the hot path of ``recv``/``recv_bytes``), anything else as a :class:`Frame`.

        Raises :class:`EndOfChannel` once the peer closed and every message was taken.
        """
        decoder = self.decoder
        if decoder is None:
            if self.message_oriented:
                return self._poll_message()
            data = self.poll_raw()
            return None if data is None else (CodecId.RAW, data)
        frames = decoder.frames
        if not frames and not self._fill(decoder):
            return None
        if self._rv and not (self._rv_gate() and frames):
            return None
        return _pop(self, frames)

    def _pop(self, frames: deque[Frame | tuple[int, bytes]]) -> Frame | tuple[int, bytes] | None:
        item = frames.popleft()
        if type(item) is tuple:
            self.stats.messages_received += 1
            self.taken += 1
            flags = item[0]
            if flags > 7:  # a receipt is asked for
                rflow = self.rflow
                if (
                    frames
                    and rflow is not None
                    and rflow.capacity is None
                    and rflow.unreported < _REPORT_LAST
                ):
                    # RecvFlow.on_take inlined for the common case (another message in
                    # hand, no capacity, the batch not full): it only counts
                    rflow.taken += 1
                    rflow.report_due = True
                    rflow.unreported += 1
                    return (flags & 7, item[1])
                self._took(True, bool(frames))
                return (flags & 7, item[1])
            if self.taking:
                self._took(False, bool(frames))
            return item
        assert isinstance(item, Frame)
        return self._take(item, bool(frames))

    def poll_frame(self, control: bool = False) -> Frame | None:
        """Like :meth:`poll`, always as a :class:`Frame`.

        With ``control=True`` (handshakes) any frame kind is returned as is.
        """
        decoder = self.decoder
        take = self._control if control else self._take
        if decoder is not None:
            if decoder.frames or self._fill(decoder):
                return take(decoder.next_frame())
            return None
        item = self._poll_message(take)
        if isinstance(item, tuple):
            return Frame(Kind.DATA, item[0] & 7, item[1], [])
        return item

    def _poll_message(
        self, take: Callable[[Frame], Frame | None] | None = None
    ) -> Frame | tuple[int, bytes] | None:
        """Message transports: one datagram (or queue message) is one frame."""
        if self.closed:
            raise ChannelClosed("the channel is closed")
        while True:
            if self.inbox:
                msg = self.inbox.popleft()
            else:
                try:
                    msg = self._recv_message()
                except EndOfChannel:
                    self.fail_receipts("the peer closed the channel")
                    raise
                if msg is None:
                    self.stats.recv_would_block += 1
                    if self.credit_out is None:
                        self._rv_valid = True
                    return None
            if self.raw or len(msg) < 2 or msg[1] != Kind.CREDIT:
                if self._rv and msg[1] == Kind.DATA:  # the gate may drop it (withdrawn)
                    self.inbox.appendleft(msg)
                    if not (self._rv_gate() and self.inbox):
                        return None
                    msg = self.inbox.popleft()
                return self._message_item(msg, take)
            self._credit_message(msg)

    def _message_item(
        self, msg: bytes, take: Callable[[Frame], Frame | None] | None
    ) -> Frame | tuple[int, bytes] | None:
        """One received message (not a CREDIT) as a frame."""
        transport = self.transport
        stats = self.stats
        if self._track_message_meta:
            self.last_priority = transport.last_priority
            stats.dropped = transport.dropped
            sender = transport.last_peer
            if sender is not None and sender != self.peer.address:
                # a bound datagram end: the peer is whoever sent the latest message
                self.peer = PeerInfo(address=sender)
        size = len(msg)
        stats.bytes_received += size
        if self.raw:
            stats.messages_received += 1
            return (CodecId.RAW, msg)
        flags = plain_data_flags(msg, self.max_frame)
        if flags >= 0:
            stats.messages_received += 1
            self.taken += 1
            if self.taking or flags > 7:
                self._took(flags > 7, False)
            return (flags & 7, msg[8:])
        try:
            frame = parse_frame(msg, self.max_frame)
        except FrameError:
            stats.rejected_frames += 1
            raise
        return take(frame) if take is not None else self._take(frame, False)

    def _credit_message(self, msg: bytes) -> None:
        """A CREDIT that came as a message of its own (message transports)."""
        try:
            frame = parse_frame(msg, self.max_frame)
        except FrameError:
            self.stats.rejected_frames += 1
            raise
        if frame.codec:
            self._withdrawal(frame.codec, frame.body)
        else:
            self._apply_credit(frame.body, frame.receipt)

    def _fill(self, decoder: FrameDecoder | _MpDecoder) -> bool:
        """Read once (more if a read fills the buffer); True if a frame is complete."""
        if self.eof:
            raise EndOfChannel("the peer closed the channel")
        if self.closed:
            raise ChannelClosed("the channel is closed")
        if decoder._error is not None:
            try:
                decoder.check()
            except FrameError as exc:
                if exc is not self._counted_error:
                    self._counted_error = exc
                    self.stats.rejected_frames += 1
                raise
        recv_into = self._recv_into
        read = self._read
        stats = self.stats
        while True:  # the post-read half is _read_bytes (shared with after_wait)
            buf = decoder.get_buffer()
            if read is not None:  # the builtin itself (no transport frame per read)
                try:
                    n = read(buf)
                except BlockingIOError:
                    n = WOULD_BLOCK
                except OSError as exc:
                    assert self._stream is not None
                    raise self._stream.io_error(exc, False) from exc
            else:
                n = recv_into(buf)
            if n == WOULD_BLOCK:
                stats.recv_would_block += 1
                if self.credit_out is None:
                    self._rv_valid = True
                return False
            if self._read_bytes(decoder, n, len(buf)):
                return True
            if n < len(buf):
                stats.recv_would_block += 1
                return False

    def _read_bytes(self, decoder: FrameDecoder | _MpDecoder, n: int, room: int) -> bool:
        """A read put ``n`` bytes (0: end of stream) into the decoder's buffer of
        ``room`` bytes: hand them over; True if a frame is complete."""
        stats = self.stats
        if n == 0:
            self.eof = True
            self.fail_receipts("the peer closed the channel")
            try:
                decoder.eof()
            except FrameError:
                stats.rejected_frames += 1
                raise
            raise EndOfChannel("the peer closed the channel")
        stats.bytes_received += n
        if n < room and self.credit_out is None:
            self._rv_valid = True  # the link is empty for now (rendezvous gate)
        try:
            decoder.buffer_updated(n)
        except FrameError:
            stats.rejected_frames += 1
            raise
        if decoder.aborted != self._aborts_seen:
            self._dropped_aborted(decoder.aborted)
        if decoder.control:
            self._apply_control(decoder)
        return bool(decoder.frames)

    def wait_read(self) -> tuple[int, bytearray, int, int] | None:
        """Where a plain receive's wait and read may be one call: ``(fd, buffer,
        limit, mode)`` for ``protocol._stream.wait_frame``, run by the sync driver (the
        core never waits). A plain receive announces nothing (no capacity, receipts or
        rendezvous: the driver checks ``taking``), is on a stream whose read fd alone
        tells readiness and whose reads are plain read(2)s (``plain_reads``), and has
        nothing of a frame read yet; its engine operation is then one INPUT step on the
        read fd and one read (:func:`buzon._engine.recv_steps`), which that call runs
        in one go. ``mode``: the transport's ``wait_mode`` (a socket: recv with
        MSG_DONTWAIT; with ``WAIT_BLOCK`` a wait with no deadline may sleep in recv,
        and a close() from another thread must then call :meth:`interrupt_reads`).
        None: the engine's loop does it."""
        fd = self.wait_fd
        decoder = self.decoder
        if fd is None or decoder is None or self.closed or self.eof:
            return None
        buf: bytearray | None = decoder.idle_buffer()  # type: ignore[union-attr]
        if buf is None:
            return None
        if buf is not self._wait_buf:  # the decoder's read buffer (it may replace it)
            self._wait_buf = buf
            self._wait_limit = min(len(buf) >> 1, self.max_frame)
        stream = self._stream
        assert stream is not None
        return fd, buf, self._wait_limit, stream.wait_mode() if stream.dontwait else 0

    def interrupt_reads(self) -> None:
        """End a blocking recv another thread sleeps in (a :meth:`wait_read` mode with
        ``WAIT_BLOCK``, a datagram socket's ``Receiver.wait``): the channel is closing,
        and its output was flushed already."""
        if self.closed:
            return
        if self._stream is not None:
            self._stream.interrupt_reads()
        elif isinstance(self.transport, MessageTransport):
            self.transport.interrupt_reads()

    def after_wait(
        self,
        got: tuple[int, bytes] | int,
        room: int,
        parse: Callable[[Buffer, int, int], Any] | None = None,
    ) -> Frame | tuple[int, Any] | None:
        """What ``wait_frame`` read into the :meth:`wait_read` buffer of ``room``
        bytes: a lone plain frame it took (counted here), or the bytes it left there
        for the decoder (0: end of stream). Returns the message, or None if the read
        brought only part of a frame (the engine's loop goes on). Raises as
        :meth:`poll` does (end of stream, a bad frame, the channel closed meanwhile).

        ``parse`` (``Channel._recv_parsed``'s hook): bytes that may be one whole
        frame are first offered to ``parse(buffer, max_frame, n)``; a result that is
        not None means it took the frame (counted here, the buffer free again) and
        comes back as ``(-1, result)``; None leaves them to the decoder."""
        if got.__class__ is tuple:
            stats = self.stats
            stats.bytes_received += len(got[1]) + 8
            stats.messages_received += 1
            self.taken += 1
            flags = got[0]
            if flags > 7:  # a receipt is asked for (the C wait takes such frames too)
                self._took(True, False)
                return (flags & 7, got[1])
            if self.taking:  # takes are numbered (receipts were asked before)
                self._took(False, False)
            return got
        if self.closed:
            raise ChannelClosed("the channel is closed")
        if parse is not None and got:
            parsed = parse(self._wait_buf, self.max_frame, got)  # type: ignore[arg-type]
            if parsed is not None:  # self.took_whole(got), inline (once per message)
                stats = self.stats
                stats.bytes_received += got  # type: ignore[operator]
                stats.messages_received += 1
                self.taken += 1
                if self.taking:
                    self._took(False, False)
                return (-1, parsed)
        decoder = self.decoder
        assert decoder is not None
        if self._read_bytes(decoder, got, room):  # type: ignore[arg-type]
            return _pop(self, decoder.frames)
        return None

    def took_whole(self, size: int) -> None:
        """Count a whole frame of ``size`` bytes that a ``parse`` hook took (see
        :meth:`after_wait`, ``Channel._recv_parsed``) as :meth:`_take` counts one."""
        stats = self.stats
        stats.bytes_received += size
        stats.messages_received += 1
        self.taken += 1
        if self.taking:  # takes are numbered (receipts were asked before)
            self._took(False, False)

    def wait_message(self) -> Receiver | FifoWaiter | None:
        """Where a plain receive on a message transport may wait and take in one call:
        the transport's C ``Receiver`` (``protocol/_dgram.c``), whose ``wait`` the sync
        driver runs (the core never waits). As :meth:`wait_read`: the receive announces
        nothing (``taking``), and nothing was read ahead (``inbox``). None: the engine's
        loop does it."""
        receiver = self.wait_receiver
        if receiver is None or self.taking or self.closed or self.inbox:
            return None
        return receiver

    def after_message(
        self, got: tuple[int, bytes] | bytes | int
    ) -> Frame | tuple[int, bytes] | None:
        """What the :meth:`wait_message` receiver's ``wait`` took: a plain DATA message
        from the same sender, priority and drop count as the one before (counted here),
        or any other message, taken the Python way (:meth:`poll`: a CREDIT applied, a
        bad frame raised, the sender noted). None: it was a CREDIT, the engine's loop
        goes on."""
        if got.__class__ is tuple:
            stats = self.stats
            stats.bytes_received += len(got[1]) + 8
            stats.messages_received += 1
            self.taken += 1
            return got
        if type(got) is int:  # a fifo: reader's frames in the decoder's buffer (0: none)
            room: int = self.wait_receiver.room  # type: ignore[union-attr]
            return self.after_wait(got, room) if got > 0 else None
        self.inbox.append(got)  # type: ignore[arg-type]
        return self.poll()

    def message_error(self, exc: OSError) -> Exception:
        """The typed error for a receive that failed in the receiver's ``wait``."""
        if self.closed:
            return ChannelClosed("the channel is closed")
        transport = self.transport
        assert isinstance(transport, MessageTransport)
        return transport.recv_error(exc)

    def read_error(self, exc: OSError) -> Exception:
        """The typed error for a read that failed in the driver's ``wait_frame``."""
        if self.closed:
            return ChannelClosed("the channel is closed")
        assert self._stream is not None
        return self._stream.io_error(exc, False)

    def _dropped_aborted(self, total: int) -> None:
        """The decoder dropped frames their sender aborted: count them, and give a
        simplex link's tokens back (the sender took one for each)."""
        new, self._aborts_seen = total - self._aborts_seen, total
        self.stats.aborted += new
        if self.tokens is not None:
            if self._rv:
                self.tokens.claim()  # the aborted message's stake
            for _ in range(new):
                self.tokens.on_take()

    def _apply_control(self, decoder: FrameDecoder | _MpDecoder) -> None:
        # counts are cumulative: the latest CREDIT says it all (bit 3: the peer is blocked)
        control = decoder.control
        blocked = 0
        body: bytes | None = None
        while control:
            flags, got = control.popleft()
            if flags & 7:  # a withdrawal (capacity=0): in order, never merged
                self._withdrawal(flags & 7, got)
                continue
            blocked |= flags
            body = got
        if body is not None:
            self._apply_credit(body, bool(blocked & 8))

    @staticmethod
    def _control(frame: Frame) -> Frame | None:
        return frame

    def _take(self, frame: Frame, more: bool = False) -> Frame | None:
        if frame.kind != Kind.DATA:
            self.stats.rejected_frames += 1
            raise FrameError(f"unexpected {Kind(frame.kind).name} frame after the handshake")
        self.stats.messages_received += 1
        self.taken += 1
        if self.taking or frame.receipt:
            self._took(frame.receipt, more)
        return frame

    def poll_raw(self) -> bytes | None:
        """Raw stream mode: whatever bytes are available (one read)."""
        if self.raw_chunks:
            self.stats.messages_received += 1
            return self.raw_chunks.popleft()
        if self.eof:
            raise EndOfChannel("the peer closed the channel")
        self.check_open()
        assert self._rbuf is not None
        n = self._recv_into(memoryview(self._rbuf))
        if n == WOULD_BLOCK:
            self.stats.recv_would_block += 1
            return None
        if n == 0:
            self.eof = True
            raise EndOfChannel("the peer closed the channel")
        self.stats.bytes_received += n
        self.stats.messages_received += 1
        return bytes(memoryview(self._rbuf)[:n])

    def partial(self) -> bool:
        """True while part of a frame has arrived (the frame-progress timer runs)."""
        return self.decoder is not None and self.decoder.buffered > 0

    def wait_limit(self, deadline: float | None, now: float) -> tuple[float | None, bool]:
        """How long a receive may sleep: the caller's deadline, or sooner the
        frame-progress deadline while part of a frame is in (then ``True``: expiring
        means the peer stalled mid-frame, reported by :meth:`stalled`)."""
        frame_timeout = self.options.frame_timeout
        if frame_timeout is not None and self.partial():
            stall = now + frame_timeout
            if deadline is None or stall < deadline:
                return stall, True
        return deadline, False

    def stalled(self) -> Timeout:
        return Timeout(
            f"the peer stalled for {self.options.frame_timeout} s in the middle of a frame"
        )

    def ready(self) -> bool:
        """True if a receive would not find the channel empty (it may raise instead).

        Reads what is available without consuming a message: a complete frame (or raw
        chunk) found here is kept and returned by the next receive.
        """
        if self.closed or self.eof or self.raw_chunks or self.inbox:
            return True
        decoder = self.decoder
        if decoder is not None and decoder.frames:
            return True
        try:
            if self.rv_ring is not None:  # capacity=0 on rings: looking must not take
                return bool(self.rv_ring.incoming() or self.rv_ring.peer_gone())
            if self.raw and not self.message_oriented:
                data = self.poll_raw()
                if data is None:
                    return False
                self.stats.messages_received -= 1
                self.raw_chunks.appendleft(data)
                return True
            if decoder is not None:
                if self._fill(decoder):
                    return True
            else:
                self.pump()  # keeps messages in the inbox, applies CREDITs
                if self.inbox:
                    return True
        except Exception:
            return True  # the receive will raise it
        return False

    def item_object(self, item: Frame | tuple[int, bytes], type: Any = Any) -> Any:
        """Decode what :meth:`poll` returned."""
        if item.__class__ is tuple:
            return self.decode_body(item[0], item[1], [], type)
        return self.decode(item, type)  # type: ignore[arg-type]

    def item_bytes(self, item: Frame | tuple[int, bytes]) -> bytes:
        """The payload of what :meth:`poll` returned, as bytes."""
        if item.__class__ is tuple:
            return item[1]
        return self.frame_bytes(item)  # type: ignore[arg-type]

    def item_into(self, item: Frame | tuple[int, bytes], buf: Buffer) -> int:
        """Copy what :meth:`poll` returned into ``buf``."""
        if item.__class__ is tuple:
            return self.frame_into(Frame(Kind.DATA, CodecId.RAW, item[1], []), buf)
        return self.frame_into(item, buf)  # type: ignore[arg-type]

    def decode(self, frame: Frame, type: Any = Any) -> Any:
        return self.decode_body(frame.codec, frame.body, frame.buffers, type)

    def decode_body(
        self, codec: int, body: Buffer, buffers: list[memoryview], type: Any = Any
    ) -> Any:
        """Decode a received message; one that cannot be decoded (or is refused, like
        an unwanted pickle) counts as rejected, not as received."""
        try:
            return self.codec.decode(codec, body, buffers, type)
        except CodecError:
            self.stats.messages_received -= 1
            self.stats.rejected_frames += 1
            raise

    def frame_bytes(self, frame: Frame) -> bytes:
        """The frame's payload as bytes (an object frame gives its encoded body, then
        its buffers). The frame's own buffer is recycled for the next big frame."""
        if not frame.buffers:
            body = frame.body
            data = body if isinstance(body, bytes) else bytes(body)
        elif not frame.body and len(frame.buffers) == 1:
            data = bytes(frame.buffers[0])
        else:
            data = b"".join([bytes(frame.body), *map(bytes, frame.buffers)])
        self._recycle(frame)
        return data

    def frame_into(self, frame: Frame, buf: Buffer) -> int:
        if frame.sunk:  # read straight into ``buf`` already
            n = frame.buffers[0].nbytes
            frame.buffers[0].release()
            return n
        target = memoryview(buf).cast("B")
        parts = [memoryview(frame.body).cast("B"), *frame.buffers]
        total = sum(p.nbytes for p in parts)
        if total > target.nbytes:  # taken: handed over in the error, not lost
            error = MessageTooLarge(
                f"message of {total} bytes does not fit a {target.nbytes}-byte buffer "
                "(the error's .message holds it)"
            )
            error.message = self.frame_bytes(frame)  # recycles the frame (see below)
            for p in parts:
                p.release()
            raise error
        pos = 0
        for p in parts:
            target[pos : pos + p.nbytes] = p
            pos += p.nbytes
        # the frame's own views go to _recycle unreleased (it reads their buffers to
        # keep the largest for the next big frame, then releases them); a big frame
        # read ahead of a recv_bytes_into (not into its buffer) raised ValueError here
        self._recycle(frame)
        for p in parts:
            p.release()
        return total

    def set_sink(self, buf: Buffer | None) -> None:
        """Let a big raw frame be read straight into ``buf`` (``recv_bytes_into``)."""
        decoder = self.decoder
        if not isinstance(decoder, FrameDecoder):
            return
        if buf is None:
            decoder.release_sink()
        else:
            decoder.sink = memoryview(buf).cast("B")

    def _recycle(self, frame: Frame) -> None:
        if isinstance(self.decoder, FrameDecoder) and isinstance(frame.body, memoryview):
            self.decoder.recycle(frame)

    # -- closing ----------------------------------------------------------------------

    @property
    def released(self) -> bool:
        """``close()`` ran: the fds are gone (``closed`` alone may be a close still
        writing what it owes: :meth:`begin_close`)."""
        return self._released

    def begin_close(self) -> None:
        """Refuse every further operation (``closed``) but keep what this end still
        owes and its fds: a lingering close writes what is owed (``flush``), then calls
        :meth:`close`, which releases them."""
        if self.closed:
            return
        self.shutdown()
        self._counters = self.transport.counters()
        self.closed = True
        self._fast_paths()

    def __del__(self) -> None:
        """Dropped without ``close()`` (the last reference went: the C writers hold the
        core weakly, so this happens at once): write what the kernel takes now of what
        this end still owes, report what it could not (as the exit hook does), and
        release the fds and files, as a dropped file object does."""
        if getattr(self, "_released", True):
            return
        try:
            if self.owed and not self.flush():
                lost = sum(v.nbytes for v in self.pending) + sum(
                    len(b) for bufs, _ in self.backlog for b in bufs
                )
                os.write(
                    2,
                    f"buzon: {lost} bytes of accepted messages were dropped with a channel "
                    "nobody closed; close() channels to deliver them\n".encode(),
                )
        except Exception:  # the peer is gone, or the interpreter is shutting down
            pass
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        self.closed = True
        self.pending.clear()
        self.backlog.clear()
        self.stats.queued_bytes = 0
        # this end can no longer read acknowledgements: a message sent may still be (or
        # have been) taken by a receiver that lives on, so its fate is unknown
        self.fail_receipts(
            "this end was closed before the receiver acknowledged the message "
            "(it may have taken it, or take it still: its fate is unknown)"
        )
        self._fast_paths()
        if self.tokens is not None:
            self.tokens.close()
        self._counters = self.transport.counters()  # statistics() after close
        self.transport.close()


#: a read message's take (ChannelCore._pop, the reference, or its C twin): a function of
#: the core and its decoder's frames
_pop: Callable[[ChannelCore, deque[Frame | tuple[int, bytes]]], Frame | tuple[int, bytes] | None]
_pop = ChannelCore._pop if _c_pop is None else _c_pop


def finish_view(lent: Any, view: memoryview) -> None:
    """End a received view: release it, then what lent it (ring space or a block goes
    back to the sender). Views the caller made of it (a numpy array) keep it alive
    instead; it is released when they are collected."""
    try:
        view.release()
    except BufferError:
        return
    if lent is not None:
        with contextlib.suppress(BufferError):  # other views remain: released with them
            lent.release()


class _MpDecoder:
    """``multiprocessing.connection`` framing behind the FrameDecoder interface.

    Its messages carry no codec id: they surface as frames whose body is the payload,
    marked PICKLE because that is what ``Connection.send`` puts there (``recv`` then
    refuses them unless the channel enabled pickle; ``recv_bytes`` takes them as is).
    """

    __slots__ = ("_d", "_error", "control", "frames")
    aborted = 0  # this framing has no chunked frames to abort

    def __init__(self, max_frame: int) -> None:
        self._d = mpcompat.MessageDecoder(max_frame)
        self._error: FrameError | None = None  # errors surface at once in this framing
        self.frames: deque[Frame | tuple[int, bytes]] = deque()
        self.control: deque[tuple[int, bytes]] = deque()  # never filled: no credits here

    def next_frame(self) -> Frame:
        item = self.frames.popleft()
        assert isinstance(item, Frame)
        return item

    @property
    def max_frame(self) -> int:
        return self._d.max_message

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._d.max_message = value

    @property
    def buffered(self) -> int:
        return self._d.buffered

    def get_buffer(self) -> memoryview:
        return self._d.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._d.buffer_updated(nbytes)
        self._drain()

    def feed(self, data: Buffer) -> None:
        self._d.feed(data)
        self._drain()

    def eof(self) -> None:
        self._d.eof()

    def check(self) -> None:
        """Errors surface from ``buffer_updated`` in this framing; nothing is deferred."""

    def _drain(self) -> None:
        messages = self._d.messages
        while messages:
            self.frames.append(Frame(Kind.DATA, CodecId.PICKLE, messages.popleft(), []))


class ChannelIdentity:
    """What both drivers' channels report about themselves (read from the core)."""

    _core: ChannelCore
    _label = "buzon.Channel"

    @property
    def properties(self) -> LinkProperties:
        """What this link guarantees (see :class:`LinkProperties`)."""
        return self._core.properties

    @property
    def peer(self) -> PeerInfo:
        """The peer's pid/uid/gid (Unix sockets) or address (INET), as far as known;
        on the bound end of a datagram socket, the sender of the latest message; on a
        reliable datagram link, where the peer sends from now (it may move)."""
        return self._core.current_peer()

    @property
    def address(self) -> Address | None:
        return self._core.address

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def last_priority(self) -> int:
        """Priority of the last message received (POSIX queues; 0 elsewhere)."""
        return self._core.last_priority

    def statistics(self) -> Statistics:
        """A snapshot of this channel's counters."""
        return self._core.statistics()

    def fileno(self) -> int:
        """The fd that becomes readable when a message may be ready (for foreign loops)."""
        return self._core.read_fileno()

    def __repr__(self) -> str:
        core = self._core
        state = "closed" if core.closed else "open"
        return f"<{self._label} {core.transport.scheme} {core.address or ''} {state}>"
