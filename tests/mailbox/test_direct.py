"""Direct communication (``buzon.send_to``, ``buzon.recv_from``, ``buzon.inbox``).

Hostile cases first: dead pids, pids without an inbox, a recycled pid, selective
receive with several senders, a sender killed mid-send, timeouts, what a process leaves
behind when it exits or is killed. Children are forked (they find the inbox by pid, as
an unrelated process would) or started with ``subprocess``; every wait is bounded by T.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from _mb_helpers import exit_code, fork

import buzon
from buzon import AddressError, Empty, NoSuchEndpoint, Timeout, _direct
from buzon._forensics import clean
from buzon._runtime import runtime_dir

T = 10.0  # generous bound on every wait


@pytest.fixture(autouse=True)
def _own_inbox_removed(no_segment_left: None) -> Iterator[None]:
    """Each test starts without an inbox and removes the one it made (the runtime dir
    changes from test to test)."""
    yield
    box = _direct._mine
    if box is not None and box.pid == os.getpid():
        box.remove()
    with _direct._lock:
        for target in _direct._targets.values():
            target.close()
        _direct._targets.clear()


def sleeper(code: str = "") -> subprocess.Popen[str]:
    """A python child that runs ``code``, prints "ready" and sleeps until killed."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, time, buzon\n{code}\nprint('ready', flush=True)\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(T)
    assert proc.stdout is not None
    proc.stdout.close()


def inbox_files() -> list[str]:
    return sorted(n for n in os.listdir(runtime_dir()) if n.startswith("inbox-"))


# ---- addressing: who can be sent to --------------------------------------------------------


def test_send_to_a_dead_pid_raises_no_such_endpoint() -> None:
    pid = fork(lambda: None)
    assert exit_code(pid) == 0
    with pytest.raises(NoSuchEndpoint, match=str(pid)):
        buzon.send_to(pid, "hello", timeout=T)


def test_send_to_a_live_pid_without_an_inbox_raises_no_such_endpoint() -> None:
    proc = sleeper()
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        with pytest.raises(NoSuchEndpoint, match="no inbox"):
            buzon.send_to(proc.pid, "hello", timeout=T)
    finally:
        kill(proc)


def test_a_recycled_pid_is_not_the_process_whose_inbox_was_left() -> None:
    # the inbox a dead process left under a pid that now belongs to another process:
    # simulated by a stale name with the right pid and another start time
    proc = sleeper()
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        start = _direct.start_time(proc.pid)
        assert start is not None
        stale = buzon.mailbox(f"inbox-{proc.pid}-{start - 1}")
        with pytest.raises(NoSuchEndpoint):
            buzon.send_to(proc.pid, "for the old process", timeout=T)
        assert len(stale) == 0  # nothing went into the dead process's inbox
        stale.close()
        # and `buzon clean` knows it is stale although its pid is alive
        removed = clean(runtime_dir(), now=time.time() + 60)
        assert any(f"inbox-{proc.pid}-{start - 1}" in r.path for r in removed)
        assert inbox_files() == []
    finally:
        kill(proc)


def test_bad_pids_raise_address_error() -> None:
    for bad in (0, -1, "12", 1.5, True):
        with pytest.raises(AddressError, match="pid"):
            buzon.send_to(bad, "x")  # type: ignore[arg-type]
        with pytest.raises(AddressError, match="pid"):
            buzon.recv_from(bad, timeout=0)  # type: ignore[arg-type]


# ---- sending and receiving -------------------------------------------------------------


def test_inbox_names_the_sender_and_send_to_self_works() -> None:
    me = buzon.inbox()
    assert buzon.inbox() is me
    parent = os.getpid()
    child = fork(lambda: buzon.send_to(parent, {"n": 1}, timeout=T))
    m = me.recv_message(T)
    assert m.body == {"n": 1} and m.sender.pid == child and m.sender.uid == os.getuid()
    assert exit_code(child) == 0
    buzon.send_to(parent, "self")
    assert me.recv_message(T).sender.pid == parent


