"""Reliable datagrams, sans-IO: the wire format, the state machine, and a deterministic
simulation of two peers over a hostile network.

The simulation
--------------
A fake clock and a seeded network (``random.Random(seed)``), no sockets, threads or
sleeps. Each seed draws a configuration (datagram size, windows, ack batching, SACK
blocks, congestion control on or off, initial sequence numbers near the 2**32 wrap) and a
network from its profile: loss (uniform, in Gilbert-Elliott bursts, or one direction
only), duplication, reordering, corruption (bit flips, truncation), delay with jitter,
blackhole periods, or a permanent blackhole. A client and a server (through the
demultiplexer, cookie handshake included) each send 20-60 messages of random sizes,
some several datagrams long, then close.

The loop jumps from event to event (the next delivery, the next deadline of either side,
the next time a slow reader reads). After EVERY step it checks:

* delivery: what each application received is a prefix of what the other sent, byte
  for byte (so nothing lost, duplicated or reordered);
* bounds: receive buffer <= recv_window segments, reassembly <= max_message, send
  buffer <= send_buffer, in flight <= sent-but-unacked, datagrams <= max_datagram;
* the peer's window: every DATA/FIN on the wire fits the window its receiver offers;
* monotonicity: snd_una, snd_nxt, rcv_nxt, both window edges never go back;
* timers: after ``datagrams_to_send(now)`` no deadline is at or before ``now``;
* damage: every corrupted datagram delivered is counted as corrupt, none delivered.

At the end both sides must be CLOSED with everything delivered both ways, within bounded
simulated time, except under a permanent blackhole, where each side must end FAILED with
a Timeout no later than ``dead_peer_timeout`` (or ``handshake_timeout``) after it last
heard from its peer (or CLOSED, if everything had already been delivered).

Seeds that ever failed during development are kept in :data:`REGRESSION_SEEDS`.
"""

from __future__ import annotations

import ast
import dataclasses
import heapq
import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buzon.errors import (
    ChannelClosed,
    ConnectionRefused,
    EndOfChannel,
    FrameError,
    Full,
    MessageTooLarge,
    ProtocolError,
    Timeout,
)
from buzon.protocol import reliable
from buzon.protocol.crc32c import crc32c
from buzon.protocol.reliable import (
    DATAGRAM_RULES,
    HEADER,
    OVERHEAD,
    RESET_COPIES,
    TRANSITIONS,
    Datagram,
    Event,
    Flag,
    Hello,
    ReliableConfig,
    ReliableConnection,
    ReliableServer,
    ResetCode,
    State,
    Type,
    decode_datagram,
    encode_datagram,
    verify_crc,
)

MASK = 0xFFFFFFFF

# -- the simulated network --------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    loss: float = 0.0  # upper bound; each seed draws its own in [0, loss]
    ack_loss: float = 0.0  # server -> client only (acks of the client's data)
    burst: bool = False  # Gilbert-Elliott bursts on top of the loss
    dup: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    delay: float = 0.005
    jitter: float = 0.0
    blackholes: int = 0  # temporary blackhole periods (shorter than dead_peer_timeout)
    permanent_blackhole: bool = False
    slow_reader: bool = False


PROFILES = {
    p.name: p
    for p in (
        Profile("clean", jitter=0.001),
        Profile("lossy", loss=0.3, jitter=0.002),
        Profile("bursty", loss=0.1, burst=True, jitter=0.002),
        Profile("dup-reorder", dup=0.3, reorder=0.4, jitter=0.02),
        Profile("corrupt", corrupt=0.25, loss=0.05, jitter=0.002),
        Profile("ack-loss", ack_loss=0.6, jitter=0.002),
        Profile("blackholes", loss=0.05, blackholes=3, jitter=0.002),
        Profile("slow-reader", loss=0.1, slow_reader=True, jitter=0.002),
        Profile(
            "hostile",
            loss=0.2,
            burst=True,
            dup=0.15,
            reorder=0.3,
            corrupt=0.1,
            jitter=0.03,
            blackholes=1,
            slow_reader=True,
        ),
        Profile("permanent-blackhole", loss=0.1, permanent_blackhole=True, jitter=0.002),
    )
}


class Link:
    """One direction of the network. Drops, duplicates, reorders, corrupts, delays."""

    def __init__(
        self,
        rng: random.Random,
        *,
        loss: float,
        burst: bool,
        dup: float,
        reorder: float,
        corrupt: float,
        delay: float,
        jitter: float,
        blackholes: list[tuple[float, float]],
    ) -> None:
        self.rng = rng
        self.loss = loss
        self.burst = burst
        self.bad_until = -1.0  # Gilbert-Elliott style: a bad period drops everything
        self.p_enter_bad = rng.uniform(0.01, 0.08) if burst else 0.0
        self.bad_mean = rng.uniform(0.01, 0.2)  # seconds
        self.dup = dup
        self.reorder = reorder
        self.corrupt = corrupt
        self.delay = delay
        self.jitter = jitter
        self.blackholes = blackholes
        self.sent = 0
        self.dropped = 0
        self.corrupted = 0  # corrupted copies put on the wire

    def dark(self, now: float) -> bool:
        return any(a <= now < b for a, b in self.blackholes)

    def transmit(self, data: bytes, now: float) -> list[tuple[float, bytes, bool]]:
        """The deliveries this datagram turns into: (time, bytes, corrupted)."""
        rng = self.rng
        self.sent += 1
        if self.burst and now >= self.bad_until and rng.random() < self.p_enter_bad:
            self.bad_until = now + rng.expovariate(1 / self.bad_mean)
        if self.dark(now) or now < self.bad_until or rng.random() < self.loss:
            self.dropped += 1
            return []
        copies = 2 if rng.random() < self.dup else 1
        out = []
        for _ in range(copies):
            at = now + self.delay + rng.uniform(0, self.jitter)
            if rng.random() < self.reorder:
                at += rng.uniform(0, 4 * self.delay + 0.05)
            payload = data
            damaged = False
            if rng.random() < self.corrupt:
                payload = damage(rng, data)
                damaged = True
                self.corrupted += 1
            out.append((at, payload, damaged))
        return out


