"""Turning results into the table, the targets and the JSON document.

The targets are ratios between rows measured in the same run, never absolute times:

====  ============================================================  ==========================
id    target                                                        ratio checked
====  ============================================================  ==========================
a     buzon framed round trip within 1.15x of raw, per transport    buzon-spin0 p50 / raw p50
b     Unix stream 64 B one-way at least 2x multiprocessing.Pipe     buzon rate / mp rate
      (b: one send_bytes call per message; b-batch: send_bytes_many, 64 per call)
c     1 MiB one-way on Unix and TCP at least the raw socket         buzon MB/s / raw MB/s
d     waiting receiver round trip 3x faster than mp.Pipe            mp p50 / buzon p50
e     rendezvous (capacity=0) round trip within 1.5x of plain       buzon-rv p50 / buzon p50
      (sockets and pipes; on shm: at most 3 us, an (i) row)
f     receipts on a 64 B stream cost at most 15% throughput         buzon-receipts / buzon rate
g     reliable UDP 64 B one-way at least half of raw UDP            reliable rate / raw rate
      (g: one send_bytes call per message; g-batch: send_bytes_many, 64 per call)
h     reliable UDP through a wifi relay at least half of clean      wifi rate / clean rate
i     shared memory and the asyncio driver: shm rows vs the peers   see ``SHM_TARGETS``
      or a fixed number (asyncio shm round trip <= 10 us p50)
rpc   RPC add(a, b) calls/s: buzon.rpc vs the peers' rows           see ``RPC_TARGETS``
====  ============================================================  ==========================

``buzon`` is the default spin, ``buzon-spin0`` the blocking receiver.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._harness import Config, Result

__all__ = ["Target", "document", "evaluate_targets", "render", "write_json"]

SCHEMA = "buzon-bench/1"
TRANSPORT_ORDER = ("pipe", "fifo", "unix", "unixgram", "tcp", "udp", "mq", "shm")
IMPL_ORDER = (
    "raw",
    "buzon-spin0",
    "buzon",
    "buzon-batch",
    "buzon-bytes",
    "buzon-aio-spin0",
    "buzon-aio",
    "buzon-rv",
    "buzon-receipts",
    "buzon-reliable",
    "buzon-reliable-batch",
    "buzon-reliable-clean",
    "buzon-reliable-wifi",
)
IMPL_LABEL = {
    "raw": "raw",
    "buzon-spin0": "buzon spin=0",
    "buzon": "buzon",
    "buzon-batch": "buzon send_many",
    "buzon-bytes": "buzon recv_bytes()",
    "buzon-aio-spin0": "buzon.aio spin=0",
    "buzon-aio": "buzon.aio",
    "buzon-rv": "buzon capacity=0",
    "buzon-receipts": "buzon send_async",
    "buzon-reliable": "buzon reliable",
    "buzon-reliable-batch": "reliable send_many",
    "buzon-reliable-clean": "reliable, relay clean",
    "buzon-reliable-wifi": "reliable, relay wifi",
    "mp": "mp.Pipe",
    "mp/Queue": "mp.Queue",
    "zmq": "pyzmq PAIR",
    "iceoryx2": "iceoryx2",
    "faster-fifo": "faster-fifo",
    "faster-fifo-batch": "faster-fifo put_many",
    "buzon-loan": "buzon ring loan",
    "buzon/shm/numpy64m": "buzon send(array)",
    "mp/Pipe/numpy64m": "mp.Pipe pickle-5",
    "buzon/BoundedBuffer/4p4c": "buzon BoundedBuffer",
    # the mailbox rows (_mailbox.py)
    "buzon/mailbox": "buzon mailbox",
    "buzon-receipts/mailbox": "buzon mailbox send_async",
    "buzon-direct": "buzon send_to/recv_from",
    "mp/Queue/4p4c-dict": "mp.Queue",
}
# the peers' rows, after buzon's transports and before mp.Pipe: (transport, impl)
PEER_ORDER = (
    ("pubsub", "iceoryx2"),
    ("pair-ipc", "zmq"),
    ("queue", "faster-fifo"),
    ("queue", "faster-fifo-batch"),
    ("Queue", "mp"),
)
MAIN_METRICS = ("rt64", "oneway64", "oneway1m")


def _label(impl: str, transport: str, metric: str = "") -> str:
    """The row's label: by case id, by impl/transport, by impl (the first found)."""
    for key in (f"{impl}/{transport}/{metric}", f"{impl}/{transport}", impl):
        if key in IMPL_LABEL:
            return IMPL_LABEL[key]
    return impl


