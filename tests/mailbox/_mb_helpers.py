"""Helpers shared by the mailbox tests: forked children and their exit status."""

from __future__ import annotations

import os
from collections.abc import Callable


def fork(fn: Callable[[], object]) -> int:
    """Run ``fn`` in a forked child; exit status 0 if it returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def reap(pid: int) -> int:
    """Wait for child ``pid``; its raw wait status."""
    return os.waitpid(pid, 0)[1]


def exit_code(pid: int) -> int:
    """Wait for child ``pid``; its exit code (a negative signal number if killed)."""
    return os.waitstatus_to_exitcode(reap(pid))
