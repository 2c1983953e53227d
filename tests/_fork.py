"""Child processes for the tests: forked children for the tests that need a
single-threaded process (a process-directed signal then interrupts the thread under
test, not one of pytest's), and scripts run by a fresh interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable


def reap(pid: int, timeout: float) -> int:
    """Wait for child ``pid`` up to ``timeout`` seconds; its wait status, or -1 when it
    had to be killed (SIGKILL, then reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -1
        time.sleep(0.005)


def in_child(body: Callable[[], None], timeout: float = 30) -> None:
    """Run ``body`` in a forked child and assert that it returned (its traceback, if
    any, goes to stderr); a child still running after ``timeout`` is killed and fails."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    status = reap(pid, timeout)
    assert status != -1, "the child hung"
    assert os.waitstatus_to_exitcode(status) == 0


def run_script(directory: str, name: str, script: str, *args: str, timeout: float = 240) -> str:
    """Write ``script`` as ``directory/name`` and run it with this interpreter (``-W
    error``, this process's sys.path) and ``args``; the script is removed afterwards.
    Asserts that it exited 0 and wrote nothing to stderr; returns its stdout."""
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(script)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        done = subprocess.run(
            [sys.executable, "-W", "error", path, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=directory,
        )
    finally:
        os.unlink(path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout
