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

An established connection follows its peer to a new address (a restarted relay, a
NAT rebinding) when a datagram from there is its next word
(:meth:`ReliableConnection.may_move_to`: an ACK, DATA or FIN with its id, an ack in
``snd_una..snd_nxt``, a segment inside the receive window); the latest such datagram
wins, and :attr:`ServerStatistics.moved` counts the moves. A half-open connection
never moves: its cookie is bound to the address.

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
* **Losses.** Messages are counted as their last segment is acknowledged in order
  (``messages_acked``); when the connection fails, every message accepted by
  :meth:`~ReliableConnection.send` and not acknowledged so is ``messages_lost``
  (a driver reports it as dropped and never as delivered).

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

from .config import ReliableConfig, ReliableStatistics, ServerStatistics
from .connection import TRANSITIONS, Event, ReliableConnection, State
from .server import ReliableServer
from .wire import (
    DATAGRAM_RULES,
    HEADER,
    HELLO,
    OVERHEAD,
    RESET_COPIES,
    VERSION,
    Datagram,
    Flag,
    Hello,
    ResetCode,
    Type,
    decode_datagram,
    encode_datagram,
    verify_crc,
)

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