_Key = tuple[str, str, str]  # (impl, transport, metric)


def _index(results: Sequence[Result]) -> dict[_Key, Result]:
    return {(r.case.impl, r.case.transport, r.case.metric): r for r in results}


def _by_id(by: dict[_Key, Result], case_id: str, name: str) -> float | None:
    impl, transport, metric = case_id.split("/")
    return _value(by, (impl, transport, metric), name)


def _value(by: dict[_Key, Result], key: _Key, name: str) -> float | None:
    result = by.get(key)
    return None if result is None else result.value(name)


# --- targets ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One checkable target: ``ratio op threshold`` with the two numbers behind it."""

    id: str
    title: str
    transport: str
    op: Literal[">=", "<="]
    threshold: float
    ratio: float | None
    measured: float | None
    reference: float | None
    unit: str
    rounds: tuple[float | None, ...] = ()
    """The same ratio in each round of a ``--repeat`` run (empty for one round)."""

    def passes(self, ratio: float) -> bool:
        """Whether ``ratio`` meets this target."""
        return ratio <= self.threshold if self.op == "<=" else ratio >= self.threshold

    @property
    def status(self) -> str:
        if self.ratio is None:
            return "n/a"
        return "PASS" if self.passes(self.ratio) else "FAIL"

    @property
    def spread(self) -> str:
        """``"rounds 0.98-1.12x, 2/3 pass"`` for a repeated run, else ``""``."""
        got = [r for r in self.rounds if r is not None]
        if len(self.rounds) < 2 or not got:
            return ""
        ok = sum(self.passes(r) for r in got)
        return f"rounds {min(got):.2f}-{max(got):.2f}x, {ok}/{len(self.rounds)} pass"


_TITLES = {
    "a": "buzon framed 64 B round trip <= 1.15x raw (p50, spin=0 vs raw)",
    "b": "Unix stream 64 B one-way >= 2x multiprocessing.Pipe (one send_bytes per message)",
    "b-batch": "Unix stream 64 B one-way >= 2x multiprocessing.Pipe (send_bytes_many, 64/call)",
    "c": "1 MiB one-way >= raw socket (default spin)",
    "d": "waiting receiver round trip >= 3x faster than multiprocessing.Pipe (p50, default spin)",
    "e": "rendezvous (capacity=0) 64 B round trip <= 1.5x the plain round trip (p50)",
    "f": "receipts (send_async) on a 64 B stream keep >= 85% of plain send throughput",
    "g": "reliable UDP 64 B one-way >= 0.5x raw UDP (one send_bytes per message)",
    "g-batch": "reliable UDP 64 B one-way >= 0.5x raw UDP (send_bytes_many, 64/call)",
    "h": "reliable UDP through a wifi chaos relay >= 0.5x through a clean relay (64 B one-way)",
    "i": "shared memory, asyncio: buzon rows vs the peers (or a fixed number), the issue's targets",
    "m": "mailboxes (issue 10): buzon rows vs the peers (or a fixed number)",
    "rpc": "RPC add(a, b) calls/s: buzon.rpc vs the peers (or a fixed number), issue 11's targets",
}


def evaluate_targets(results: Sequence[Result]) -> list[Target]:
    """Every target, from the results' values (the medians of a repeated run); with
    ``--repeat N`` each target also carries its ratio in each round (``Target.rounds``,
    its spread), the rounds' own values paired as they were measured."""
    targets = _targets(results)
    n = max((len(r.rounds) for r in results), default=0)
    if n < 2:
        return targets
    per_round = [
        _targets(
            [
                dataclasses.replace(r, values=r.rounds[k], rounds=[])
                if k < len(r.rounds)
                else dataclasses.replace(r, status="skipped", values={}, rounds=[])
                for r in results
            ]
        )
        for k in range(n)
    ]
    return [
        dataclasses.replace(t, rounds=tuple(round_[i].ratio for round_ in per_round))
        for i, t in enumerate(targets)
    ]


