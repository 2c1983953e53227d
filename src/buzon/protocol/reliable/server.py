"""The demultiplexer behind one listening datagram socket (see
:mod:`buzon.protocol.reliable`)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import struct
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace

from ...errors import FrameError, HandshakeError
from .config import ReliableConfig, ServerStatistics
from .connection import ReliableConnection, State, _ids
from .wire import (
    COOKIE_SIZE,
    Datagram,
    Hello,
    ResetCode,
    Type,
    _encode,
    decode_datagram,
    verify_crc,
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
        if conn is not None and conn.peer_addr != addr and conn.may_move_to(d):
            self._move(conn, addr)
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

    def _move(self, conn: ReliableConnection, addr: Hashable) -> None:
        """The peer of an established connection now sends from ``addr`` (a NAT rebinding,
        a restarted relay): answer it there. Only a datagram that fits the connection's
        state moves it (:meth:`ReliableConnection.may_move_to`)."""
        old = (conn.peer_addr, conn.remote_id)
        if self._by_client.get(old) is conn:
            del self._by_client[old]
        conn.peer_addr = addr
        self._by_client[(addr, conn.remote_id)] = conn
        self._stats.moved += 1

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
