"""What :func:`buzon.wait` and :func:`buzon.aio.wait` share: which objects can be
waited on, when a wait must wake up at the latest, and the end of a wait (the
rendezvous offers it made withdrawn). The drivers only differ in how they sleep."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

W = TypeVar("W")


def waitables(objects: Iterable[W], who: str) -> tuple[list[W], list[float]]:
    """The objects as a list (TypeError naming ``who`` for one that cannot be waited
    on) and the slices some of them bound each sleep to (mailboxes: a wake-up another
    waiter may have taken)."""
    items = list(objects)
    for o in items:
        if not hasattr(o, "_ready"):
            raise TypeError(f"{who} cannot wait on {type(o).__name__}")
    slices = [o._wait_slice for o in items if hasattr(o, "_wait_slice")]
    return items, slices


def wake_at(
    items: list[Any], deadline: float | None, slices: list[float], now: float
) -> float | None:
    """The deadline, or sooner a listener's next pending peer's deadline, or the end
    of the shortest slice an object sleeps at most. None: no bound."""
    wakes = [w for o in items if (w := _next_wake(o)) is not None]
    if deadline is not None:
        wakes.append(deadline)
    if slices:
        wakes.append(now + min(slices))
    return min(wakes, default=None)


def _next_wake(o: Any) -> float | None:
    wake = getattr(o, "_next_wake", None)  # listeners: their pending peers' deadlines
    return None if wake is None else wake()


def unready(items: list[Any]) -> None:
    """The wait returns: the rendezvous offers it made are withdrawn (no offer stands
    while no operation runs: a sender that gives up learns its fate at once)."""
    for o in items:
        done = getattr(o, "_wait_over", None)
        if done is not None:
            done()