def _targets(results: Sequence[Result]) -> list[Target]:
    by = _index(results)
    targets: list[Target] = []

    def add(
        tid: str,
        transport: str,
        op: Literal[">=", "<="],
        threshold: float,
        measured: float | None,
        reference: float | None,
        unit: str,
        ratio: Callable[[float, float], float],
    ) -> None:
        value = None
        if measured is not None and reference is not None and measured > 0 and reference > 0:
            value = ratio(measured, reference)
        targets.append(
            Target(tid, _TITLES[tid], transport, op, threshold, value, measured, reference, unit)
        )

    def div(m: float, r: float) -> float:
        return m / r

    def inv(m: float, r: float) -> float:
        return r / m

    for t in TRANSPORT_ORDER:
        add(
            "a",
            t,
            "<=",
            1.15,
            _value(by, ("buzon-spin0", t, "rt64"), "p50"),
            _value(by, ("raw", t, "rt64"), "p50"),
            "us",
            div,
        )
    add(
        "b",
        "unix",
        ">=",
        2.0,
        _value(by, ("buzon", "unix", "oneway64"), "rate"),
        _value(by, ("mp", "Pipe", "oneway64"), "rate"),
        "msg/s",
        div,
    )
    add(
        "b-batch",
        "unix",
        ">=",
        2.0,
        _value(by, ("buzon-batch", "unix", "oneway64"), "rate"),
        _value(by, ("mp", "Pipe", "oneway64"), "rate"),
        "msg/s",
        div,
    )
    for t in ("unix", "tcp"):
        add(
            "c",
            t,
            ">=",
            1.0,
            _value(by, ("buzon", t, "oneway1m"), "bandwidth"),
            _value(by, ("raw", t, "oneway1m"), "bandwidth"),
            "MB/s",
            div,
        )
    mp_p50 = _value(by, ("mp", "Pipe", "rt64"), "p50")
    for t in TRANSPORT_ORDER:
        add("d", t, ">=", 3.0, _value(by, ("buzon", t, "rt64"), "p50"), mp_p50, "us", inv)
    # link semantics (e, f) and reliable datagrams (g, h): one row against another
    semantics = ("pipe", "unix", "tcp")
    o64 = "oneway64"
    pairs: list[tuple[str, tuple[str, ...], Literal[">=", "<="], float, str, str, str, str]] = [
        # id, transports, op, threshold, row impl, reference impl, metric, value
        ("e", semantics, "<=", 1.5, "buzon-rv", "buzon", "rt64", "p50"),
        ("f", semantics, ">=", 0.85, "buzon-receipts", "buzon", o64, "rate"),
        ("g", ("udp",), ">=", 0.5, "buzon-reliable", "raw", o64, "rate"),
        ("g-batch", ("udp",), ">=", 0.5, "buzon-reliable-batch", "raw", o64, "rate"),
        ("h", ("udp",), ">=", 0.5, "buzon-reliable-wifi", "buzon-reliable-clean", o64, "rate"),
    ]
    for tid, transports, op, threshold, row, reference, metric, value in pairs:
        unit = "us" if value == "p50" else "msg/s"
        for t in transports:
            measured = _value(by, (row, t, metric), value)
            ref = _value(by, (reference, t, metric), value)
            add(tid, t, op, threshold, measured, ref, unit, div)
    # (i) shared memory: buzon's shm rows against the peers, or against a fixed number
    for label, case, unit, op, threshold, versus in SHM_TARGETS:
        name = _VALUE[unit]
        ref = _by_id(by, versus, name) if isinstance(versus, str) else versus
        add("i", label, op, threshold, _by_id(by, case, name), ref, unit, div)
    for label, case, unit, op, threshold, versus in MAILBOX_TARGETS:
        name = _VALUE[unit]
        ref = _by_id(by, versus, name) if isinstance(versus, str) else versus
        add("m", label, op, threshold, _by_id(by, case, name), ref, unit, div)
    # (rpc) issue 11: calls/s of buzon.rpc rows against the peers' rows (or a number)
    for label, case, value, op, threshold, peer in RPC_TARGETS:
        if isinstance(peer, tuple):  # another value of a case (nvim: the bare loop)
            ref = _by_id(by, peer[0], peer[1])
        else:
            ref = _by_id(by, peer, "rate") if isinstance(peer, str) else peer
        add("rpc", label, op, threshold, _by_id(by, case, value), ref, "calls/s", div)
    return targets


