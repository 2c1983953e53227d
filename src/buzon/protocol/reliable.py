"""Reliable datagrams: a sans-IO protocol that turns a lossy datagram link into a channel.

UDP and Unix datagram sockets keep message boundaries but may lose, duplicate, reorder
or (UDP) damage datagrams, and a message must fit one datagram. This module adds, on
top of any such link, what the issue asks for and nothing the link cannot carry:
a connection handshake with connection ids, sequence numbers, selective acks,
retransmission driven by an RTT estimate, duplicate suppression, in-order delivery,
a CRC32C on every datagram, a receiver-advertised window with bounded buffers on both
sides, batched acks, and messages larger than one datagram (fragmented and reassembled).

Sans-IO: datagrams in, datagrams out, time is an input (``now`` on every call) and the
next deadline an output. Randomness (connection ids, initial sequence numbers, the
cookie secret) is an input too: pass ``os.urandom`` in production, a seeded
``random.Random().randbytes`` in tests. Nothing here waits, reads a clock, or touches
a socket. Two classes:

* :class:`ReliableConnection`: one end of one connection (a client, or a server-side
  peer made by the server).
* :class:`ReliableServer`: the demultiplexer behind one listening socket. It answers
  new peers statelessly until they prove they receive at their address (a cookie),
  caps half-open and total connections, routes datagrams by connection id and peer
  address, and hands established connections to :meth:`ReliableServer.accept`.

A driver's loop, for either class::

    conn.receive_datagram(data, now)            # server.receive_datagram(data, addr, now)
    for datagram in conn.datagrams_to_send(now):  # runs expired timers first
        sock.send(datagram)
    wake_at = conn.next_deadline()              # None: nothing to wake for
    messages = conn.messages()

Call :meth:`~ReliableConnection.datagrams_to_send` after every input (a datagram, a
``send``, a ``close``, taking messages, or reaching the deadline). After it,
:meth:`~ReliableConnection.next_deadline` is always in the future (a server's may be
``-inf`` when it has replies or connections to forget: call it again). A graceful
close is complete when the state is CLOSED; a client may then drop everything, while
the server keeps running for the others (and for its tombstones).

Datagram format
---------------
Every datagram, of every type, is one header, its SACK blocks, its payload and a
CRC32C (all integers little-endian, sequence numbers are u32 and wrap)::

    offset   size   field
    0        1      version        0x01; anything else is dropped (FrameError)
    1        1      type           1 SYN, 2 COOKIE, 3 SYN_ACK, 4 DATA, 5 ACK, 6 FIN, 7 RESET
    2        1      flags          bit 0 ACK_NOW: acknowledge at once
                                   bit 1 CLOSED: the sender is closed (see Close)
                                   bit 2 BUNDLE: DATA carrying several whole messages
                                   bits 3-7: zero
    3        1      nsack          number of SACK blocks that follow the header
    4        4      conn id        the *receiver's* connection id (0 only in a SYN)
    8        4      seq            DATA/FIN: this segment's sequence number
                                   SYN/SYN_ACK: the sender's initial sequence number
                                   COOKIE/RESET: echoes the SYN's or the peer's seq
    12       4      ack            cumulative ack: every seq below it has arrived
    16       4      window         receive window, in segments: the sender may use
                                   seq < ack + window (this right edge never shrinks)
    20       2      frag index     DATA: this fragment's index in its message (0-based)
    22       2      frag count     DATA: fragments in the message (1..65535); else 0
    24       4      payload length bytes of payload after the SACK blocks
    28       8*n    SACK blocks    n x (start u32, end u32): seqs [start, end) received
                                   above ``ack``; the most recently changed block first
    28+8n    len    payload        DATA: a fragment, or for BUNDLE (frag 0 of 1) whole
                                   messages, each as u32 length + bytes;
                                   SYN/SYN_ACK: the hello below;
                                   COOKIE: the 16-byte cookie; RESET: code u8 + reason
    end-4    4      CRC32C         over every byte before it

The hello (SYN and SYN_ACK payload, 32 bytes)::

    0   4   conn id        the id the sender wants to be addressed with (never 0)
    4   4   max datagram   the largest datagram it accepts, all headers included
    8   4   recv window    its receive buffer, in segments
    12  4   max message    the largest message it reassembles, in bytes
    16  16  cookie         SYN: the server's cookie echoed, or zeros; SYN_ACK: zeros

A datagram whose CRC32C does not match, that is shorter than 32 bytes, that is
malformed, too long, or addressed to an unknown connection id (or from another
address) is dropped and counted; it is never delivered. Type-specific rules (which
fields may be set, payload sizes) are the table :data:`DATAGRAM_RULES`.

Connection handshake (SYN-flood safe, 1 RTT more than TCP when cookies are on)::

    client                                           server (stateless until ➌)
    ➊ SYN {conn=0, seq=isn_c, hello(id_c, cookie=0)} ──▶
                                       ◀── ➋ COOKIE {conn=id_c, seq=isn_c, cookie}
    ➌ SYN {.., hello(id_c, cookie)}                 ──▶  cookie valid: state created
                       ◀── ➍ SYN_ACK {conn=id_c, seq=isn_s, ack=isn_c, hello(id_s)}
    client ESTABLISHED; every later datagram carries conn=id_s
    ➎ ACK or DATA {conn=id_s, ack=isn_s, ...}      ──▶  server ESTABLISHED, accept()

The cookie is a truncated HMAC-SHA256, under a secret only the server knows, of the
peer's address, its id, its ISN, its hello and a coarse timestamp; it proves the peer
receives at its address before the server keeps any state for it, so spoofed SYNs cost
one stateless reply each (a COOKIE is smaller than the SYN it answers: no amplification).
Half-open connections (after ➌, before ➎) are capped, and expire after
``handshake_timeout``. Stray datagrams are rejected by connection id and address; a
datagram of an older connection carries an id the server no longer knows.

Data transfer
-------------
* **Segments.** A message is cut into fragments of the negotiated payload size (its
  first fragment says how many follow); each fragment is a *segment* with its own
  sequence number. FIN is a segment too (no payload), so it arrives after all data.
  Internally sequence numbers are unbounded integers from the ISN; the wire carries
  them mod 2**32 and the receiver unwraps each to the value nearest the one it expects.
* **Bundles.** When small messages are already queued (the window or the congestion
  window held them back, or the application sent several before the driver flushed),
  as many as fit go in one BUNDLE segment. Nothing ever waits to fill a bundle, so
  latency is unchanged; under load it cuts the per-datagram cost (CRC, headers, acks)
  per message several times.
* **Acks.** The receiver acks cumulatively and reports up to ``max_sack_blocks``
  SACK ranges above the cumulative point. It acks at once on anything unusual (a
  segment out of order, a gap filled, a duplicate, a FIN, ACK_NOW) and otherwise every
  ``ack_every`` segments or ``ack_delay`` after the first unacked one. Data going the
  other way carries the ack for free. It never reneges on a SACKed segment, so the
  sender frees SACKed data at once.
* **Loss detection and retransmission.** A segment is lost when a segment sent at
  least 3 transmissions after it was acked, or when one sent after it was acked and
  ``9/8 max(srtt, latest rtt)`` has passed (reordering tolerance). Otherwise the
  retransmission timer (RTO) fires: RFC 6298 (SRTT, RTTVAR, RTO = SRTT + 4 RTTVAR,
  clamped to ``[min_rto, max_rto]``, doubled on each expiry), and every outstanding
  segment is retransmitted from slow start. **Karn's rule**: a segment that was ever
  retransmitted gives no RTT sample, and the backed-off RTO stays until one does.
* **Congestion.** NewReno-like: slow start from ``initial_cwnd`` segments, additive
  increase above ``ssthresh``, halved once per loss episode, back to 1 after an RTO.
  Never more in flight than the peer's window allows.
* **Flow control.** The receiver holds at most ``recv_window`` segments: out of order,
  in reassembly, and complete but not yet taken by the application (:meth:`messages`).
  It advertises ``recv_window - held in order``; while the application does not take
  messages the window closes and the sender stops. A sender facing a closed window
  probes it (an ACK_NOW ping) on the persist timer, so a lost window update never
  deadlocks. The sender holds at most ``send_buffer`` bytes: messages not yet sent plus
  segments not yet acked; :meth:`send` raises :class:`~buzon.errors.Full` beyond.
* **Liveness.** An idle connection pings every ``keepalive``; a peer silent for
  ``dead_peer_timeout`` fails the connection with :class:`~buzon.errors.Timeout`.

Close
-----
:meth:`ReliableConnection.close` is graceful: messages already sent are delivered
first, then a FIN. Both directions are done once our FIN is acked and the peer's FIN
has arrived. The last ack of such an exchange is never acknowledged itself (the two
generals), so one side must stay to repeat it; here that is always the server, whose
lingering costs a little memory in the demultiplexer and no process:

* a **server** is CLOSED as soon as both directions are done. It lingers ``linger``
  seconds, repeats its last ack twice unasked, re-acks whatever the client
  retransmits, and marks every datagram it sends then with the flag CLOSED. Then the
  demultiplexer forgets the connection but keeps a *tombstone* for
  ``dead_peer_timeout``: its id, peer address and that last ack (32 bytes), sent again
  for anything the client still retransmits, so even an outage longer than
  ``linger`` cannot leave the client unsure (TIME_WAIT, at a few hundred bytes);
* a **client** with both directions done waits for a datagram flagged CLOSED (it
  pings, with backoff, until one comes), then is CLOSED and may vanish at once: the
  server was told everything and needs nothing more from it.

If the confirmation never comes but everything both ways arrived, or if only the ack of
our FIN is missing (all our data acked, the peer's FIN in), the side still ends CLOSED
after ``dead_peer_timeout``: nothing was lost. A FAILED connection sends a RESET
saying why (unless the peer went silent), :data:`RESET_COPIES` times at once: nothing
is left to retransmit it, and it is often the only word the peer will get (a copy
that arrives after the first is dropped as stray). The states are :class:`State`, the
transitions the table :data:`TRANSITIONS`.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import math
import struct
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, replace
from enum import Enum, IntEnum

from ..errors import (
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
from .crc32c import crc32c

__all__ = [
    "DATAGRAM_RULES",
    "HEADER",
    "HELLO",
    "OVERHEAD",
    "RESET_COPIES",
    "TRANSITIONS",
    "VERSION",
    "Datagram",
    "Event",
    "Flag",
    "Hello",
    "ReliableConfig",
    "ReliableConnection",
    "ReliableServer",
    "ReliableStatistics",
    "ResetCode",
    "ServerStatistics",
    "State",
    "Type",
    "decode_datagram",
    "encode_datagram",
    "verify_crc",
]

VERSION = 1
HEADER = struct.Struct("<BBBBIIIIHHI")  # 28 bytes: see the byte table
_SACK = struct.Struct("<II")
_CRC = struct.Struct("<I")
HELLO = struct.Struct("<IIII16s")  # 32 bytes
COOKIE_SIZE = 16
OVERHEAD = HEADER.size + _CRC.size  # 32: every datagram's fixed cost
MIN_DATAGRAM = 128
MAX_FRAGMENTS = 0xFFFF
MAX_REASON = 64  # bytes of RESET reason text (a RESET answering a SYN is never larger)
RESET_COPIES = 3  # a RESET is sent this often at once: nothing ever retransmits it
_MASK = 0xFFFFFFFF
_HALF = 1 << 31
_PACKET_THRESHOLD = 3  # a segment is lost when one sent 3 transmissions later is acked
_TIME_THRESHOLD = 9 / 8
_GRANULARITY = 0.001  # the smallest timer interval this protocol reasons about
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack


class Type(IntEnum):
    SYN = 1
    COOKIE = 2
    SYN_ACK = 3
    DATA = 4
    ACK = 5
    FIN = 6
    RESET = 7


class Flag(IntEnum):
    ACK_NOW = 0x01  # acknowledge this datagram at once (a ping, a burst's end)
    CLOSED = 0x02  # the sender is CLOSED: it has everything and its FIN was acked
    BUNDLE = 0x04  # DATA: the payload is several whole messages, each u32-length-prefixed


_FLAGS_MASK = 0x07
_BUNDLE_LEN = struct.Struct("<I")


class ResetCode(IntEnum):
    PROTOCOL = 1  # the sender of the RESET saw a protocol violation
    REFUSED = 2  # a server refused a new connection (full)
    ABORT = 3  # the application aborted the connection


@dataclass(frozen=True, slots=True)
class _Rule:
    payload: tuple[int, int]  # inclusive bounds on the payload length
    sack: bool  # may carry SACK blocks
    fragments: bool  # frag index/count are meaningful (else both must be 0)
    conn_zero: bool  # conn id must be 0 (SYN) instead of non-zero


# Which fields each type may use. Anything else is a FrameError (the datagram is dropped).
DATAGRAM_RULES: dict[Type, _Rule] = {
    Type.SYN: _Rule((HELLO.size, HELLO.size), sack=False, fragments=False, conn_zero=True),
    Type.COOKIE: _Rule((COOKIE_SIZE, COOKIE_SIZE), sack=False, fragments=False, conn_zero=False),
    Type.SYN_ACK: _Rule((HELLO.size, HELLO.size), sack=False, fragments=False, conn_zero=False),
    Type.DATA: _Rule((0, _MASK), sack=True, fragments=True, conn_zero=False),
    Type.ACK: _Rule((0, 0), sack=True, fragments=False, conn_zero=False),
    Type.FIN: _Rule((0, 0), sack=True, fragments=False, conn_zero=False),
    Type.RESET: _Rule((1, 1 + MAX_REASON), sack=False, fragments=False, conn_zero=False),
}
_RULES_BY_INT = {int(t): r for t, r in DATAGRAM_RULES.items()}


# -- the wire format --------------------------------------------------------------------


@dataclass(slots=True)
class Datagram:
    """One decoded datagram; sequence fields are the u32 wire values."""

    type: int
    conn: int
    seq: int = 0
    ack: int = 0
    window: int = 0
    flags: int = 0
    frag: int = 0
    nfrag: int = 0
    sacks: tuple[tuple[int, int], ...] = ()
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Hello:
    """The SYN / SYN_ACK payload: who the sender is and what it accepts."""

    conn_id: int
    max_datagram: int
    recv_window: int
    max_message: int
    cookie: bytes = bytes(COOKIE_SIZE)

    def encode(self) -> bytes:
        return HELLO.pack(
            self.conn_id, self.max_datagram, self.recv_window, self.max_message, self.cookie
        )

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        conn_id, max_datagram, window, max_message, cookie = HELLO.unpack(payload)
        if not conn_id:
            raise HandshakeError("the peer's hello names connection id 0")
        if max_datagram < MIN_DATAGRAM or window < 1 or max_message < 1:
            raise HandshakeError(
                f"the peer's limits are unusable (max datagram {max_datagram}, "
                f"window {window}, max message {max_message})"
            )
        return cls(conn_id, max_datagram, window, max_message, cookie)


def _encode(
    type_: int,
    conn: int,
    seq: int,
    ack: int,
    window: int,
    flags: int = 0,
    frag: int = 0,
    nfrag: int = 0,
    sacks: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
    payload: bytes | memoryview = b"",
) -> bytes:
    head = _pack_header(
        VERSION,
        type_,
        flags,
        len(sacks),
        conn,
        seq & _MASK,
        ack & _MASK,
        window,
        frag,
        nfrag,
        len(payload),
    )
    if sacks:
        head += b"".join([_SACK.pack(a & _MASK, b & _MASK) for a, b in sacks])
    body = head + payload if payload else head
    return body + _CRC.pack(crc32c(body))


def encode_datagram(d: Datagram) -> bytes:
    """Encode ``d`` (no validation beyond what ``struct`` enforces; for tests and tools)."""
    return _encode(
        d.type, d.conn, d.seq, d.ack, d.window, d.flags, d.frag, d.nfrag, d.sacks, d.payload
    )


def verify_crc(data: bytes | bytearray | memoryview) -> bool:
    """True when ``data`` is long enough to be a datagram and its CRC32C matches."""
    n = len(data)
    if n < OVERHEAD:
        return False
    return bool(crc32c(memoryview(data)[: n - 4]) == _CRC.unpack_from(data, n - 4)[0])


def decode_datagram(data: bytes | bytearray | memoryview, *, verify: bool = True) -> Datagram:
    """Decode one datagram; every defect is a :class:`~buzon.errors.FrameError`.

    With ``verify=False`` the CRC is assumed checked already (:func:`verify_crc`).
    """
    n = len(data)
    if n < OVERHEAD:
        raise FrameError(f"a {n}-byte datagram is shorter than the {OVERHEAD}-byte minimum")
    if verify and not verify_crc(data):
        raise FrameError("CRC32C mismatch: the datagram was damaged")
    version, type_, flags, nsack, conn, seq, ack, window, frag, nfrag, length = _unpack_header(
        data, 0
    )
    if version != VERSION:
        raise FrameError(f"unsupported datagram version {version} (this side speaks {VERSION})")
    rule = _RULES_BY_INT.get(type_)
    if rule is None:
        raise FrameError(f"unknown datagram type {type_}")
    if flags & ~_FLAGS_MASK:
        raise FrameError(f"reserved flag bits set: {flags:#04x}")
    if HEADER.size + 8 * nsack + length + 4 != n:
        raise FrameError(
            f"lengths do not add up: {nsack} SACK blocks and {length} payload bytes "
            f"in a {n}-byte datagram"
        )
    name = Type(type_).name
    if not rule.payload[0] <= length <= rule.payload[1]:
        raise FrameError(f"a {name} datagram cannot carry {length} payload bytes")
    if nsack and not rule.sack:
        raise FrameError(f"a {name} datagram cannot carry SACK blocks")
    if rule.fragments:
        if nfrag < 1 or frag >= nfrag:
            raise FrameError(f"fragment {frag} of {nfrag} is impossible")
        if flags & Flag.BUNDLE and nfrag != 1:
            raise FrameError("a bundle of messages cannot be a fragment")
    elif frag or nfrag:
        raise FrameError(f"a {name} datagram has no fragment fields")
    elif flags & Flag.BUNDLE:
        raise FrameError(f"a {name} datagram cannot be a bundle")
    if (conn == 0) != rule.conn_zero:
        raise FrameError(f"a {name} datagram with connection id {conn}")
    sacks = []
    pos = HEADER.size
    for _ in range(nsack):
        start, end = _SACK.unpack_from(data, pos)
        if not 0 < (end - start) & _MASK < _HALF:
            raise FrameError(f"empty or inverted SACK block [{start}, {end})")
        sacks.append((start, end))
        pos += 8
    return Datagram(
        type_, conn, seq, ack, window, flags, frag, nfrag, tuple(sacks), bytes(data[pos : n - 4])
    )


def _unwrap(wire: int, near: int) -> int:
    """The unbounded sequence number with these low 32 bits that is nearest ``near``."""
    return near + ((wire - near + _HALF) & _MASK) - _HALF


# -- configuration and counters ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReliableConfig:
    """Limits and timers of one side. Both sides may differ; the hello reconciles them."""

    max_datagram: int = 1400  # bytes on the wire, every header and the CRC included
    max_message: int = 1024 * 1024  # the largest message, sent or received
    recv_window: int = 1024  # receive buffer, in segments (out of order + unread)
    send_buffer: int = 2 * 1024 * 1024  # bytes queued or unacknowledged
    max_sack_blocks: int = 4  # per datagram
    ack_every: int = 2  # ack after this many in-order segments...
    ack_delay: float = 0.005  # ...or this long after the first unacked one
    initial_rto: float = 0.2
    min_rto: float = 0.02
    max_rto: float = 2.0
    initial_cwnd: int = 10  # segments
    congestion_control: bool = True  # False: only the peer's window limits what is in flight
    handshake_timeout: float = 5.0
    dead_peer_timeout: float = 10.0
    keepalive: float | None = None  # idle ping interval; None: dead_peer_timeout / 4
    linger: float = 5.0  # a server, CLOSED, still re-acks this long (then a tombstone does)

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"ReliableConfig: {what}")

        need(0 <= self.max_sack_blocks <= 16, "max_sack_blocks is 0..16")
        need(MIN_DATAGRAM <= self.max_datagram <= 1 << 20, f"max_datagram is {MIN_DATAGRAM}..1 MiB")
        payload = self.payload_size(self.max_datagram)
        need(payload >= 32, "max_datagram leaves under 32 payload bytes after the SACK blocks")
        need(self.max_message >= 1, "max_message is at least 1")
        need(
            self.max_message <= MAX_FRAGMENTS * payload,
            f"max_message is at most {MAX_FRAGMENTS} fragments ({MAX_FRAGMENTS * payload} bytes)",
        )
        need(
            self.max_message <= self.recv_window * payload,
            "max_message must fit the receive window (recv_window * payload bytes): "
            "a message is reassembled inside it",
        )
        need(self.recv_window <= 1 << 24, "recv_window is at most 2**24 segments")
        need(self.send_buffer >= self.max_message, "send_buffer must hold one max_message")
        need(self.ack_every >= 1 and self.ack_delay >= 0, "ack_every >= 1, ack_delay >= 0")
        need(0 < self.min_rto <= self.initial_rto <= self.max_rto, "min_rto <= initial <= max")
        need(self.initial_cwnd >= 1, "initial_cwnd >= 1")
        need(self.handshake_timeout > 0 and self.dead_peer_timeout > 0, "timeouts are positive")
        need(self.keepalive is None or self.keepalive > 0, "keepalive is positive")
        need(self.linger >= 0, "linger >= 0")

    def payload_size(self, max_datagram: int) -> int:
        """Payload bytes per DATA datagram when datagrams are at most ``max_datagram``."""
        return max_datagram - OVERHEAD - 8 * self.max_sack_blocks

    @property
    def keepalive_interval(self) -> float:
        return self.keepalive if self.keepalive is not None else self.dead_peer_timeout / 4

    def hello(self, conn_id: int, cookie: bytes = bytes(COOKIE_SIZE)) -> Hello:
        return Hello(conn_id, self.max_datagram, self.recv_window, self.max_message, cookie)


@dataclass(slots=True)
class ReliableStatistics:
    """Counters of one connection (:meth:`ReliableConnection.statistics` returns a copy)."""

    datagrams_sent: int = 0
    datagrams_received: int = 0  # valid and addressed to this connection
    segments_sent: int = 0  # DATA/FIN segments, first transmissions
    retransmitted: int = 0  # DATA/FIN segments sent again
    acked: int = 0  # segments acknowledged (cumulatively or by SACK)
    acks_sent: int = 0  # datagrams sent only to ack (or to ping)
    duplicates_dropped: int = 0  # segments that had arrived already
    out_of_order_buffered: int = 0  # segments held until the gap before them filled
    window_dropped: int = 0  # segments beyond the advertised window
    corrupt_dropped: int = 0  # CRC32C mismatch or too short
    malformed_dropped: int = 0  # valid CRC, invalid content (or over max_datagram)
    stray_dropped: int = 0  # another connection id, or too late
    timeouts: int = 0  # retransmission timer expiries
    losses_detected: int = 0  # segments declared lost by acks (fast retransmit)
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0  # message bytes accepted by send()
    bytes_received: int = 0  # message bytes delivered
    srtt: float | None = None  # smoothed RTT estimate, seconds
    rttvar: float | None = None
    rto: float = 0.0
    cwnd: float = 0.0  # congestion window, segments
    peer_window: int = 0  # segments the peer still accepts beyond what we sent
    recv_window: int = 0  # segments we advertise
    in_flight: int = 0  # segments sent, not acked, not deemed lost


@dataclass(slots=True)
class ServerStatistics:
    """Counters of a :class:`ReliableServer` (the demultiplexer itself)."""

    datagrams_received: int = 0
    corrupt_dropped: int = 0
    malformed_dropped: int = 0
    stray_dropped: int = 0  # unknown connection id, or a known one from another address
    cookies_sent: int = 0
    cookies_rejected: int = 0  # SYNs with a forged, stale or foreign cookie
    syn_dropped: int = 0  # valid SYNs dropped: half-open cap reached
    refused: int = 0  # valid SYNs refused with a RESET: connection cap reached
    replies_dropped: int = 0  # stateless replies over the reply queue cap
    tombstone_replies: int = 0  # last acks repeated for connections already forgotten
    connections_created: int = 0
    connections_established: int = 0
    half_open: int = 0
    connections: int = 0


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
    ) -> None:
        self.seq = seq
        self.kind = kind
        self.frag = frag
        self.nfrag = nfrag
        self.payload = payload
        self.flags = flags  # BUNDLE or 0
        self.cost = len(payload) if cost < 0 else cost  # message bytes it frees when acked
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
        seg = _Seg(self._snd_nxt, Type.DATA, self._q_frag, self._q_nfrag, chunk)
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
        return _Seg(self._snd_nxt, Type.DATA, 0, 1, b"".join(parts), Flag.BUNDLE, cost)

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


# -- the server-side demultiplexer ------------------------------------------------------


@dataclass(slots=True)
class _ServerLimits:
    max_half_open: int
    max_connections: int
    cookie_lifetime: float
    require_cookie: bool
    max_replies: int = 1024
    max_tombstones: int = 4096


class ReliableServer:
    """The demultiplexer behind one listening datagram socket. Not thread-safe.

    ``addr`` values are whatever the driver's socket gives (a ``(host, port)`` tuple, a
    path); they must be hashable, and a connection only accepts datagrams from the
    address its SYN came from. Established connections wait in :meth:`accept`.
    """

    def __init__(
        self,
        randbytes: Callable[[int], bytes],
        config: ReliableConfig | None = None,
        *,
        max_half_open: int = 64,
        max_connections: int = 1024,
        cookie_lifetime: float = 10.0,
        require_cookie: bool = True,
        max_tombstones: int = 4096,
    ) -> None:
        if min(max_half_open, max_connections, cookie_lifetime, max_tombstones) <= 0:
            raise ValueError(
                "max_half_open, max_connections, cookie_lifetime, max_tombstones are positive"
            )
        self.config = config if config is not None else ReliableConfig()
        self._randbytes = randbytes
        self._secret = randbytes(32)
        self._limits = _ServerLimits(
            max_half_open, max_connections, cookie_lifetime, require_cookie, 1024, max_tombstones
        )
        self._conns: dict[int, ReliableConnection] = {}
        self._by_client: dict[tuple[Hashable, int], ReliableConnection] = {}
        self._half_open: set[int] = set()
        self._accept: deque[ReliableConnection] = deque()
        self._replies: list[tuple[bytes, Hashable]] = []
        # closed connections, remembered: id -> (peer address, last ack, until when)
        self._tombstones: dict[int, tuple[Hashable, bytes, float]] = {}
        self._stats = ServerStatistics()

    # -- the driver's side --------------------------------------------------------------

    def receive_datagram(
        self, data: bytes | bytearray | memoryview, addr: Hashable, now: float
    ) -> ReliableConnection | None:
        """Route one datagram; return the connection it went to (None: dropped or
        answered statelessly). A connection that becomes established is queued for
        :meth:`accept`."""
        st = self._stats
        st.datagrams_received += 1
        if len(data) > self.config.max_datagram:
            st.malformed_dropped += 1
            return None
        if not verify_crc(data):
            st.corrupt_dropped += 1
            return None
        try:
            d = decode_datagram(data, verify=False)
        except FrameError:
            st.malformed_dropped += 1
            return None
        if d.type == Type.SYN:
            return self._on_syn(d, addr, now)
        conn = self._conns.get(d.conn)
        if conn is None or conn.peer_addr != addr:
            tomb = self._tombstones.get(d.conn) if conn is None else None
            if tomb is not None and tomb[0] == addr and now < tomb[2] and d.type != Type.RESET:
                # a closed connection's peer is still unsure: repeat our last word
                st.tombstone_replies += 1
                self._reply(tomb[1], addr)
            else:
                st.stray_dropped += 1
            return None
        was_connecting = conn.state is State.CONNECTING
        conn.receive_parsed(d, now)
        if was_connecting:
            self._left_half_open(conn)
        return conn

    def accept(self) -> ReliableConnection | None:
        """The next established connection not yet accepted, or None."""
        return self._accept.popleft() if self._accept else None

    @property
    def acceptable(self) -> int:
        """Established connections waiting in :meth:`accept`."""
        return len(self._accept)

    def datagrams_to_send(
        self, now: float, only: Iterable[ReliableConnection] | None = None
    ) -> list[tuple[bytes, Hashable]]:
        """Run due timers; return ``(datagram, address)`` pairs to send now. Finished
        connections are forgotten here.

        By default every connection is asked (O(connections)): right for a timer wake-up.
        After a datagram was routed to one connection, or its application sent on it,
        pass ``only=[conn]`` to ask just that one (stateless replies always go out)."""
        out = self._replies
        self._replies = []
        done: list[ReliableConnection] = []
        conns = self._conns.values() if only is None else only
        for conn in conns:
            was_connecting = conn.state is State.CONNECTING
            for datagram in conn.datagrams_to_send(now):
                out.append((datagram, conn.peer_addr))
            if was_connecting and conn.state is not State.CONNECTING:
                self._left_half_open(conn)
            if conn.finished:
                done.append(conn)
        for conn in done:
            self._forget(conn, now)
        return out

    def on_timeout(self, now: float) -> None:
        """Run every connection's due timers (``datagrams_to_send`` does this too)."""
        for conn in list(self._conns.values()):
            was_connecting = conn.state is State.CONNECTING
            conn.on_timeout(now)
            if was_connecting and conn.state is not State.CONNECTING:
                self._left_half_open(conn)

    def next_deadline(self) -> float | None:
        best: float | None = None
        for conn in self._conns.values():
            t = conn.next_deadline()
            if t is not None and (best is None or t < best):
                best = t
            elif t is None and conn.finished:  # datagrams_to_send will forget it
                return float("-inf")
        if self._replies:
            return float("-inf")
        return best

    def connections(self) -> list[ReliableConnection]:
        """Every connection the server routes to (half-open ones included)."""
        return list(self._conns.values())

    def statistics(self) -> ServerStatistics:
        s = self._stats
        s.half_open = len(self._half_open)
        s.connections = len(self._conns)
        return replace(s)

    # -- internals ----------------------------------------------------------------------

    def _cookie(self, addr: Hashable, d: Datagram, hello: Hello, stamp: int) -> bytes:
        text = b"|".join(
            (
                repr(addr).encode(),
                b"%d" % hello.conn_id,
                b"%d" % d.seq,
                b"%d %d %d" % (hello.max_datagram, hello.recv_window, hello.max_message),
                b"%d" % stamp,
            )
        )
        mac = hmac.new(self._secret, b"buzon-reliable-cookie " + text, hashlib.sha256)
        return struct.pack("<I", stamp) + mac.digest()[: COOKIE_SIZE - 4]

    def _cookie_ok(self, addr: Hashable, d: Datagram, hello: Hello, now: float) -> bool:
        (stamp,) = struct.unpack_from("<I", hello.cookie)
        age = math.floor(now) - stamp
        if not 0 <= age <= self._limits.cookie_lifetime:
            return False
        return hmac.compare_digest(self._cookie(addr, d, hello, stamp), hello.cookie)

    def _reply(self, datagram: bytes, addr: Hashable) -> None:
        if len(self._replies) >= self._limits.max_replies:
            self._stats.replies_dropped += 1
            return
        self._replies.append((datagram, addr))

    def _on_syn(self, d: Datagram, addr: Hashable, now: float) -> ReliableConnection | None:
        st = self._stats
        try:
            hello = Hello.decode(d.payload)
        except HandshakeError:
            st.malformed_dropped += 1
            return None
        known = self._by_client.get((addr, hello.conn_id))
        if known is not None:
            known.receive_parsed(d, now)
            return known
        limits = self._limits
        if limits.require_cookie and not self._cookie_ok(addr, d, hello, now):
            if hello.cookie != bytes(COOKIE_SIZE):
                st.cookies_rejected += 1
            st.cookies_sent += 1
            cookie = self._cookie(addr, d, hello, math.floor(now))
            self._reply(_encode(Type.COOKIE, hello.conn_id, d.seq, 0, 0, payload=cookie), addr)
            return None
        if len(self._half_open) >= limits.max_half_open:
            st.syn_dropped += 1  # the client retries; by then a slot may be free
            return None
        if len(self._conns) >= limits.max_connections:
            st.refused += 1
            refusal = bytes([ResetCode.REFUSED]) + b"server full"
            self._reply(_encode(Type.RESET, hello.conn_id, d.seq, 0, 0, payload=refusal), addr)
            return None
        while True:
            conn_id, isn = _ids(self._randbytes)
            if conn_id not in self._conns:
                break
        conn = ReliableConnection(
            "server",
            conn_id,
            now,
            self.config,
            isn=isn,
            peer_hello=hello,
            peer_isn=d.seq,
            peer_addr=addr,
        )
        self._conns[conn_id] = conn
        self._by_client[(addr, hello.conn_id)] = conn
        self._half_open.add(conn_id)
        st.connections_created += 1
        return conn

    def _bury(self, conn: ReliableConnection, now: float) -> None:
        """Keep a closed connection's last ack (32 bytes, flagged CLOSED) for
        ``dead_peer_timeout``: a client whose acks were lost, even across an outage
        longer than ``linger``, learns from it that everything arrived."""
        tombs = self._tombstones
        for key in list(itertools.islice(tombs, 64)):  # oldest first: drop the expired
            if tombs[key][2] > now:
                break
            del tombs[key]
        while len(tombs) >= self._limits.max_tombstones:
            del tombs[next(iter(tombs))]
        expiry = now + self.config.dead_peer_timeout
        tombs[conn.local_id] = (conn.peer_addr, conn.final_ack(), expiry)

    def _left_half_open(self, conn: ReliableConnection) -> None:
        if conn.local_id in self._half_open and conn.state is not State.CONNECTING:
            self._half_open.discard(conn.local_id)
            if conn.state is not State.FAILED:
                self._stats.connections_established += 1
                self._accept.append(conn)

    def _forget(self, conn: ReliableConnection, now: float) -> None:
        if conn.state is State.CLOSED and self._conns.get(conn.local_id) is conn:
            self._bury(conn, now)
        self._conns.pop(conn.local_id, None)
        self._half_open.discard(conn.local_id)
        key = (conn.peer_addr, conn.remote_id)
        if self._by_client.get(key) is conn:
            del self._by_client[key]