def test_recv_from_is_selective_and_keeps_the_others_in_order() -> None:
    me = buzon.inbox()
    parent = os.getpid()
    senders = []
    for k in range(3):  # one after the other: arrival order is s0's, s1's, s2's
        pid = fork(lambda k=k: [buzon.send_to(parent, (k, i), timeout=T) for i in range(4)])
        assert exit_code(pid) == 0
        senders.append(pid)
    s0, s1, s2 = senders
    assert buzon.recv_from(s2, timeout=T) == [2, 0]
    assert buzon.recv_from(s1, timeout=T) == [1, 0]
    assert buzon.recv_from(s2, timeout=T) == [2, 1]
    got = []
    for _ in range(9):
        m = me.recv_message(timeout=T)
        got.append((m.sender.pid, tuple(m.body)))
    assert got == (
        [(s0, (0, i)) for i in range(4)]
        + [(s1, (1, i)) for i in range(1, 4)]
        + [(s2, (2, i)) for i in range(2, 4)]
    )
    with pytest.raises(Empty):
        me.recv_nowait()


def test_recv_from_holds_back_general_and_common_records_of_others_in_order() -> None:
    # the hot path (one C call per take) meets: a record only the general way reads (a
    # numpy array through the codec's hook), a common one (bytes), a dict, then the
    # wanted sender's; the three are held back in order, and a Timeout takes nothing
    import numpy as np

    me = buzon.inbox()
    parent = os.getpid()
    buzon.send_to(parent, np.arange(3))
    buzon.send_to(parent, b"own")
    buzon.send_to(parent, {"own": 1})
    child = fork(lambda: buzon.send_to(parent, "from the child", timeout=T))
    assert buzon.recv_from(child, timeout=T) == "from the child"
    assert exit_code(child) == 0
    with pytest.raises(Timeout):
        buzon.recv_from(child, timeout=0.05)
    got = [me.recv_message(T) for _ in range(3)]
    assert [m.sender.pid for m in got] == [parent] * 3
    assert got[0].body.tolist() == [0, 1, 2]
    assert [m.body for m in got[1:]] == [b"own", {"own": 1}]
    assert [m.id for m in got] == sorted(m.id for m in got)
    with pytest.raises(Empty):
        me.recv_nowait()


def test_recv_from_in_threads_each_gets_its_senders_messages_in_order() -> None:
    me = buzon.inbox()
    parent = os.getpid()
    go_r, go_w = os.pipe()

    def send(k: int) -> None:
        os.read(go_r, 1)
        for i in range(200):
            buzon.send_to(parent, (k, i), timeout=T)

    pids = [fork(lambda k=k: send(k)) for k in range(3)]
    results: dict[int, list[list[int]]] = {}

    def receive(pid: int) -> None:
        results[pid] = [buzon.recv_from(pid, timeout=T) for _ in range(200)]

    threads = [threading.Thread(target=receive, args=(pid,)) for pid in pids]
    for t in threads:
        t.start()
    os.write(go_w, b"xxx")
    for t in threads:
        t.join(3 * T)
    for pid in pids:
        assert exit_code(pid) == 0
    os.close(go_r)
    os.close(go_w)
    for k, pid in enumerate(pids):
        assert results[pid] == [[k, i] for i in range(200)]
    with pytest.raises(Empty):
        me.recv_nowait()


def test_timeouts_and_nowait() -> None:
    me = buzon.inbox()
    buzon.send_to(os.getpid(), "mine")
    other = fork(lambda: None)
    assert exit_code(other) == 0
    with pytest.raises(Timeout):
        buzon.recv_from(other, timeout=0.05)
    with pytest.raises(Empty):
        buzon.recv_from(other, timeout=0)
    assert me.recv_nowait() == "mine"  # held back by recv_from, not lost
    with pytest.raises(Empty):
        me.recv_nowait()
    with pytest.raises(Timeout):
        me.recv(timeout=0.05)
    for i in range(me.mailbox.capacity or 0):  # fill it
        buzon.send_to(os.getpid(), i, timeout=T)
    with pytest.raises(Timeout):
        buzon.send_to(os.getpid(), "one too many", timeout=0.05)
    assert me.recv(T) == 0


def test_a_send_to_a_full_inbox_whose_process_dies_raises_no_such_endpoint() -> None:
    proc = sleeper("buzon.inbox()")
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        with pytest.raises(Timeout):
            while True:
                buzon.send_to(proc.pid, b"x", timeout=0.05)
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                buzon.send_to(proc.pid, b"waits for room")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(0.1)
        proc.kill()
        t.join(T)
        assert not t.is_alive() and len(errors) == 1
        assert isinstance(errors[0], NoSuchEndpoint)
    finally:
        kill(proc)
    clean(runtime_dir(), now=time.time() + 60)
    assert inbox_files() == []


@pytest.mark.parametrize("k", [buzon._core.F_LOCKED, buzon._core.F_MID_PAYLOAD])
def test_a_sender_killed_mid_send_leaves_no_torn_message(k: int) -> None:
    me = buzon.inbox()
    parent = os.getpid()

    def die() -> None:
        buzon.send_to(parent, "before", timeout=T)
        buzon._core._set_fault(k)
        buzon.send_to(parent, "torn", timeout=T)

    pid = fork(die)
    assert exit_code(pid) == -signal.SIGKILL
    assert buzon.recv_from(pid, timeout=T) == "before"
    with pytest.raises(Empty):
        me.recv_nowait()
    child = fork(lambda: buzon.send_to(parent, "after", timeout=T))
    assert exit_code(child) == 0
    m = me.recv_message(T)
    assert (m.body, m.sender.pid) == ("after", child)


# ---- what a process leaves behind --------------------------------------------------------


