"""One end of a reliable-datagram connection: the state machine, the sender and the
receiver (see :mod:`buzon.protocol.reliable` for the protocol)."""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import replace
from enum import Enum

from ...errors import (
    BuzonError,
    ChannelClosed,
    ConnectionRefused,
    EndOfChannel,
    FrameError,
    Full,
    HandshakeError,
    MessageTooLarge,
    ProtocolError,
    Timeout,
)
from .config import ReliableConfig, ReliableStatistics
from .wire import (
    _BUNDLE_LEN,
    _MASK,
    COOKIE_SIZE,
    MAX_FRAGMENTS,
    MAX_REASON,
    OVERHEAD,
    RESET_COPIES,
    Datagram,
    Flag,
    Hello,
    ResetCode,
    Type,
    _encode,
    _unwrap,
    decode_datagram,
    verify_crc,
)

_PACKET_THRESHOLD = 3  # a segment is lost when one sent 3 transmissions later is acked
_TIME_THRESHOLD = 9 / 8
_GRANULARITY = 0.001  # the smallest timer interval this protocol reasons about

# -- the state machine ------------------------------------------------------------------


class State(Enum):
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


class Event(Enum):
    HANDSHAKE_DONE = "handshake done"  # client: SYN_ACK; server: the first datagram to id_s
    CLOSE = "close"  # the application called close()
    CLOSE_DONE = "close done"  # our FIN acked (or only it unacked) and the peer's FIN in
    FAIL = "fail"  # timeout, protocol violation, RESET received, abort()


# (state, event) -> next state. A pair not listed is a bug in this module (AssertionError).
# close() while CONNECTING is remembered and applied once the handshake is done, so
# messages queued before it are still delivered.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.CONNECTING, Event.HANDSHAKE_DONE): State.ESTABLISHED,
    (State.CONNECTING, Event.CLOSE): State.CONNECTING,
    (State.CONNECTING, Event.FAIL): State.FAILED,
    (State.ESTABLISHED, Event.CLOSE): State.CLOSING,
    (State.ESTABLISHED, Event.FAIL): State.FAILED,
    (State.CLOSING, Event.CLOSE): State.CLOSING,
    (State.CLOSING, Event.CLOSE_DONE): State.CLOSED,
    (State.CLOSING, Event.FAIL): State.FAILED,
    (State.CLOSED, Event.CLOSE): State.CLOSED,
    (State.FAILED, Event.CLOSE): State.FAILED,
}

_RESET_ERRORS: dict[int, tuple[type[BuzonError], str]] = {
    ResetCode.PROTOCOL: (ProtocolError, "the peer reset the connection (protocol violation)"),
    ResetCode.REFUSED: (ConnectionRefused, "the server refused the connection"),
    ResetCode.ABORT: (EndOfChannel, "the peer aborted the connection"),
}


class _Seg:
    """A segment we sent and must keep until it is acknowledged."""

    __slots__ = (
        "cost",
        "flags",
        "frag",
        "kind",
        "lost",
        "msgs",
        "nfrag",
        "payload",
        "retransmitted",
        "sent",
        "seq",
        "xmit",
    )

    def __init__(
        self,
        seq: int,
        kind: int,
        frag: int,
        nfrag: int,
        payload: bytes,
        flags: int = 0,
        cost: int = -1,
        msgs: int = 0,
    ) -> None:
        self.seq = seq
        self.kind = kind
        self.frag = frag
        self.nfrag = nfrag
        self.payload = payload
        self.flags = flags  # BUNDLE or 0
        self.cost = len(payload) if cost < 0 else cost  # message bytes it frees when acked
        self.msgs = msgs  # messages it completes (the last fragment of one, a bundle's all)
        self.sent = 0.0  # time of the latest transmission
        self.xmit = 0  # transmission counter value of the latest transmission
        self.retransmitted = False
        self.lost = False


class _Ranges:
    """Disjoint, sorted half-open ranges of sequence numbers."""

    __slots__ = ("_r",)

    def __init__(self) -> None:
        self._r: list[list[int]] = []

    def __bool__(self) -> bool:
        return bool(self._r)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((a, b) for a, b in self._r)

    def add(self, start: int, end: int) -> list[tuple[int, int]]:
        """Add [start, end); return the parts that were not already in the set."""
        r = self._r
        new: list[tuple[int, int]] = []
        i = 0
        n = len(r)
        while i < n and r[i][1] < start:  # ranges wholly before, not even touching
            i += 1
        lo, hi = start, end
        j = i
        cursor = start
        while j < n and r[j][0] <= end:  # overlapping or touching
            a, b = r[j]
            if a > cursor:
                new.append((cursor, min(a, end)))
            cursor = max(cursor, b)
            lo = min(lo, a)
            hi = max(hi, b)
            j += 1
        if cursor < end:
            new.append((cursor, end))
        r[i:j] = [[lo, hi]]
        return new

    def discard_below(self, point: int) -> None:
        r = self._r
        while r and r[0][1] <= point:
            del r[0]
        if r and r[0][0] < point:
            r[0][0] = point

    def last_end(self) -> int | None:
        return self._r[-1][1] if self._r else None

    def containing(self, point: int) -> tuple[int, int] | None:
        for a, b in self._r:
            if a <= point < b:
                return (a, b)
        return None


def _ids(randbytes: Callable[[int], bytes]) -> tuple[int, int]:
    """A non-zero connection id and an initial sequence number."""
    raw = randbytes(8)
    conn_id = int.from_bytes(raw[:4], "little") or 1
    return conn_id, int.from_bytes(raw[4:8], "little")


