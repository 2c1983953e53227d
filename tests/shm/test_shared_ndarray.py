"""A shared array behaves as a numpy array; re-attaching with other specs raises.

(issue 10: ``arr[0, 0]`` was a TypeError, ``arr.shape`` failed, ``np.sum(arr)`` returned
the wrapper, ``np.asarray(arr)`` was a 0-d object array, and attaching with another
shape or dtype silently returned the old one.)
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

import buzon
from buzon.errors import ChannelClosed, EndpointInUse
from buzon.shm import SharedArray, SharedLock

T = 30.0


@pytest.fixture
def arr() -> Iterator[SharedArray]:
    sa = buzon.shared_array("nd", (3, 4), "i8")
    try:
        yield sa
    finally:
        sa.remove()
        sa.close()


def _mapped(segment: str) -> bool:
    with open("/proc/self/maps") as f:
        return segment in f.read()


def test_indexing_slicing_and_attributes(arr: SharedArray) -> None:
    assert arr.shape == (3, 4) and arr.dtype == np.int64 and arr.ndim == 2
    assert arr.size == 12 and arr.nbytes == 96 and len(arr) == 3
    assert arr.T.shape == (4, 3)
    arr[0, 0] = 7
    arr[1:3] = 5
    assert arr[0, 0] == 7 and arr[2, 3] == 5 and arr[0, 1] == 0
    assert [row.tolist() for row in arr][1] == [5, 5, 5, 5]
    with buzon.shared_array("nd") as other:  # the segment itself was written
        assert other[1:3].tolist() == [[5] * 4, [5] * 4] and other[0, 0] == 7
    assert arr.name == "nd" and isinstance(arr.lock, SharedLock)
    assert "(3, 4)" in repr(arr) and "int64" in repr(arr)


def test_numpy_functions_and_arithmetic_give_plain_results(arr: SharedArray) -> None:
    arr[:] = np.arange(12).reshape(3, 4)
    total = np.sum(arr)
    assert total == 66 and not isinstance(total, SharedArray)
    assert float(np.mean(arr)) == 5.5 and arr.sum() == 66 and arr.max() == 11
    plain = np.asarray(arr)
    assert type(plain) is np.ndarray and plain.shape == (3, 4)
    assert np.shares_memory(plain, np.asarray(arr))
    plain[2, 3] = 99
    assert arr[2, 3] == 99  # the same memory, not a copy
    for got in (arr + 1, arr * arr, -arr, np.add(arr, 1), arr[1:], np.concatenate([arr, arr])):
        assert type(got) is np.ndarray
    assert not np.shares_memory(arr + 1, plain)
    assert (arr == plain).all() and np.array_equal(arr, plain)
    assert type(arr.reshape(12)) is np.ndarray and arr.reshape(12)[11] == 99
    assert np.array(arr, dtype="f8")[2, 3] == 99.0
    assert arr[arr > 9].tolist() == [10, 99] and (10 - arr)[0, 0] == 10
    assert (1 in arr) and not (arr < 0).any() and abs(-arr)[2, 3] == 99
    copied = np.array(arr)
    assert not np.shares_memory(copied, plain)
    with pytest.raises(TypeError):
        hash(arr)


def test_in_place_operations_write_the_segment(arr: SharedArray) -> None:
    same = arr
    arr += 3
    assert arr is same  # still the shared array, not a new plain ndarray
    np.multiply(arr, 2, out=arr)
    np.copyto(arr, arr[0], where=np.asarray(arr) > 100)  # an array function writing it
    with buzon.shared_array("nd") as other:
        assert (np.asarray(other) == 6).all()


def test_memoryview_of_the_shared_array(arr: SharedArray) -> None:
    arr[0, 1] = 4
    with memoryview(arr.array) as mv:
        assert mv.shape == (3, 4) and mv[0, 1] == 4


def test_reattach_with_another_shape_or_dtype_raises(arr: SharedArray) -> None:
    with pytest.raises(EndpointInUse, match=r"\(3, 4\).*int64.*\(4, 3\).*int64"):
        buzon.shared_array("nd", (4, 3), "i8")
    with pytest.raises(EndpointInUse, match=r"int64.*float32"):
        buzon.shared_array("nd", (3, 4), "f4")
    with pytest.raises(EndpointInUse, match=r"int64.*float64"):
        buzon.shared_array("nd", (3, 4))  # the default dtype (float64) is asked for
    with pytest.raises(EndpointInUse, match=r"int64.*uint8"):
        buzon.shared_array("nd", dtype="u1")
    for same in (
        buzon.shared_array("nd", (3, 4), "i8"),
        buzon.shared_array("nd", [3, 4], np.int64),
        buzon.shared_array("nd", dtype="int64"),
        buzon.shared_array("nd"),
    ):
        assert not same.created and same.shape == (3, 4)
        same.close()
    with buzon.shared_array("vec", 5, "u1") as vec:
        try:
            with buzon.shared_array("vec", (5,), "u1") as again:
                assert again.shape == (5,)
            with pytest.raises(EndpointInUse):
                buzon.shared_array("vec", 6, "u1")
        finally:
            vec.remove()


def test_reattach_a_value_with_another_type_raises() -> None:
    with buzon.shared_value("typed", int) as v:
        try:
            with pytest.raises(EndpointInUse, match=r"'q'.*'d'"):
                buzon.shared_value("typed", float)
            with buzon.shared_value("typed", "q") as same, buzon.shared_value("typed") as bare:
                assert same.format == bare.format == "q"
        finally:
            v.remove()


def test_after_close_the_handle_raises_but_views_stay_valid() -> None:
    sa = buzon.shared_array("views", 4, "i4")
    segment = sa.segment_name
    try:
        plain = np.asarray(sa)
        part = sa[1:3]
        sa.close()
        for use in (
            lambda: sa[0],
            lambda: sa.shape,
            lambda: np.sum(sa),
            lambda: np.asarray(sa),
            lambda: sa + 1,
            lambda: len(sa),
        ):
            with pytest.raises(ChannelClosed, match="'views' is closed"):
                use()
        sa.close()  # twice: nothing more
        part[:] = 8  # the mapping lives while views of it do: no crash
        plain[0] = 1
        with buzon.shared_array("views") as other:
            assert other.tolist() == [1, 8, 8, 0]
        assert _mapped(segment)
        del plain, part
        gc.collect()
        assert not _mapped(segment)  # ...and goes with the last of them
    finally:
        sa.remove()


def test_remove_while_views_exist_is_safe() -> None:
    sa = buzon.shared_array("gone", 8, "f8")
    view = np.asarray(sa)
    sa.remove()
    sa.close()
    view[:] = 2.5  # still mapped, only unnamed
    assert view.sum() == 20.0
    del view


def _child_fills(sa: SharedArray) -> None:  # pragma: no cover - child
    sa[:] = np.arange(sa.size).reshape(sa.shape)
    assert np.sum(sa) == sum(range(sa.size))
    sa.close()


def test_passes_to_a_forked_child() -> None:
    sa = buzon.shared_array("pass", (2, 3), "i2")
    try:
        p = multiprocessing.get_context("fork").Process(target=_child_fills, args=(sa,))
        p.start()
        p.join(T)
        assert p.exitcode == 0
        assert sa.tolist() == [[0, 1, 2], [3, 4, 5]]
    finally:
        sa.remove()
        sa.close()


SPAWN = r"""
import multiprocessing as mp
import numpy as np
import buzon