def damage(rng: random.Random, data: bytes) -> bytes:
    """Flip 1-3 bits, or truncate (CRC32C catches both)."""
    if rng.random() < 0.25 and len(data) > 1:
        return data[: rng.randrange(len(data))]
    buf = bytearray(data)
    for i in rng.sample(range(len(buf) * 8), rng.randint(1, 3)):  # distinct bits
        buf[i // 8] ^= 1 << (i % 8)
    return bytes(buf)


# -- the two applications ---------------------------------------------------------------


@dataclass
class App:
    """One side's application: sends its messages as space allows, then closes; reads
    everything (a slow reader only now and then)."""

    name: str
    outgoing: list[bytes]
    slow_reader: bool
    rng: random.Random
    conn: ReliableConnection | None = None
    next_out: int = 0
    received: list[bytes] = field(default_factory=list)
    next_read: float = 0.0
    closed: bool = False

    def step(self, now: float, expected: list[bytes]) -> None:
        conn = self.conn
        if conn is None:
            return
        while self.next_out < len(self.outgoing) and conn.state in (
            State.CONNECTING,
            State.ESTABLISHED,
        ):
            message = self.outgoing[self.next_out]
            if conn.send_space() < len(message):
                with pytest.raises(Full):
                    conn.send(message)
                break
            conn.send(message)
            self.next_out += 1
        if self.next_out == len(self.outgoing) and not self.closed:
            conn.close()
            self.closed = True
        if not self.slow_reader or now >= self.next_read:
            limit = self.rng.randint(1, 4) if self.slow_reader else None
            got = conn.messages(limit)
            for message in got:
                i = len(self.received)
                assert i < len(expected), f"{self.name}: a message beyond what was sent"
                assert message == expected[i], (
                    f"{self.name}: message {i} differs (lost, duplicated or reordered)"
                )
                self.received.append(message)
            if self.slow_reader and now >= self.next_read:
                self.next_read = now + self.rng.expovariate(1 / 0.2)

    def wake(self) -> float | None:
        if self.conn is not None and self.slow_reader and self.conn.pending_messages:
            return self.next_read
        return None


# -- one seed ---------------------------------------------------------------------------


@dataclass
class Outcome:
    seed: int
    profile: str
    steps: int
    sim_time: float
    datagrams: int
    client_state: State
    server_state: State | None


class Monotonic:
    """Checks that a connection's sequence counters never go back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.last: dict[str, int] = {}

    def check(self, conn: ReliableConnection) -> None:
        if conn.state is State.CONNECTING or conn.state is State.FAILED:
            return
        for key in ("snd_una", "snd_nxt", "rcv_nxt", "peer_edge", "recv_edge"):
            value = getattr(conn, key)
            before = self.last.get(key)
            assert before is None or value >= before, f"{self.name}.{key} went back"
            self.last[key] = value


def check_bounds(conn: ReliableConnection, name: str) -> None:
    cfg = conn.config
    assert conn.recv_buffered <= cfg.recv_window, f"{name}: receive buffer over the window"
    assert conn.reassembly_bytes <= cfg.max_message, f"{name}: reassembly over max_message"
    assert conn.send_buffered <= cfg.send_buffer, f"{name}: send buffer over its cap"
    assert conn.send_buffered >= 0
    assert 0 <= conn.in_flight <= conn.snd_nxt - conn.snd_una, f"{name}: in-flight count"
    if conn.state in (State.ESTABLISHED, State.CLOSING):
        assert conn.snd_una <= conn.snd_nxt <= conn.peer_edge, f"{name}: beyond the window"
    assert cfg.min_rto <= conn.rto <= cfg.max_rto, f"{name}: RTO out of bounds"


def make_config(rng: random.Random, client: bool) -> ReliableConfig:
    max_datagram = rng.choice([160, 200, 300, 600, 1400])
    sack = rng.choice([0, 1, 2, 4, 4, 8]) if max_datagram >= 200 else rng.choice([0, 1, 2])
    payload = max_datagram - OVERHEAD - 8 * sack
    max_message = payload * rng.randint(2, 6) + rng.randrange(payload)
    segments = -(-max_message // payload)
    recv_window = rng.randint(segments, segments + 40)
    send_buffer = rng.randint(max_message, 3 * max_message)
    return ReliableConfig(
        max_datagram=max_datagram,
        max_message=max_message,
        recv_window=recv_window,
        send_buffer=send_buffer,
        max_sack_blocks=sack,
        ack_every=rng.randint(1, 4),
        ack_delay=rng.choice([0.0, 0.002, 0.01, 0.04]),
        initial_rto=0.2,
        min_rto=0.02,
        max_rto=1.0,
        initial_cwnd=rng.choice([1, 4, 10]),
        congestion_control=rng.random() < 0.8,
        handshake_timeout=30.0,
        dead_peer_timeout=30.0,
        keepalive=rng.choice([None, 1.0]),
        linger=rng.choice([0.0, 1.0, 5.0]) if client else rng.choice([3.0, 5.0]),
    )


def message_limit(mine: ReliableConfig, peer: ReliableConfig) -> int:
    """The largest message ``mine`` may send to ``peer`` (what the hello negotiates)."""
    max_out = min(mine.max_datagram, peer.max_datagram)
    sack = min(mine.max_sack_blocks, (max_out - OVERHEAD - 32) // 8)
    payload = max_out - OVERHEAD - 8 * sack
    return min(mine.max_message, peer.max_message, peer.recv_window * payload, 0xFFFF * payload)


def make_messages(rng: random.Random, cfg: ReliableConfig, limit: int, tag: bytes) -> list[bytes]:
    payload = cfg.payload_size(cfg.max_datagram)
    out = []
    for i in range(rng.randint(20, 60)):
        kind = rng.random()
        if kind < 0.1:
            size = 0
        elif kind < 0.7:
            size = rng.randint(1, payload)
        elif kind < 0.95:
            size = rng.randint(min(payload, limit), min(3 * payload, limit))
        else:
            size = limit
        size = min(size, limit)
        head = tag + struct.pack("<I", i)
        body = head + rng.randbytes(max(0, size - len(head)))
        out.append(body[:size] if size < len(head) else body)
    return out


def randbytes_for(rng: random.Random, near_wrap: bool) -> Callable[[int], bytes]:
    """Seeded randomness for ids and ISNs; optionally ISNs a few segments before 2**32."""

    def randbytes(n: int) -> bytes:
        raw = rng.randbytes(n)
        if near_wrap and n == 8:
            isn = MASK - rng.randrange(40)
            raw = raw[:4] + isn.to_bytes(4, "little")
        return raw

    return randbytes


CLIENT_ADDR = ("10.0.0.2", 40000)


def run_seed(profile: Profile, seed: int) -> Outcome:
    rng = random.Random(f"{profile.name}:{seed}")
    cfg_client = make_config(rng, client=True)
    cfg_server = make_config(rng, client=False)
    if rng.random() < 0.7:  # mostly the same limits both sides
        cfg_server = dataclasses.replace(cfg_client, linger=cfg_server.linger)
    near_wrap = rng.random() < 0.3
    dead = cfg_client.dead_peer_timeout

    blackholes: list[tuple[float, float]] = []
    t = 0.0
    for _ in range(profile.blackholes):
        t += rng.uniform(0.2, 3.0)
        length = rng.uniform(0.2, dead / 4)
        blackholes.append((t, t + length))
        t += length
    forever_at = rng.uniform(0.0, 1.5) if profile.permanent_blackhole else None
    if forever_at is not None:
        blackholes.append((forever_at, float("inf")))

    loss = rng.uniform(0, profile.loss)

    def link(extra_loss: float) -> Link:
        return Link(
            rng,
            loss=min(0.9, loss + extra_loss),
            burst=profile.burst,
            dup=rng.uniform(0, profile.dup),
            reorder=rng.uniform(0, profile.reorder),
            corrupt=rng.uniform(0, profile.corrupt),
            delay=profile.delay * rng.uniform(0.2, 2.0),
            jitter=profile.jitter,
            blackholes=blackholes,
        )

    c2s = link(0.0)
    s2c = link(rng.uniform(0, profile.ack_loss))

    now = 0.0
    client = ReliableConnection.client(
        now, randbytes_for(rng, near_wrap), cfg_client, peer_addr="server"
    )
    server = ReliableServer(
        randbytes_for(rng, near_wrap),
        cfg_server,
        max_half_open=4,
        require_cookie=rng.random() < 0.8,
    )
    client_app = App(
        "client",
        make_messages(rng, cfg_client, message_limit(cfg_client, cfg_server), b"C"),
        profile.slow_reader,
        random.Random(seed),
    )
    server_app = App(
        "server",
        make_messages(rng, cfg_server, message_limit(cfg_server, cfg_client), b"S"),
        profile.slow_reader,
        random.Random(~seed),
    )
    client_app.conn = client
    server_conn: ReliableConnection | None = None
    mono_c, mono_s = Monotonic("client"), Monotonic("server")

    # (time, order, destination, bytes, corrupted)
    wire: list[tuple[float, int, str, bytes, bool]] = []
    order = 0
    corrupt_in = {"client": 0, "server": 0}
    last_heard = {"client": 0.0, "server": 0.0}  # last intact datagram delivered to each
    ended_at: dict[str, float] = {}  # when each side reached CLOSED or FAILED
    datagrams = 0
    steps = 0
    limit_time = 900.0

    def put(dest: str, deliveries: list[tuple[float, bytes, bool]]) -> None:
        nonlocal order
        for at, data, bad in deliveries:
            order += 1
            heapq.heappush(wire, (at, order, dest, data, bad))

    def check_wire(data: bytes, sender: ReliableConnection, receiver: ReliableConnection | None):
        d = decode_datagram(data)
        assert len(data) <= max(cfg_client.max_datagram, cfg_server.max_datagram)
        if sender.state is not State.CONNECTING:
            assert len(data) <= sender.max_datagram, "a datagram over the negotiated size"
        if d.type in (Type.DATA, Type.FIN) and receiver is not None:
            seq = receiver.rcv_nxt + ((d.seq - receiver.rcv_nxt + (1 << 31)) & MASK) - (1 << 31)
            if receiver.state is not State.FAILED:
                assert seq < receiver.recv_edge, "a segment beyond the receiver's window"

    def fail(msg: str) -> str:
        return f"[{profile.name} seed {seed} t={now:.3f} step {steps}] {msg}"

    while True:
        steps += 1
        assert steps < 400_000, fail("too many steps (a livelock?)")
        assert now < limit_time, fail("not done within the simulated time bound")
        # 1. deliver what is due
        while wire and wire[0][0] <= now:
            _, _, dest, data, bad = heapq.heappop(wire)
            if dest == "client":
                if bad:
                    corrupt_in["client"] += 1
                if not bad:
                    last_heard["client"] = now
                client.receive_datagram(data, now)
            else:
                if bad:
                    corrupt_in["server"] += 1
                if not bad:
                    last_heard["server"] = now
                server.receive_datagram(data, CLIENT_ADDR, now)
        # 2. the applications
        if server_conn is None:
            server_conn = server.accept()
            if server_conn is not None:
                server_app.conn = server_conn
                assert server.accept() is None, fail("one client, one connection")
        try:
            client_app.step(now, server_app.outgoing)
            server_app.step(now, client_app.outgoing)
        except AssertionError as exc:
            raise AssertionError(fail(str(exc))) from None
        # 3. what each side sends now
        for data in client.datagrams_to_send(now):
            datagrams += 1
            check_wire(data, client, server_conn)
            put("server", c2s.transmit(data, now))
        for data, addr in server.datagrams_to_send(now):
            datagrams += 1
            assert addr == CLIENT_ADDR
            if server_conn is not None:
                check_wire(data, server_conn, client)
            put("client", s2c.transmit(data, now))
        # 4. invariants
        try:
            check_bounds(client, "client")
            mono_c.check(client)
            if server_conn is not None:
                check_bounds(server_conn, "server")
                mono_s.check(server_conn)
        except AssertionError as exc:
            raise AssertionError(fail(str(exc))) from None
        client_deadline = client.next_deadline()
        server_deadline = server.next_deadline()
        for who, deadline in (("client", client_deadline), ("server", server_deadline)):
            assert deadline is None or deadline > now, fail(f"{who} left a deadline in the past")
        assert client.statistics().corrupt_dropped == corrupt_in["client"], fail("corrupt count")
        assert server.statistics().corrupt_dropped == corrupt_in["server"], fail("corrupt count")
        # 5. done?
        terminal = (State.CLOSED, State.FAILED)
        for name, conn in (("client", client), ("server", server_conn)):
            if conn is not None and conn.state in terminal and name not in ended_at:
                ended_at[name] = now
        server_done = server_conn.state in terminal if server_conn is not None else True
        if (
            client.state in terminal
            and server_done
            and (server_conn is not None or client.state is State.FAILED)
            and client.finished
            and (server_conn is None or server_conn.finished)
        ):
            break
        # 6. the next event
        times = [w for w in (client_deadline, server_deadline) if w is not None]
        if wire:
            times.append(wire[0][0])
        for app in (client_app, server_app):
            w = app.wake()
            if w is not None:
                times.append(max(w, now))
        if not times:
            break
        nxt = min(times)
        assert nxt >= now, fail("time went back")
        now = nxt

    # -- the verdict --------------------------------------------------------------------
    if forever_at is None:
        assert client.state is State.CLOSED, fail(f"client ended {client.state}: {client.error}")
        assert server_conn is not None and server_conn.state is State.CLOSED, fail(
            f"server ended {server_conn and server_conn.state}: {server_conn and server_conn.error}"
        )
        for app, other in ((client_app, server_app), (server_app, client_app)):
            assert app.conn is not None
            app.received.extend(app.conn.messages())
            assert app.received == other.outgoing, fail(f"{app.name} did not get everything")
            assert app.conn.at_eof
    else:
        for name, conn in (("client", client), ("server", server_conn)):
            if conn is None:
                continue
            if conn.state is State.FAILED:
                error = str(conn.error)
                assert isinstance(conn.error, Timeout), fail(f"{name}: {conn.error!r}")
                # no later than the timeout after it last heard from its peer
                if "handshake_timeout" in error:
                    bound = conn.config.handshake_timeout
                else:
                    assert "dead_peer_timeout" in error, fail(error)
                    bound = last_heard[name] + conn.config.dead_peer_timeout
                assert ended_at[name] <= bound + 1e-9, fail(
                    f"{name} failed at {ended_at[name]:.3f}, later than {bound:.3f}"
                )
            else:
                assert conn.state is State.CLOSED, fail(f"{name} ended {conn.state}")
    return Outcome(
        seed,
        profile.name,
        steps,
        now,
        datagrams,
        client.state,
        server_conn.state if server_conn is not None else None,
    )


# -- the seed sweep ---------------------------------------------------------------------

SEEDS_PER_PROFILE = 104  # 10 profiles x 104 = 1040 seeds per run
SEEDS_RUN: list[tuple[str, int]] = []

# Seeds that failed at some point during development, kept forever: (profile, seed).
# lossy 5, lossy 26, bursty 9, bursty 23, hostile 29, bursty 494, corrupt 581: the last ack
#   of the close was lost and its sender had already gone, leaving the other side unsure
#   its data arrived (FAILED after dead_peer_timeout); fixed by the server-lingers /
#   client-waits-for-CLOSED close (see test_lost_final_acks_leave_nobody_in_doubt).
# hostile 2847: a 7 s blackhole outlasted the server's linger, so the client never heard
#   its last segments acked; fixed by the server's tombstones (last ack kept for
#   dead_peer_timeout, see test_datagrams_of_an_old_connection_are_rejected).
# corrupt 3: the harness flipped the same bit twice (an intact datagram counted as
#   damaged); the damage now flips distinct bits.
# (The harness has changed since, so these seeds now draw other scenarios; kept anyway.)
REGRESSION_SEEDS: list[tuple[str, int]] = [
    ("lossy", 5),
    ("lossy", 26),
    ("bursty", 9),
    ("bursty", 23),
    ("hostile", 29),
    ("bursty", 494),
    ("corrupt", 581),
    ("hostile", 2847),
    ("corrupt", 3),
]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_simulation(profile: str) -> None:
    for seed in range(SEEDS_PER_PROFILE):
        run_seed(PROFILES[profile], seed)
        SEEDS_RUN.append((profile, seed))


@pytest.mark.parametrize(("profile", "seed"), REGRESSION_SEEDS)
def test_regression_seed(profile: str, seed: int) -> None:
    run_seed(PROFILES[profile], seed)
    SEEDS_RUN.append((profile, seed))


# -- a small lossless (or selectively lossy) pair for the unit tests ----------------------


class Pair:
    """A client and a server over a network with a fixed one-way delay. ``drop`` decides,
    per decoded datagram and direction ("c2s"/"s2c"), whether the network eats it. With
    ``auto_read`` both applications take their messages at every step, into ``got``."""

    def __init__(
        self,
        config: ReliableConfig | None = None,
        server_config: ReliableConfig | None = None,
        *,
        seed: int = 0,
        delay: float = 0.01,
        auto_read: bool = True,
        **server_options: object,
    ) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.delay = delay
        self.client = ReliableConnection.client(0.0, self.rng.randbytes, config)
        self.server = ReliableServer(
            self.rng.randbytes,
            server_config if server_config is not None else config,
            **server_options,  # type: ignore[arg-type]
        )
        self.sconn: ReliableConnection | None = None
        self.wire: list[tuple[float, int, str, bytes]] = []
        self.order = 0
        self.drop: Callable[[str, Datagram], bool] = lambda direction, d: False
        self.log: list[tuple[float, str, Datagram]] = []  # what was put on the wire
        self.auto_read = auto_read
        self.last_rx = {"c2s": 0.0, "s2c": 0.0}  # when each direction last delivered
        self.got: dict[str, list[bytes]] = {"client": [], "server": []}
        self.client_addr = "client"  # where the client's datagrams come from (a path)

    def flush(self) -> None:
        """Collect what both sides send now and put it on the wire."""
        for direction, items in (
            ("c2s", [(d, None) for d in self.client.datagrams_to_send(self.now)]),
            ("s2c", self.server.datagrams_to_send(self.now)),
        ):
            for data, addr in items:
                d = decode_datagram(data)
                self.log.append((self.now, direction, d))
                if self.drop(direction, d) or addr not in (None, self.client_addr):
                    continue  # (a reply to an address the client left is lost)
                self.order += 1
                heapq.heappush(self.wire, (self.now + self.delay, self.order, direction, data))

    def run(self, duration: float, until: Callable[[], bool] = lambda: False) -> None:
        end = self.now + duration
        while True:
            while self.wire and self.wire[0][0] <= self.now:
                _, _, direction, data = heapq.heappop(self.wire)
                self.last_rx[direction] = self.now
                if direction == "c2s":
                    self.server.receive_datagram(data, self.client_addr, self.now)
                else:
                    self.client.receive_datagram(data, self.now)
            if self.sconn is None:
                self.sconn = self.server.accept()
            if self.auto_read:
                self.got["client"] += self.client.messages()
                if self.sconn is not None:
                    self.got["server"] += self.sconn.messages()
            self.flush()
            if until():
                return
            times = [t for t in (self.client.next_deadline(), self.server.next_deadline()) if t]
            if self.wire:
                times.append(self.wire[0][0])
            if not times or min(times) > end:
                self.now = end
                return
            nxt = min(times)
            assert nxt > self.now or self.wire, "a deadline in the past"
            self.now = max(nxt, self.now)

    def connect(self) -> ReliableConnection:
        self.run(
            5.0, until=lambda: self.sconn is not None and self.client.state is State.ESTABLISHED
        )
        assert self.sconn is not None
        return self.sconn

    def sent(self, direction: str, type_: Type) -> list[Datagram]:
        return [d for _, dr, d in self.log if dr == direction and d.type == type_]


SMALL = ReliableConfig(max_datagram=200, max_message=2000, recv_window=16, send_buffer=4000)


def test_handshake_with_cookie() -> None:
    pair = Pair()
    sconn = pair.connect()
    types = [(direction, Type(d.type)) for _, direction, d in pair.log]
    assert types[:5] == [
        ("c2s", Type.SYN),
        ("s2c", Type.COOKIE),
        ("c2s", Type.SYN),
        ("s2c", Type.SYN_ACK),
        ("c2s", Type.ACK),
    ]
    syn1, syn2 = pair.sent("c2s", Type.SYN)[:2]
    assert Hello.decode(syn1.payload).cookie == bytes(16)
    assert Hello.decode(syn2.payload).cookie == pair.sent("s2c", Type.COOKIE)[0].payload
    assert sconn.state is State.ESTABLISHED and pair.client.state is State.ESTABLISHED
    assert sconn.remote_id == pair.client.local_id and pair.client.remote_id == sconn.local_id
    stats = pair.server.statistics()
    assert stats.cookies_sent == 1 and stats.connections_established == 1
    assert stats.half_open == 0 and stats.connections == 1
    # answers to a SYN are never larger than the SYN (no amplification)
    syn_size = len(encode_datagram(syn1))
    assert len(encode_datagram(pair.sent("s2c", Type.COOKIE)[0])) <= syn_size


def test_handshake_without_cookie() -> None:
    pair = Pair(require_cookie=False)
    pair.connect()
    assert [Type(d.type) for _, _, d in pair.log][:3] == [Type.SYN, Type.SYN_ACK, Type.ACK]


def test_messages_both_ways_then_graceful_close() -> None:
    pair = Pair(SMALL)
    sconn = pair.connect()
    big = bytes(range(256)) * 7  # 1792 bytes: several datagrams
    for m in (b"hello", b"", big):
        pair.client.send(m)
    sconn.send(b"reply")
    pair.client.close()
    sconn.close()
    pair.run(10.0, until=lambda: pair.client.finished and sconn.finished)
    assert pair.got["server"] == [b"hello", b"", big]
    assert pair.got["client"] == [b"reply"]
    assert pair.client.state is State.CLOSED and sconn.state is State.CLOSED
    assert pair.client.at_eof and sconn.at_eof
    frags = [d for d in pair.sent("c2s", Type.DATA) if d.nfrag > 1]
    assert {d.nfrag for d in frags} == {-(-len(big) // SMALL.payload_size(200))}
    stats = pair.client.statistics()
    assert stats.retransmitted == 0 and stats.messages_sent == 3
    assert stats.acked == stats.segments_sent  # every data segment and the FIN
    assert stats.srtt is not None and abs(stats.srtt - 0.02) < 0.01
    # the server told the client it was closed; the client left without lingering
    assert any(d.flags & Flag.CLOSED for d in pair.sent("s2c", Type.ACK))
    assert pair.server.connections() == []  # forgotten after its linger


def test_lost_final_acks_leave_nobody_in_doubt() -> None:
    """Regression for the close races found by the simulation."""
    # the client does not linger at all; the server does
    pair = Pair(dataclasses.replace(SMALL, linger=0.0), dataclasses.replace(SMALL, linger=3.0))
    sconn = pair.connect()
    pair.run(0.5)
    server_fin: list[int] = []
    lost = {"acks": 0, "closed": 0}

    def drop(direction: str, d: Datagram) -> bool:
        if direction == "s2c" and d.type == Type.FIN:
            server_fin.append((d.seq + 1) & MASK)
        if direction == "c2s" and server_fin and d.ack == server_fin[0] and lost["acks"] < 3:
            lost["acks"] += 1  # the client's acks of the server's FIN
            return True
        if direction == "s2c" and d.flags & Flag.CLOSED and lost["closed"] < 2:
            lost["closed"] += 1  # the server's "I am closed"
            return True
        return pair.client.finished  # the client vanishes once it is done

    pair.drop = drop
    sconn.send(b"from the server")
    pair.client.send(b"from the client")
    pair.client.close()
    sconn.close()
    pair.run(20.0, until=lambda: pair.client.finished and sconn.state is not State.CLOSING)
    assert lost == {"acks": 3, "closed": 2}
    assert pair.client.state is State.CLOSED and sconn.state is State.CLOSED
    assert pair.got == {"client": [b"from the server"], "server": [b"from the client"]}
    assert pair.now < 5.0  # no dead_peer_timeout was needed


def test_only_the_fin_ack_missing_still_closes_both_sides() -> None:
    cfg = dataclasses.replace(SMALL, dead_peer_timeout=3.0, linger=0.0)
    pair = Pair(cfg)
    sconn = pair.connect()
    pair.client.send(b"bye")
    pair.client.close()
    pair.run(1.0, until=lambda: sconn.peer_finished)
    cut = {"on": False}
    # from the server's FIN on, nothing the client says gets through
    pair.drop = lambda direction, d: cut["on"] and direction == "c2s"
    sconn.close()
    cut["on"] = True
    pair.run(20.0, until=lambda: pair.client.finished and sconn.finished)
    # the server never heard its FIN acked, but everything else arrived both ways
    assert sconn.state is State.CLOSED and sconn.error is None
    assert pair.client.state is State.CLOSED and pair.client.error is None
    assert pair.got["server"] == [b"bye"] and sconn.at_eof
    assert 3.0 < pair.now < 10.0
    pair.server.on_timeout(pair.now)
    pair.server.datagrams_to_send(pair.now)
    assert pair.server.connections() == [] and pair.server.next_deadline() is None


def test_an_outage_longer_than_linger_is_answered_by_the_tombstone() -> None:
    client_cfg = dataclasses.replace(SMALL, dead_peer_timeout=10.0, linger=0.0)
    server_cfg = dataclasses.replace(SMALL, dead_peer_timeout=10.0, linger=1.0)
    pair = Pair(client_cfg, server_cfg)
    sconn = pair.connect()
    outage: dict[str, float] = {}

    def drop(direction: str, d: Datagram) -> bool:
        if sconn.state is State.CLOSED and "from" not in outage:
            outage["from"] = pair.now  # the server just closed: cut it off for 3 s
        return direction == "s2c" and "from" in outage and pair.now < outage["from"] + 3.0

    pair.drop = drop
    pair.client.send(b"last words")
    pair.client.close()
    sconn.close()
    pair.run(10.0, until=lambda: pair.client.finished)
    assert pair.server.connections() == []  # forgotten during the outage...
    assert pair.server.statistics().tombstone_replies >= 1  # ...yet it answered
    assert pair.client.state is State.CLOSED and pair.client.error is None
    assert pair.got["server"] == [b"last words"]
    assert pair.now < outage["from"] + 6.0


def test_close_while_connecting_still_delivers() -> None:
    pair = Pair()
    pair.client.send(b"early")
    pair.client.close()
    assert pair.client.state is State.CONNECTING
    with pytest.raises(ChannelClosed):
        pair.client.send(b"late")
    pair.run(5.0, until=lambda: pair.sconn is not None and pair.sconn.peer_finished)
    assert pair.got["server"] == [b"early"]


def test_send_limits() -> None:
    cfg = ReliableConfig(max_datagram=200, max_message=1000, recv_window=8, send_buffer=1500)
    pair = Pair(cfg)
    with pytest.raises(MessageTooLarge):
        pair.client.send(bytes(1001))
    pair.client.send(bytes(1000))
    assert pair.client.send_space() == 500
    with pytest.raises(Full):
        pair.client.send(bytes(501))
    pair.client.send(bytearray(500))  # copied: the caller may reuse its buffer
    assert pair.client.send_space() == 0


def test_negotiated_limits_take_the_smaller_side() -> None:
    client_cfg = ReliableConfig(max_datagram=1400, max_message=20000, recv_window=64)
    server_cfg = ReliableConfig(max_datagram=300, max_message=5000, recv_window=64)
    pair = Pair(client_cfg, server_cfg)
    pair.connect()
    assert pair.client.max_datagram == 300
    with pytest.raises(MessageTooLarge):
        pair.client.send(bytes(5001))
    pair.client.send(bytes(5000))
    pair.run(2.0)
    assert all(len(encode_datagram(d)) <= 300 for _, _, d in pair.log[5:])
    assert pair.got["server"] == [bytes(5000)]


def test_fin_acked_and_max_message_for_drivers() -> None:
    """What the transport's close and send read: the FIN's ack, the negotiated limit."""
    pair = Pair(ReliableConfig(max_message=20000), ReliableConfig(max_message=5000))
    sconn = pair.connect()
    assert pair.client.max_message == 5000 and sconn.max_message == 5000
    assert not pair.client.fin_acked
    pair.client.send(b"x" * 3000)
    pair.client.close()
    assert not pair.client.fin_acked and not pair.client.data_acked  # not even sent
    pair.drop = lambda direction, d: direction == "s2c"  # the acks are lost
    pair.run(0.05)
    assert not pair.client.fin_acked and not pair.client.data_acked and sconn.peer_finished
    pair.drop = lambda direction, d: False
    pair.run(5.0, until=lambda: pair.client.fin_acked)
    assert pair.client.fin_acked and pair.client.data_acked
    assert pair.got["server"] == [b"x" * 3000]


def test_queued_message_over_the_peer_limit_fails_clearly() -> None:
    pair = Pair(ReliableConfig(max_message=20000), ReliableConfig(max_message=100))
    pair.client.send(bytes(5000))
    pair.run(2.0)
    assert pair.client.state is State.FAILED
    assert isinstance(pair.client.error, MessageTooLarge)
    assert "limit of 100 bytes" in str(pair.client.error)
    # the half-open server side heard the RESET: failed, never accepted, forgotten
    assert pair.sconn is None and pair.server.connections() == []
    assert any(d.type == Type.RESET for _, _, d in pair.log)


# -- damage, garbage and strays --------------------------------------------------------


def established_pair(config: ReliableConfig | None = None) -> tuple[Pair, ReliableConnection]:
    pair = Pair(config, auto_read=False)
    return pair, pair.connect()


def test_every_single_bit_flip_is_dropped_and_counted() -> None:
    pair, sconn = established_pair()
    sconn.send(b"payload that must never arrive damaged")
    (sample,) = sconn.datagrams_to_send(pair.now)
    flips = 0
    for bit in range(len(sample) * 8):
        damaged = bytearray(sample)
        damaged[bit // 8] ^= 1 << (bit % 8)
        assert not verify_crc(damaged)
        pair.client.receive_datagram(bytes(damaged), pair.now)
        flips += 1
    stats = pair.client.statistics()
    assert stats.corrupt_dropped == flips == len(sample) * 8
    assert pair.client.messages() == [] and stats.messages_received == 0
    pair.client.receive_datagram(sample, pair.now)  # the intact one is delivered
    assert pair.client.messages() == [b"payload that must never arrive damaged"]


def test_server_counts_damage_and_strays() -> None:
    pair, sconn = established_pair()
    pair.client.send(b"x")
    (data,) = pair.client.datagrams_to_send(pair.now)
    server = pair.server
    server.receive_datagram(data[:-1] + bytes([data[-1] ^ 1]), "client", pair.now)
    server.receive_datagram(data[:20], "client", pair.now)  # truncated
    # right id, another address, and not the connection's next word (see
    # test_an_established_peer_that_moves_is_followed_when_its_datagram_fits)
    elsewhere = replace(decode_datagram(data), ack=(sconn.snd_nxt + 1) & MASK)
    server.receive_datagram(encode_datagram(elsewhere), "someone else", pair.now)
    d = decode_datagram(data)
    d.conn ^= 0x5A5A5A5A  # an id the server never gave
    server.receive_datagram(encode_datagram(d), "client", pair.now)
    stats = server.statistics()
    assert stats.corrupt_dropped == 2 and stats.stray_dropped == 2
    assert sconn.messages() == []
    assert server.receive_datagram(data, "client", pair.now) is sconn
    assert sconn.messages() == [b"x"]


def test_datagrams_of_an_old_connection_are_rejected() -> None:
    pair, sconn = established_pair()
    pair.client.send(b"first life")
    pair.client.close()
    sconn.close()
    pair.run(30.0, until=lambda: not pair.server.connections() and pair.client.finished)
    old = [encode_datagram(d) for _, dr, d in pair.log if dr == "c2s" and d.type != Type.SYN]
    old_ack = max(d.ack for _, dr, d in pair.log if dr == "s2c" and d.type == Type.ACK)
    second = Pair(seed=1)
    second.server = pair.server  # the same server, a new client
    second.connect()
    # within dead_peer_timeout the forgotten connection's last ack answers them (TIME_WAIT)
    now = pair.now
    for data in old:
        assert pair.server.receive_datagram(data, "client", now) is None
    replies = pair.server.datagrams_to_send(now, only=[])
    assert len(replies) == len(old) == pair.server.statistics().tombstone_replies
    for data, addr in replies:
        d = decode_datagram(data)
        assert addr == "client" and d.flags & Flag.CLOSED and d.ack == old_ack
        assert len(data) == OVERHEAD  # never larger than what it answers
    # from another address, or later, they are plain strays
    before = pair.server.statistics().stray_dropped
    pair.server.receive_datagram(old[0], "elsewhere", now)
    for data in old:
        pair.server.receive_datagram(data, "client", now + 11.0)
    assert pair.server.statistics().stray_dropped == before + 1 + len(old)
    assert second.got["server"] == []


def test_segments_beyond_the_window_are_dropped_and_memory_stays_bounded() -> None:
    cfg = ReliableConfig(max_datagram=200, max_message=1000, recv_window=8)
    pair, sconn = established_pair(cfg)
    pair.run(0.5)
    sconn.send(b"in window")
    (first,) = sconn.datagrams_to_send(pair.now)
    template = decode_datagram(first)
    edge = pair.client.recv_edge
    for offset in range(1, 40):  # a peer that ignores our window (CRC-valid, well formed)
        rogue = dataclasses.replace(template, seq=(template.seq + offset) & MASK)
        pair.client.receive_datagram(encode_datagram(rogue), pair.now)
        assert pair.client.recv_buffered <= cfg.recv_window
    stats = pair.client.statistics()
    assert stats.window_dropped == 39 - (edge - pair.client.rcv_nxt - 1)
    assert stats.out_of_order_buffered == edge - pair.client.rcv_nxt - 1


def test_duplicates_are_dropped_and_counted() -> None:
    pair, sconn = established_pair()
    sconn.send(b"once")
    (data,) = sconn.datagrams_to_send(pair.now)
    for _ in range(5):
        pair.client.receive_datagram(data, pair.now)
    assert pair.client.messages() == [b"once"]
    assert pair.client.statistics().duplicates_dropped == 4


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_garbage_never_crashes(data: bytes) -> None:
    try:
        decode_datagram(data)
    except FrameError:
        pass
    conn = ReliableConnection.client(0.0, random.Random(0).randbytes)
    conn.receive_datagram(data, 0.0)
    assert conn.messages() == [] and conn.state is State.CONNECTING
    server = ReliableServer(random.Random(0).randbytes)
    server.receive_datagram(data, "addr", 0.0)
    assert server.connections() == []


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 20),
    st.integers(0, MASK),
    st.integers(0, MASK),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=200),
)
def test_garbage_with_a_valid_crc_only_raises_frame_error(
    version: int,
    type_: int,
    flags: int,
    nsack: int,
    conn: int,
    seq: int,
    frag: int,
    nfrag: int,
    rest: bytes,
) -> None:
    head = HEADER.pack(version, type_, flags, nsack, conn, seq, seq, 10, frag, nfrag, len(rest))
    body = head + rest
    data = body + struct.pack("<I", crc32c(body))
    try:
        d = decode_datagram(data)
    except FrameError:
        return
    assert encode_datagram(d) == data  # what decodes re-encodes identically


@settings(max_examples=200)
@given(
    st.sampled_from([t for t in Type if t not in (Type.SYN, Type.SYN_ACK, Type.COOKIE)]),
    st.integers(1, MASK),
    st.integers(0, MASK),
    st.integers(0, MASK),
    st.integers(0, 1 << 24),
    st.lists(st.tuples(st.integers(0, MASK), st.integers(1, 1 << 20)), max_size=4),
    st.binary(max_size=64),
    st.booleans(),
)
def test_encode_decode_round_trip(
    type_: Type,
    conn: int,
    seq: int,
    ack: int,
    window: int,
    sacks: list[tuple[int, int]],
    payload: bytes,
    ack_now: bool,
) -> None:
    rule = DATAGRAM_RULES[type_]
    blocks = tuple((s, (s + n) & MASK) for s, n in sacks) if rule.sack else ()
    if type_ is Type.RESET:
        payload = b"\x01" + payload
    elif type_ is not Type.DATA:
        payload = b""
    frag, nfrag = (0, 1) if rule.fragments else (0, 0)
    d = Datagram(type_, conn, seq, ack, window, int(ack_now), frag, nfrag, blocks, payload)
    data = encode_datagram(d)
    assert len(data) == OVERHEAD + 8 * len(blocks) + len(payload)
    assert decode_datagram(data) == d


def test_byte_layout_matches_the_documented_table() -> None:
    d = Datagram(
        Type.DATA, 0x11223344, 0x55667788, 0x99AABBCC, 0x0D0E0F10, 1, 2, 3, ((5, 9),), b"xyz"
    )
    data = encode_datagram(d)
    assert data[0] == 1 and data[1] == Type.DATA and data[2] == 1 and data[3] == 1
    assert data[4:8] == (0x11223344).to_bytes(4, "little")
    assert data[8:12] == (0x55667788).to_bytes(4, "little")
    assert data[12:16] == (0x99AABBCC).to_bytes(4, "little")
    assert data[16:20] == (0x0D0E0F10).to_bytes(4, "little")
    assert data[20:22] == (2).to_bytes(2, "little") and data[22:24] == (3).to_bytes(2, "little")
    assert data[24:28] == (3).to_bytes(4, "little")
    assert data[28:36] == (5).to_bytes(4, "little") + (9).to_bytes(4, "little")
    assert data[36:39] == b"xyz"
    assert data[39:] == crc32c(data[:39]).to_bytes(4, "little")
    assert HEADER.size == 28 and OVERHEAD == 32


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.__setattr__("type", 9), "unknown datagram type"),
        (lambda d: d.__setattr__("flags", 0x80), "reserved flag"),
        (lambda d: d.__setattr__("nfrag", 0), "fragment"),
        (lambda d: d.__setattr__("frag", 5), "fragment"),
        (lambda d: d.__setattr__("conn", 0), "connection id 0"),
        (lambda d: d.__setattr__("sacks", ((7, 7),)), "SACK block"),
        (lambda d: (d.__setattr__("flags", Flag.BUNDLE), d.__setattr__("nfrag", 2)), "bundle"),
        (
            lambda d: (
                d.__setattr__("type", Type.FIN),
                d.__setattr__("flags", Flag.BUNDLE),
                d.__setattr__("payload", b""),
                d.__setattr__("nfrag", 0),
            ),
            "cannot be a bundle",
        ),
        (lambda d: d.__setattr__("type", Type.ACK), "payload bytes"),
        (lambda d: (d.__setattr__("type", Type.RESET), d.__setattr__("payload", b"")), "payload"),
        (
            lambda d: (d.__setattr__("type", Type.FIN), d.__setattr__("payload", b"")),
            "no fragment fields",
        ),
    ],
)
def test_decoder_rules(mutate: Callable[[Datagram], object], message: str) -> None:
    d = Datagram(Type.DATA, 7, 1, 1, 4, 0, 0, 1, (), b"abc")
    mutate(d)
    with pytest.raises(FrameError, match=message):
        decode_datagram(encode_datagram(d))


def test_decoder_rejects_bad_versions_lengths_and_crc() -> None:
    good = encode_datagram(Datagram(Type.ACK, 7, 1, 1, 4))
    with pytest.raises(FrameError, match="shorter"):
        decode_datagram(good[:31])
    with pytest.raises(FrameError, match="CRC32C"):
        decode_datagram(good[:-1] + bytes([good[-1] ^ 0xFF]))
    body = bytes([2]) + good[1:-4]
    with pytest.raises(FrameError, match="version"):
        decode_datagram(body + crc32c(body).to_bytes(4, "little"))
    body = good[:-4] + b"\x00"  # one stray byte, CRC fixed up
    with pytest.raises(FrameError, match="add up"):
        decode_datagram(body + crc32c(body).to_bytes(4, "little"))
    with pytest.raises(FrameError, match="CRC32C"):
        decode_datagram(good[:-4] + b"\x00" + good[-4:])  # checked before anything else
    assert decode_datagram(good[:-4] + bytes(4), verify=False).type == Type.ACK


# -- the server: cookies and caps -------------------------------------------------------


def syn_from(client: ReliableConnection, now: float = 0.0) -> bytes:
    (syn,) = client.datagrams_to_send(now)
    assert decode_datagram(syn).type == Type.SYN
    return syn


def answer(server: ReliableServer, now: float) -> list[Datagram]:
    return [decode_datagram(data) for data, _ in server.datagrams_to_send(now)]


def with_cookie(syn: bytes, cookie: bytes) -> bytes:
    d = decode_datagram(syn)
    hello = Hello.decode(d.payload)
    d.payload = dataclasses.replace(hello, cookie=cookie).encode()
    return encode_datagram(d)


def test_cookies_keep_the_server_stateless_until_proven() -> None:
    rng = random.Random(3)
    server = ReliableServer(rng.randbytes)
    flood = [syn_from(ReliableConnection.client(0.0, rng.randbytes)) for _ in range(500)]
    for i, syn in enumerate(flood):
        assert server.receive_datagram(syn, ("198.51.100.7", i), 1.0) is None
    replies = answer(server, 1.0)
    assert len(replies) == 500 and {Type(d.type) for d in replies} == {Type.COOKIE}
    assert server.connections() == []  # 500 SYNs, no state
    # a cookie is bound to the address, the client id and ISN, and expires
    cookie = replies[0].payload
    assert server.receive_datagram(with_cookie(flood[0], cookie), ("198.51.100.7", 1), 1.0) is None
    assert server.receive_datagram(with_cookie(flood[1], cookie), ("198.51.100.7", 0), 1.0) is None
    forged = cookie[:4] + bytes(12)
    assert server.receive_datagram(with_cookie(flood[0], forged), ("198.51.100.7", 0), 1.0) is None
    assert server.receive_datagram(with_cookie(flood[0], cookie), ("198.51.100.7", 0), 30.0) is None
    assert server.statistics().cookies_rejected == 4 and server.connections() == []
    conn = server.receive_datagram(with_cookie(flood[0], cookie), ("198.51.100.7", 0), 5.0)
    assert conn is not None and conn.state is State.CONNECTING
    # the same SYN again goes to the same half-open connection (its SYN_ACK is resent)
    assert server.receive_datagram(with_cookie(flood[0], cookie), ("198.51.100.7", 0), 5.1) is conn
    assert len(server.connections()) == 1


def handshake_through(server: ReliableServer, rng: random.Random, addr: object, now: float):
    """Drive one client's SYN and cookie round; return (client, server-side conn or None)."""
    client = ReliableConnection.client(now, rng.randbytes)
    server.receive_datagram(syn_from(client, now), addr, now)
    for data, to in server.datagrams_to_send(now):
        if to == addr:
            client.receive_datagram(data, now)
    (syn2,) = client.datagrams_to_send(now)
    return client, server.receive_datagram(syn2, addr, now)


def test_half_open_cap_and_expiry() -> None:
    rng = random.Random(4)
    cfg = ReliableConfig(handshake_timeout=3.0)
    server = ReliableServer(rng.randbytes, cfg, max_half_open=2)
    made = [handshake_through(server, rng, ("203.0.113.1", port), 1.0)[1] for port in range(3)]
    assert made[0] is not None and made[1] is not None and made[2] is None
    stats = server.statistics()
    assert stats.half_open == 2 and stats.syn_dropped == 1
    server.datagrams_to_send(1.0)
    deadline = server.next_deadline()
    assert deadline is not None and deadline <= 4.0
    server.datagrams_to_send(4.5)  # nobody finished the handshake: both expire
    assert server.connections() == [] and server.statistics().half_open == 0
    assert isinstance(made[0].error, Timeout)
    assert server.accept() is None


def test_connection_cap_refuses_with_a_reset() -> None:
    rng = random.Random(5)
    server = ReliableServer(rng.randbytes, max_connections=1)
    first = handshake_through(server, rng, "a", 0.0)[1]
    assert first is not None
    client, second = handshake_through(server, rng, "b", 0.0)
    assert second is None and server.statistics().refused == 1
    for data, to in server.datagrams_to_send(0.0):
        if to == "b":
            client.receive_datagram(data, 0.0)
    assert client.state is State.FAILED
    assert isinstance(client.error, ConnectionRefused)
    assert "server full" in str(client.error)


def test_server_without_cookies_still_caps_half_open() -> None:
    rng = random.Random(6)
    server = ReliableServer(rng.randbytes, require_cookie=False, max_half_open=3)
    for i in range(10):
        client = ReliableConnection.client(0.0, rng.randbytes)
        server.receive_datagram(syn_from(client), ("192.0.2.1", i), 0.0)
    assert len(server.connections()) == 3 and server.statistics().syn_dropped == 7


# -- timers: handshake, RTT, Karn, backoff, delayed acks, dead peers ------------------------


def test_syn_is_retransmitted_with_backoff_then_the_connect_times_out() -> None:
    cfg = ReliableConfig(initial_rto=0.1, max_rto=0.4, handshake_timeout=2.0)
    client = ReliableConnection.client(0.0, random.Random(1).randbytes, cfg)
    now, sends = 0.0, []
    while client.state is State.CONNECTING:
        if client.datagrams_to_send(now):
            sends.append(now)
        if client.state is State.FAILED:
            break
        deadline = client.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(sends)]
    assert gaps[:3] == [0.1, 0.2, 0.4] and set(gaps[3:]) <= {0.4}
    assert client.state is State.FAILED and now == 2.0
    assert isinstance(client.error, Timeout) and "handshake_timeout" in str(client.error)
    with pytest.raises(Timeout):
        client.send(b"x")


