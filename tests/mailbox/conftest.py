"""Every mailbox test leaves /dev/shm as it found it (and no fds open)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

SHM_DIR = "/dev/shm"


def _ours() -> set[str]:
    prefix = f"buzon-{os.getuid()}-"
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}
    except FileNotFoundError:  # pragma: no cover - Linux always has it
        return set()


@pytest.fixture(autouse=True)
def no_segment_left(fd_leak_check: None) -> Iterator[None]:
    before = _ours()
    yield
    left = _ours() - before
    for name in left:  # do not let one failure cascade into the next tests
        os.unlink(os.path.join(SHM_DIR, name))
    assert not left, f"segments left in /dev/shm: {sorted(left)}"