_VALUE = {"us": "p50", "msg/s": "rate", "MB/s": "bandwidth", "GB/s": "gbps"}
_Op = Literal[">=", "<="]
_B64 = "buzon/shm/oneway64"
_BB64 = "buzon-batch/shm/oneway64"
_B4 = "buzon/BoundedBuffer/4p4c"
_BY1M = "buzon-bytes/shm/oneway1m"
_FF1M = "faster-fifo/queue/oneway1m"
# label, buzon case, unit (of the value compared), op, threshold, peer case or fixed number
SHM_TARGETS: list[tuple[str, str, str, _Op, float, str | float]] = [
    ("rt64 p50 vs mp.Pipe", "buzon/shm/rt64", "us", "<=", 0.05, "mp/Pipe/rt64"),
    ("rt64 p50 vs iceoryx2", "buzon/shm/rt64", "us", "<=", 2, "iceoryx2/pubsub/rt64"),
    ("oneway64 vs 2M msg/s", _B64, "msg/s", ">=", 1, 2e6),
    ("oneway64 vs mp.Pipe", _B64, "msg/s", ">=", 5, "mp/Pipe/oneway64"),
    ("oneway64 vs iceoryx2", _B64, "msg/s", ">=", 2.6, "iceoryx2/pubsub/oneway64"),
    ("oneway64 vs pyzmq PAIR", _B64, "msg/s", ">=", 0.8, "zmq/pair-ipc/oneway64"),
    ("batch oneway64 vs 2M msg/s", _BB64, "msg/s", ">=", 1, 2e6),
    ("batch oneway64 vs mp.Pipe", _BB64, "msg/s", ">=", 5, "mp/Pipe/oneway64"),
    ("batch oneway64 vs iceoryx2", _BB64, "msg/s", ">=", 2.6, "iceoryx2/pubsub/oneway64"),
    ("batch oneway64 vs pyzmq PAIR", _BB64, "msg/s", ">=", 0.8, "zmq/pair-ipc/oneway64"),
    ("rendezvous rt64 p50 vs 3 us", "buzon-rv/shm/rt64", "us", "<=", 1, 3.0),
    ("asyncio rt64 p50 vs 10 us", "buzon-aio/shm/rt64", "us", "<=", 1, 10.0),
    # 1 MiB: recv_bytes() (a new bytes each, the target) and recv_bytes_into
    ("oneway1m recv_bytes() vs faster-fifo", _BY1M, "MB/s", ">=", 1, _FF1M),
    ("oneway1m recv_bytes_into vs faster-fifo", "buzon/shm/oneway1m", "MB/s", ">=", 1, _FF1M),
    ("numpy64m channel vs 10 GB/s", "buzon/shm/numpy64m", "GB/s", ">=", 1, 10.0),
    ("numpy64m ring loan vs 15 GB/s", "buzon-loan/shm/numpy64m", "GB/s", ">=", 1, 15.0),
    ("4p4c vs mp.Queue", _B4, "msg/s", ">=", 10, "mp/Queue/4p4c"),
    ("4p4c vs faster-fifo", _B4, "msg/s", ">=", 3, "faster-fifo/queue/4p4c"),
]
_M4 = "buzon/mailbox/4p4c"
_MD = "buzon/mailbox/4p4c-dict"
# issue 10's speed targets, in the same format (label, case, unit, op, threshold, versus)
MAILBOX_TARGETS: list[tuple[str, str, str, _Op, float, str | float]] = [
    ("4p4c vs BoundedBuffer", _M4, "msg/s", ">=", 1, _B4),
    ("4p4c vs mp.Queue", _M4, "msg/s", ">=", 10, "mp/Queue/4p4c"),
    ("4p4c vs faster-fifo", _M4, "msg/s", ">=", 3, "faster-fifo/queue/4p4c"),
    ("4p4c dict vs mp.Queue", _MD, "msg/s", ">=", 10, "mp/Queue/4p4c-dict"),
    ("4p4c dict vs faster-fifo", _MD, "msg/s", ">=", 3, "faster-fifo/queue/4p4c-dict"),
    ("4p4c receipts vs plain", "buzon-receipts/mailbox/4p4c", "msg/s", ">=", 0.5, _M4),
    ("send_to rt64 p50 vs shm", "buzon-direct/inbox/rt64", "us", "<=", 2, "buzon/shm/rt64"),
    ("broadcast to each vs 1M msg/s", "buzon/mailbox/bcast4", "msg/s", ">=", 1, 1e6),
]

