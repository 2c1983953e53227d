"""A chaos relay: forward datagrams or streams between two addresses, with faults.

::

    from buzon.testing.chaos import ChaosRelay

    with ChaosRelay("udp://127.0.0.1:0", back="udp://127.0.0.1:9000",
                    profile="wifi", seed=7) as relay:
        ch = buzon.connect(relay.address)     # talk to the relay as if it were the server
        ...
        print(relay.statistics()["dropped"])

Theory of operation
-------------------
The relay listens on a *front* address and forwards to a *back* address. It works on
raw sockets and knows nothing of buzon's frames, so it relays any protocol. Traffic
from front to back is the ``forward`` direction, replies are the ``reply`` direction.

* **Datagrams** (``udp://``, ``unixgram:``): the front socket is bound; every distinct
  client address gets its own *flow*: one upstream socket connected to the back
  address (a ``unixgram:`` upstream binds a private ``c-PID-RANDOM.dgram`` file, as
  buzon's own connecting ends do), so the back end's replies come back to that socket
  and are sent on to the right client. At most ``max_flows`` flows are kept; the
  least recently used is closed to make room.
* **Streams** (``tcp://``, ``unix:``): every accepted connection gets one upstream
  connection; bytes flow both ways, end-of-stream (half-close) is passed on, and a
  connection ends when both directions have ended or one side fails (a side that
  fails resets the other).

Everything runs in ONE background thread owned by the relay (started by
:meth:`ChaosRelay.start` or ``with``, stopped and joined by :meth:`ChaosRelay.close`):
a ``selectors`` loop plus a heap of timers for delays, reordering and slice gaps.
``close`` closes every socket and removes every socket file the relay created.

Faults
------
A :class:`Faults` value describes one direction; its ``reply`` field, when set,
describes the reply direction (else the reply direction gets the same faults).
For each datagram, in this order:

1. *cut* drops everything; a *blackhole* window drops everything inside it;
2. *loss*: independent (``drop``), bursty (``burst``: a Gilbert-Elliott chain whose
   state moves before each datagram; ``drop_run``: with probability p, this datagram
   and the next k-1 are lost);
3. *truncate* keeps a random prefix (0 to size-1 bytes);
4. *corrupt* flips ``corrupt_bits`` distinct random bits;
5. *duplicate* sends a second copy (with its own delay);
6. *reorder* holds the datagram until 1..``reorder_span`` later datagrams of the same
   flow have gone out, or ``reorder_hold`` seconds, whichever comes first;
7. *delay* is ``delay`` ± ``jitter`` (uniform, or normal with sigma jitter/2 cut at
   ±jitter), never below 0; different delays reorder datagrams, as networks do.

On streams the kernel already repairs loss, duplication and reordering, so those
(and truncation) do not apply. A stream direction is cut into the chunks one read
returns; per chunk: *cut* discards the bytes (end-of-stream still passes, so
connections can finish); *reset* with probability ``reset`` resets the connection,
and ``reset_after`` resets it once exactly N bytes went forward in that direction;
*corrupt* flips bits; a *blackhole* window stalls the bytes until it ends (TCP would
retransmit them then), for ever if it never ends; *delay* ± *jitter* delays the chunk
but never reorders bytes. On the way out, ``slice=k`` writes the bytes in pieces of
1..k bytes, with a pause of 0..``slice_gap`` seconds after each piece. A *reset* closes
both the client's and the upstream connection with ``SO_LINGER`` 0, so both peers see
``ECONNRESET``.

Determinism and logs
--------------------
``seed`` (random when not given; :attr:`ChaosRelay.seed` tells which) drives one
``random.Random`` per datagram direction and per direction of each stream connection
(numbered in accept order). Each datagram or stream chunk takes the same draws from
its direction's generator whatever becomes of it; the few decisions that need a
varying number of draws (which bits, how short, how long held) use a generator
seeded from one of them. So the dice for the n-th datagram never depend on what
happened to earlier ones, and given the same seed and the same inputs in the same
order a run makes the same decisions (time enters only through blackhole windows
and reorder hold timeouts; burst and run state carry over, by design). Slice sizes
come from a second generator seeded from the first, so the cut points depend only
on byte offsets.

Every decision is an :class:`Event` ``(t, direction, action, size, detail, flow)``,
kept in memory (:meth:`ChaosRelay.events`, the last ``max_events``) and, with
``log=PATH``, written as JSON lines (a first line describes the run: addresses,
seed, faults). :meth:`ChaosRelay.statistics` counts them per action.

======================  =========================================================
action                  meaning (``detail`` says more)
======================  =========================================================
``receive``             a datagram or chunk was read from one side
``forward``             a datagram or piece was handed to the kernel
``drop``                a datagram was lost: ``random``, ``burst``, ``run``,
                        ``blackhole``, ``cut``, ``unroutable``, or an OS error
``duplicate``           a second copy will be sent
``reorder``             held back; ``release`` when it goes on
``corrupt``             bits flipped (positions in ``detail``)
``truncate``            cut short (new length in ``detail``)
``delay``               sent later (milliseconds in ``detail``)
``stall``               stream bytes held by a blackhole window
``reset``               a connection reset on purpose (``SO_LINGER`` 0)
``overflow``            a datagram dropped because a queue of the relay was full
``open`` / ``close``    a flow or connection began or ended
``abort``               a connection ended because one side failed
``error``               anything else that went wrong (the relay keeps going)
======================  =========================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import heapq
import itertools
import json
import math
import os
import random
import secrets
import selectors
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Literal, NamedTuple

from .._runtime import runtime_dir
from ..address import Address, parse_address
from ..errors import AddressError, InsecureBind, from_oserror
from ..transport.tcp import is_loopback, resolve
from ..transport.unix import bind_unix_path, unlink_if_ours

__all__ = [
    "COUNTERS",
    "PROFILES",
    "Blackhole",
    "ChaosRelay",
    "Direction",
    "DropRun",
    "Event",
    "Faults",
    "GilbertElliott",
    "render_profiles",
]

Direction = Literal["forward", "reply"]
DIRECTIONS: tuple[Direction, Direction] = ("forward", "reply")

_DGRAM_SCHEMES = ("udp", "unixgram")
_STREAM_SCHEMES = ("tcp", "unix")
_RECV_BUFFER = 1 << 18  # larger than any datagram a Unix or UDP socket carries by default
_STREAM_READ = 65536
_OUTBOX_LIMIT = 4096  # datagrams waiting for a full receiver, per flow and direction
_RETRY_FIRST = 0.001  # seconds before retrying a datagram a full receiver refused
_RETRY_MAX = 0.02
_ACCEPT_BATCH = 16
_FINE = 0.001  # timers closer than this are waited for with sleep(), not the selector


# ================================================================= fault descriptions


def _check_probability(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} is a probability from 0 to 1, not {value!r}")


def _check_seconds(name: str, value: float, *, infinite: bool = False) -> None:
    ok = isinstance(value, int | float) and value >= 0 and (infinite or math.isfinite(value))
    if not ok:
        raise ValueError(f"{name} is a number of seconds >= 0, not {value!r}")


def _pct(p: float) -> str:
    return f"{p * 100:.3g}%"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


@dataclass(frozen=True, slots=True)
class GilbertElliott:
    """Bursty loss: a two-state (good/bad) Markov chain, moved before each datagram.

    ``enter`` is P(good -> bad), ``leave`` P(bad -> good); a datagram is lost with
    ``loss_good`` or ``loss_bad`` depending on the state. Mean burst length is
    ``1/leave`` datagrams.
    """

    enter: float
    leave: float
    loss_good: float = 0.0
    loss_bad: float = 1.0

    def __post_init__(self) -> None:
        for name in ("enter", "leave", "loss_good", "loss_bad"):
            _check_probability(f"GilbertElliott.{name}", getattr(self, name))
        if self.enter + self.leave == 0:
            raise ValueError("GilbertElliott: enter and leave cannot both be 0")

    def mean_loss(self) -> float:
        """The long-run fraction of datagrams lost."""
        bad = self.enter / (self.enter + self.leave)
        return (1 - bad) * self.loss_good + bad * self.loss_bad


@dataclass(frozen=True, slots=True)
class DropRun:
    """With ``probability``, this datagram and the next ``length - 1`` are lost."""

    probability: float
    length: int

    def __post_init__(self) -> None:
        _check_probability("DropRun.probability", self.probability)
        if not (isinstance(self.length, int) and self.length >= 1):
            raise ValueError(f"DropRun.length is a whole number >= 1, not {self.length!r}")

    def mean_loss(self) -> float:
        """The long-run fraction of datagrams lost (runs start only outside a run)."""
        p, k = self.probability, self.length
        return p * k / (1 - p + p * k) if p else 0.0


@dataclass(frozen=True, slots=True)
class Blackhole:
    """Everything is lost from ``start`` seconds (after the relay started) for
    ``duration`` seconds, and again every ``period`` seconds if a period is given.

    ``Blackhole()`` is a blackhole for ever; ``Blackhole(1.0, 0.5)`` one from 1 s to
    1.5 s; ``Blackhole(0.0, 0.2, period=1.0)`` 0.2 s at the start of every second.
    """

    start: float = 0.0
    duration: float = math.inf
    period: float | None = None

    def __post_init__(self) -> None:
        _check_seconds("Blackhole.start", self.start)
        _check_seconds("Blackhole.duration", self.duration, infinite=True)
        if self.period is not None:
            _check_seconds("Blackhole.period", self.period)
            if self.period <= 0 or not self.duration < self.period:
                raise ValueError("Blackhole: a period must be > 0 and longer than the duration")

    def active(self, t: float) -> bool:
        """True if time ``t`` (seconds since the relay started) is inside a window."""
        if t < self.start:
            return False
        if self.period is None:
            return t - self.start < self.duration
        return (t - self.start) % self.period < self.duration

    def ends(self, t: float) -> float:
        """When the window around ``t`` ends (``t`` itself outside any window)."""
        if not self.active(t):
            return t
        if self.period is None:
            return self.start + self.duration
        k = math.floor((t - self.start) / self.period)
        return self.start + k * self.period + self.duration

    def describe(self) -> str:
        if self.period is not None:
            return f"blackhole {self.duration:g} s every {self.period:g} s from {self.start:g} s"
        if math.isinf(self.duration):
            return "blackhole for ever" if self.start == 0 else f"blackhole from {self.start:g} s"
        return f"blackhole from {self.start:g} s to {self.start + self.duration:g} s"


@dataclass(frozen=True, slots=True)
class Faults:
    """What the relay does to one direction of traffic (see the module doc for order).

    Probabilities are from 0 to 1, times in seconds. ``reply`` describes the reply
    (back -> front) direction; ``None`` means the same faults both ways. Datagram-only:
    ``drop``, ``burst``, ``drop_run``, ``duplicate``, ``reorder*``, ``truncate``.
    Stream-only: ``slice``, ``slice_gap``, ``reset``, ``reset_after``.
    """

    drop: float = 0.0
    burst: GilbertElliott | None = None
    drop_run: DropRun | None = None
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_span: int = 1
    reorder_hold: float = 0.05
    corrupt: float = 0.0
    corrupt_bits: int = 1
    truncate: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    jitter_distribution: Literal["uniform", "normal"] = "uniform"
    blackhole: Blackhole | None = None
    cut: bool = False
    slice: int = 0
    slice_gap: float = 0.0
    reset: float = 0.0
    reset_after: int | None = None
    reply: Faults | None = None

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder", "corrupt", "truncate", "reset"):
            _check_probability(name, getattr(self, name))
        for name in ("reorder_hold", "delay", "jitter", "slice_gap"):
            _check_seconds(name, getattr(self, name))
        if not (isinstance(self.reorder_span, int) and self.reorder_span >= 1):
            raise ValueError(f"reorder_span is a whole number >= 1, not {self.reorder_span!r}")
        if not (isinstance(self.corrupt_bits, int) and self.corrupt_bits >= 1):
            raise ValueError(f"corrupt_bits is a whole number >= 1, not {self.corrupt_bits!r}")
        if not (isinstance(self.slice, int) and self.slice >= 0):
            raise ValueError(f"slice is a whole number of bytes >= 0, not {self.slice!r}")
        if self.reset_after is not None and not (
            isinstance(self.reset_after, int) and self.reset_after >= 0
        ):
            raise ValueError(f"reset_after is a number of bytes >= 0, not {self.reset_after!r}")
        if self.jitter_distribution not in ("uniform", "normal"):
            raise ValueError("jitter_distribution is 'uniform' or 'normal'")
        if self.reply is not None and self.reply.reply is not None:
            raise ValueError("the reply direction's Faults cannot have a reply of its own")

    def for_direction(self, direction: Direction) -> Faults:
        """The faults of one direction, without a ``reply`` part."""
        if direction == "reply" and self.reply is not None:
            return self.reply
        return self if self.reply is None else dataclasses.replace(self, reply=None)

    def with_(self, **changes: Any) -> Faults:
        """A copy with ``changes`` applied to both directions."""
        reply = None if self.reply is None else dataclasses.replace(self.reply, **changes)
        return dataclasses.replace(self, **changes, reply=reply)

    def expected_loss(self) -> float:
        """The long-run fraction of datagrams lost in this direction (no blackhole)."""
        if self.cut:
            return 1.0
        hole = self.blackhole
        if (
            hole is not None
            and hole.period is None
            and hole.start == 0
            and hole.duration == math.inf
        ):
            return 1.0
        kept = 1.0 - self.drop
        if self.burst is not None:
            kept *= 1.0 - self.burst.mean_loss()
        if self.drop_run is not None:
            kept *= 1.0 - self.drop_run.mean_loss()
        return 1.0 - kept

    def describe(self) -> str:
        """A short English description of one direction (``reply`` ignored)."""
        parts: list[str] = []
        if self.cut:
            parts.append("cut")
        if self.blackhole is not None:
            parts.append(self.blackhole.describe())
        if self.drop:
            parts.append(f"drop {_pct(self.drop)}")
        if self.burst is not None:
            b = self.burst
            text = f"bursts (Gilbert-Elliott: enter {_pct(b.enter)}, leave {_pct(b.leave)}"
            if b.loss_good:
                text += f", loss good {_pct(b.loss_good)}"
            parts.append(text + f", loss bad {_pct(b.loss_bad)})")
        if self.drop_run is not None:
            r = self.drop_run
            parts.append(f"drop {r.length} in a row with p {_pct(r.probability)}")
        if self.duplicate:
            parts.append(f"duplicate {_pct(self.duplicate)}")
        if self.reorder:
            parts.append(
                f"reorder {_pct(self.reorder)} (after 1-{self.reorder_span}, "
                f"at most {_ms(self.reorder_hold)})"
            )
        if self.corrupt:
            bits = "bit" if self.corrupt_bits == 1 else "bits"
            parts.append(f"corrupt {_pct(self.corrupt)} ({self.corrupt_bits} {bits})")
        if self.truncate:
            parts.append(f"truncate {_pct(self.truncate)}")
        if self.delay or self.jitter:
            text = f"delay {_ms(self.delay)}"
            if self.jitter:
                text += f" ± {_ms(self.jitter)} {self.jitter_distribution}"
            parts.append(text)
        if self.slice:
            gap = f", gaps up to {_ms(self.slice_gap)}" if self.slice_gap else ""
            parts.append(f"slice 1-{self.slice} B{gap}")
        if self.reset:
            parts.append(f"reset {_pct(self.reset)} per chunk")
        if self.reset_after is not None:
            parts.append(f"reset after {self.reset_after} B")
        return ", ".join(parts) if parts else "nothing"


PROFILES: dict[str, Faults] = {
    "clean": Faults(),
    "lan": Faults(drop=0.001, delay=0.0002, jitter=0.0001),
    "wifi": Faults(
        burst=GilbertElliott(enter=0.01, leave=0.3),
        duplicate=0.005,
        reorder=0.01,
        reorder_span=2,
        delay=0.002,
        jitter=0.002,
        jitter_distribution="normal",
    ),
    "hostile": Faults(
        drop=0.1,
        burst=GilbertElliott(enter=0.02, leave=0.25),
        duplicate=0.05,
        reorder=0.05,
        reorder_span=3,
        corrupt=0.02,
        truncate=0.01,
        delay=0.005,
        jitter=0.005,
    ),
    "blackhole": Faults(blackhole=Blackhole()),
    "ack-loss": Faults(reply=Faults(drop=0.3)),
}
"""Named fault profiles: name -> :class:`Faults` (documented in ``docs/chaos.md``)."""


def render_profiles() -> str:
    """The Markdown table of :data:`PROFILES` (a generated section of ``docs/chaos.md``)."""
    rows = [
        "| profile | forward (front → back) | reply (back → front) | datagram loss f / r |",
        "|---|---|---|---|",
    ]
    for name, faults in PROFILES.items():
        fwd, rep = faults.for_direction("forward"), faults.for_direction("reply")
        rows.append(
            f"| `{name}` | {fwd.describe()} | "
            f"{'same' if faults.reply is None else rep.describe()} | "
            f"{_pct(fwd.expected_loss())} / {_pct(rep.expected_loss())} |"
        )
    return "\n".join(rows)


def _resolve_faults(profile: str | Faults) -> Faults:
    if isinstance(profile, Faults):
        return profile
    try:
        return PROFILES[profile]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown chaos profile {profile!r}; choose one of {', '.join(PROFILES)}"
        ) from None


# ==================================================================== the decisions


class Event(NamedTuple):
    """One decision or happening: ``t`` seconds after start, in ``direction``
    (``forward``, ``reply``, or ``-`` for the relay itself), on flow/connection ``flow``."""

    t: float
    direction: str
    action: str
    size: int
    detail: str
    flow: int = 0


COUNTERS: dict[str, str] = {
    "receive": "received",
    "forward": "forwarded",
    "drop": "dropped",
    "duplicate": "duplicated",
    "reorder": "reordered",
    "release": "released",
    "corrupt": "corrupted",
    "delay": "delayed",
    "truncate": "truncated",
    "stall": "stalled",
    "reset": "resets",
    "overflow": "overflowed",
    "open": "opened",
    "close": "closed",
    "abort": "aborted",
    "error": "errors",
}
"""Event action -> the key that counts it in :meth:`ChaosRelay.statistics`."""


def _flip_bits(data: bytes, rng: random.Random, count: int) -> tuple[bytes, list[int]]:
    buf = bytearray(data)
    positions = sorted(rng.sample(range(len(buf) * 8), min(count, len(buf) * 8)))
    for bit in positions:
        buf[bit >> 3] ^= 1 << (bit & 7)
    return bytes(buf), positions


def _delay_sample(f: Faults, rng: random.Random) -> float:
    if not f.jitter:
        return f.delay
    if f.jitter_distribution == "normal":
        extra = max(-f.jitter, min(f.jitter, rng.gauss(0.0, f.jitter / 2)))
    else:
        extra = rng.uniform(-f.jitter, f.jitter)
    return max(0.0, f.delay + extra)


@dataclass(slots=True)
class _Verdict:
    """What to do with one datagram."""

    payload: bytes
    notes: list[tuple[str, int, str]] = field(default_factory=list)  # (action, size, detail)
    drop: str | None = None
    delays: list[float] = field(default_factory=list)  # one per copy to send
    hold: int = 0  # > 0: reordered, released after this many later datagrams


class _Shaper:
    """The fault decisions of one direction of datagrams."""

    def __init__(self, faults: Faults, rng: random.Random) -> None:
        self.faults = faults
        self.rng = rng
        self.bad = False  # Gilbert-Elliott state
        self.run_left = 0  # datagrams still to lose in a drop run

    def datagram(self, data: bytes, t: float) -> _Verdict:
        f = self.faults
        rng = self.rng
        # The same draws for every datagram, whatever becomes of it, so the dice for
        # one datagram never depend on what happened to the ones before.
        u = [rng.random() for _ in range(8)]
        delays = [_delay_sample(f, rng), _delay_sample(f, rng)]
        key = rng.getrandbits(64)  # seeds the variable-length draws, when needed
        reasons: list[str] = []
        if f.cut:
            reasons.append("cut")
        if f.blackhole is not None and f.blackhole.active(t):
            reasons.append("blackhole")
        if u[0] < f.drop:
            reasons.append("random")
        if f.burst is not None:
            if self.bad and u[1] < f.burst.leave:
                self.bad = False
            elif not self.bad and u[1] < f.burst.enter:
                self.bad = True
            if u[2] < (f.burst.loss_bad if self.bad else f.burst.loss_good):
                reasons.append("burst")
        if f.drop_run is not None:
            if self.run_left > 0:
                self.run_left -= 1
                reasons.append("run")
            elif u[3] < f.drop_run.probability:
                self.run_left = f.drop_run.length - 1
                reasons.append("run")
        verdict = _Verdict(data)
        if reasons:
            verdict.drop = reasons[0]
            return verdict
        size = len(data)
        more: random.Random | None = None
        if u[4] < f.truncate and size > 0:
            more = random.Random(key)
            keep = more.randrange(size)
            verdict.payload = verdict.payload[:keep]
            verdict.notes.append(("truncate", size, f"to {keep}"))
        if u[5] < f.corrupt and verdict.payload:
            more = more or random.Random(key)
            verdict.payload, bits = _flip_bits(verdict.payload, more, f.corrupt_bits)
            verdict.notes.append(("corrupt", len(verdict.payload), f"bits {bits}"))
        copies = 1
        if u[6] < f.duplicate:
            copies = 2
            verdict.notes.append(("duplicate", len(verdict.payload), ""))
        if u[7] < f.reorder:
            more = more or random.Random(key)
            verdict.hold = more.randint(1, f.reorder_span)
            verdict.notes.append(("reorder", len(verdict.payload), f"after {verdict.hold}"))
        verdict.delays = delays[:copies]
        return verdict


# ==================================================================== the relay state


class _Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False


@dataclass(slots=True, eq=False)
class _Held:
    """A reordered datagram waiting for ``left`` more datagrams of its flow."""

    payload: bytes
    delay: float
    since: float
    span: int
    left: int
    timer: _Timer | None = None


class _Flow:
    """One datagram client: its address, upstream socket and queues."""

    def __init__(self, fid: int, client: Any, upstream: socket.socket) -> None:
        self.id = fid
        self.client = client
        self.upstream = upstream
        self.file: tuple[str, os.stat_result] | None = None  # a unixgram upstream's own file
        self.held: dict[Direction, list[_Held]] = {"forward": [], "reply": []}
        self.outbox: dict[Direction, deque[bytes]] = {"forward": deque(), "reply": deque()}
        self.retry: dict[Direction, float] = {"forward": 0.0, "reply": 0.0}
        self.closed = False


class _Pipe:
    """One direction of a relayed stream connection."""

    def __init__(self, direction: Direction, faults: Faults, rng: random.Random) -> None:
        self.direction = direction
        self.faults = faults
        self.rng = rng
        self.slicer = random.Random(rng.getrandbits(64))
        self.pending: deque[tuple[float, bytes]] = deque()  # (due, bytes), dues ascending
        self.pending_bytes = 0
        self.out = bytearray()  # due bytes, not yet taken by the kernel
        self.last_due = 0.0
        self.piece_left = self._piece()
        self.gap_until = 0.0
        self.bytes_in = 0
        self.eof = False  # the source ended
        self.done = False  # the end was passed on (shutdown of the destination)
        # reset_after reached: reset once the bytes before it are out
        self.reset_pending = faults.reset_after == 0
        self.blocked = False  # the destination's kernel buffer is full

    def _piece(self) -> int:
        return self.slicer.randint(1, self.faults.slice) if self.faults.slice else 0

    def buffered(self) -> int:
        return self.pending_bytes + len(self.out)

    def wants_read(self, limit: int) -> bool:
        return not (self.eof or self.reset_pending) and self.buffered() < limit

    def idle(self) -> bool:
        return not self.pending and not self.out


class _Conn:
    """A relayed stream connection: the accepted client and its upstream connection."""

    def __init__(
        self,
        cid: int,
        client: socket.socket,
        upstream: socket.socket,
        pipes: dict[Direction, _Pipe],
    ) -> None:
        self.id = cid
        self.client = client
        self.upstream = upstream
        self.pipes = pipes
        self.connected = False
        self.closed = False

    def src(self, pipe: _Pipe) -> socket.socket:
        return self.client if pipe.direction == "forward" else self.upstream

    def dst(self, pipe: _Pipe) -> socket.socket:
        return self.upstream if pipe.direction == "forward" else self.client


# ========================================================================= the relay


class ChaosRelay:
    """Relay ``front`` <-> ``back`` with faults, in a background thread of its own.

    ``front`` is where clients connect (``udp://``, ``unixgram:``, ``tcp://``,
    ``unix:``; port 0 picks a free port); ``back`` is the real server, of the same
    kind (datagram or stream). ``profile`` is a name of :data:`PROFILES` or a
    :class:`Faults`. ``log`` names a JSON-lines file for every event. A front that is
    not loopback needs ``insecure=True`` (the relay authenticates nobody).
    """

    def __init__(
        self,
        front: str | Address,
        back: str | Address,
        *,
        profile: str | Faults = "clean",
        seed: int | None = None,
        log: str | os.PathLike[str] | None = None,
        max_events: int = 200_000,
        max_flows: int = 256,
        buffer_limit: int = 1 << 20,
        insecure: bool = False,
    ) -> None:
        self.front = parse_address(front)
        self.back = parse_address(back)
        kinds = {
            "front": self.front.scheme,
            "back": self.back.scheme,
        }
        for which, scheme in kinds.items():
            if scheme not in _DGRAM_SCHEMES + _STREAM_SCHEMES:
                raise AddressError(
                    f"the chaos relay's {which} is udp://, unixgram:, tcp:// or unix:, "
                    f"not {scheme}:"
                )
        if (self.front.scheme in _DGRAM_SCHEMES) != (self.back.scheme in _DGRAM_SCHEMES):
            raise AddressError(
                f"cannot relay between {self.front.scheme}: and {self.back.scheme}: "
                "(both ends must be datagram, or both stream)"
            )
        self.faults = _resolve_faults(profile)
        self.profile = profile if isinstance(profile, str) else "custom"
        self.seed = seed if seed is not None else secrets.randbits(32)
        self.datagrams = self.front.scheme in _DGRAM_SCHEMES
        self._log_path = log
        self._max_flows = max_flows
        self._buffer_limit = buffer_limit
        self._insecure = insecure
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=max_events)
        self._counts: dict[str, dict[str, int]] = {}
        self._reset_counts()
        self._address: Address | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self.failure: BaseException | None = None
        """The exception that stopped the relay's thread, if one did."""
        # loop state (touched by the relay's thread only, once started)
        self._t0 = 0.0
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._front_sock: socket.socket | None = None
        self._front_file: tuple[str, os.stat_result] | None = None
        self._back_sockaddr: Any = None
        self._back_family: int = socket.AF_UNIX
        self._interest: dict[int, int] = {}
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        self._flows: OrderedDict[Any, _Flow] = OrderedDict()
        self._conns: dict[int, _Conn] = {}
        self._shapers: dict[Direction, _Shaper] = {}
        self._logfile: IO[str] | None = None
        self._buf = bytearray(_RECV_BUFFER if self.datagrams else 0)

    # ----------------------------------------------------------------- public surface

    @property
    def address(self) -> Address:
        """The front address clients use (the real port once started)."""
        if self._address is None:
            raise RuntimeError("the relay is not started; call start() or use 'with'")
        return self._address

    @property
    def running(self) -> bool:
        """True while the relay's thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ChaosRelay:
        """Bind the front address and start relaying in the background; return self."""
        if self._thread is not None or self._closed:
            raise RuntimeError("a ChaosRelay starts once")
        try:
            self._open()
        except BaseException:
            self._teardown()
            self._closed = True
            raise
        self._thread = threading.Thread(target=self._run, name="buzon-chaos", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, close every socket, remove every file; idempotent.

        Open stream connections are closed (their peers see end-of-stream).
        """
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            self._teardown()
            return
        self._stopping = True
        self._wake()
        thread.join()

    def __enter__(self) -> ChaosRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.failure is not None and exc[0] is None:
            raise RuntimeError(f"the chaos relay failed: {self.failure!r}") from self.failure

    def events(self) -> list[Event]:
        """The events so far (the last ``max_events``), oldest first."""
        with self._lock:
            return list(self._events)

    def statistics(self, direction: Direction | None = None) -> dict[str, int]:
        """Counters per action (see :data:`COUNTERS`), for one direction or all."""
        with self._lock:
            if direction is not None:
                return dict(self._counts[direction])
            total = dict.fromkeys(self._counts["forward"], 0)
            for counts in self._counts.values():
                for key, value in counts.items():
                    total[key] += value
            return total

    def summary(self) -> str:
        """One line of the main counters, for humans."""
        s = self.statistics()
        keys = (
            "received",
            "forwarded",
            "dropped",
            "duplicated",
            "reordered",
            "corrupted",
            "delayed",
            "truncated",
            "resets",
        )
        return " ".join(f"{k}={s[k]}" for k in keys)

    def __repr__(self) -> str:
        where = self._address or self.front
        return f"<ChaosRelay {where} -> {self.back} profile={self.profile} seed={self.seed}>"

    # ------------------------------------------------------------------- bookkeeping

    def _reset_counts(self) -> None:
        keys = [*COUNTERS.values(), "forwarded_bytes"]
        self._counts = {d: dict.fromkeys(keys, 0) for d in (*DIRECTIONS, "-")}

    def _record(self, direction: str, action: str, size: int, detail: str, flow: int) -> None:
        event = Event(round(time.monotonic() - self._t0, 6), direction, action, size, detail, flow)
        with self._lock:
            self._events.append(event)
            counts = self._counts[direction]
            counts[COUNTERS[action]] += 1
            if action == "forward":
                counts["forwarded_bytes"] += size
        if self._logfile is not None:
            self._logfile.write(json.dumps(event._asdict()) + "\n")

    # ----------------------------------------------------------------------- opening

    def _open(self) -> None:
        self._t0 = time.monotonic()
        if self._log_path is not None:
            self._logfile = open(self._log_path, "w", encoding="utf-8")  # noqa: SIM115
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        front = self.front
        kind = socket.SOCK_DGRAM if self.datagrams else socket.SOCK_STREAM
        if front.is_inet:
            if not self._insecure and not is_loopback(front):
                raise InsecureBind(
                    f"{front}: the chaos relay binds loopback only unless insecure=True"
                )
            family, sockaddr = resolve(front, kind, passive=True)
            sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
            self._front_sock = sock
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if not self.datagrams:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise from_oserror(exc, f"bind {front}") from exc
            self._address = front.with_port(sock.getsockname()[1])
        else:
            sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
            self._front_sock = sock
            path = front.fs_path()
            self._front_file = (path, bind_unix_path(sock, front, path))
            self._address = front
        if not self.datagrams:
            sock.listen(128)
        sock.setblocking(False)
        if self.back.is_inet:
            self._back_family, self._back_sockaddr = resolve(self.back, kind, passive=False)
        else:
            self._back_family, self._back_sockaddr = socket.AF_UNIX, self.back.fs_path()
        handler = self._on_front_datagram if self.datagrams else self._on_accept
        self._watch(sock, selectors.EVENT_READ, handler)
        for direction in DIRECTIONS:
            rng = random.Random(f"{self.seed}:{direction}")
            self._shapers[direction] = _Shaper(self.faults.for_direction(direction), rng)
        if self._logfile is not None:
            header = {
                "relay": {
                    "front": str(self._address),
                    "back": str(self.back),
                    "profile": self.profile,
                    "seed": self.seed,
                    "faults": dataclasses.asdict(self.faults),
                }
            }
            self._logfile.write(json.dumps(header, default=str) + "\n")

    # -------------------------------------------------------------------- the loop

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stopping:
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                ready = sel.select(0 if timeout is not None and timeout < _FINE else timeout)
                if not ready and timeout is not None and 0 < timeout < _FINE:
                    # epoll counts whole milliseconds: sleep the fraction instead, so a
                    # 0.2 ms delay is 0.2 ms (the kernel queues what arrives meanwhile)
                    time.sleep(timeout)
                for key, mask in ready:
                    if self._stopping:
                        break
                    key.data(mask)
                self._fire_timers()
        except BaseException as exc:  # the tool must say why it stopped, never hang
            self.failure = exc
            with contextlib.suppress(Exception):
                self._record("-", "error", 0, f"relay stopped: {exc!r}", 0)
        finally:
            self._teardown()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def _on_wake(self, mask: int) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(OSError):
            self._wake_r.recv(64)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now and not self._stopping:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()

    def _at(self, due: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(callback)
        if math.isfinite(due):
            heapq.heappush(self._timers, (due, next(self._seq), timer))
        return timer

    def _watch(self, sock: socket.socket, mask: int, handler: Callable[[int], None]) -> None:
        """Set the events wanted on ``sock`` (0: none)."""
        assert self._sel is not None
        fd = sock.fileno()
        if fd < 0:
            return
        old = self._interest.get(fd, 0)
        if mask == old:
            return
        if not old:
            self._sel.register(sock, mask, handler)
            self._interest[fd] = mask
        elif not mask:
            self._sel.unregister(sock)
            del self._interest[fd]
        else:
            self._sel.modify(sock, mask, handler)
            self._interest[fd] = mask

    def _forget(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd >= 0 and self._interest.pop(fd, 0) and self._sel is not None:
            self._sel.unregister(sock)

    def _teardown(self) -> None:
        for conn in list(self._conns.values()):
            self._close_conn(conn, reason="relay closed", record=False)
        for flow in list(self._flows.values()):
            self._close_flow(flow, record=False)
        if self._front_sock is not None:
            self._forget(self._front_sock)
            self._front_sock.close()
            self._front_sock = None
        if self._front_file is not None:
            unlink_if_ours(*self._front_file)
            self._front_file = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        self._interest.clear()
        self._timers.clear()
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None

    # ================================================================== datagrams

    def _on_front_datagram(self, mask: int) -> None:
        sock = self._front_sock
        assert sock is not None
        buf = self._buf
        for _ in range(64):  # then let the others have a turn
            try:
                n, client = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier reply
                self._record("reply", "error", 0, f"front: {exc.strerror or exc}", 0)
                continue
            flow = self._flow_for(client)
            if flow is None:
                continue
            self._datagram_in(flow, "forward", bytes(buf[:n]))

    def _flow_for(self, client: Any) -> _Flow | None:
        key = client if client else ""
        flow = self._flows.get(key)
        if flow is not None:
            self._flows.move_to_end(key)
            return flow
        while len(self._flows) >= self._max_flows:
            _, oldest = self._flows.popitem(last=False)
            self._close_flow(oldest, record=True, why="evicted: too many clients")
        fid = next(self._ids)
        sock = socket.socket(self._back_family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        own: tuple[str, os.stat_result] | None = None
        try:
            if self._back_family == socket.AF_UNIX:
                path = os.path.join(runtime_dir(), f"c-{os.getpid()}-{secrets.token_hex(6)}.dgram")
                own = (path, bind_unix_path(sock, Address("unixgram", path=path), path))
            sock.connect(self._back_sockaddr)
            sock.setblocking(False)
        except Exception as exc:
            sock.close()
            if own is not None:
                unlink_if_ours(*own)
            self._record("forward", "drop", 0, f"cannot reach the back end: {exc}", fid)
            return None
        flow = _Flow(fid, key, sock)
        flow.file = own
        self._flows[key] = flow
        self._watch(sock, selectors.EVENT_READ, lambda mask: self._on_upstream(flow))
        self._record("-", "open", 0, f"client {_show(client)}", fid)
        return flow

    def _on_upstream(self, flow: _Flow) -> None:
        buf = self._buf
        for _ in range(64):
            if flow.closed:
                return
            try:
                n = flow.upstream.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ECONNREFUSED: nobody at the back address
                self._record("forward", "error", 0, f"back: {exc.strerror or exc}", flow.id)
                continue
            self._datagram_in(flow, "reply", bytes(buf[:n]))

    def _datagram_in(self, flow: _Flow, direction: Direction, data: bytes) -> None:
        now = time.monotonic()
        fid = flow.id
        self._record(direction, "receive", len(data), "", fid)
        verdict = self._shapers[direction].datagram(data, now - self._t0)
        for action, size, detail in verdict.notes:
            self._record(direction, action, size, detail, fid)
        if verdict.drop is not None:
            self._record(direction, "drop", len(data), verdict.drop, fid)
            return
        payload = verdict.payload
        due = now
        if verdict.hold:
            held = _Held(payload, verdict.delays[0], now, verdict.hold, verdict.hold)
            held.timer = self._at(
                now + self.faults.for_direction(direction).reorder_hold,
                lambda: self._release(flow, direction, held, now, "timeout"),
            )
        else:
            due = self._send_later(flow, direction, payload, verdict.delays[0])
        for extra in verdict.delays[1:]:  # the duplicate
            self._send_later(flow, direction, payload, extra)
        waiting = flow.held[direction]
        for held_before in list(waiting):
            held_before.left -= 1
            if held_before.left <= 0:
                self._release(flow, direction, held_before, due, f"after {held_before.span}")
        if verdict.hold:
            waiting.append(held)

    def _release(
        self, flow: _Flow, direction: Direction, held: _Held, after: float, why: str
    ) -> None:
        waiting = flow.held[direction]
        if held not in waiting or flow.closed:
            return
        waiting.remove(held)
        if held.timer is not None:
            held.timer.cancelled = True
        now = time.monotonic()
        self._record(direction, "release", len(held.payload), why, flow.id)
        due = max(after, held.since + held.delay, now)
        self._send_later(flow, direction, held.payload, due - now)

    def _send_later(self, flow: _Flow, direction: Direction, payload: bytes, delay: float) -> float:
        now = time.monotonic()
        if delay > 0:
            self._record(direction, "delay", len(payload), f"{delay * 1000:.3f} ms", flow.id)
            self._at(now + delay, lambda: self._send(flow, direction, payload))
            return now + delay
        self._send(flow, direction, payload)
        return now

    def _send(self, flow: _Flow, direction: Direction, payload: bytes) -> None:
        if flow.closed:
            return
        box = flow.outbox[direction]
        if box:  # a full receiver: keep the order, wait for the retry
            if len(box) >= _OUTBOX_LIMIT:
                self._record(direction, "overflow", len(payload), "relay queue full", flow.id)
            else:
                box.append(payload)
            return
        if self._send_now(flow, direction, payload) is None:
            box.append(payload)
            flow.retry[direction] = _RETRY_FIRST
            self._at(time.monotonic() + _RETRY_FIRST, lambda: self._retry(flow, direction))

    def _send_now(self, flow: _Flow, direction: Direction, payload: bytes) -> bool | None:
        """True sent, False dropped for an error, None: the receiver is full."""
        try:
            if direction == "forward":
                flow.upstream.send(payload)
            elif not flow.client:
                self._record(
                    direction, "drop", len(payload), "unroutable: client has no address", flow.id
                )
                return False
            else:
                assert self._front_sock is not None
                self._front_sock.sendto(payload, flow.client)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._record(direction, "drop", len(payload), f"send: {exc.strerror or exc}", flow.id)
            return False
        self._record(direction, "forward", len(payload), "", flow.id)
        return True

    def _retry(self, flow: _Flow, direction: Direction) -> None:
        box = flow.outbox[direction]
        while box and not flow.closed:
            if self._send_now(flow, direction, box[0]) is None:
                flow.retry[direction] = min(_RETRY_MAX, flow.retry[direction] * 2)
                self._at(
                    time.monotonic() + flow.retry[direction], lambda: self._retry(flow, direction)
                )
                return
            box.popleft()

    def _close_flow(self, flow: _Flow, *, record: bool, why: str = "") -> None:
        if flow.closed:
            return
        flow.closed = True
        self._flows.pop(flow.client, None)
        self._forget(flow.upstream)
        flow.upstream.close()
        if flow.file is not None:
            unlink_if_ours(*flow.file)
            flow.file = None
        for direction in DIRECTIONS:
            for held in flow.held[direction]:
                if held.timer is not None:
                    held.timer.cancelled = True
            flow.held[direction].clear()
            flow.outbox[direction].clear()
        if record:
            self._record("-", "close", 0, why, flow.id)

    # ==================================================================== streams

    def _on_accept(self, mask: int) -> None:
        sock = self._front_sock
        assert sock is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                client, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                self._record("-", "error", 0, f"accept: {exc.strerror or exc}", 0)
                return
            client.setblocking(False)
            cid = next(self._ids)
            if len(self._conns) >= self._max_flows:
                client.close()
                self._record("-", "error", 0, "refused: too many connections", cid)
                continue
            self._open_conn(cid, client, peer)

    def _open_conn(self, cid: int, client: socket.socket, peer: Any) -> None:
        upstream = socket.socket(
            self._back_family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        pipes: dict[Direction, _Pipe] = {}
        for direction in DIRECTIONS:
            rng = random.Random(f"{self.seed}:{direction}:{cid}")
            pipes[direction] = _Pipe(direction, self.faults.for_direction(direction), rng)
        conn = _Conn(cid, client, upstream, pipes)
        self._conns[cid] = conn
        _nodelay(client)  # (a no-op on Unix sockets)
        _nodelay(upstream)
        self._record("-", "open", 0, f"client {_show(peer)}", cid)
        self._connect_step(conn, first=True)

    def _connect_step(self, conn: _Conn, *, first: bool) -> None:
        if conn.closed:
            return
        if first:
            err = conn.upstream.connect_ex(self._back_sockaddr)
        else:
            err = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == errno.EINPROGRESS:
            self._sync(conn)  # wait for the upstream to become writable
            return
        if err == errno.EAGAIN:  # a Unix listener's backlog is full: try again soon
            self._at(time.monotonic() + 0.005, lambda: self._connect_step(conn, first=True))
            return
        if err:
            why = os.strerror(err)
            self._record("-", "error", 0, f"connect {self.back}: {why}", conn.id)
            self._close_conn(conn, reason=f"back end unreachable: {why}", reset=True)
            return
        conn.connected = True
        for pipe in conn.pipes.values():
            self._pump(conn, pipe)
        self._sync(conn)

    def _sync(self, conn: _Conn) -> None:
        """Recompute the selector interest of both sockets of ``conn``."""
        if conn.closed:
            return
        fwd, rep = conn.pipes["forward"], conn.pipes["reply"]
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        limit = self._buffer_limit
        cmask = (read if fwd.wants_read(limit) else 0) | (write if rep.blocked else 0)
        if conn.connected:
            umask = (read if rep.wants_read(limit) else 0) | (write if fwd.blocked else 0)
        else:
            umask = write
        self._watch(conn.client, cmask, lambda mask: self._on_client(conn, mask))
        self._watch(conn.upstream, umask, lambda mask: self._on_upstream_stream(conn, mask))

    def _on_client(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            conn.pipes["reply"].blocked = False
            self._pump(conn, conn.pipes["reply"])
        if mask & selectors.EVENT_READ:
            self._read(conn, conn.pipes["forward"])
        self._sync(conn)

    def _on_upstream_stream(self, conn: _Conn, mask: int) -> None:
        if not conn.connected:
            self._connect_step(conn, first=False)
            return
        if mask & selectors.EVENT_WRITE:
            conn.pipes["forward"].blocked = False
            self._pump(conn, conn.pipes["forward"])
        if mask & selectors.EVENT_READ:
            self._read(conn, conn.pipes["reply"])
        self._sync(conn)

    def _read(self, conn: _Conn, pipe: _Pipe) -> None:
        if conn.closed or pipe.eof:
            return
        f = pipe.faults
        size = _STREAM_READ
        if pipe.reset_pending:
            return
        if f.reset_after is not None:
            size = max(1, min(size, f.reset_after - pipe.bytes_in))
        # With resets in play, look before taking: a Unix socket closed with unread
        # bytes is the only way to make its peer see ECONNRESET (AF_UNIX has no RST).
        src = conn.src(pipe)
        peek = f.reset > 0
        try:
            data = src.recv(size, socket.MSG_PEEK if peek else 0)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._abort(conn, pipe.direction, f"recv: {exc.strerror or exc}")
            return
        direction = pipe.direction
        if not data:
            pipe.eof = True
            self._record(direction, "receive", 0, "end of stream", conn.id)
            self._pump(conn, pipe)
            return
        rng = pipe.rng  # the same draws for every chunk, as for datagrams
        u_reset, u_corrupt, delay = rng.random(), rng.random(), _delay_sample(f, rng)
        key = rng.getrandbits(64)
        if u_reset < f.reset:  # (only when peeking: f.reset > 0)
            self._record(direction, "receive", len(data), "", conn.id)
            self._reset(conn, direction, "random")
            return
        if peek:
            data = src.recv(len(data))  # the bytes just seen (this thread alone reads src)
        now = time.monotonic()
        self._record(direction, "receive", len(data), "", conn.id)
        if f.cut:
            self._record(direction, "drop", len(data), "cut", conn.id)
            return
        pipe.bytes_in += len(data)
        if f.reset_after is not None and pipe.bytes_in >= f.reset_after:
            pipe.reset_pending = True
        if u_corrupt < f.corrupt:
            data, bits = _flip_bits(data, random.Random(key), f.corrupt_bits)
            self._record(direction, "corrupt", len(data), f"bits {bits}", conn.id)
        due = max(now + delay, pipe.last_due)  # bytes never overtake
        t = now - self._t0
        if f.blackhole is not None and f.blackhole.active(t):
            until = f.blackhole.ends(t)
            self._record(direction, "stall", len(data), f"until {until:.3f} s", conn.id)
            due = max(due, self._t0 + until)
        elif due > now:
            self._record(direction, "delay", len(data), f"{(due - now) * 1000:.3f} ms", conn.id)
        if now < due < math.inf:
            self._at(due, lambda: self._pump(conn, pipe))
        pipe.last_due = due
        pipe.pending.append((due, data))
        pipe.pending_bytes += len(data)
        self._pump(conn, pipe)

    def _pump(self, conn: _Conn, pipe: _Pipe) -> None:
        """Write what is due from ``pipe`` to its destination, as the faults allow."""
        if conn.closed:
            return
        now = time.monotonic()
        while pipe.pending and pipe.pending[0][0] <= now:
            _, data = pipe.pending.popleft()
            pipe.pending_bytes -= len(data)
            pipe.out += data
        if not conn.connected:
            return
        dst = conn.dst(pipe)
        f = pipe.faults
        while pipe.out and not pipe.blocked:
            n = len(pipe.out)
            if f.slice:
                if now < pipe.gap_until:
                    self._at(pipe.gap_until, lambda: self._pump(conn, pipe))
                    break
                n = min(n, pipe.piece_left)
            try:
                sent = dst.send(memoryview(pipe.out)[:n])
            except (BlockingIOError, InterruptedError):
                pipe.blocked = True
                break
            except OSError as exc:
                other: Direction = "reply" if pipe.direction == "forward" else "forward"
                self._abort(conn, other, f"send: {exc.strerror or exc}")
                return
            del pipe.out[:sent]
            self._record(pipe.direction, "forward", sent, "slice" if f.slice else "", conn.id)
            if f.slice:
                pipe.piece_left -= sent
                if pipe.piece_left <= 0:
                    pipe.piece_left = pipe._piece()
                    if f.slice_gap:
                        pipe.gap_until = now + pipe.slicer.uniform(0, f.slice_gap)
        if pipe.idle():
            if pipe.reset_pending:
                self._reset(conn, pipe.direction, f"after {f.reset_after} bytes")
                return
            if pipe.eof and not pipe.done:
                pipe.done = True
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                if all(p.done for p in conn.pipes.values()):
                    self._close_conn(conn, reason="both directions ended")
                    return
        self._sync(conn)

    def _reset(self, conn: _Conn, direction: Direction, why: str) -> None:
        self._record(direction, "reset", 0, why, conn.id)
        self._close_conn(conn, reason="", reset=True, record=False)

    def _abort(self, conn: _Conn, failed: Direction, why: str) -> None:
        """One side failed (``failed``: the direction whose source or destination did)."""
        self._record(failed, "abort", 0, why, conn.id)
        self._close_conn(conn, reason="", reset=True, record=False)

    def _close_conn(
        self, conn: _Conn, *, reason: str, reset: bool = False, record: bool = True
    ) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.id, None)
        for sock in (conn.client, conn.upstream):
            self._forget(sock)
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        if record:
            self._record("-", "close", 0, reason, conn.id)


_LINGER_RESET = struct.pack("ii", 1, 0)


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _show(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    if isinstance(addr, bytes):
        addr = os.fsdecode(addr)
    return str(addr) if addr else "(unnamed)"