def test_rtt_estimate_and_rto_bounds() -> None:
    cfg = ReliableConfig(min_rto=0.05, max_rto=1.0, ack_delay=0.0, ack_every=1)
    pair = Pair(cfg, delay=0.04)  # RTT 80 ms
    sconn = pair.connect()
    for i in range(20):
        pair.client.send(b"m%d" % i)
        pair.run(0.2)
    stats = pair.client.statistics()
    assert stats.srtt is not None and abs(stats.srtt - 0.08) < 1e-6
    assert stats.rttvar is not None and stats.rttvar < 0.01
    assert abs(stats.rto - max(0.05, stats.srtt + max(0.001, 4 * stats.rttvar))) < 1e-9
    assert sconn.statistics().srtt is not None  # the server measured its SYN_ACK


def test_karn_rule_and_backoff() -> None:
    cfg = ReliableConfig(initial_rto=0.2, min_rto=0.05, max_rto=0.8, ack_delay=0.0)
    pair, sconn = established_pair(cfg)
    pair.run(0.5)
    srtt_before = pair.client.statistics().srtt
    rto_before = pair.client.rto
    blackhole = {"on": True}
    pair.drop = lambda direction, d: blackhole["on"] and direction == "s2c"
    pair.client.send(b"lost ack")
    start = pair.now
    pair.run(3.0, until=lambda: pair.client.statistics().timeouts >= 3)
    # each expiry doubles the RTO, up to max_rto
    assert pair.client.rto == min(rto_before * 8, 0.8)
    sends = [t for t, dr, d in pair.log if dr == "c2s" and d.type == Type.DATA and t >= start]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(sends)]
    assert len(gaps) == 3
    assert gaps == [round(min(rto_before * 2**i, 0.8), 6) for i in range(3)]
    blackhole["on"] = False
    pair.run(2.0, until=lambda: pair.client.snd_una == pair.client.snd_nxt)
    # Karn: the ack of a retransmitted segment is no RTT sample; the backed-off RTO stays
    assert pair.client.statistics().srtt == srtt_before
    assert pair.client.rto == min(rto_before * 8, 0.8)
    assert pair.client.statistics().retransmitted >= 3
    pair.client.send(b"fresh")  # a segment sent once gives a sample again
    pair.run(1.0)
    assert pair.client.rto < 0.8
    assert sconn.messages() == [b"lost ack", b"fresh"]