_RPC_UNIX = "buzon-rpc/unix/rpcadd"
_RPC_SHM = "buzon-rpc/shm/rpcadd"
_MANAGERS = "mp-managers/unix/rpcadd"
_NVIM = "buzon-msgpack-rpc/nvim/rpcadd"
# label, buzon case, its value, op, threshold, peer case (its rate), (case, value) or number
RPC_TARGETS: list[tuple[str, str, str, _Op, float, str | tuple[str, str] | float]] = [
    ("unix vs mp.managers", _RPC_UNIX, "rate", ">=", 2, _MANAGERS),
    ("unix vs Pyro5", _RPC_UNIX, "rate", ">=", 8, "pyro5/unix/rpcadd"),
    ("unix vs RPyC", _RPC_UNIX, "rate", ">=", 8, "rpyc/unix/rpcadd"),
    # the same peers as a user who configures nothing calls them (docs/benchmarks.md)
    ("unix vs Pyro5 (default config)", _RPC_UNIX, "rate", ">=", 8, "pyro5-default/unix/rpcadd"),
    ("unix vs RPyC (root.add per call)", _RPC_UNIX, "rate", ">=", 8, "rpyc-default/unix/rpcadd"),
    ("unix vs grpcio", _RPC_UNIX, "rate", ">=", 8, "grpcio/unix/rpcadd"),
    ("shm vs 100k calls/s", _RPC_SHM, "rate", ">=", 1, 1e5),
    ("shm vs mp.managers", _RPC_SHM, "rate", ">=", 4, _MANAGERS),
    (
        "exactly_once vs at_most_once",
        "buzon-rpc-exactly-once/unix/rpcadd",
        "rate",
        ">=",
        0.8,
        _RPC_UNIX,
    ),
    ("nvim msgpack-rpc vs bare msgpack", _NVIM, "rate", ">=", 0.9, (_NVIM, "bare")),
]


# --- the table ----------------------------------------------------------------


