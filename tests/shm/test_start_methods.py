"""Shared memory under every multiprocessing start method, with no warnings left.

The children run in a separate interpreter (a subprocess) so that the forkserver and
multiprocessing's resource tracker, which those start methods launch, end with it.
The bounded buffer is attached by name in each child; the array is passed as a
``Process`` argument (pickled by multiprocessing under spawn and forkserver, see
tests/test_pass_to_child.py for every other object).
"""

from __future__ import annotations

import pytest

from _fork import run_script

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
    out = run_script(runtime_dir, "start_methods.py", SCRIPT, method, timeout=120)
    assert out == ("[0, 0, 0] [b'hello from 0', b'hello from 1', b'hello from 2'] [1, 2, 3]\n")