def test_karn_an_ambiguous_ack_gives_no_sample() -> None:
    cfg = ReliableConfig(ack_every=1, min_rto=0.05)
    pair, sconn = established_pair(cfg)
    pair.run(0.5)
    before = sconn.statistics()
    t = pair.now
    sconn.send(b"x")
    (original,) = sconn.datagrams_to_send(t)
    pair.client.receive_datagram(original, t + 0.01)
    (ack,) = pair.client.datagrams_to_send(t + 0.01)  # held back by the network...
    rto_at = sconn.next_deadline()
    assert rto_at == pytest.approx(t + before.rto)
    (again,) = sconn.datagrams_to_send(rto_at)  # ...so the sender retransmits
    assert decode_datagram(again).seq == decode_datagram(original).seq
    sconn.receive_datagram(ack, rto_at + 0.001)  # the ack of the FIRST copy lands now
    after = sconn.statistics()
    assert after.acked == before.acked + 1
    # a naive sample would say the RTT is 1 ms; Karn's rule takes none
    assert after.srtt == before.srtt and after.rttvar == before.rttvar
    assert after.rto == min(2 * before.rto, cfg.max_rto)  # and keeps the backoff


def test_acks_are_batched_and_delayed() -> None:
    cfg = ReliableConfig(ack_every=3, ack_delay=0.05)
    pair, sconn = established_pair(cfg)
    pair.run(0.5)
    data = []
    for m in (b"1", b"2", b"3", b"4"):
        sconn.send(m)
        data += sconn.datagrams_to_send(pair.now)  # one at a time: no bundle
    assert len(data) == 4
    receiver, t = pair.client, pair.now
    receiver.receive_datagram(data[0], t)
    assert receiver.datagrams_to_send(t) == []  # 1 of 3: wait
    receiver.receive_datagram(data[1], t)
    assert receiver.datagrams_to_send(t) == []  # 2 of 3: wait
    assert receiver.next_deadline() == pytest.approx(t + 0.05)
    receiver.receive_datagram(data[2], t)
    (ack,) = receiver.datagrams_to_send(t)  # 3 of 3: ack now
    assert decode_datagram(ack).type == Type.ACK
    assert decode_datagram(ack).ack == (decode_datagram(data[2]).seq + 1) & MASK
    receiver.receive_datagram(data[3], t)
    assert receiver.datagrams_to_send(t + 0.049) == []
    (late,) = receiver.datagrams_to_send(t + 0.05)  # the delay ran out
    assert decode_datagram(late).ack == (decode_datagram(data[3]).seq + 1) & MASK
    # data going the other way carries the ack for free: no pure ACK needed
    sconn.send(b"5")
    (five,) = sconn.datagrams_to_send(t)
    receiver.receive_datagram(five, t)
    receiver.send(b"reply")
    (reply,) = receiver.datagrams_to_send(t)
    assert decode_datagram(reply).type == Type.DATA
    assert decode_datagram(reply).ack == (decode_datagram(five).seq + 1) & MASK