def _fmt_us(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _fmt_rate(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.0f}k"
    return f"{v:.0f}"


def _fmt_mbs(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def _fmt_ratio(v: float) -> str:
    return f"{v:.2f}"


_STATUS_CELL = {"n/a": "n/a", "skipped": "skip", "error": "ERR"}
NOT_INSTALLED = "not installed"


def _not_installed(result: Result) -> bool:
    return result.status == "skipped" and result.note.startswith(NOT_INSTALLED)


def _status_cell(result: Result) -> str:
    if _not_installed(result):
        return NOT_INSTALLED
    return _STATUS_CELL.get(result.status, result.status)


def _cells(
    by: dict[_Key, Result],
    impl: str,
    transport: str,
    metric: str,
    name: str,
    fmt: Callable[[float], str],
    raw_key: _Key | None,
    mp_key: _Key | None,
) -> list[str]:
    """A value column and its two ratio columns (value / raw, value / mp)."""
    result = by.get((impl, transport, metric))
    if result is None:
        return ["", "", ""]
    if result.status != "ok":
        # a missing peer is said once, on the row's label (see _rows)
        return ["" if _not_installed(result) else _status_cell(result), "", ""]
    v = result.value(name)
    if v is None:
        return ["?", "", ""]
    out = [fmt(v)]
    for key in (raw_key, mp_key):
        ref = None if key is None else _value(by, key, name)
        out.append("-" if key is None else ("" if not ref else _fmt_ratio(v / ref)))
    return out


def _rows(results: Sequence[Result]) -> list[list[str]]:
    by = _index(results)
    present = {(r.case.transport, r.case.impl) for r in results if r.case.metric in MAIN_METRICS}
    order = [(t, i) for t in TRANSPORT_ORDER for i in IMPL_ORDER]
    order += [*PEER_ORDER, ("Pipe", "mp")]
    rows: list[list[str]] = []
    last_transport = None
    for transport, impl in order + sorted(present - set(order)):
        if (transport, impl) not in present:
            continue
        is_raw = impl == "raw"
        is_mp = (impl, transport) == ("mp", "Pipe")
        label = _label(impl, transport)
        mine = [by[(impl, transport, m)] for m in MAIN_METRICS if (impl, transport, m) in by]
        if all(_not_installed(r) for r in mine):
            label += f" ({NOT_INSTALLED})"
        row = [
            "" if transport == last_transport else ("mp.Pipe" if is_mp else transport),
            label,
        ]
        last_transport = transport
        for metric, name, fmt in (
            ("rt64", "p50", _fmt_us),
            ("oneway64", "rate", _fmt_rate),
            ("oneway1m", "bandwidth", _fmt_mbs),
        ):
            raw_key = None if is_raw or is_mp else ("raw", transport, metric)
            mp_key = None if is_mp else ("mp", "Pipe", metric)
            cells = _cells(by, impl, transport, metric, name, fmt, raw_key, mp_key)
            if metric == "rt64":
                p99 = _value(by, (impl, transport, metric), "p99")
                cells.insert(1, "" if p99 is None else _fmt_us(p99))
            row += cells
        rows.append(row)
    return rows


# the bulk cases: (metric, title, value, unit, formatter)
BULK = (
    ("numpy64m", "64 MiB numpy array, one way", "gbps", "GB/s", lambda v: f"{v:.2f}"),
    ("4p4c", "4 producers x 4 consumers, 64 B, all messages", "rate", "msg/s", _fmt_rate),
    (
        "4p4c-dict",
        "4 producers x 4 consumers, a dict of three fields, all messages",
        "rate",
        "msg/s",
        _fmt_rate,
    ),
    (
        "bcast4",
        "broadcast, 1 sender -> 4 receivers, 64 B, to each receiver (the slowest)",
        "rate",
        "msg/s",
        _fmt_rate,
    ),
    (
        "rpcadd",
        "RPC add(a, b), one call at a time, from another process",
        "rate",
        "calls/s",
        _fmt_rate,
    ),
)


def _bulk_lines(results: Sequence[Result]) -> list[str]:
    out: list[str] = []
    for metric, title, name, unit, fmt in BULK:
        rows = [
            (f"{r.case.transport:<13} {_label(r.case.impl, r.case.transport, metric)}", r)
            for r in results
            if r.case.metric == metric
        ]
        if not rows:
            continue
        width = max(len(label) for label, _ in rows)
        out += ["", f"{title} ({unit})"]
        for label, r in rows:
            v = r.value(name)
            cell = _status_cell(r) if r.status != "ok" else ("?" if v is None else fmt(v))
            out.append(f"  {label:<{width}}  {cell:>8}".rstrip())
    return out


_GROUPS = (("", 2), ("64 B round trip, us", 4), ("one-way 64 B", 3), ("one-way 1 MiB", 3))
_HEADER = [
    "transport",
    "impl",
    "p50",
    "p99",
    "xraw",
    "xmp",
    "msg/s",
    "xraw",
    "xmp",
    "MB/s",
    "xraw",
    "xmp",
]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [_HEADER, *rows]) for i in range(len(_HEADER))]
    sep = "  "
    gap = " | "

    def line(cells: list[str]) -> str:
        parts: list[str] = []
        col = 0
        for _, span in _GROUPS:
            chunk = []
            for i in range(col, col + span):
                chunk.append(cells[i].ljust(widths[i]) if i < 2 else cells[i].rjust(widths[i]))
            col += span
            parts.append(sep.join(chunk))
        return gap.join(parts).rstrip()

    group_line: list[str] = []
    col = 0
    for title, span in _GROUPS:
        width = sum(widths[col : col + span]) + len(sep) * (span - 1)
        group_line.append(title.center(width) if title else " " * width)
        col += span
    out = [gap.join(group_line).rstrip(), line(_HEADER)]
    out.append("-" * len(out[1]))
    out += [line(r) for r in rows]
    return out


