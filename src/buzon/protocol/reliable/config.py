"""The limits and timers of a reliable-datagram side, and its counters."""

from __future__ import annotations

from dataclasses import dataclass

from .wire import COOKIE_SIZE, MAX_FRAGMENTS, MIN_DATAGRAM, OVERHEAD, Hello


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
    messages_sent: int = 0  # accepted by send()
    messages_acked: int = 0  # of those, acknowledged in order (the peer has them)
    messages_lost: int = 0  # accepted, never acknowledged, and the connection FAILED
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
    moved: int = 0  # established connections whose peer now sends from another address
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
