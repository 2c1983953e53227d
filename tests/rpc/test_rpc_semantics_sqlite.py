"""exactly_once with the completion table in SQLite (``Server(..., table=PATH)``).

Side effects run once through the chaos relay (replies dropped, connections reset) and
across a real server restart (the process killed with SIGKILL, started again on the same
address and database); replies are sent only once their completion is committed; a
handler's own writes commit with its completion; a call a crash interrupted is run again
only if its handler is transactional, else the retry says its outcome is unknown."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _rpc_helpers import serving

import buzon
from buzon import rpc
from buzon.errors import RemoteError, UnsupportedOperation
from buzon.protocol.frames import Field
from buzon.testing.chaos import ChaosRelay, Faults

CALLS = 30


def _effects_service(counts: Counter[str]) -> rpc.Service:
    lock = threading.Lock()
    svc = rpc.Service("effects")

    @svc.method
    def incr(key: str) -> int:
        with lock:
            counts[key] += 1
            return counts[key]

    @svc.method
    @rpc.transactional
    def record(key: str) -> int:
        db = rpc.context().transaction
        db.execute("INSERT INTO effects (key) VALUES (?)", (key,))
        (n,) = db.execute("SELECT COUNT(*) FROM effects WHERE key = ?", (key,)).fetchone()
        return int(n)

    @svc.method
    def record_then_fail(key: str) -> None:
        rpc.context().transaction.execute("INSERT INTO effects (key) VALUES (?)", (key,))
        with lock:
            counts[key] += 1
        raise ValueError(key)

    return svc


def _effects_db(path: Path) -> str:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL)")
    db.close()
    return str(path)


def _stored_effects(path: str) -> Counter[str]:
    db = sqlite3.connect(path)
    try:
        return Counter(k for (k,) in db.execute("SELECT key FROM effects"))
    finally:
        db.close()


def test_exactly_once_with_sqlite_runs_each_side_effect_once_through_chaos(
    tmp_path: Path,
) -> None:
    db = _effects_db(tmp_path / "calls.db")
    counts: Counter[str] = Counter()
    faults = Faults(reply=Faults(reset=0.25))
    with (
        serving("unix:effects", _effects_service(counts), table=db) as srv,
        ChaosRelay("unix:front", srv.address, profile=faults, seed=11) as relay,
    ):
        assert isinstance(srv.table, rpc.SqliteTable) and srv.table.durable
        c = rpc.connect(relay.address, timeout=60, semantics="exactly_once")
        try:
            plain = [c.incr(f"k{i}") for i in range(CALLS)]
            stored = [c.record(f"r{i}") for i in range(CALLS)]
        finally:
            c.close()
        replayed = srv.table.replayed
    assert plain == [1] * CALLS and stored == [1] * CALLS
    assert all(counts[f"k{i}"] == 1 for i in range(CALLS)), counts
    assert _stored_effects(db) == Counter(f"r{i}" for i in range(CALLS))
    assert c.retries > 0, "the relay reset nothing: the test proved nothing"
    assert replayed > 0, "no retry was answered from the table"


def test_completions_are_group_committed(tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    threads, per = 8, 15
    with serving("unix:group", _effects_service(counts), table=str(tmp_path / "c.db")) as srv:
        clients = [  # one connection each: served by threads of their own
            rpc.connect(srv.address, timeout=60, semantics="exactly_once") for _ in range(threads)
        ]
        go = threading.Barrier(threads)

        def hammer(t: int) -> None:
            go.wait(10)
            for i in range(per):
                assert clients[t].incr(f"t{t}-{i}") == 1

        workers = [threading.Thread(target=hammer, args=(t,)) for t in range(threads)]
        try:
            for t in workers:
                t.start()
            for t in workers:
                t.join(60)
        finally:
            for c in clients:
                c.close()
        table = srv.table
        assert isinstance(table, rpc.SqliteTable)
        assert table.completions == threads * per
        # each call is two durable writes (in progress, then completed): batched, fewer
        assert table.commits < 2 * threads * per, (table.commits, table.completions)
    assert sum(counts.values()) == threads * per


def test_the_handler_s_writes_commit_with_its_completion_or_not_at_all(tmp_path: Path) -> None:
    db = _effects_db(tmp_path / "calls.db")
    counts: Counter[str] = Counter()
    with serving("unix:tx", _effects_service(counts), table=db) as srv:
        c = rpc.connect(srv.address, timeout=30, semantics="exactly_once")
        try:
            assert c.record("a") == 1
            with pytest.raises(RemoteError, match="raised ValueError"):
                c.record_then_fail("b")
        finally:
            c.close()
        at_most = rpc.connect(srv.address, timeout=30)  # not exactly_once: no transaction
        try:
            with pytest.raises(RemoteError, match="UnsupportedOperation") as info:
                at_most.record("c")
            assert "exactly_once" in str(info.value)
        finally:
            at_most.close()
    assert _stored_effects(db) == Counter({"a": 1})  # b's write rolled back with its failure
    assert counts["b"] == 1


def test_context_transaction_needs_an_sqlite_table() -> None:
    counts: Counter[str] = Counter()
    with serving("unix:mem", _effects_service(counts)) as srv:
        assert isinstance(srv.table, rpc.MemoryTable) and not srv.table.durable
        c = rpc.connect(srv.address, timeout=30, semantics="exactly_once")
        try:
            with pytest.raises(RemoteError, match="table=PATH"):
                c.record("a")
        finally:
            c.close()


def test_acknowledged_rows_are_collected(tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    with serving("unix:ack", _effects_service(counts), table=str(tmp_path / "c.db")) as srv:
        c = rpc.connect(srv.address, timeout=30, semantics="exactly_once")
        try:
            for i in range(40):
                c.incr(f"k{i}")
            assert len(srv.table) <= 2  # each request acknowledges the ones before it
        finally:
            c.close()


def test_bad_table_arguments_are_typed_errors(tmp_path: Path) -> None:
    svc = _effects_service(Counter())
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite database, not at all" * 100)
    before = set(os.listdir(os.environ["BUZON_RUNTIME_DIR"]))
    with pytest.raises(UnsupportedOperation, match=r"junk\.db"):
        rpc.Server("unix:bad", svc, table=str(junk))
    with pytest.raises(TypeError, match="table="):
        rpc.Server("unix:bad", svc, table=42)
    with pytest.raises(UnsupportedOperation, match=r"junk\.db"):  # the asyncio server too
        buzon.aio.rpc.Server("unix:bad", svc, table=str(junk))
    with pytest.raises(TypeError, match="table="):
        buzon.aio.rpc.Server("unix:bad", svc, table=42)
    assert set(os.listdir(os.environ["BUZON_RUNTIME_DIR"])) == before  # nothing bound
    assert junk.read_bytes().startswith(b"this is not")  # and nothing overwritten


# -- a real server process, killed and started again ------------------------------------

_CHILD = """
import os, sqlite3, sys, time
from buzon import rpc
url, db, effects, block, mode = sys.argv[1:6]
if db != "-":
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL)")
    conn.close()