def test_a_waiting_sender_asks_for_its_ack_once_per_flight() -> None:
    cfg = ReliableConfig(ack_every=3, ack_delay=0.05)
    pair, sconn = established_pair(cfg)
    pair.run(0.5)
    receiver, t = pair.client, pair.now
    sconn.request_ack()
    assert sconn.datagrams_to_send(t) == []  # nothing unacked: nothing to ask
    sconn.send(b"flush me")
    (data,) = sconn.datagrams_to_send(t)
    receiver.receive_datagram(data, t)
    assert receiver.datagrams_to_send(t) == []  # 1 of 3: the receiver would wait 50 ms
    sconn.request_ack()  # the application waits (flush, close, a handshake)
    (ping,) = sconn.datagrams_to_send(t)
    assert decode_datagram(ping).type == Type.ACK
    assert decode_datagram(ping).flags & Flag.ACK_NOW
    sconn.request_ack()  # same flight: the first ping stands
    assert sconn.datagrams_to_send(t) == []
    receiver.receive_datagram(ping, t)
    (ack,) = receiver.datagrams_to_send(t)  # at once, not after ack_delay
    assert decode_datagram(ack).ack == (decode_datagram(data).seq + 1) & MASK
    sconn.receive_datagram(ack, t)
    assert sconn.snd_una == sconn.snd_nxt
    sconn.request_ack()  # all acked: nothing to ask
    assert sconn.datagrams_to_send(t) == []
    sconn.send(b"next flight")
    sconn.datagrams_to_send(t)
    sconn.request_ack()  # a new flight may ask again
    (again,) = sconn.datagrams_to_send(t)
    assert decode_datagram(again).flags & Flag.ACK_NOW