def test_a_process_that_exits_normally_leaves_nothing() -> None:
    code = (
        "import os, buzon\nme = buzon.inbox()\nbuzon.send_to(os.getpid(), 1)\n"
        "assert me.recv(5) == 1"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert inbox_files() == []  # the segment check is the fixture's

    def mp_child() -> None:
        buzon.inbox()

    import multiprocessing

    p = multiprocessing.get_context("fork").Process(target=mp_child)
    p.start()
    p.join(T)
    assert p.exitcode == 0
    assert inbox_files() == []


def test_a_forked_child_gets_its_own_inbox() -> None:
    mine = buzon.inbox()
    r, w = os.pipe()

    def child() -> None:
        box = buzon.inbox()
        assert box is not mine and box.name != mine.name
        os.write(w, box.name.encode())
        box.remove()  # os._exit skips the exit hooks, as a kill would

    pid = fork(child)
    assert exit_code(pid) == 0
    name = os.read(r, 100).decode()
    os.close(r)
    os.close(w)
    assert name.startswith(f"inbox-{pid}-")
    assert buzon.inbox() is mine and mine.mailbox.exists()


def test_a_killed_process_leaves_its_inbox_and_buzon_clean_removes_it() -> None:
    proc = sleeper("buzon.inbox()")
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        buzon.send_to(proc.pid, "never read", timeout=T)
        left = inbox_files()
        assert left  # its name file and wake-up FIFO
        removed = clean(runtime_dir(), now=time.time() + 60)
        assert all("inbox-" not in r.path for r in removed)  # alive: kept
        assert inbox_files() == left
    finally:
        kill(proc)
    assert inbox_files()
    removed = clean(runtime_dir(), now=time.time() + 60)
    assert any("inbox-" in r.path for r in removed)
    assert inbox_files() == []


# ---- asyncio ------------------------------------------------------------------------------


def test_asyncio_twin_is_selective_and_never_blocks_the_loop() -> None:
    import asyncio

    parent = os.getpid()
    buzon.inbox()  # before the senders start: they need it to exist
    go_r, go_w = os.pipe()

    def send(k: int) -> None:
        os.read(go_r, 1)
        for i in range(20):
            buzon.send_to(parent, (k, i), timeout=T)

    pids = [fork(lambda k=k: send(k)) for k in range(2)]

    async def main() -> None:
        me = buzon.aio.inbox()
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:  # runs while the receivers wait: the loop is free
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # the ticker starts
        before = ticks
        with pytest.raises(Timeout):
            await buzon.aio.recv_from(pids[0], timeout=0.05)
        assert ticks > before  # it ran while the receive waited: the loop was free
        os.write(go_w, b"xx")
        second = [await buzon.aio.recv_from(pids[1], timeout=T) for _ in range(20)]
        first = [await me.recv_from(pids[0], timeout=T) for _ in range(20)]
        await buzon.aio.send_to(parent, "self", timeout=T)
        m = await me.recv_message(timeout=T)
        stop.set()
        await tick
        assert second == [[1, i] for i in range(20)]
        assert first == [[0, i] for i in range(20)]
        assert (m.body, m.sender.pid) == ("self", parent)

    asyncio.run(main())
    for pid in pids:
        assert exit_code(pid) == 0
    os.close(go_r)
    os.close(go_w)


def test_asyncio_send_to_a_dead_pid_raises_no_such_endpoint() -> None:
    import asyncio

    pid = fork(lambda: None)
    assert exit_code(pid) == 0
    with pytest.raises(NoSuchEndpoint):
        asyncio.run(buzon.aio.send_to(pid, "x", timeout=T))


def test_recv_from_holds_back_a_bounded_number_then_raises_full_losing_nothing() -> None:
    me = buzon.inbox()
    me.max_held = 5
    parent = os.getpid()
    flood = fork(lambda: [buzon.send_to(parent, i, timeout=T) for i in range(8)])
    assert exit_code(flood) == 0
    other = fork(lambda: buzon.send_to(parent, "wanted", timeout=T))
    assert exit_code(other) == 0
    with pytest.raises(buzon.Full, match="max_held"):
        buzon.recv_from(other, timeout=T)
    assert [me.recv(T) for _ in range(8)] == list(range(8))  # in order, none lost
    assert buzon.recv_from(other, timeout=T) == "wanted"


def test_buzon_ls_names_the_owner_of_an_inbox() -> None:
    from buzon._forensics import ls_rows

    me = buzon.inbox()
    rows = [r for r in ls_rows(runtime_dir()) if r[0] == f"mailbox:{me.name}"]
    assert len(rows) == 1 and f"inbox of pid {os.getpid()}" in rows[0][3]
    assert "gone" not in rows[0][3]


def test_buzon_wait_takes_an_inbox_and_sees_held_back_messages() -> None:
    me = buzon.inbox()
    assert buzon.wait([me], timeout=0.05) == []
    parent = os.getpid()
    other = fork(lambda: buzon.send_to(parent, "held", timeout=T))
    assert exit_code(other) == 0
    assert buzon.wait([me], timeout=T) == [me]
    with pytest.raises(Timeout):
        buzon.recv_from(parent, timeout=0.05)  # takes "held" into the holding queue
    assert len(me.mailbox) == 0
    assert buzon.wait([me], timeout=T) == [me]  # the held one counts
    assert me.recv_nowait() == "held"


def test_buzon_aio_wait_takes_an_aio_inbox() -> None:
    import asyncio

    async def main() -> None:
        me = buzon.aio.inbox()
        assert await buzon.aio.wait([me], timeout=0.05) == []
        await buzon.aio.send_to(me.pid, 1, timeout=T)
        assert await buzon.aio.wait([me], timeout=T) == [me]
        assert await me.recv(timeout=T) == 1

    asyncio.run(main())