svc = rpc.Service("effects")

def _maybe_block(key):
    if key.startswith("slow") and os.path.exists(block):
        open(block + ".started", "w").close()
        time.sleep(60)

@svc.method
@rpc.transactional
def record(key: str) -> int:
    tx = rpc.context().transaction
    tx.execute("INSERT INTO effects (key) VALUES (?)", (key,))
    _maybe_block(key)
    return tx.execute("SELECT COUNT(*) FROM effects WHERE key = ?", (key,)).fetchone()[0]

@svc.method
def append(key: str) -> int:
    with open(effects, "a") as f:
        f.write(key + "\\n")
    _maybe_block(key)
    with open(effects) as f:
        return f.read().split().count(key)

srv = rpc.Server(url, svc, table=None if db == "-" else db, mode=mode)
print("ready", flush=True)
srv.serve_forever()
"""


class _Child:
    """The server in a child process, at a fixed address with one database."""

    def __init__(
        self, tmp: Path, url: str = "unix:durable", memory: bool = False, mode: str = "thread"
    ) -> None:
        self.url = url
        self.mode = mode
        self.db = "-" if memory else str(tmp / "calls.db")
        self.effects = str(tmp / "effects.txt")
        self.block = str(tmp / "block")
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, self.url, self.db, self.effects, self.block, self.mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.kill()
            raise AssertionError("the server process did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # SIGKILL: no cleanup, no last commit
            self.proc.wait(timeout=10)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.proc = None

    def wait_started(self) -> None:
        end = time.monotonic() + 30
        while not os.path.exists(self.block + ".started"):
            assert time.monotonic() < end, "the slow call never started"
            time.sleep(0.01)

    def appended(self) -> list[str]:
        with open(self.effects) as f:
            return f.read().split()


@pytest.fixture
def child(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = _Child(tmp_path)
    c.start()
    try:
        yield c
    finally:
        c.kill()


@pytest.fixture
def memory_child(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = _Child(tmp_path, url="unix:fixed", memory=True)
    c.start()
    try:
        yield c
    finally:
        c.kill()


def _request(ch: buzon.Channel, call_id: int, method: str, key: str, seq: int) -> list[object]:
    cid = b"restart-client-01"
    fields = {Field.MESSAGE_ID: call_id.to_bytes(8, "little")}
    ch._send_fields([0, method, [key], None, [cid, seq, 1]], fields, 5)
    body, _ = ch._recv_fields(20)
    assert isinstance(body, list)
    return body


def test_a_recorded_reply_survives_a_sigkill_and_a_restart(child: _Child) -> None:
    with buzon.connect(child.url, timeout=10) as ch:
        assert _request(ch, 1, "append", "a", 1) == [1, None, 1]
        assert _request(ch, 2, "record", "r", 2) == [1, None, 1]
    child.kill()
    child.start()
    with buzon.connect(child.url, timeout=10) as ch:
        assert _request(ch, 1, "append", "a", 1) == [1, None, 1]  # from the table
        assert _request(ch, 2, "record", "r", 2) == [1, None, 1]
        refused = _request(ch, 3, "append", "other", 1)  # same id, other arguments
        assert isinstance(refused[1], list) and refused[1][0] == RemoteError.INVALID_REQUEST
    assert child.appended() == ["a"]
    assert _stored_effects(child.db) == Counter({"r": 1})


def test_calls_in_flight_across_sigkill_run_once(child: _Child) -> None:
    """A stream of calls through the chaos relay; the server is killed and restarted
    in the middle: every answer is 1 and every side effect is stored once."""
    faults = Faults(reply=Faults(reset=0.2))
    relay = ChaosRelay("unix:front", child.url, profile=faults, seed=5)
    relay.start()
    c = rpc.connect(relay.address, timeout=60, semantics="exactly_once")
    answers: list[int] = []
    errors: list[BaseException] = []

    def calls() -> None:
        try:
            for i in range(60):
                answers.append(c.call("record" if i % 2 else "append", f"k{i}"))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=calls)
    try:
        t.start()
        while len(answers) < 20 and t.is_alive():
            time.sleep(0.005)
        child.kill()
        time.sleep(0.05)
        child.start()
        t.join(60)
        assert not t.is_alive()
    finally:
        c.close()
        relay.close()
    outcome_unknown = [e for e in errors if isinstance(e, rpc.ServerRestarted)]
    assert not errors or (len(errors) == 1 and outcome_unknown), errors
    done = len(answers)
    assert answers == [1] * done
    keys = [f"k{i}" for i in range(done)]
    stored = _stored_effects(child.db) + Counter(child.appended())
    assert all(stored[k] == 1 for k in keys), stored
    assert all(n <= 1 for n in stored.values()), stored
    if not errors:
        assert done == 60
    assert c.retries > 0


def test_a_transactional_call_cut_by_sigkill_runs_again_after_the_restart(
    child: _Child,
) -> None:
    Path(child.block).touch()
    c = rpc.connect(child.url, timeout=60, semantics="exactly_once")
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(c.call("record", "slow-1")))
    try:
        t.start()
        child.wait_started()  # its write is made, not committed
        child.kill()
        os.unlink(child.block)
        child.start()
        t.join(60)
        assert not t.is_alive()
    finally:
        c.close()
    assert result == [1]  # run again: its first write died uncommitted with the process
    assert c.restarts_survived == 1  # a new instance in the handshake, its table kept
    assert _stored_effects(child.db) == Counter({"slow-1": 1})


def test_a_plain_call_cut_by_sigkill_reports_an_unknown_outcome(child: _Child) -> None:
    Path(child.block).touch()
    c = rpc.connect(child.url, timeout=60, semantics="exactly_once")
    outcome: list[BaseException] = []

    def slow() -> None:
        try:
            c.call("append", "slow-2")
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=slow)
    try:
        t.start()
        child.wait_started()  # its side effect happened; no reply yet
        child.kill()
        os.unlink(child.block)
        child.start()
        t.join(60)
        assert not t.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], rpc.ServerRestarted), outcome
        assert isinstance(outcome[0], buzon.EndOfChannel)
        assert "outcome unknown" in str(outcome[0])
        assert c.call("append", "after") == 1  # the client goes on
    finally:
        c.close()
    assert child.appended() == ["slow-2", "after"]  # not run a second time


# -- restart detection through a fixed address (the instance id in the handshake) -------


def test_the_handshake_says_which_server_start_and_whether_its_table_persists(
    tmp_path: Path,
) -> None:
    svc = _effects_service(Counter())
    with serving("unix:mem", svc) as mem, serving("unix:db", svc, table=str(tmp_path / "c")) as db:
        for srv, durable in ((mem, False), (db, True)):
            with buzon.connect(srv.address, timeout=10) as ch:
                said = ch.peer.extra["options"]["rpc"]
                assert said == {"instance": srv.instance, "durable": durable}
            c = rpc.connect(srv.address, timeout=10, semantics="exactly_once")
            try:
                assert c.server_instance == srv.instance
            finally:
                c.close()
        assert mem.instance != db.instance


def test_server_restarted_lives_in_buzon_errors() -> None:
    assert buzon.errors.ServerRestarted is rpc.ServerRestarted
    assert issubclass(buzon.errors.ServerRestarted, buzon.EndOfChannel)


def test_hello_entries_cannot_overwrite_the_handshake_s_own() -> None:
    with pytest.raises(ValueError, match="hello= keys"):
        buzon.listen("unix:hello", hello={"capacity": 3})


def test_a_restart_at_a_fixed_address_without_a_table_raises_server_restarted(
    memory_child: _Child,
) -> None:
    child = memory_child
    Path(child.block).touch()
    c = rpc.connect(child.url, timeout=60, semantics="exactly_once")
    outcome: list[BaseException] = []

    def slow() -> None:
        try:
            c.call("append", "slow-3")
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=slow)
    try:
        assert c.call("append", "before") == 1
        first = c.server_instance
        t.start()
        child.wait_started()
        child.kill()
        os.unlink(child.block)
        child.start()  # same address, a new start with an empty table
        t.join(60)
        assert not t.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], buzon.errors.ServerRestarted)
        assert "did not persist" in str(outcome[0]) and "append" in str(outcome[0])
        assert c.call("append", "after") == 1  # new calls go to the new server
        assert c.server_instance not in (None, first)
    finally:
        c.close()
    assert child.appended() == ["before", "slow-3", "after"]  # not run a second time


@pytest.mark.parametrize("table", [None, "calls.db"])
def test_long_and_short_arguments_are_told_apart(tmp_path: Path, table: str | None) -> None:
    """Short arguments are compared as their msgpack, long ones by a digest: a retry
    with the same ones is answered from the table, other ones are refused."""
    counts: Counter[str] = Counter()
    svc = _effects_service(counts)
    path = None if table is None else str(tmp_path / table)
    long = "x" * 100
    with serving("unix:long", svc, table=path) as srv, buzon.connect(srv.address) as ch:
        assert _request(ch, 1, "incr", long, 1) == [1, None, 1]
        assert _request(ch, 2, "incr", long, 1) == [1, None, 1]  # replayed
        assert _request(ch, 3, "incr", long + "y", 1)[1][0] == RemoteError.INVALID_REQUEST  # type: ignore[index]
        assert _request(ch, 4, "incr", "s", 2) == [1, None, 1]
        assert _request(ch, 5, "incr", "t", 2)[1][0] == RemoteError.INVALID_REQUEST  # type: ignore[index]
        assert srv.table.replayed == 1
    assert counts == Counter({long: 1, "s": 1})


def test_mode_process_children_share_the_sqlite_table(tmp_path: Path) -> None:
    """mode="process" serves each connection in a child of its own: a retry after a
    reset lands in another child, whose memory knows nothing; the database answers.
    (The server runs in a process of its own: its forks must not inherit the relay's
    and the client's sockets, which would keep reset connections open.)"""
    child = _Child(tmp_path, url="unix:forked", mode="process")
    child.start()
    faults = Faults(reply=Faults(reset=0.3))
    try:
        with ChaosRelay("unix:front", child.url, profile=faults, seed=3) as relay:
            c = rpc.connect(relay.address, timeout=60, semantics="exactly_once")
            try:
                stored = [c.record(f"r{i}") for i in range(12)]
                plain = [c.append(f"a{i}") for i in range(12)]
            finally:
                c.close()
    finally:
        child.kill()
    assert stored == [1] * 12 and plain == [1] * 12
    assert c.retries > 0, "the relay reset nothing: the test proved nothing"
    assert _stored_effects(child.db) == Counter(f"r{i}" for i in range(12))
    assert child.appended() == [f"a{i}" for i in range(12)]


# -- the asyncio client: the same rules (buzon.rpc._retry) --------------------------------


def _aio_call_across_a_restart(child: _Child, key: str) -> tuple[list[Any], str | None, Any]:
    """An asyncio exactly_once client's call in flight while ``child`` is killed and
    started again at the same address: (outcome, first instance, the client after)."""
    import asyncio

    from buzon.aio import rpc as arpc

    Path(child.block).touch()

    async def main() -> tuple[list[Any], str | None, Any]:
        c = await arpc.connect(child.url, timeout=60, semantics="exactly_once")
        async with c:
            assert await c.call("append", "before") == 1
            first = c.server_instance
            slow = asyncio.create_task(c.call("append", key))
            await asyncio.to_thread(child.wait_started)
            await asyncio.to_thread(child.kill)
            os.unlink(child.block)
            await asyncio.to_thread(child.start)
            try:
                outcome: list[Any] = [await asyncio.wait_for(slow, 60)]
            except BaseException as exc:
                outcome = [exc]
            after = (await c.call("append", "after"), c.server_instance, c.restarts_survived)
            return outcome, first, after

    return asyncio.run(main())


def test_an_asyncio_client_at_a_fixed_address_sees_the_restart(memory_child: _Child) -> None:
    outcome, first, (after, instance, survived) = _aio_call_across_a_restart(memory_child, "slow-a")
    assert len(outcome) == 1 and isinstance(outcome[0], buzon.errors.ServerRestarted)
    assert "did not persist" in str(outcome[0])
    assert after == 1 and instance not in (None, first) and survived == 0
    assert memory_child.appended() == ["before", "slow-a", "after"]  # not run again


def test_an_asyncio_client_survives_a_restart_of_a_durable_server(child: _Child) -> None:
    """The table persisted: the retry goes on; a plain handler the crash cut short is
    answered "outcome unknown" by the new start, which the client raises as
    ServerRestarted (never a second run)."""
    outcome, first, (after, instance, survived) = _aio_call_across_a_restart(child, "slow-d")
    assert len(outcome) == 1 and isinstance(outcome[0], buzon.errors.ServerRestarted)
    assert "slow-d" in child.appended() and child.appended().count("slow-d") == 1
    assert after == 1 and instance not in (None, first) and survived == 1