def test_small_queued_messages_travel_bundled() -> None:
    cfg = ReliableConfig(max_datagram=300, max_message=1000, recv_window=8)
    pair, sconn = established_pair(cfg)
    pair.run(0.5)
    messages = [b"m%03d" % i + bytes(i % 50) for i in range(200)]
    for m in messages:
        sconn.send(m)
    pair.auto_read = True
    pair.run(5.0)
    assert pair.got["client"] == messages
    bundles = [d for d in pair.sent("s2c", Type.DATA) if d.flags & Flag.BUNDLE]
    assert bundles and all(len(encode_datagram(d)) <= 300 for d in bundles)
    assert len(pair.sent("s2c", Type.DATA)) < len(messages) // 3
    assert sconn.send_buffered == 0 and pair.client.recv_buffered == 0
    assert pair.client.statistics().messages_received == 200


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\x05\x00\x00\x00abc", "overrun"),
        (b"\x01\x00\x00\x00a\x00\x00", "truncated"),
        (b"", "empty bundle"),
    ],
)
def test_malformed_bundles_are_violations(payload: bytes, why: str) -> None:
    pair, sconn = established_pair()
    pair.run(0.5)
    sconn.send(b"x")
    (good,) = sconn.datagrams_to_send(pair.now)
    d = decode_datagram(good)
    d.flags |= Flag.BUNDLE
    d.payload = payload
    pair.client.receive_datagram(encode_datagram(d), pair.now)
    assert pair.client.state is State.FAILED and why in str(pair.client.error)


