"""The channel contracts, as an executable suite: every check runs natively in both
drivers on every transport it applies to.

Every check is written once, as an ``async`` function of a :class:`Pair` (see
:mod:`._harness`): in the ``asyncio`` driver its operations are :mod:`buzon.aio`
coroutines run as real tasks on one event loop (with real cancellation and timeouts),
in the ``sync`` driver they are the blocking calls run in real threads; the two sides
of a check run at the same time in both. A check that does not apply to a transport
raises :class:`NotApplicable` saying why (pytest reports it as a skip with that reason).

The checks, by group (the list with each check's contract is generated into
``docs/semantics.md``, section "The conformance suite"):

* :data:`CHECKS` (1-13), the channel contract, on :data:`TRANSPORTS`;
* :data:`CAPACITY_CHECKS` (14-17), capacity and receipts, on :data:`CAPACITY_TRANSPORTS`;
* :data:`ESTABLISHMENT_CHECKS` (18-20), connecting, accepting, admission (4h, 4d, 4e);
* :data:`CONTRACT_CHECKS` (21-26), the contracts about hostile peers and giving up:
  memory follows bytes received (4b), dead peers are reported (4c), writers of one
  endpoint cannot poison each other (4f), ends and listeners pass to children (4g), a
  send that gives up delivered nothing (4a).

Run it with pytest (``tests/testing/test_conformance.py``) or call :func:`run_all`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from ._basic import (
    check_backpressure,
    check_bytes,
    check_closed,
    check_direction,
    check_end_of_channel,
    check_nonblocking,
    check_numpy,
    check_order,
    check_processes,
    check_roundtrip,
    check_statistics,
    check_too_large,
    check_wait,
)
from ._capacity import check_bounded, check_receipts, check_rendezvous, check_unbounded
from ._contracts import (
    check_dead_peer_flush,
    check_dead_peer_send,
    check_giving_up,
    check_memory_bound,
    check_pass_to_child,
    check_several_writers,
)
from ._establish import (
    ESTABLISHMENT_TRANSPORTS,
    check_accept_timeout,
    check_admission,
    check_connect_retry,
)
from ._harness import (
    CAPACITY_TRANSPORTS,
    DRIVERS,
    TRANSPORTS,
    Check,
    End,
    NotApplicable,
    Pair,
    open_pair,
    run_check,
)

__all__ = [
    "CAPACITY_CHECKS",
    "CAPACITY_TRANSPORTS",
    "CHECKS",
    "CONTRACT_CHECKS",
    "DRIVERS",
    "ESTABLISHMENT_CHECKS",
    "ESTABLISHMENT_TRANSPORTS",
    "PAIR_OPTIONS",
    "TRANSPORTS",
    "End",
    "NotApplicable",
    "Pair",
    "catalogue",
    "open_pair",
    "render_catalogue",
    "run_all",
    "run_check",
]

CHECKS: dict[str, Check] = {
    "roundtrip": check_roundtrip,
    "bytes": check_bytes,
    "order": check_order,
    "nonblocking": check_nonblocking,
    "backpressure": check_backpressure,
    "end_of_channel": check_end_of_channel,
    "closed": check_closed,
    "too_large": check_too_large,
    "direction": check_direction,
    "wait": check_wait,
    "statistics": check_statistics,
    "numpy": check_numpy,
    "processes": check_processes,
}
"""The channel contract (1-13): ``check(pair)``, on a pair opened with
``PAIR_OPTIONS.get(name, {})``."""

PAIR_OPTIONS: dict[str, dict[str, Any]] = {
    # streams get a frame cap just above 1 MiB so "too large" is cheap to provoke
    "too_large": {"max_frame": (1 << 20) + 4096},
}

CAPACITY_CHECKS: dict[str, tuple[Check, dict[str, Any]]] = {
    "rendezvous": (check_rendezvous, {"capacity": 0}),
    "bounded": (check_bounded, {"capacity": 4}),
    "unbounded": (check_unbounded, {"capacity": None, "max_queue": 4 * 1024 * 1024}),
    "receipts": (check_receipts, {}),
}
"""The capacity contract (14-17): ``(check, options of its pair)``."""

ESTABLISHMENT_CHECKS: dict[str, Callable[[str, str], None]] = {
    "connect_retry": check_connect_retry,
    "accept_timeout": check_accept_timeout,
    "admission": check_admission,
}
"""The establishment contract (18-20): ``check(transport, driver)``, each with its own
listener and clients."""

CONTRACT_CHECKS: dict[str, Callable[[str, str], None]] = {
    "memory_bound": check_memory_bound,
    "dead_peer_send": check_dead_peer_send,
    "dead_peer_flush": check_dead_peer_flush,
    "several_writers": check_several_writers,
    "pass_to_child": check_pass_to_child,
    "giving_up": check_giving_up,
}
"""The contracts about giving up and hostile peers (21-26): ``check(transport,
driver)``, each opening the pairs it needs (with the options it needs)."""


def run_all(
    transports: tuple[str, ...] = TRANSPORTS, drivers: tuple[str, ...] = DRIVERS
) -> list[tuple[str, str, str, str]]:
    """Run every check on every transport and driver; raise on the first failure.
    Returns ``(check, transport, driver, reason)`` for each check that did not apply."""
    skipped: list[tuple[str, str, str, str]] = []
    for transport in transports:
        for driver in drivers:
            runs: list[tuple[str, Callable[[], None]]] = []
            for name, check in CHECKS.items():
                options = PAIR_OPTIONS.get(name, {})
                runs.append((name, partial(run_check, check, transport, driver, **options)))
            if transport in CAPACITY_TRANSPORTS:
                for name, (check, options) in CAPACITY_CHECKS.items():
                    runs.append((name, partial(run_check, check, transport, driver, **options)))
            for name, fn in {**ESTABLISHMENT_CHECKS, **CONTRACT_CHECKS}.items():
                runs.append((name, partial(fn, transport, driver)))
            for name, run in runs:
                try:
                    run()
                except NotApplicable as exc:
                    skipped.append((name, transport, driver, str(exc)))
    return skipped


def catalogue() -> list[tuple[int, str, str, str]]:
    """``(number, name, group, contract)`` of every check, in order: the contract is the
    first paragraph of the check's docstring (what docs/semantics.md lists)."""
    groups: list[tuple[str, dict[str, Any]]] = [
        ("channel", CHECKS),
        ("capacity", {k: v[0] for k, v in CAPACITY_CHECKS.items()}),
        ("establishment", ESTABLISHMENT_CHECKS),
        ("contracts", CONTRACT_CHECKS),
    ]
    rows: list[tuple[int, str, str, str]] = []
    for group, checks in groups:
        for name, fn in checks.items():
            doc = (fn.__doc__ or "").strip().split("\n\n")[0]
            text = " ".join(doc.split())
            if text.startswith("("):  # "(14) ..." : the number comes from the order
                text = text.split(") ", 1)[1]
            rows.append((len(rows) + 1, name, group, text))
    return rows


def render_catalogue() -> str:
    """The checks as a Markdown table (docs/semantics.md, generated by buzon.docgen)."""
    lines = ["| # | check | group | what it checks |", "|---|---|---|---|"]
    for number, name, group, text in catalogue():
        lines.append(f"| {number} | `{name}` | {group} | {text.replace('|', '/')} |")
    return "\n".join(lines)
