"""Shared memory under every multiprocessing start method, with no warnings left.

The children run in a separate interpreter (a subprocess) so that the forkserver and
multiprocessing's resource tracker, which those start methods launch, end with it.
The bounded buffer is attached by name in each child; the array is passed as a
``Process`` argument (pickled by multiprocessing under spawn and forkserver, see
tests/test_pass_to_child.py for every other object).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import multiprocessing as mp
import sys

import buzon


def work(i, grid):
    with buzon.BoundedBuffer("jobs") as buf:
        buf.put(b"hello from %d" % i, timeout=10)
    with grid, grid.lock:
        grid.array[i] = i + 1


if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    buf = buzon.BoundedBuffer("jobs", slots=4, item_size=32)
    grid = buzon.shared_array("grid", 3, "i8")
    try:
        procs = [ctx.Process(target=work, args=(i, grid)) for i in range(3)]
        for p in procs:
            p.start()
        got = sorted(buf.get(timeout=10) for _ in range(3))
        for p in procs:
            p.join(10)
        print([p.exitcode for p in procs], got, grid.array.tolist())
    finally:
        buf.remove()
        buf.close()
        grid.remove()
        grid.close()
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_start_method(method: str, runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "start_methods.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-W", "error", path, method],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=runtime_dir,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == (
        "[0, 0, 0] [b'hello from 0', b'hello from 1', b'hello from 2'] [1, 2, 3]\n"
    )
    os.unlink(path)