def test_datagrams_to_send_honours_a_limit() -> None:
    pair, sconn = established_pair()
    pair.run(0.5)
    for i in range(5):
        sconn.send(bytes([i]) * 1000)  # too big to bundle in pairs
    first = sconn.datagrams_to_send(pair.now, limit=2)
    rest = sconn.datagrams_to_send(pair.now)
    assert len(first) == 2 and len(rest) == 3
    seqs = [decode_datagram(d).seq for d in first + rest]
    assert seqs == sorted(seqs)


def test_server_can_be_asked_about_one_connection() -> None:
    pair, sconn = established_pair()
    pair.run(0.5)
    sconn.send(b"only me")
    out = pair.server.datagrams_to_send(pair.now, only=[sconn])
    assert [decode_datagram(d).type for d, _ in out] == [Type.DATA]
    assert {addr for _, addr in out} == {"client"}


def test_out_of_order_is_acked_at_once_with_sack_and_only_the_hole_is_resent() -> None:
    cfg = ReliableConfig(ack_every=8, ack_delay=0.5, max_sack_blocks=4)
    pair, sconn = established_pair(cfg)
    pair.run(0.5)
    data = []
    for i in range(6):
        sconn.send(b"seg%d" % i)
        data += sconn.datagrams_to_send(pair.now)
    assert len(data) == 6
    receiver, t = pair.client, pair.now
    for i in (0, 2, 3, 5):  # 1 and 4 lost
        receiver.receive_datagram(data[i], t)
    acks = [decode_datagram(d) for d in receiver.datagrams_to_send(t)]
    assert len(acks) == 1
    seqs = [decode_datagram(d).seq for d in data]
    assert acks[0].ack == seqs[1]
    assert set(acks[0].sacks) == {(seqs[2], seqs[4]), (seqs[5], (seqs[5] + 1) & MASK)}
    assert acks[0].sacks[0] == (seqs[5], (seqs[5] + 1) & MASK)  # the newest block first
    assert receiver.statistics().out_of_order_buffered == 3
    assert receiver.messages() == [b"seg0"]
    sconn.receive_datagram(encode_datagram(acks[0]), t + 0.02)
    resent = [decode_datagram(d) for d in sconn.datagrams_to_send(t + 0.021)]
    # 1 is lost by the count rule (3 later segments acked); 4 waits for the time rule
    assert [d.seq for d in resent] == [seqs[1]]
    loss_time = sconn.next_deadline()  # 9/8 RTT after segment 4 left
    assert loss_time is not None and t + 0.021 < loss_time < t + 0.03
    resent += [decode_datagram(d) for d in sconn.datagrams_to_send(loss_time)]
    assert [d.seq for d in resent] == [seqs[1], seqs[4]]
    assert sconn.statistics().timeouts == 0 and sconn.statistics().losses_detected == 2
    for d in resent:
        receiver.receive_datagram(encode_datagram(d), t + 1.0)
    assert receiver.messages() == [b"seg1", b"seg2", b"seg3", b"seg4", b"seg5"]


def test_flow_control_stops_the_sender_and_a_lost_window_update_is_probed() -> None:
    cfg = ReliableConfig(max_datagram=200, max_message=1000, recv_window=8, send_buffer=60_000)
    pair = Pair(cfg, auto_read=False)
    sconn = pair.connect()
    for i in range(30):
        pair.client.send(bytes([i]) * 100)  # one segment each
    pair.run(3.0)
    assert sconn.pending_messages == 8  # the window is full: the application reads nothing
    assert pair.client.snd_nxt == pair.client.peer_edge
    assert sconn.statistics().window_dropped == 0 and sconn.recv_buffered == 8
    # window updates are lost; the sender's persist timer probes
    pair.drop = lambda direction, d: direction == "s2c" and d.type == Type.ACK and d.window > 0
    got = sconn.messages()
    pair.run(2.0)
    probes = [d for _, dr, d in pair.log if dr == "c2s" and d.flags & Flag.ACK_NOW]
    assert probes, "the sender never probed the closed window"
    pair.drop = lambda direction, d: False
    pair.run(5.0, until=lambda: not pair.client.send_buffered)
    for _ in range(10):
        got += sconn.messages()
        pair.run(0.5)
    assert got == [bytes([i]) * 100 for i in range(30)]


def test_dead_peer_fails_within_the_timeout() -> None:
    cfg = ReliableConfig(dead_peer_timeout=4.0)
    pair, sconn = established_pair(cfg)
    pair.run(1.0)
    pair.drop = lambda direction, d: True  # the path is cut both ways
    pair.client.send(b"into the void")
    pair.run(10.0, until=lambda: pair.client.state is State.FAILED)
    assert pair.client.state is State.FAILED and isinstance(pair.client.error, Timeout)
    assert "dead_peer_timeout" in str(pair.client.error)
    assert pair.now == pytest.approx(pair.last_rx["s2c"] + 4.0)  # to the deadline
    pair.run(10.0, until=lambda: sconn.state is State.FAILED)
    assert isinstance(sconn.error, Timeout)


def test_a_failed_connection_counts_every_message_it_could_not_deliver() -> None:
    """``messages_lost``: accepted by ``send`` and not acknowledged in order when the
    connection failed. A message SACKed behind a hole counts: the peer's application
    never gets it (delivery is in order)."""
    cfg = ReliableConfig(dead_peer_timeout=4.0, max_datagram=200, max_message=2000)
    pair, sconn = established_pair(cfg)
    for i in range(5):
        pair.client.send(b"early %d" % i)
    pair.run(1.0)
    assert len(sconn.messages()) == 5
    assert pair.client.statistics().messages_acked == 5
    hole = pair.client.snd_nxt  # the next segment is lost, every time it is sent
    pair.drop = lambda direction, d: (
        direction == "c2s" and d.type == Type.DATA and (d.seq == hole & MASK)
    )
    pair.client.send(b"lost")
    pair.flush()
    pair.client.send(b"SACKed, behind the hole")
    pair.client.send(b"x" * 1500)  # several fragments
    pair.run(0.5)
    assert pair.client.statistics().messages_acked == 5
    assert sconn.messages() == []  # they wait for the hole
    pair.drop = lambda direction, d: True  # now the peer goes silent
    pair.run(10.0, until=lambda: pair.client.state is State.FAILED)
    st = pair.client.statistics()
    assert isinstance(pair.client.error, Timeout)
    assert (st.messages_sent, st.messages_acked, st.messages_lost) == (8, 5, 3)


def test_an_aborted_connection_counts_its_undelivered_messages() -> None:
    pair, sconn = established_pair()
    pair.client.send(b"delivered")
    pair.run(1.0)
    pair.drop = lambda direction, d: True
    pair.client.send(b"queued")
    pair.client.abort()
    assert pair.client.statistics().messages_lost == 1
    assert sconn.statistics().messages_lost == 0


def test_an_established_peer_that_moves_is_followed_when_its_datagram_fits() -> None:
    """A restarted relay or a NAT rebinding: the client's datagrams come from a new
    address. The server follows the connection there when a datagram proves to be its
    next word (its id, a valid CRC32C, an ack in snd_una..snd_nxt, a sequence number
    in the window); anything else from another address stays stray."""
    pair, sconn = established_pair()
    server = pair.server
    sconn.send(b"from the server")
    pair.run(1.0)
    assert pair.client.messages() == [b"from the server"]
    acks = [d for _, dr, d in pair.log if dr == "c2s" and d.type == Type.ACK]
    stale = encode_datagram(acks[0])  # the handshake's last ack: older than snd_una
    before = server.statistics()
    # not its next word: an old ack, an ack of what was never sent, a RESET, garbage
    assert decode_datagram(stale).ack != sconn.snd_una & MASK
    server.receive_datagram(stale, "relay 2", pair.now)
    pair.client.send(b"hello")
    (data,) = pair.client.datagrams_to_send(pair.now)
    d = decode_datagram(data)
    forged = [
        replace(d, ack=(sconn.snd_nxt + 5) & MASK),
        replace(d, seq=(sconn.recv_edge + 1) & MASK),
        Datagram(Type.RESET, d.conn, payload=bytes([ResetCode.ABORT])),
        replace(d, conn=d.conn ^ 1),
    ]
    for bad in forged:
        server.receive_datagram(encode_datagram(bad), "relay 2", pair.now)
    assert sconn.peer_addr == "client" and sconn.state is State.ESTABLISHED
    after = server.statistics()
    assert after.moved == 0 and after.stray_dropped == before.stray_dropped + 1 + len(forged)
    # the real next datagram moves it, and the answers go there
    assert server.receive_datagram(data, "relay 2", pair.now) is sconn
    assert sconn.peer_addr == "relay 2" and server.statistics().moved == 1
    assert sconn.messages() == [b"hello"]
    sconn.send(b"answer")
    replies = server.datagrams_to_send(pair.now)
    assert replies and {addr for _, addr in replies} == {"relay 2"}
    # both paths alive: the latest datagram that fits wins (a dead path sends nothing)
    server.receive_datagram(data, "client", pair.now)
    assert sconn.peer_addr == "client" and server.statistics().moved == 2
    assert sconn.messages() == []  # a duplicate: delivered once


