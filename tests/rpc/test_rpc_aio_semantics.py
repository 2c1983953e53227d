"""buzon.aio.rpc call semantics through the chaos relay, binding by name (registered,
re-resolved on reconnect, a restarted server noticed) and deadlines/cancellation."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from _rpc_aio_helpers import aio_serving, aio_serving_in_thread, until
from _rpc_helpers import Recorder, calc_service, serving
from test_rpc_names import _child_server, _kill

import buzon
from buzon import names, rpc
from buzon.aio import rpc as arpc
from buzon.errors import DeadlineExceeded, EndpointInUse, NoSuchEndpoint, RemoteError
from buzon.testing.chaos import ChaosRelay, Faults

CALLS = 30


def _effects() -> tuple[rpc.Service, Counter[str]]:
    counts: Counter[str] = Counter()
    svc = rpc.Service("effects")

    @svc.method
    async def incr(key: str) -> int:
        counts[key] += 1
        return counts[key]

    @svc.method
    def fail(key: str) -> None:
        counts[key] += 1
        raise ValueError(key)

    return svc, counts


@asynccontextmanager
async def _through_chaos(
    seed: int,
) -> AsyncIterator[tuple[arpc.Server, ChaosRelay, Counter[str]]]:
    svc, counts = _effects()
    faults = Faults(reply=Faults(reset=0.25))  # replies lose their connection
    async with aio_serving("unix:aeffects", svc) as srv:
        relay = ChaosRelay("unix:afront", srv.address, profile=faults, seed=seed).start()
        try:
            yield srv, relay, counts
        finally:
            await asyncio.to_thread(relay.close)


async def test_exactly_once_runs_each_side_effect_once_through_reset_connections() -> None:
    async with _through_chaos(seed=11) as (srv, relay, counts):
        c = await arpc.connect(relay.address, timeout=60, semantics="exactly_once")
        async with c:
            results = [await c.incr(f"k{i}") for i in range(CALLS)]
            with pytest.raises(RemoteError, match="raised ValueError"):
                await c.fail("f")
            # concurrent calls (tasks) are retried too, each once
            more = await asyncio.gather(*(c.call_async("incr", f"t{i}") for i in range(10)))
    assert results == [1] * CALLS and more == [1] * 10
    assert all(counts[f"k{i}"] == 1 for i in range(CALLS)), counts
    assert all(counts[f"t{i}"] == 1 for i in range(10)), counts
    assert counts["f"] == 1
    assert c.retries > 0, "the relay reset nothing: the test proved nothing"
    assert srv.table.replayed > 0, "no retry was answered from the table"


async def test_at_least_once_retries_and_may_run_a_call_twice() -> None:
    async with _through_chaos(seed=11) as (_, relay, counts):
        c = await arpc.connect(relay.address, timeout=60, semantics="at_least_once")
        async with c:
            results = [await c.incr(f"k{i}") for i in range(CALLS)]
    assert all(counts[f"k{i}"] >= 1 for i in range(CALLS))
    assert c.retries > 0
    assert sum(counts.values()) > CALLS, "no call ran twice: the relay did not bite"
    assert any(r > 1 for r in results)


async def test_at_most_once_reports_an_unknown_outcome() -> None:
    async with _through_chaos(seed=11) as (_, relay, _counts):
        c = await arpc.connect(relay.address, timeout=60)
        async with c:
            with pytest.raises(buzon.EndOfChannel, match="may or may not have run"):
                for i in range(CALLS * 10):
                    await c.incr(f"k{i}")


async def test_exactly_once_across_the_blocking_and_async_ends() -> None:
    rec = Recorder()
    with serving("unix:bonce", calc_service(rec), semantics="exactly_once") as srv:
        c = await arpc.connect(srv.address, timeout=10, semantics="exactly_once")
        async with c:
            assert [await c.add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
        assert len(srv.table) <= 2  # each request acknowledged the ones before it
    svc, counts = _effects()
    with (
        aio_serving_in_thread("unix:aonce", svc) as asrv,
        rpc.connect(asrv.address, timeout=10, semantics="exactly_once") as bc,
    ):
        assert [bc.incr(f"b{i}") for i in range(5)] == [1] * 5
        assert len(asrv.table) <= 2
    assert sum(counts.values()) == 5


async def test_a_retry_while_the_first_attempt_runs_gets_its_answer_once() -> None:
    """Two attempts of one exactly-once call on two connections: one execution."""
    gate = asyncio.Event()
    ran: list[str] = []
    svc = rpc.Service("slow")

    @svc.method
    async def slow(key: str) -> str:
        ran.append(key)
        await gate.wait()
        return key

    async with aio_serving("unix:aslow", svc) as srv:
        c = await arpc.connect(srv.address, timeout=10, semantics="exactly_once")
        async with c:
            key = [c._client_id, 1, 1]
            first = asyncio.create_task(c._call("slow", ("k",), {}, None, key))
            assert await until(lambda: ran == ["k"])
            second = asyncio.create_task(c._call("slow", ("k",), {}, None, key))
            await asyncio.sleep(0.05)
            gate.set()
            assert await asyncio.gather(first, second) == ["k", "k"]
    assert ran == ["k"] and srv.table.replayed == 1


# -- binding by name ---------------------------------------------------------------------


async def test_serve_with_a_name_registers_and_the_client_resolves_it() -> None:
    svc, _ = _effects()
    async with aio_serving("unix:anamed", svc, name="acalc", semantics="exactly_once") as srv:
        record = names.lookup("acalc")
        assert record.address == str(srv.address) and record.pid == os.getpid()
        assert record.metadata == {
            "service": "effects",
            "wire": "buzon",
            "semantics": "exactly_once",
            "instance": srv.instance,
        }
        with pytest.raises(EndpointInUse):
            arpc.Server("unix:anamed2", svc, name="acalc")
        c = await arpc.connect("name:acalc", timeout=10)
        async with c:
            assert await c.incr("x") == 1
    with pytest.raises(NoSuchEndpoint):  # the name went with the server
        names.lookup("acalc")
    async with aio_serving("name:aother", svc) as srv:  # name:X serves unix:X
        assert names.lookup("aother").address == str(srv.address)


async def test_at_least_once_client_finds_a_server_restarted_elsewhere() -> None:
    proc = await asyncio.to_thread(_child_server, "unix:aold", "calc")
    calc = await arpc.connect("name:calc", timeout=20, semantics="at_least_once")
    try:
        assert await calc.add(1, 2) == 3
        await asyncio.to_thread(_kill, proc)
        svc, counts = _effects()
        async with aio_serving("unix:anew", svc, name="calc", grace=0.1):
            assert await calc.incr("moved") == 1  # re-resolved on reconnect
            assert counts["moved"] == 1
            assert "anew" in repr(calc.channel)  # the new address, found by the name
    finally:
        await calc.aclose()


async def test_exactly_once_client_gets_a_typed_error_when_the_server_restarted() -> None:
    proc = await asyncio.to_thread(_child_server, "unix:aold", "calc")
    calc = await arpc.connect("name:calc", timeout=20, semantics="exactly_once")
    try:
        assert await calc.add(1, 2) == 3
        task = calc.call_async("block", "x")
        assert await until(lambda: calc.in_flight == 1)
        await asyncio.to_thread(_kill, proc)
        svc, counts = _effects()
        async with aio_serving("unix:anew", svc, name="calc", grace=0.1):
            with pytest.raises(rpc.ServerRestarted, match="block"):
                await asyncio.wait_for(task, 20)
            assert await calc.incr("after") == 1  # new calls go to the new server
            assert counts == Counter({"after": 1})
    finally:
        await calc.aclose()


# -- deadlines and cancellation ----------------------------------------------------------


async def test_deadlines_propagate_to_nested_calls_and_cancel_reaches_the_handler() -> None:
    seen: dict[str, object] = {}
    inner = rpc.Service("inner")

    @inner.method
    async def budget() -> float | None:
        at = rpc.context().deadline
        return None if at is None else at - time.monotonic()

    @inner.method
    async def watch(name: str) -> str:
        ctx = rpc.context()
        try:
            while not ctx.cancelled:  # a handler that looks instead of being cancelled
                await asyncio.sleep(0.01)
            seen[name] = ctx.cancelled  # its own deadline may come a hair before the cancel
            # and answer only when the caller's cancel ends it: the deadline on the wire
            # is the caller's budget rounded down to whole ms (it never extends one), so
            # this end's deadline may pass up to 1 ms before the caller's, and a reply
            # sent then could reach the caller before its own timer (it returned "late")
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen[name] = ctx.cancelled
            raise
        return "late"

    async with aio_serving("unix:ainner", inner) as isrv:
        outer = rpc.Service("outer")
        client = await arpc.connect(isrv.address, timeout=None)

        @outer.method
        async def nested() -> float | None:
            result: float | None = await client.budget()  # inherits the caller's budget
            return result

        async with aio_serving("unix:aouter", outer) as osrv:
            c = await arpc.connect(osrv.address, timeout=None)
            async with c:
                with rpc.deadline(5.0):
                    left = await c.nested()
                assert left is not None and 0 < left <= 5.0
                assert await c.nested() is None  # no deadline anywhere: none on the wire
        with rpc.deadline(0.2), pytest.raises(DeadlineExceeded, match="told to cancel"):
            await client.watch("dl")
        assert await until(lambda: seen.get("dl") is True)
        task = client.call_async("watch", "task")
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await until(lambda: seen.get("task") is True)
        await client.aclose()


def test_blocking_call_async_retries_with_the_client_s_semantics() -> None:
    svc, counts = _effects()
    faults = Faults(reply=Faults(reset=0.25))
    with (
        aio_serving_in_thread("unix:bretry", svc) as srv,
        ChaosRelay("unix:bfront", srv.address, profile=faults, seed=11) as relay,
    ):
        c = rpc.connect(relay.address, timeout=60, semantics="exactly_once")
        try:
            results = []
            for i in range(CALLS):  # in pairs: many reply chunks for the relay to reset
                pair = [c.call_async("incr", f"k{i}"), c.call_async("incr", f"j{i}")]
                results += [f.result(60) for f in pair]
        finally:
            c.close()
    assert results == [1] * (2 * CALLS)
    assert all(counts[f"k{i}"] == counts[f"j{i}"] == 1 for i in range(CALLS)), counts
    assert c.retries > 0, "the relay reset nothing: the test proved nothing"


async def test_an_asyncio_server_keeps_its_completions_in_sqlite(tmp_path: Path) -> None:
    """table= on the asyncio server: a coroutine handler's writes go through
    context().transaction and commit with its completion; the handshake says the table
    is durable; a second start on the same file answers a retry from the record (a
    blocking exactly_once client survives the restart and nothing runs twice)."""
    db = str(tmp_path / "calls.db")
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE effects (key TEXT NOT NULL)")
    conn.close()
    svc = rpc.Service("effects")

    @svc.method
    @rpc.transactional
    async def record(key: str) -> int:
        tx = rpc.context().transaction
        tx.execute("INSERT INTO effects (key) VALUES (?)", (key,))
        (n,) = tx.execute("SELECT COUNT(*) FROM effects").fetchone()
        return int(n)

    async with aio_serving("unix:asql", svc, table=db) as srv:
        ch = await buzon.aio.connect(srv.address, timeout=10)
        async with ch:
            assert ch.peer.extra["options"]["rpc"] == {"instance": srv.instance, "durable": True}
        c = await arpc.connect(srv.address, timeout=10, semantics="exactly_once")
        async with c:
            assert [await c.record(f"k{i}") for i in range(5)] == [1, 2, 3, 4, 5]
        first = srv.instance
    async with aio_serving("unix:asql", svc, table=db) as again:
        assert again.instance != first
        c = await arpc.connect(again.address, timeout=10, semantics="exactly_once")
        async with c:
            assert await c.record("k5") == 6
    check = sqlite3.connect(db)
    try:
        rows = [k for (k,) in check.execute("SELECT key FROM effects ORDER BY rowid")]
    finally:
        check.close()
    assert rows == [f"k{i}" for i in range(6)]  # each write once, none rolled back
