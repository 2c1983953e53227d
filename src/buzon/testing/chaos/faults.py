"""Chaos fault models: what to do with each datagram or stream chunk, decided by seeded
dice and nothing else (sans-IO: no sockets, no clock of its own; the relay passes the
time). :class:`Faults` describes one direction's faults, :data:`PROFILES` names a few,
``_Shaper`` decides the fate of each datagram and ``_Pipe`` holds one stream
direction's fault state. The relay (:mod:`buzon.testing.chaos.relay`) applies them to
real sockets. The same seed gives the same decisions.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = [
    "COUNTERS",
    "DIRECTIONS",
    "PROFILES",
    "Blackhole",
    "Direction",
    "DropRun",
    "Event",
    "Faults",
    "GilbertElliott",
    "render_profiles",
]

Direction = Literal["forward", "reply"]
DIRECTIONS: tuple[Direction, Direction] = ("forward", "reply")


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


# ================================================================ a stream direction


class _ChunkDice(NamedTuple):
    """The draws for one chunk read from a stream (the same draws for every chunk)."""

    reset: bool  # reset the connection instead of passing the chunk on
    corrupt: bool
    delay: float
    key: int  # seeds the variable-length draws, when needed


class _Pipe:
    """One direction of a relayed stream connection: its fault state and its queues of
    bytes (the relay moves them between sockets)."""

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

    def read_size(self, most: int) -> int:
        """How much to read next: at most ``most``, and not past ``reset_after``."""
        after = self.faults.reset_after
        return most if after is None else max(1, min(most, after - self.bytes_in))

    def dice(self) -> _ChunkDice:
        """The draws for the next chunk, whatever becomes of it."""
        f, rng = self.faults, self.rng
        u_reset, u_corrupt, delay = rng.random(), rng.random(), _delay_sample(f, rng)
        key = rng.getrandbits(64)
        return _ChunkDice(u_reset < f.reset, u_corrupt < f.corrupt, delay, key)

    def take(self, data: bytes, dice: _ChunkDice) -> tuple[bytes, list[int] | None]:
        """Count a chunk passed on (arming ``reset_after``), corrupted if the dice say
        so: the bytes to pass on, and the bits flipped (None: not corrupted)."""
        f = self.faults
        self.bytes_in += len(data)
        if f.reset_after is not None and self.bytes_in >= f.reset_after:
            self.reset_pending = True
        if not dice.corrupt:
            return data, None
        return _flip_bits(data, random.Random(dice.key), f.corrupt_bits)