def test_a_path_that_changes_mid_stream_loses_nothing() -> None:
    """A relay between the two dies mid-stream (everything on it is lost) and another
    takes over from a new address: both directions go on, every message once, in order."""
    pair = Pair(ReliableConfig(dead_peer_timeout=5.0), seed=3)
    sconn = pair.connect()
    sent = {"client": [b"c%d" % i for i in range(400)], "server": [b"s%d" % i for i in range(400)]}
    for i in range(400):
        pair.client.send(sent["client"][i])
        sconn.send(sent["server"][i])
        if i == 150:
            pair.run(0.02)  # some in flight...
            pair.wire.clear()  # ...lost with the relay
            pair.client_addr = "relay 2"  # its successor, with a new source address
            pair.run(0.5)  # both peers keep sending: replies to "client" are lost too
    pair.run(20.0, until=lambda: all(len(pair.got[k]) == 400 for k in pair.got))
    assert pair.got["server"] == sent["client"] and pair.got["client"] == sent["server"]
    assert sconn.peer_addr == "relay 2" and pair.server.statistics().moved == 1
    assert pair.client.statistics().retransmitted > 0
    assert sconn.state is State.ESTABLISHED and pair.client.state is State.ESTABLISHED


def test_a_connection_still_in_its_handshake_never_moves() -> None:
    rng = random.Random(5)
    server = ReliableServer(rng.randbytes)
    client = ReliableConnection.client(0.0, rng.randbytes)
    for _ in range(2):  # SYN, COOKIE, SYN with the cookie
        for data in client.datagrams_to_send(0.0):
            server.receive_datagram(data, "client", 0.0)
        for data, _ in server.datagrams_to_send(0.0):
            client.receive_datagram(data, 0.0)
    (sconn,) = server.connections()
    assert client.state is State.ESTABLISHED and sconn.state is State.CONNECTING
    (ack,) = client.datagrams_to_send(0.0)
    assert server.receive_datagram(ack, "elsewhere", 0.0) is None
    assert sconn.state is State.CONNECTING and sconn.peer_addr == "client"
    assert server.statistics().moved == 0


def test_keepalive_keeps_an_idle_connection_alive() -> None:
    cfg = ReliableConfig(dead_peer_timeout=2.0)
    pair, sconn = established_pair(cfg)
    pair.run(60.0)
    assert pair.client.state is State.ESTABLISHED and sconn.state is State.ESTABLISHED
    pings = [d for _, _, d in pair.log if d.type == Type.ACK and d.flags & Flag.ACK_NOW]
    assert 30 <= len(pings) <= 240  # at most one per keepalive interval (0.5 s) per side


# -- violations, resets, aborts ---------------------------------------------------------


def test_protocol_violation_fails_both_sides_clearly() -> None:
    pair, sconn = established_pair()
    pair.run(0.5)
    sconn.send(b"abc")
    (good,) = sconn.datagrams_to_send(pair.now)
    d = decode_datagram(good)
    d.frag, d.nfrag = 1, 2  # starts a message in the middle
    pair.client.receive_datagram(encode_datagram(d), pair.now)
    assert pair.client.state is State.FAILED
    assert isinstance(pair.client.error, ProtocolError)
    assert "fragment 1/2" in str(pair.client.error)
    resets = pair.client.datagrams_to_send(pair.now)
    assert len(resets) == RESET_COPIES  # never retransmitted, so sent thrice at once
    reset = resets[0]
    assert all(r == reset for r in resets)
    assert decode_datagram(reset).type == Type.RESET
    assert pair.client.datagrams_to_send(pair.now) == []  # and only then
    sconn.receive_datagram(reset, pair.now)
    assert sconn.state is State.FAILED and isinstance(sconn.error, ProtocolError)
    assert "protocol violation" in str(sconn.error)
    with pytest.raises(ProtocolError):
        sconn.send(b"x")


def test_abort_tells_the_peer() -> None:
    pair, sconn = established_pair()
    pair.run(0.5)
    pair.client.abort("user pressed ctrl-c")
    assert pair.client.state is State.FAILED and isinstance(pair.client.error, ChannelClosed)
    pair.run(1.0)
    assert sconn.state is State.FAILED and isinstance(sconn.error, EndOfChannel)
    assert "user pressed ctrl-c" in str(sconn.error)
    assert pair.server.connections() == []


def test_reset_after_close_is_ignored() -> None:
    pair, sconn = established_pair()
    pair.client.close()
    sconn.close()
    pair.run(1.0, until=lambda: sconn.state is State.CLOSED)
    reset = encode_datagram(
        Datagram(Type.RESET, sconn.local_id, 0, 0, 0, payload=bytes([ResetCode.ABORT]))
    )
    sconn.receive_parsed(decode_datagram(reset), pair.now)
    assert sconn.state is State.CLOSED


def test_data_after_fin_is_a_violation() -> None:
    pair, sconn = established_pair()
    pair.run(0.5)
    sconn.send(b"last")
    sconn.close()
    data = sconn.datagrams_to_send(pair.now)
    assert [decode_datagram(d).type for d in data] == [Type.DATA, Type.FIN]
    fin = decode_datagram(data[1])
    pair.client.receive_datagram(data[1], pair.now)  # FIN first, out of order
    after = dataclasses.replace(fin, type=Type.DATA, seq=(fin.seq + 1) & MASK, frag=0, nfrag=1)
    pair.client.receive_datagram(encode_datagram(after), pair.now)
    assert pair.client.state is State.FAILED and "after the FIN" in str(pair.client.error)


# -- sequence numbers wrap --------------------------------------------------------------


def test_sequence_numbers_wrap() -> None:
    def near_wrap(n: int) -> bytes:
        return (7).to_bytes(4, "little") + (MASK - 2).to_bytes(4, "little") if n == 8 else bytes(n)

    client = ReliableConnection.client(0.0, near_wrap, SMALL)
    pair = Pair(SMALL)
    pair.client = client
    sconn = pair.connect()
    messages = [bytes([i]) * 300 for i in range(12)]  # several segments each
    for m in messages:
        client.send(m)
    pair.run(5.0)
    assert pair.got["server"] == messages
    assert client.snd_una > MASK  # unbounded inside, wrapped on the wire
    assert max(d.seq for _, dr, d in pair.log if dr == "c2s" and d.type == Type.DATA) == MASK
    assert sconn.rcv_nxt == client.snd_nxt


# -- configuration, state table, layering -----------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_datagram": 100},
        {"max_sack_blocks": 17},
        {"max_message": 10**9},
        {"max_message": 100_000, "recv_window": 10},
        {"send_buffer": 10, "max_message": 100},
        {"min_rto": 2.0},
        {"ack_every": 0},
        {"keepalive": 0.0},
        {"linger": -1.0},
        {"initial_cwnd": 0},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="ReliableConfig"):
        ReliableConfig(**kwargs)  # type: ignore[arg-type]


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        ReliableConnection("peer", 1, 0.0)
    with pytest.raises(ValueError):
        ReliableConnection("client", 0, 0.0)
    with pytest.raises(ValueError):
        ReliableConnection("server", 1, 0.0)  # needs the client's hello
    with pytest.raises(ValueError):
        ReliableServer(random.Random(0).randbytes, max_half_open=0)


def test_state_table() -> None:
    states = {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values())
    assert states == set(State)
    for state in (State.CONNECTING, State.ESTABLISHED, State.CLOSING):
        assert TRANSITIONS[(state, Event.FAIL)] is State.FAILED
    assert not any(s in (State.CLOSED, State.FAILED) and e is Event.FAIL for s, e in TRANSITIONS)
    assert all(s is not State.FAILED or n is State.FAILED for (s, _), n in TRANSITIONS.items())
    conn = ReliableConnection.client(0.0, random.Random(0).randbytes)
    with pytest.raises(AssertionError, match="no transition"):
        conn._transition(Event.CLOSE_DONE)


FORBIDDEN = {"socket", "select", "selectors", "asyncio", "threading", "time", "os", "signal"}


_PACKAGE = Path(reliable.__file__).parent  # protocol/reliable/


@pytest.mark.parametrize(
    "path",
    [*sorted(_PACKAGE.glob("*.py")), _PACKAGE.parent / "crc32c.py"],
    ids=lambda p: p.name,
)
def test_sans_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, imported & FORBIDDEN


# -- the count (keep this test last) ------------------------------------------------------


def test_simulation_ran_at_least_1000_seeds() -> None:
    """The sweep above ran 10 x 104 seeds; when only part of the module was selected,
    top the count up here so every run that includes this test simulates >= 1000."""
    profiles = sorted(PROFILES)
    seed = SEEDS_PER_PROFILE
    while len(SEEDS_RUN) < 1000:
        profile = profiles[len(SEEDS_RUN) % len(profiles)]
        run_seed(PROFILES[profile], seed)
        SEEDS_RUN.append((profile, seed))
        seed += 1
    distinct = len(set(SEEDS_RUN))
    print(f"reliable-datagram simulation: {distinct} seeds in this run")
    assert distinct >= 1000