def child(sa):
    sa[:] = np.arange(sa.size).reshape(sa.shape)
    assert np.sum(sa) == 15 and sa.name == "spawned"
    sa.close()


if __name__ == "__main__":
    sa = buzon.shared_array("spawned", (2, 3), "i2")
    try:
        p = mp.get_context("spawn").Process(target=child, args=(sa,))
        p.start()
        p.join(60)
        print(p.exitcode, sa.tolist())
    finally:
        sa.remove()
        sa.close()
"""


def test_passes_to_a_spawned_child_by_name(tmp_path: pathlib.Path) -> None:
    # in a subprocess, so that multiprocessing's resource tracker ends with it
    script = tmp_path / "spawned.py"
    script.write_text(SPAWN)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0 [[0, 1, 2], [3, 4, 5]]\n" and done.stderr == ""


def test_no_fds_left() -> None:
    before = len(os.listdir("/proc/self/fd"))
    with buzon.shared_array("fds", 3) as sa:
        _ = np.asarray(sa) + 1
        sa.remove()
    assert len(os.listdir("/proc/self/fd")) == before


VIEW_AFTER_CLOSE = r"""
import buzon
sa = buzon.shared_array("kept", 1 << 20, "u1")
try:
    part = sa.array[1000:2000]  # the old API: a view taken before close
    sa.close()
    part[:] = 7  # was a write to unmapped memory: SIGSEGV
    print(int(part.sum()))
finally:
    sa.remove()
"""


def test_a_view_of_dot_array_outlives_close() -> None:
    # in a subprocess: before the fix this crashed the interpreter
    done = subprocess.run(
        [sys.executable, "-c", VIEW_AFTER_CLOSE],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout == "7000\n"