class ReliableConnection:
    """One end of a reliable connection over datagrams. Not thread-safe.

    Make a client with :meth:`client`; server-side connections come from
    :class:`ReliableServer`. The connection never raises from
    :meth:`receive_datagram`, :meth:`datagrams_to_send` or :meth:`on_timeout`: a
    datagram it cannot use is dropped and counted, and a fatal condition moves it to
    FAILED with :attr:`error` set (then :meth:`send` raises that error).
    """

    def __init__(
        self,
        role: str,
        conn_id: int,
        now: float,
        config: ReliableConfig | None = None,
        *,
        isn: int = 0,
        peer_hello: Hello | None = None,
        peer_isn: int = 0,
        peer_addr: Hashable = None,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError("role is 'client' or 'server'")
        if not 0 < conn_id <= _MASK:
            raise ValueError("conn_id is a non-zero u32")
        if (role == "server") != (peer_hello is not None):
            raise ValueError("a server-side connection is made from the client's hello")
        cfg = config if config is not None else ReliableConfig()
        self.role = role
        self.config = cfg
        self.local_id = conn_id
        self.remote_id = 0
        self.peer_addr = peer_addr
        self.state = State.CONNECTING
        self.error: BuzonError | None = None
        self._stats = ReliableStatistics()
        self._created = now
        self._close_requested = False
        # handshake
        self._cookie = bytes(COOKIE_SIZE)
        self._hs_send = True  # a SYN / SYN_ACK is due
        self._hs_sent_at: float | None = None
        self._hs_retransmitted = False
        self._hs_deadline: float | None = None
        self._payload = cfg.payload_size(cfg.max_datagram)
        self._max_out = cfg.max_datagram  # negotiated: min of both sides
        self._sack_max = cfg.max_sack_blocks  # negotiated: fits the smaller datagram
        self._max_message = cfg.max_message  # negotiated (sending side)
        # sender
        isn &= _MASK
        self._isn = isn
        self._snd_una = isn
        self._snd_nxt = isn
        self._peer_edge = isn  # may send seq < this
        self._queue: deque[bytes] = deque()
        self._q_off = 0  # bytes of the head message already cut into segments
        self._q_frag = 0
        self._q_nfrag = 0
        self._buffered = 0  # bytes queued + unacked payload
        self._fin_seq: int | None = None
        self._outstanding: dict[int, _Seg] = {}  # sent, not acked, not SACKed; seq order
        self._sacked = _Ranges()
        self._lost: list[int] = []  # heap of seqs to retransmit (lazy)
        self._in_flight = 0
        self._xmit = 0
        self._largest_acked_xmit = -1
        self._largest_acked_seq = isn - 1  # of a never-retransmitted segment
        self._srtt: float | None = None
        self._rttvar: float | None = None
        self._latest_rtt = 0.0
        self._rto = cfg.initial_rto
        self._rto_deadline: float | None = None
        self._loss_deadline: float | None = None
        self._persist_deadline: float | None = None
        self._persist_backoff = 0
        self._ping = False  # an ACK_NOW ping is due
        self._last_ping = now
        self._asked_edge = 0  # request_ack: no new ping until snd_una reaches this
        # (last seq of a message, messages cut so far) for segments that complete messages,
        # not yet acked in order: the count of messages the peer has follows snd_una
        self._msg_marks: deque[tuple[int, int]] = deque()
        self._msgs_cut = 0
        # without congestion control only the peer's window limits what is in flight
        self._cwnd = float(cfg.initial_cwnd) if cfg.congestion_control else math.inf
        self._cwnd_cap = float(max(cfg.recv_window, cfg.initial_cwnd))
        self._ssthresh = float("inf")
        self._recovery_xmit = 0  # losses of segments sent before this do not cut cwnd again
        # receiver
        self._rcv_nxt = 0
        # seq -> (type, flags, frag, nfrag, payload) of segments that arrived early
        self._ooo: dict[int, tuple[int, int, int, int, bytes]] = {}
        self._ooo_ranges = _Ranges()
        self._last_ooo = -1
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._next_frag = 0
        self._nfrag = 0
        self._ready: deque[tuple[bytes, int]] = deque()  # message, segments it held
        self._held = 0  # in-order segments held: reassembly + ready
        self._peer_fin: int | None = None  # seq of the peer's FIN, once seen
        self._peer_finished = False  # the FIN was reached in order
        self._ack_now = False
        self._ack_pending = 0
        self._ack_deadline: float | None = None
        self._advertised_edge = 0
        self._last_heard = now
        self._linger_until: float | None = None
        self._confirming = False  # client: both directions done, awaiting the server's CLOSED
        self._peer_closed = False  # the peer said (flag CLOSED) that it is closed
        self._ack_repeats = 0  # unasked copies of our last ack still to send (CLOSED)
        self._ack_gap = 0.0
        self._repeat_deadline: float | None = None
        self._reset: tuple[int, str] | None = None  # a RESET to send once
        if peer_hello is not None:
            self._adopt_hello(peer_hello, peer_isn)

    @classmethod
    def client(
        cls,
        now: float,
        randbytes: Callable[[int], bytes],
        config: ReliableConfig | None = None,
        *,
        peer_addr: Hashable = None,
    ) -> ReliableConnection:
        """A client connection: a SYN is due at once (:meth:`datagrams_to_send`)."""
        conn_id, isn = _ids(randbytes)
        return cls("client", conn_id, now, config, isn=isn, peer_addr=peer_addr)

    # -- the application side ----------------------------------------------------------

    def send(self, message: bytes | bytearray | memoryview) -> None:
        """Queue one message. Raises :class:`Full` when the send buffer cannot take it
        now, :class:`MessageTooLarge` over the (negotiated) max message, the connection's
        error once FAILED, :class:`ChannelClosed` after :meth:`close`."""
        if self.state is State.FAILED:
            assert self.error is not None
            raise self.error
        if self._close_requested or self.state in (State.CLOSING, State.CLOSED):
            raise ChannelClosed("the connection was closed by this side")
        n = message.nbytes if isinstance(message, memoryview) else len(message)
        if n > self._max_message:
            raise MessageTooLarge(
                f"a {n}-byte message exceeds the connection's max message of "
                f"{self._max_message} bytes"
            )
        if self._buffered + n > self.config.send_buffer:
            raise Full(
                f"the send buffer holds {self._buffered} of {self.config.send_buffer} bytes; "
                f"a {n}-byte message does not fit until the peer acknowledges more"
            )
        if not isinstance(message, bytes):
            message = bytes(message)  # the caller may reuse its buffer once send returns
        self._queue.append(message)
        self._buffered += n
        self._stats.messages_sent += 1
        self._stats.bytes_sent += n

    def send_space(self) -> int:
        """Bytes :meth:`send` accepts right now (0 once closed or failed)."""
        if self._close_requested or self.state not in (State.CONNECTING, State.ESTABLISHED):
            return 0
        return max(0, self.config.send_buffer - self._buffered)

    def messages(self, limit: int | None = None) -> list[bytes]:
        """Take the messages delivered so far (in order, each exactly once)."""
        out: list[bytes] = []
        ready = self._ready
        freed = 0
        while ready and (limit is None or len(out) < limit):
            message, segments = ready.popleft()
            out.append(message)
            freed += segments
        if freed:
            self._held -= freed
            edge = self.recv_edge
            adv = self._advertised_edge
            window = self.config.recv_window
            # tell the peer when its window was under half and grew, or grew by a quarter
            if edge > adv and (adv - self._rcv_nxt < window // 2 or edge - adv >= window // 4):
                self._ack_now = True
        return out

    @property
    def pending_messages(self) -> int:
        """Complete messages waiting in :meth:`messages`."""
        return len(self._ready)

    @property
    def at_eof(self) -> bool:
        """The peer closed its sending side and every message it sent has been taken."""
        return self._peer_finished and not self._ready

    @property
    def peer_finished(self) -> bool:
        """The peer's FIN arrived in order: it will send nothing more."""
        return self._peer_finished

    @property
    def finished(self) -> bool:
        """Nothing more will happen: FAILED (its RESET sent), or CLOSED and, for a
        server-side connection, its linger over. A driver may drop a finished
        connection; a client is finished as soon as it is CLOSED."""
        if self.state is State.FAILED:
            return self._reset is None
        return self.state is State.CLOSED and self._linger_until is None

    @property
    def fin_acked(self) -> bool:
        """Our FIN was sent and acknowledged: the peer has every message we sent."""
        return self._fin_seq is not None and self._snd_una > self._fin_seq

    @property
    def data_acked(self) -> bool:
        """Our FIN was sent and every message before it is acknowledged (the FIN's own
        ack may still be missing)."""
        return self._fin_seq is not None and self._snd_una >= self._fin_seq

    @property
    def max_message(self) -> int:
        """The largest message :meth:`send` accepts (negotiated once established)."""
        return self._max_message

    def close(self) -> None:
        """Graceful close: queued messages are delivered, then a FIN. Idempotent."""
        if self._close_requested:
            return
        self._close_requested = True
        self._transition(Event.CLOSE)

    def request_ack(self) -> None:
        """The application waits for delivery (a flush, a lingering close, a handshake).
        If everything is sent and only the peer's (delayed) ack is missing, ask for it
        at once with an ACK_NOW ping, which saves up to ``ack_delay``. One ping per
        flight: a lost ping is covered by the retransmission timer, whose segments ask
        for an immediate ack themselves."""
        if (
            self.state in (State.ESTABLISHED, State.CLOSING)
            and self._snd_una < self._snd_nxt
            and self._snd_una >= self._asked_edge
            and not self._queue
            and not self._lost
        ):
            self._ping = True
            self._asked_edge = self._snd_nxt

    def abort(self, reason: str = "aborted by the application") -> None:
        """Fail at once, dropping undelivered data, and tell the peer with a RESET."""
        if self.state in (State.CLOSED, State.FAILED):
            return
        self._fail(ChannelClosed(reason), ResetCode.ABORT, reason)

    def statistics(self) -> ReliableStatistics:
        s = self._stats
        s.srtt, s.rttvar, s.rto, s.cwnd = self._srtt, self._rttvar, self._rto, self._cwnd
        s.peer_window = max(0, self._peer_edge - self._snd_nxt)
        s.recv_window = self.recv_edge - self._rcv_nxt
        s.in_flight = self._in_flight
        return replace(s)

    # -- introspection (tests check invariants with these) ------------------------------

    @property
    def snd_una(self) -> int:
        """Oldest unacknowledged sequence number (unbounded)."""
        return self._snd_una

    @property
    def snd_nxt(self) -> int:
        """Next sequence number to assign (unbounded)."""
        return self._snd_nxt

    @property
    def rcv_nxt(self) -> int:
        """Next sequence number expected from the peer (unbounded)."""
        return self._rcv_nxt

    @property
    def peer_edge(self) -> int:
        """The peer's window right edge: we may send seq < peer_edge."""
        return self._peer_edge

    @property
    def recv_edge(self) -> int:
        """Our window right edge: we accept seq < recv_edge."""
        return self._rcv_nxt + self.config.recv_window - self._held

    @property
    def send_buffered(self) -> int:
        """Bytes held for sending: queued messages plus unacknowledged segments."""
        return self._buffered

    @property
    def recv_buffered(self) -> int:
        """Segments held for receiving: out of order, in reassembly, unread."""
        return self._held + len(self._ooo)

    @property
    def reassembly_bytes(self) -> int:
        return self._parts_size

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def cwnd(self) -> float:
        return self._cwnd

    @property
    def rto(self) -> float:
        return self._rto

    @property
    def max_datagram(self) -> int:
        """The largest datagram this side sends (negotiated once established)."""
        return self._max_out

    # -- the network side ---------------------------------------------------------------

    def receive_datagram(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed one datagram from the peer (as received; it is checked here)."""
        if len(data) > self.config.max_datagram:
            self._stats.malformed_dropped += 1
            return
        if not verify_crc(data):
            self._stats.corrupt_dropped += 1
            return
        try:
            d = decode_datagram(data, verify=False)
        except FrameError:
            self._stats.malformed_dropped += 1
            return
        self.receive_parsed(d, now)

    def receive_parsed(self, d: Datagram, now: float) -> None:
        """Feed one datagram already checked and decoded (the server does that)."""
        st = self._stats
        t = d.type
        if self.state is State.FAILED or self.finished:
            st.stray_dropped += 1
            return
        if t == Type.SYN:  # only a server gets them, routed by (address, client id)
            if self.role == "server" and self.state is State.CONNECTING:
                self._hs_send = True
                self._hs_retransmitted = True  # two SYN_ACKs in flight: no RTT sample
                st.datagrams_received += 1
            else:
                st.duplicates_dropped += 1
            return
        if d.conn != self.local_id:
            st.stray_dropped += 1
            return
        if t == Type.RESET:
            client_connecting = self.role == "client" and self.state is State.CONNECTING
            if self.state is State.CLOSED or (client_connecting and d.seq != self._isn):
                st.stray_dropped += 1  # too late to matter, or not an answer to our SYN
                return
            st.datagrams_received += 1
            self._on_reset(d)
            return
        if self.state is State.CONNECTING:
            if self.role == "client":
                self._client_handshake(d, now)
                return
            if t in (Type.COOKIE, Type.SYN_ACK):
                st.malformed_dropped += 1
                return
            # server: the first datagram on our id proves the client got the SYN_ACK
            if self._hs_sent_at is not None and not self._hs_retransmitted:
                self._rtt_sample(now - self._hs_sent_at)
            self._established(now)
        elif t in (Type.COOKIE, Type.SYN_ACK):
            if t == Type.SYN_ACK and self.role == "client":
                self._ack_now = True  # the server is still half-open: it needs our ack
                st.datagrams_received += 1
            else:
                st.duplicates_dropped += 1
            self._last_heard = now
            return
        if self.state is State.CLOSED:
            st.datagrams_received += 1
            self._last_heard = now
            if t != Type.ACK:
                st.duplicates_dropped += 1  # everything arrived before we closed
            if t != Type.ACK or d.flags & Flag.ACK_NOW:
                self._ack_now = True  # a retransmitted FIN or a probe: our ack was lost
            return
        if not self._on_ack(d, now):
            st.malformed_dropped += 1  # it acks what we never sent
            return
        st.datagrams_received += 1
        self._last_heard = now
        if t != Type.ACK:
            self._on_segment(d, now)
        elif d.flags & Flag.ACK_NOW:
            self._ack_now = True
        if d.flags & Flag.CLOSED and self.role == "client":
            self._peer_closed = True
        if self.error is None:
            self._maybe_close_done(now)

    def may_move_to(self, d: Datagram) -> bool:
        """True when ``d``, arriving from an address other than the peer's, proves to be
        this connection's next word, so the peer's address may change to its source.

        It must be an ACK, DATA or FIN (never a handshake datagram or a RESET) for our
        connection id, of an ESTABLISHED or CLOSING connection; its ack must lie between
        what the peer acknowledged already and what we sent (``snd_una..snd_nxt``), and a
        segment's sequence number inside our receive window (or just below it: a
        retransmission). Guessing that takes the 32-bit id and both 32-bit sequence
        spaces; the CRC32C was checked before. An on-path attacker can do more than this
        anyway: the protocol authenticates nobody (docs/reliable.md, Limits).
        """
        if self.state not in (State.ESTABLISHED, State.CLOSING) or d.conn != self.local_id:
            return False
        if d.type not in (Type.ACK, Type.DATA, Type.FIN):
            return False
        ack = _unwrap(d.ack, self._snd_una)
        if not self._snd_una <= ack <= self._snd_nxt:
            return False
        if d.type == Type.ACK:
            return True
        seq = _unwrap(d.seq, self._rcv_nxt)
        return self._rcv_nxt - self.config.recv_window <= seq < self.recv_edge

    def next_deadline(self) -> float | None:
        """When :meth:`on_timeout` (or :meth:`datagrams_to_send`) next has work."""
        best: float | None = None
        for t in self._deadlines():
            if t is not None and (best is None or t < best):
                best = t
        return best

    def _deadlines(self) -> tuple[float | None, ...]:
        state = self.state
        if state is State.FAILED:
            return ()
        if state is State.CLOSED:
            return (self._linger_until, self._repeat_deadline)
        if state is State.CONNECTING:
            return (self._hs_deadline, self._created + self.config.handshake_timeout)
        return (
            self._rto_deadline,
            self._loss_deadline,
            self._persist_deadline,
            self._ack_deadline,
            self._keepalive_deadline(),
            self._last_heard + self.config.dead_peer_timeout,
        )

    def _keepalive_deadline(self) -> float | None:
        if self._outstanding or self._persist_deadline is not None:
            return None  # retransmissions and probes already make the peer answer
        return max(self._last_heard, self._last_ping) + self.config.keepalive_interval

    def on_timeout(self, now: float) -> None:
        """Run every timer due at ``now``."""
        state = self.state
        cfg = self.config
        if state is State.FAILED:
            return
        if state is State.CLOSED:
            if self._linger_until is not None and now >= self._linger_until:
                self._linger_until = None
                self._repeat_deadline = None
            if self._repeat_deadline is not None and now >= self._repeat_deadline:
                self._ack_now = True
                self._ack_repeats -= 1
                self._ack_gap *= 2
                self._repeat_deadline = now + self._ack_gap if self._ack_repeats > 0 else None
            return
        if state is State.CONNECTING:
            if now >= self._created + cfg.handshake_timeout:
                what = "a SYN_ACK" if self.role == "client" else "the client's first ack"
                self._fail(
                    Timeout(
                        f"reliable handshake: no {what} within {cfg.handshake_timeout} s "
                        f"(handshake_timeout)"
                    ),
                    None,
                )
                return
            if self._hs_deadline is not None and now >= self._hs_deadline:
                self._hs_send = True
                self._hs_retransmitted = True
                self._rto = min(self._rto * 2, cfg.max_rto)
                self._hs_deadline = None
            return
        if now >= self._last_heard + cfg.dead_peer_timeout:
            self._dead_peer(now)
            return
        if self._loss_deadline is not None and now >= self._loss_deadline:
            self._loss_deadline = None
            self._detect_losses(now)
        if self._rto_deadline is not None and now >= self._rto_deadline:
            self._on_rto(now)
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._persist_deadline = None
            self._ping = True
            self._persist_backoff += 1
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._ack_deadline = None
            self._ack_now = True
        keepalive = self._keepalive_deadline()
        if keepalive is not None and now >= keepalive:
            self._ping = True
            self._last_ping = now

    def datagrams_to_send(self, now: float, limit: int | None = None) -> list[bytes]:
        """Run due timers, then return the datagrams to send now (at most ``limit``)."""
        self.on_timeout(now)
        out: list[bytes] = []
        state = self.state
        if state is State.FAILED:
            if self._reset is not None:
                code, reason = self._reset
                self._reset = None
                if self.remote_id:
                    out.extend([self._reset_datagram(code, reason)] * RESET_COPIES)
                    self._stats.datagrams_sent += RESET_COPIES
            return out
        if state is State.CONNECTING:
            if self._hs_send:
                self._hs_send = False
                out.append(self._handshake_datagram())
                self._hs_sent_at = now
                self._hs_deadline = now + self._rto
            self._stats.datagrams_sent += len(out)
            return out
        room = -1 if limit is None else limit
        if state is not State.CLOSED:
            self._send_segments(now, out, room)
        if (self._ack_now or self._ping) and (not out) and room != 0:
            out.append(self._ack_datagram(Flag.ACK_NOW if self._ping else 0))
            self._stats.acks_sent += 1
            if self._ping:
                self._last_ping = now
            self._ping = False
        self._stats.datagrams_sent += len(out)
        self._update_persist(now)
        return out

    # -- handshake ----------------------------------------------------------------------

    def _handshake_datagram(self) -> bytes:
        cfg = self.config
        if self.role == "client":
            hello = cfg.hello(self.local_id, self._cookie)
            return _encode(Type.SYN, 0, self._isn, 0, cfg.recv_window, payload=hello.encode())
        return _encode(
            Type.SYN_ACK,
            self.remote_id,
            self._isn,
            self._rcv_nxt,
            cfg.recv_window,
            payload=cfg.hello(self.local_id).encode(),
        )

    def _client_handshake(self, d: Datagram, now: float) -> None:
        st = self._stats
        if d.type == Type.COOKIE and d.seq == self._isn:
            st.datagrams_received += 1
            self._cookie = d.payload
            self._hs_send = True  # answer at once: the cookie proves nothing is lost
            self._hs_retransmitted = False
            return
        if d.type != Type.SYN_ACK or d.ack != self._isn:
            st.stray_dropped += 1
            return
        try:
            hello = Hello.decode(d.payload)
        except HandshakeError as exc:
            st.datagrams_received += 1
            self._fail(exc, ResetCode.PROTOCOL, str(exc))
            return
        st.datagrams_received += 1
        self._last_heard = now
        if self._hs_sent_at is not None and not self._hs_retransmitted:
            self._rtt_sample(now - self._hs_sent_at)
        self._adopt_hello(hello, d.seq)
        self._established(now)
        self._ack_now = True  # so the server leaves half-open even if we have nothing to say

    def _adopt_hello(self, hello: Hello, peer_isn: int) -> None:
        cfg = self.config
        self.remote_id = hello.conn_id
        self._rcv_nxt = peer_isn
        self._advertised_edge = peer_isn
        self._max_out = min(cfg.max_datagram, hello.max_datagram)
        # a smaller peer datagram (at least MIN_DATAGRAM) may leave room for fewer blocks
        self._sack_max = min(cfg.max_sack_blocks, (self._max_out - OVERHEAD - 32) // 8)
        self._payload = self._max_out - OVERHEAD - 8 * self._sack_max
        self._peer_edge = self._isn + hello.recv_window
        self._cwnd_cap = float(max(hello.recv_window, cfg.initial_cwnd))
        self._max_message = min(
            cfg.max_message,
            hello.max_message,
            hello.recv_window * self._payload,
            MAX_FRAGMENTS * self._payload,
        )

    def _established(self, now: float) -> None:
        self._hs_deadline = None
        self._hs_send = False
        self._last_heard = now
        self._last_ping = now
        self._transition(Event.HANDSHAKE_DONE)
        for message in self._queue:
            n = len(message)
            if n > self._max_message:
                self._fail(
                    MessageTooLarge(
                        f"a queued {n}-byte message exceeds the peer's limit of "
                        f"{self._max_message} bytes"
                    ),
                    ResetCode.PROTOCOL,
                    "message over the peer's limit",
                )
                return
        if self._close_requested:
            self._transition(Event.CLOSE)

    # -- sending ------------------------------------------------------------------------

    def _sack_blocks(self) -> list[tuple[int, int]]:
        n = self._sack_max
        ranges = self._ooo_ranges
        if not n or not ranges:
            return []
        recent = ranges.containing(self._last_ooo)
        blocks = [recent] if recent is not None else []
        for block in ranges:
            if len(blocks) >= n:
                break
            if block != recent:
                blocks.append(block)
        return blocks

    def _ack_fields(self) -> tuple[int, int, list[tuple[int, int]]]:
        """(ack, window, sacks) for an outgoing datagram; it carries our ack, so the
        delayed-ack state resets."""
        edge = self.recv_edge
        self._advertised_edge = max(self._advertised_edge, edge)
        self._ack_now = False
        self._ack_pending = 0
        self._ack_deadline = None
        return self._rcv_nxt, edge - self._rcv_nxt, self._sack_blocks()

    def _ack_datagram(self, flags: int) -> bytes:
        if self.state is State.CLOSED:
            flags |= Flag.CLOSED
        ack, window, sacks = self._ack_fields()
        return _encode(Type.ACK, self.remote_id, self._snd_nxt, ack, window, flags, sacks=sacks)

    def _segment_datagram(self, seg: _Seg, flags: int) -> bytes:
        ack, window, sacks = self._ack_fields()
        return _encode(
            seg.kind,
            self.remote_id,
            seg.seq,
            ack,
            window,
            flags | seg.flags,
            seg.frag,
            seg.nfrag,
            sacks,
            seg.payload,
        )

    def _transmit(self, seg: _Seg, now: float, out: list[bytes], flags: int) -> None:
        self._xmit += 1
        seg.xmit = self._xmit
        seg.sent = now
        self._in_flight += 1
        out.append(self._segment_datagram(seg, flags))
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rto

    def _send_segments(self, now: float, out: list[bytes], room: int) -> None:
        st = self._stats
        outstanding = self._outstanding
        lost = self._lost
        # retransmissions first, oldest first
        while lost and self._in_flight < self._cwnd and room != 0:
            seq = heapq.heappop(lost)
            seg = outstanding.get(seq)
            if seg is None or not seg.lost:
                continue
            seg.lost = False
            seg.retransmitted = True
            st.retransmitted += 1
            self._transmit(seg, now, out, Flag.ACK_NOW)
            room -= 1
        # new segments while the congestion and flow windows allow
        while (
            self._in_flight < self._cwnd
            and self._snd_nxt < self._peer_edge
            and room != 0
            and self._fin_seq is None
        ):
            seg = self._next_segment()
            if seg is None:
                break
            outstanding[seg.seq] = seg
            self._snd_nxt += 1
            st.segments_sent += 1
            if seg.msgs:
                self._msgs_cut += seg.msgs
                self._msg_marks.append((seg.seq, self._msgs_cut))
            # ask for an immediate ack when nothing more can follow soon: the window is
            # used up, or too few segments fit in flight for the peer's ack batching
            stall = self._snd_nxt >= self._peer_edge or self._cwnd < 2 * self.config.ack_every
            self._transmit(seg, now, out, Flag.ACK_NOW if stall else 0)
            room -= 1

    def _next_segment(self) -> _Seg | None:
        queue = self._queue
        if not queue:
            if self.state is State.CLOSING and self._fin_seq is None:
                self._fin_seq = self._snd_nxt
                return _Seg(self._snd_nxt, Type.FIN, 0, 0, b"")
            return None
        head = queue[0]
        size = self._payload
        if self._q_frag == 0:
            if len(queue) > 1 and len(head) + len(queue[1]) + 8 <= size:
                return self._bundle()
            self._q_nfrag = max(1, -(-len(head) // size))
        off = self._q_off
        chunk = head[off : off + size]
        last = self._q_frag + 1 == self._q_nfrag
        seg = _Seg(self._snd_nxt, Type.DATA, self._q_frag, self._q_nfrag, chunk, msgs=int(last))
        self._q_frag += 1
        if self._q_frag == self._q_nfrag:
            queue.popleft()
            self._q_off = self._q_frag = 0
        else:
            self._q_off = off + size
        return seg

    def _bundle(self) -> _Seg:
        """Several small queued messages in one segment (they were waiting anyway: no
        delay is ever added to make a bundle)."""
        queue = self._queue
        room = self._payload
        parts: list[bytes] = []
        cost = 0
        pack = _BUNDLE_LEN.pack
        while queue and len(queue[0]) + 4 <= room:
            message = queue.popleft()
            parts.append(pack(len(message)))
            parts.append(message)
            room -= len(message) + 4
            cost += len(message)
        return _Seg(
            self._snd_nxt, Type.DATA, 0, 1, b"".join(parts), Flag.BUNDLE, cost, len(parts) // 2
        )

    def _update_persist(self, now: float) -> None:
        """Arm the persist timer when data waits for a window that is closed and nothing
        in flight will bring an update, or a client waits for the server's CLOSED."""
        blocked = self._confirming or (
            self.state in (State.ESTABLISHED, State.CLOSING)
            and self._snd_nxt >= self._peer_edge
            and not self._outstanding
            and bool(self._queue or (self.state is State.CLOSING and self._fin_seq is None))
        )
        if not blocked:
            self._persist_deadline = None
            self._persist_backoff = 0
        elif self._persist_deadline is None:
            wait = min(self._rto * (1 << min(self._persist_backoff, 16)), self.config.max_rto)
            self._persist_deadline = now + wait

    def final_ack(self) -> bytes:
        """An ACK saying everything this CLOSED connection knows (flagged CLOSED); the
        server keeps it after forgetting the connection."""
        if self.state is not State.CLOSED:
            raise ValueError("only a CLOSED connection has a final ack")
        ack, window, _ = self._ack_fields()
        return _encode(Type.ACK, self.remote_id, self._snd_nxt, ack, window, Flag.CLOSED)

    def _reset_datagram(self, code: int, reason: str) -> bytes:
        text = reason.encode("utf-8", "replace")[:MAX_REASON]
        return _encode(
            Type.RESET,
            self.remote_id,
            self._snd_nxt,
            self._rcv_nxt,
            0,
            payload=bytes([code]) + text,
        )

    # -- acknowledgements we receive ----------------------------------------------------

    def _on_ack(self, d: Datagram, now: float) -> bool:
        """Process the ack part of ``d``; False if ``d`` must be ignored entirely."""
        una = self._snd_una
        ack = _unwrap(d.ack, una)
        if ack > self._snd_nxt:
            return False
        edge = ack + d.window
        if edge > self._peer_edge:
            self._peer_edge = edge
        outstanding = self._outstanding
        newly: list[_Seg] = []
        if ack > una:
            pop = outstanding.pop
            for seq in range(una, ack):
                seg = pop(seq, None)
                if seg is not None:
                    newly.append(seg)
            self._snd_una = ack
            self._sacked.discard_below(ack)
            marks = self._msg_marks
            while marks and marks[0][0] < ack:  # messages acked in order: delivered
                self._stats.messages_acked = marks.popleft()[1]
        nxt = self._snd_nxt
        for start_w, end_w in d.sacks:
            start = _unwrap(start_w, ack)
            end = start + ((end_w - start_w) & _MASK)
            start = max(start, self._snd_una)
            end = min(end, nxt)
            if start >= end:
                continue
            for a, b in self._sacked.add(start, end):
                for seq in range(a, b):
                    seg = outstanding.pop(seq, None)
                    if seg is not None:
                        newly.append(seg)
        if not newly:
            if ack > una:  # it acked only segments SACKed before
                self._restart_rto(now)
                if not outstanding:
                    self._loss_deadline = None
            return True
        st = self._stats
        st.acked += len(newly)
        sample: _Seg | None = None
        for seg in newly:
            if not seg.lost:
                self._in_flight -= 1
            self._buffered -= seg.cost
            if not seg.retransmitted and (sample is None or seg.xmit > sample.xmit):
                sample = seg
        if sample is not None:
            self._rtt_sample(now - sample.sent)
            if sample.xmit > self._largest_acked_xmit:
                self._largest_acked_xmit = sample.xmit
                self._largest_acked_seq = sample.seq
        self._grow_cwnd(len(newly))
        if ack > una:
            self._restart_rto(now)
            self._persist_backoff = 0
        self._detect_losses(now)
        if not outstanding:
            self._rto_deadline = None
            self._loss_deadline = None
        return True

    def _restart_rto(self, now: float) -> None:
        self._rto_deadline = now + self._rto if self._outstanding else None

    def _rtt_sample(self, rtt: float) -> None:
        cfg = self.config
        rtt = max(rtt, 0.0)
        self._latest_rtt = rtt
        if self._srtt is None or self._rttvar is None:
            self._srtt = rtt
            self._rttvar = rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        rto = self._srtt + max(_GRANULARITY, 4 * self._rttvar)
        self._rto = min(max(rto, cfg.min_rto), cfg.max_rto)

    def _grow_cwnd(self, acked: int) -> None:
        if not self.config.congestion_control:
            return
        cwnd = self._cwnd
        if cwnd < self._ssthresh:
            cwnd += acked
        else:
            cwnd += acked / cwnd
        self._cwnd = min(cwnd, self._cwnd_cap)

    def _detect_losses(self, now: float) -> None:
        largest = self._largest_acked_xmit
        if largest < 0:
            return
        delay = max(_TIME_THRESHOLD * max(self._srtt or 0.0, self._latest_rtt), _GRANULARITY)
        limit_seq = self._largest_acked_seq
        earliest: float | None = None
        newly_lost = 0
        for seq, seg in self._outstanding.items():
            if seq > limit_seq:
                break
            if seg.lost or seg.xmit >= largest:
                continue
            if largest - seg.xmit >= _PACKET_THRESHOLD or seg.sent + delay <= now:
                self._mark_lost(seg)
                newly_lost += 1
            else:
                at = seg.sent + delay
                if earliest is None or at < earliest:
                    earliest = at
        self._loss_deadline = earliest
        if newly_lost:
            self._stats.losses_detected += newly_lost

    def _mark_lost(self, seg: _Seg) -> None:
        seg.lost = True
        self._in_flight -= 1
        heapq.heappush(self._lost, seg.seq)
        if self.config.congestion_control and seg.xmit > self._recovery_xmit:
            self._ssthresh = max(self._cwnd / 2, 2.0)
            self._cwnd = self._ssthresh
            self._recovery_xmit = self._xmit

    def _on_rto(self, now: float) -> None:
        cfg = self.config
        if not self._outstanding:
            self._rto_deadline = None
            return
        self._stats.timeouts += 1
        self._rto = min(self._rto * 2, cfg.max_rto)
        for seg in self._outstanding.values():
            if not seg.lost:
                self._mark_lost(seg)
        if cfg.congestion_control:
            self._cwnd = 1.0
        self._recovery_xmit = self._xmit
        self._loss_deadline = None
        self._rto_deadline = now + self._rto

    # -- segments we receive ------------------------------------------------------------

    def _on_segment(self, d: Datagram, now: float) -> None:
        st = self._stats
        rcv = self._rcv_nxt
        seq = _unwrap(d.seq, rcv)
        if seq < rcv or seq in self._ooo:
            st.duplicates_dropped += 1
            self._ack_now = True  # the peer may have missed our ack
            return
        if seq >= self.recv_edge:
            st.window_dropped += 1
            self._ack_now = True
            return
        fin = self._peer_fin
        is_fin = d.type == Type.FIN
        if (fin is not None and seq > fin) or (is_fin and (self._ooo_ranges.last_end() or 0) > seq):
            self._violation("data after the FIN")
            return
        if is_fin:
            self._peer_fin = seq
        if seq != rcv:
            self._ooo[seq] = (d.type, d.flags, d.frag, d.nfrag, d.payload)
            self._ooo_ranges.add(seq, seq + 1)
            self._last_ooo = seq
            st.out_of_order_buffered += 1
            self._ack_now = True
            return
        had_gap = bool(self._ooo)
        self._deliver(d.type, d.flags, d.frag, d.nfrag, d.payload)
        rcv += 1
        ooo = self._ooo
        while ooo and rcv in ooo and self.state is not State.FAILED:
            self._deliver(*ooo.pop(rcv))
            rcv += 1
        self._rcv_nxt = rcv
        self._ooo_ranges.discard_below(rcv)
        if had_gap or is_fin or d.flags & Flag.ACK_NOW or self._peer_finished:
            self._ack_now = True
            return
        self._ack_pending += 1
        if self._ack_pending >= self.config.ack_every:
            self._ack_now = True
        elif self._ack_deadline is None:
            self._ack_deadline = now + self.config.ack_delay

    def _deliver(self, type_: int, flags: int, frag: int, nfrag: int, payload: bytes) -> None:
        """One segment, in order: append it to the message being reassembled."""
        if type_ == Type.FIN or flags & Flag.BUNDLE:
            if self._parts or self._next_frag:
                self._violation("a FIN or a bundle inside a fragmented message")
                return
            if type_ == Type.FIN:
                self._peer_finished = True
            else:
                self._unbundle(payload)
            return
        if frag != self._next_frag or (frag and nfrag != self._nfrag):
            self._violation(
                f"fragment {frag}/{nfrag} where {self._next_frag}/{self._nfrag or nfrag} belongs"
            )
            return
        if frag == 0:
            self._nfrag = nfrag
        self._parts_size += len(payload)
        if self._parts_size > self.config.max_message:
            self._violation(f"a message over max_message ({self.config.max_message} bytes)")
            return
        self._parts.append(payload)
        self._held += 1
        if frag + 1 < nfrag:
            self._next_frag = frag + 1
            return
        parts = self._parts
        message = parts[0] if len(parts) == 1 else b"".join(parts)
        self._ready.append((message, nfrag))
        self._stats.messages_received += 1
        self._stats.bytes_received += len(message)
        self._parts = []
        self._parts_size = 0
        self._next_frag = 0
        self._nfrag = 0

    def _unbundle(self, payload: bytes) -> None:
        messages = []
        pos, end = 0, len(payload)
        view = memoryview(payload)
        while pos < end:
            if end - pos < 4:
                self._violation("a bundle with a truncated length")
                return
            (n,) = _BUNDLE_LEN.unpack_from(payload, pos)
            pos += 4
            if n > end - pos or n > self.config.max_message:
                self._violation("a bundle whose lengths overrun it or max_message")
                return
            messages.append(bytes(view[pos : pos + n]))
            pos += n
        if not messages:
            self._violation("an empty bundle")
            return
        st = self._stats
        ready = self._ready
        for message in messages[:-1]:
            ready.append((message, 0))
        ready.append((messages[-1], 1))  # the segment is freed with its last message
        self._held += 1
        st.messages_received += len(messages)
        st.bytes_received += sum(len(m) for m in messages)

    # -- endings ------------------------------------------------------------------------

    def _maybe_close_done(self, now: float) -> None:
        if not (
            self.state is State.CLOSING
            and self._peer_finished
            and self._fin_seq is not None
            and self._snd_una > self._fin_seq
        ):
            return
        # Both directions are done. A server closes now and lingers; a client first
        # waits for the server to say it is CLOSED (so it never leaves a server unsure
        # whether its data arrived), pinging until it does.
        if self.role == "server" or self._peer_closed:
            self._closed(now)
        elif not self._confirming:
            self._confirming = True
            self._ping = True

    def _closed(self, now: float) -> None:
        self._transition(Event.CLOSE_DONE)
        # only a server lingers: a client closes once the server said it is closed
        linger = self.config.linger if self.role == "server" else 0.0
        self._linger_until = now + linger if linger else None
        # The ack that closed us may be the peer's last word: if it is lost the peer is
        # left unsure its data arrived. Repeat it twice, unasked, while we linger.
        self._ack_repeats = 2
        self._ack_gap = max(self._srtt or 0.0, self.config.min_rto)
        self._repeat_deadline = now + self._ack_gap
        self._rto_deadline = self._loss_deadline = self._persist_deadline = None
        self._outstanding.clear()
        self._lost.clear()
        self._in_flight = 0

    def _dead_peer(self, now: float) -> None:
        cfg = self.config
        if (
            self.state is State.CLOSING
            and self._peer_finished
            and self._fin_seq is not None
            and self._snd_una >= self._fin_seq
        ):
            # Everything both ways arrived; only the ack of our FIN is missing. The peer
            # got its data and its FIN acked, so it closed and stopped lingering.
            self._closed(now)
            self._linger_until = None
            return
        self._fail(
            Timeout(
                f"the peer sent nothing for {cfg.dead_peer_timeout} s (dead_peer_timeout); "
                "it is gone or the path is cut"
            ),
            None,
        )

    def _on_reset(self, d: Datagram) -> None:
        code = d.payload[0]
        reason = d.payload[1:].decode("utf-8", "replace")
        cls, text = _RESET_ERRORS.get(code, (ProtocolError, "the peer reset the connection"))
        self._fail(cls(f"{text}: {reason}" if reason else text), None)

    def _violation(self, what: str) -> None:
        error = ProtocolError(f"the peer violated the protocol: {what}")
        self._fail(error, ResetCode.PROTOCOL, what)

    def _fail(self, exc: BuzonError, code: int | None, reason: str = "") -> None:
        if self.state is State.FAILED:
            return
        self._transition(Event.FAIL)
        self.error = exc
        if code is not None:
            self._reset = (code, reason)
        # every message accepted by send() and not acknowledged in order is lost, and known
        # to be: a SACKed message behind a gap never reaches the peer's application either
        st = self._stats
        st.messages_lost = st.messages_sent - st.messages_acked
        self._msg_marks.clear()
        # free what can no longer be delivered; messages already complete stay readable
        self._queue.clear()
        self._outstanding.clear()
        self._lost.clear()
        self._ooo.clear()
        self._parts = []
        self._buffered = 0
        self._in_flight = 0
        self._rto_deadline = self._loss_deadline = self._persist_deadline = None
        self._ack_deadline = self._hs_deadline = None

    def _transition(self, event: Event) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise AssertionError(f"reliable: no transition from {self.state} on {event}")
        self.state = new

    def __repr__(self) -> str:
        return (
            f"<ReliableConnection {self.role} {self.local_id:#010x}->{self.remote_id:#010x} "
            f"{self.state.value}>"
        )
