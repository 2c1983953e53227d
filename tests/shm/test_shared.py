"""buzon.shared_array / buzon.shared_value and their process-shared lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

import buzon
from buzon import _core
from buzon.errors import NoSuchEndpoint, ProtocolError, Timeout

T = 10.0


def _fork(fn: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def _wait_ok(pid: int) -> None:
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_array_is_shared_between_processes() -> None:
    sa = buzon.shared_array("grid", (3, 4), "f8")
    try:
        assert sa.created and sa.array.shape == (3, 4) and not sa.array.any()

        def child() -> None:
            with buzon.shared_array("grid") as other:
                assert not other.created and other.array.dtype == np.float64
                other.array[1, :] = [1.5, 2.5, 3.5, 4.5]

        _wait_ok(_fork(child))
        assert sa.array[1].tolist() == [1.5, 2.5, 3.5, 4.5]
    finally:
        sa.remove()
        sa.close()


def test_segment_name_attaches_with_multiprocessing_shared_memory() -> None:
    sa = buzon.shared_array("mp", 5, "i4")
    try:
        sa.array[:] = [5, 4, 3, 2, 1]
        code = (
            "import sys, numpy as np\n"
            "from multiprocessing import resource_tracker, shared_memory\n"
            "sm = shared_memory.SharedMemory(sys.argv[1])\n"
            "resource_tracker.unregister(sm._name, 'shared_memory')  # not ours to unlink\n"
            "a = np.ndarray((5,), 'i4', buffer=sm.buf)\n"
            "print(a.tolist()); a[0] = 50; del a\n"
            "sm.close()\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, sa.segment_name],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "[5, 4, 3, 2, 1]\n" and done.stderr == ""
        assert sa.array[0] == 50
    finally:
        sa.remove()
        sa.close()


def test_lock_survives_its_holder_dying() -> None:
    sv = buzon.shared_value("guarded", int)
    try:
        r, w = os.pipe()

        def holder() -> None:
            with buzon.shared_value("guarded") as v:
                v.lock.acquire()
                v.value = 99  # half-way through an update...
                os.write(w, b"1")
                os.kill(os.getpid(), signal.SIGKILL)

        pid = _fork(holder)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        os.waitpid(pid, 0)
        assert sv.lock.acquire(timeout=T) is True  # taken over: the data may need repair
        assert sv.value == 99
        sv.lock.release()
        assert sv.lock.acquire(timeout=T) is False
        sv.lock.release()
    finally:
        sv.remove()
        sv.close()


def test_lock_times_out_while_a_live_process_holds_it() -> None:
    sv = buzon.shared_value("busy", float)
    try:
        r, w = os.pipe()
        r2, w2 = os.pipe()

        def holder() -> None:
            with buzon.shared_value("busy") as v, v.lock:
                os.write(w, b"1")
                os.read(r2, 1)

        pid = _fork(holder)
        assert os.read(r, 1) == b"1"
        with pytest.raises(Timeout):
            sv.lock.acquire(timeout=0.05)
        os.write(w2, b"1")
        _wait_ok(pid)
        for fd in (r, w, r2, w2):
            os.close(fd)
        with sv.lock:
            assert not sv.lock.recovered
        with pytest.raises(RuntimeError):
            sv.lock.release()
    finally:
        sv.remove()
        sv.close()


def test_counter_under_the_lock_is_exact() -> None:
    procs, each = 4, 500
    sv = buzon.shared_value("counter", "q")
    try:

        def add() -> None:
            with buzon.shared_value("counter") as v:
                for _ in range(each):
                    with v.lock:
                        v.value = v.value + 1

        pids = [_fork(add) for _ in range(procs)]
        for pid in pids:
            _wait_ok(pid)
        assert sv.value == procs * each
    finally:
        sv.remove()
        sv.close()


def test_values_of_each_type() -> None:
    for name, typ, val in (("i", int, -7), ("f", float, 2.5), ("b", bool, True)):
        with buzon.shared_value(name, typ) as v:
            v.value = val
            with buzon.shared_value(name) as again:
                assert again.value == val and type(again.value) is typ
            v.remove()
    with pytest.raises(ValueError):
        buzon.shared_value("bad", str)
    with pytest.raises(NoSuchEndpoint):
        buzon.shared_value("nobody")


def _poke_meta(segment: str, meta: bytes) -> None:
    path = f"/dev/shm/{segment}"
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, meta.ljust(1024, b"\0"), size - 4096 + 3072)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "meta",
    [
        b"not json",
        json.dumps({"kind": "array", "dtype": "O", "shape": [1]}).encode(),
        json.dumps({"kind": "array", "dtype": "<f8", "shape": [1000]}).encode(),
        json.dumps({"kind": "array", "dtype": "<f8", "shape": [-1]}).encode(),
        json.dumps({"kind": "value", "format": "d"}).encode(),
    ],
)
def test_untrusted_metadata_is_checked(meta: bytes) -> None:
    sa = buzon.shared_array("meta", 4, "f8")
    try:
        _poke_meta(sa.segment_name, meta)
        with pytest.raises(ProtocolError):
            buzon.shared_array("meta")
    finally:
        sa.remove()
        sa.close()


def test_block_rejects_a_bad_header() -> None:
    sa = buzon.shared_array("hdr", 4, "f8")
    try:
        path = f"/dev/shm/{sa.segment_name}"
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"NOTABLOK", os.stat(path).st_size - 4096)
        finally:
            os.close(fd)
        with pytest.raises(ProtocolError, match="magic"):
            _core.Block.attach("/" + sa.segment_name)
        with pytest.raises(BufferError):
            held = memoryview(sa._block)
            try:
                sa._block.close()
            finally:
                held.release()
    finally:
        sa.remove()
        sa.close()


def _count_in_threads(sv: buzon.SharedValue, threads: int, each: int) -> list[BaseException]:
    """``threads`` threads add 1 to ``sv`` ``each`` times, each addition under its lock,
    with a thread switch forced inside the critical section; the errors they raised."""
    import threading
    import time

    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def add() -> None:
        try:
            start.wait(T)
            for _ in range(each):
                with sv.lock:
                    v = sv.value
                    time.sleep(0)  # let the other thread run while we hold the lock
                    sv.value = v + 1
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=add) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return errors


def test_the_lock_excludes_threads_sharing_one_handle() -> None:
    sv = buzon.shared_value("threads", "q")
    try:
        errors = _count_in_threads(sv, 2, 2000)
        assert errors == []
        assert sv.value == 2 * 2000
    finally:
        sv.remove()
        sv.close()


def test_the_lock_excludes_threads_and_processes_together() -> None:
    procs, threads, each = 2, 2, 500
    sv = buzon.shared_value("mixed", "q")
    try:

        def child() -> None:
            with buzon.shared_value("mixed") as v:
                assert _count_in_threads(v, threads, each) == []

        pids = [_fork(child) for _ in range(procs)]
        assert _count_in_threads(sv, threads, each) == []
        for pid in pids:
            _wait_ok(pid)
        assert sv.value == (procs + 1) * threads * each
    finally:
        sv.remove()
        sv.close()


def test_a_thread_waits_for_another_thread_and_never_for_itself() -> None:
    import threading

    sv = buzon.shared_value("own", int)
    try:
        with sv.lock:
            with pytest.raises(RuntimeError, match="this thread already holds"):
                sv.lock.acquire(timeout=T)  # it would wait for itself forever
            box: list[BaseException] = []

            def other() -> None:
                try:
                    sv.lock.acquire(timeout=0.05)
                except BaseException as exc:
                    box.append(exc)

            t = threading.Thread(target=other)
            t.start()
            t.join(T)
            assert len(box) == 1 and isinstance(box[0], Timeout)
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(sv.lock.acquire(timeout=T)))
        t.start()
        t.join(T)
        assert got == [False]
        sv.lock.release()  # like threading.Lock, any thread may release it
        with pytest.raises(RuntimeError):
            sv.lock.release()
    finally:
        sv.remove()
        sv.close()


def test_the_lock_is_taken_over_once_when_threads_wait_for_a_dead_holder() -> None:
    import threading

    sv = buzon.shared_value("orphan", int)
    try:
        r, w = os.pipe()

        def holder() -> None:
            with buzon.shared_value("orphan") as v:
                v.lock.acquire()
                v.value = 7
                os.write(w, b"1")
                os.kill(os.getpid(), signal.SIGKILL)

        pid = _fork(holder)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        recovered: list[bool] = []

        def waiter() -> None:
            got = sv.lock.acquire(timeout=T)
            recovered.append(got)
            sv.value = sv.value + 1
            sv.lock.release()

        ts = [threading.Thread(target=waiter) for _ in range(2)]
        for t in ts:
            t.start()
        os.waitpid(pid, 0)  # the holder dies while both threads wait
        for t in ts:
            t.join(T)
        assert sorted(recovered) == [False, True]  # one takes it over, once
        assert sv.value == 9
    finally:
        sv.remove()
        sv.close()