def render(
    results: Sequence[Result],
    config: Config,
    machine: dict[str, Any],
    *,
    interrupted: bool = False,
) -> str:
    lines = [
        f"buzon bench: {machine['platform']}, {machine['cpu_count']} CPUs, "
        f"{machine['implementation']} {machine['python']}, "
        f"{config.seconds:g} s per case (+{config.warmup:g} s warm-up)"
        + (f", median of {config.repeat} rounds" if config.repeat > 1 else ""),
        "processes "
        + (
            f"pinned: parent on CPU {config.pin[0]}, peer on CPU {config.pin[1]}"
            if config.pin
            else "not pinned"
        )
        + _load_text(machine),
        "",
    ]
    if interrupted:
        lines += ["INTERRUPTED: partial results", ""]
    rows = _rows(results)
    if rows:
        lines += _table(rows)
    lines += _bulk_lines(results)
    lines += [
        "",
        "xraw, xmp: this row's value divided by the raw row of the same transport and by",
        "multiprocessing.Pipe. Round trip (p50/p99, us): lower is better, so xraw 1.05 is",
        "5% slower than raw. Throughput: higher is better. MB = 10^6 bytes. n/a: impossible",
        "on this transport; skip: a dependency is missing; ERR: failed (see notes);",
        "(not installed): a peer library is missing (pip install -e '.[bench]', make bench).",
    ]
    lines += _notes(results)
    lines += ["", "targets (ratios between rows of this run)"]
    current = ""
    targets = evaluate_targets(results)
    width: dict[str, int] = {}
    for t in targets:
        width[t.id] = max(width.get(t.id, 9), len(t.transport))
    for t in targets:
        w = width[t.id]
        if t.id != current:
            current = t.id
            lines.append(f"  ({t.id}) {t.title}")
        if t.ratio is None:
            lines.append(f"      {t.transport:<{w}} {'':>7}  n/a   (not measured in this run)")
            continue
        assert t.measured is not None and t.reference is not None
        fmt = _FORMATS.get(t.unit, _fmt_us)
        numbers = f"buzon {fmt(t.measured)} vs {fmt(t.reference)} {t.unit}"
        spread = f"; {t.spread}" if t.spread else ""
        lines.append(
            f"      {t.transport:<{w}} {t.ratio:>6.2f}x  {t.status:<4}  "
            f"({numbers}; need {t.op} {t.threshold:g}x{spread})"
        )
    return "\n".join(lines) + "\n"


_FORMATS: dict[str, Callable[[float], str]] = {
    "msg/s": _fmt_rate,
    "calls/s": _fmt_rate,
    "MB/s": _fmt_mbs,
    "GB/s": lambda v: f"{v:.2f}",
}


def _load_text(machine: dict[str, Any]) -> str:
    load = machine.get("loadavg_start")
    if not isinstance(load, float):
        return ""
    text = f"; load average {load:.2f} at start"
    if load >= 0.5:
        text += " (the machine is busy: expect noise, compare ratios from a quiet run)"
    return text


def _notes(results: Sequence[Result]) -> list[str]:
    grouped: dict[str, list[str]] = {}
    for r in results:
        if r.status != "ok" and r.note:
            grouped.setdefault(f"{r.status}: {r.note}", []).append(r.case.id)
    if not grouped:
        return []
    out = ["", "notes"]
    for note, ids in grouped.items():
        shown = ", ".join(ids[:4]) + (f", ... ({len(ids)} cases)" if len(ids) > 4 else "")
        out.append(f"  - {shown}")
        out.append(f"      {note}")
    return out


# --- JSON ---------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    version: str | None
    try:
        version = importlib.metadata.version("buzon")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        version = getattr(sys.modules.get("buzon"), "__version__", None)
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "platform": platform.platform(),
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "buzon_version": version,
        "executable": sys.executable,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def document(
    results: Sequence[Result],
    config: Config,
    machine: dict[str, Any],
    *,
    started: datetime.datetime,
    elapsed: float,
    interrupted: bool,
) -> dict[str, Any]:
    """The JSON document: machine, configuration, every measurement, the targets."""
    return {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 3),
        "interrupted": interrupted,
        "machine": machine,
        "config": {
            "seconds": config.seconds,
            "warmup_s": round(config.warmup, 6),
            "quick": config.quick,
            "only": list(config.only),
            "pin": None if config.pin is None else list(config.pin),
            "repeat": config.repeat,
        },
        "results": [
            {
                "id": r.case.id,
                "impl": r.case.impl,
                "transport": r.case.transport,
                "metric": r.case.metric,
                "status": r.status,
                "note": r.note,
                "wall_s": round(r.wall, 3),
                "values": {k: {"value": q.value, "unit": q.unit} for k, q in r.values.items()},
                "rounds": [{k: q.value for k, q in v.items()} for v in r.rounds],
            }
            for r in results
        ],
        "targets": [
            {
                "id": t.id,
                "title": t.title,
                "transport": t.transport,
                "ratio": t.ratio,
                "op": t.op,
                "threshold": t.threshold,
                "status": t.status,
                "round_ratios": list(t.rounds),
                "measured": None if t.measured is None else {"value": t.measured, "unit": t.unit},
                "reference": None
                if t.reference is None
                else {"value": t.reference, "unit": t.unit},
            }
            for t in evaluate_targets(results)
        ],
    }


def write_json(path: str, doc: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
