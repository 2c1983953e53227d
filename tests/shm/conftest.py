"""Every shared-memory test leaves /dev/shm as it found it (and no fds open).

Only segments this test run made are judged: another process of the same user (a second
test run on the machine, a user's own program) may create and remove segments meanwhile,
and those are neither reported nor removed. A segment is this run's when its creator is
this process, one of its descendants, or a process that is gone (a child a test killed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from buzon.shm import list_segments

SHM_DIR = "/dev/shm"


def _ours() -> set[str]:
    prefix = f"buzon-{os.getuid()}-"
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}
    except FileNotFoundError:  # pragma: no cover - Linux always has it
        return set()


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: the fields follow the last ")"
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _made_here(pid: int | None) -> bool:
    """Whether a segment created by ``pid`` belongs to this run."""
    me = os.getpid()
    if not pid or pid == me:
        return True
    seen = 0
    while pid and seen < 64:  # walk up to init; bounded against a /proc race
        parent = _parent(pid)
        if parent is None:
            return seen == 0  # the creator itself is gone: a child of ours a test killed
        if parent == me:
            return True
        pid, seen = parent, seen + 1
    return False


def _foreign(names: set[str]) -> set[str]:
    owners = {s.name: s.owner_pid for s in list_segments() if s.name in names}
    return {n for n in names if n in owners and not _made_here(owners[n])}


@pytest.fixture(autouse=True)
def no_segment_left(fd_leak_check: None) -> Iterator[None]:
    before = _ours()
    yield
    left = _ours() - before
    left -= _foreign(left)
    for name in left:  # do not let one failure cascade into the next tests
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    assert not left, f"segments left in /dev/shm: {sorted(left)}"
