"""Binding by name: ``rpc.Server(..., name=)`` registers the real address (with the
wire, the semantics and a per-start instance id), the name goes with the server, and a
reconnecting client re-resolves it and notices a restarted server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from _rpc_helpers import Calc, Recorder, calc_service, serving

from buzon import names, rpc
from buzon.errors import EndpointInUse, NoSuchEndpoint

_CHILD_SERVES = """
import sys, time
from buzon import rpc
svc = rpc.Service("calc")

@svc.method
def add(a: int, b: int) -> int:
    return a + b

@svc.method
def block(name: str) -> str:
    print("running block", flush=True)
    time.sleep(60)
    return name

srv = rpc.Server(sys.argv[1], svc, name=sys.argv[2])
print("ready", flush=True)
srv.serve_forever()
"""


def _child_server(url: str, name: str) -> subprocess.Popen[str]:
    """A child process serving a calculator at ``url`` under ``name``, until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD_SERVES, url, name],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _running_block(proc: subprocess.Popen[str]) -> None:
    """Wait until the child server runs ``block`` (the call has reached it: only then
    is its outcome unknown when the server dies; killed sooner, the call may not have
    left the client, and then it rightly goes to the next server start)."""
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready, "the server did not start the call"
    assert proc.stdout.readline().strip() == "running block"


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def test_serve_with_a_name_registers_the_real_address_and_metadata() -> None:
    rec = Recorder()
    with serving("unix:named", calc_service(rec), name="calc", semantics="exactly_once") as srv:
        record = names.lookup("calc")
        assert record.address == str(srv.address)
        assert record.pid == os.getpid()
        meta = record.metadata
        assert meta["wire"] == "buzon" and meta["semantics"] == "exactly_once"
        assert meta["service"] == "calc"
        assert meta["instance"] == srv.instance and len(srv.instance) >= 16
        with rpc.connect("name:calc", Calc, timeout=10) as calc:  # type: ignore[attr-defined]
            assert calc.add(2, 3) == 5
    with pytest.raises(NoSuchEndpoint):  # the name went with the server
        names.lookup("calc")


def test_each_server_start_has_its_own_instance_id() -> None:
    svc = calc_service(Recorder())
    with serving("unix:one", svc, name="calc") as a:
        first = a.instance
    with serving("unix:one", svc, name="calc") as b:
        assert b.instance != first
        assert names.lookup("calc").metadata["instance"] == b.instance


def test_a_second_server_with_a_live_name_is_refused_and_leaves_nothing() -> None:
    svc = calc_service(Recorder())
    with serving("unix:first", svc, name="calc") as srv:
        before = set(os.listdir(os.environ["BUZON_RUNTIME_DIR"]))
        with pytest.raises(EndpointInUse, match=str(os.getpid())):
            rpc.Server("unix:second", svc, name="calc")
        assert set(os.listdir(os.environ["BUZON_RUNTIME_DIR"])) == before  # no socket left
        assert names.lookup("calc").address == str(srv.address)  # the first one's stays
    with pytest.raises(EndpointInUse):  # a live holder in another process, too
        proc = _child_server("unix:child", "held")
        try:
            rpc.Server("unix:mine", svc, name="held")
        finally:
            _kill(proc)


def test_name_url_and_name_argument_agree_or_are_refused() -> None:
    svc = calc_service(Recorder())
    with serving("name:calc", svc) as srv:
        assert names.lookup("calc").address == str(srv.address)
        assert names.lookup("calc").metadata["instance"] == srv.instance
    with pytest.raises(Exception, match="two different names"):
        rpc.Server("name:calc", svc, name="other")


def test_a_killed_server_s_name_is_gone_at_once() -> None:
    proc = _child_server("unix:victim", "victim")
    try:
        assert names.lookup("victim").pid == proc.pid
    finally:
        _kill(proc)
    with pytest.raises(NoSuchEndpoint):  # flock-owned: free as soon as the owner is dead
        names.lookup("victim")


def test_at_least_once_client_finds_a_server_restarted_elsewhere() -> None:
    proc = _child_server("unix:old", "calc")
    calc = rpc.connect("name:calc", timeout=20, semantics="at_least_once")
    try:
        assert calc.add(1, 2) == 3
        _kill(proc)
        rec = Recorder()
        with serving("unix:new", calc_service(rec), name="calc") as srv:
            assert names.lookup("calc").address == str(srv.address)
            assert calc.add(20, 22) == 42  # re-resolved on reconnect
            assert rec.ran == ["add"]
            assert calc.retries >= 1
    finally:
        calc.close()


def test_exactly_once_client_gets_a_typed_error_when_the_server_restarted() -> None:
    proc = _child_server("unix:old", "calc")
    calc = rpc.connect("name:calc", timeout=20, semantics="exactly_once")
    try:
        assert calc.add(1, 2) == 3
        outcome: list[BaseException] = []

        def in_flight() -> None:
            try:
                calc.call("block", "x")
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=in_flight)
        t.start()
        _running_block(proc)
        _kill(proc)  # the call's outcome is unknown, and the table died with the server
        rec = Recorder()
        with serving("unix:new", calc_service(rec), name="calc"):
            t.join(20)
            assert not t.is_alive()
            assert len(outcome) == 1 and isinstance(outcome[0], rpc.ServerRestarted)
            assert "restarted" in str(outcome[0]) and "block" in str(outcome[0])
            assert rec.ran == []  # not run again on the new server
            assert calc.add(2, 2) == 4  # new calls go to the new server
            assert rec.ran == ["add"]
    finally:
        calc.close()


def test_a_reconnect_that_finds_a_stale_address_looks_the_name_up_again() -> None:
    """The race behind a flaky restart test: a dying server's socket closes before its
    name's lock does, so a reconnect may resolve the name to the old, dead address.
    That attempt must fail fast and the name be looked up again (the next attempt finds
    the new server), not wait for the dead address until the call's deadline."""
    proc = _child_server("unix:old", "calc")
    calc = rpc.connect("name:calc", timeout=8, semantics="exactly_once")
    try:
        assert calc.add(1, 2) == 3
        outcome: list[BaseException] = []

        def in_flight() -> None:
            try:
                calc.call("block", "x")
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=in_flight)
        t.start()
        _running_block(proc)
        _kill(proc)
        stale = names.register("calc", "unix:gone-for-good")  # a live record, dead address
        try:
            t.join(0.5)  # the reconnects meet the stale record meanwhile
        finally:
            stale.remove()
        rec = Recorder()
        with serving("unix:new", calc_service(rec), name="calc"):
            t.join(20)
            assert not t.is_alive()
            assert len(outcome) == 1 and isinstance(outcome[0], rpc.ServerRestarted), outcome
            assert calc.add(2, 2) == 4
    finally:
        calc.close()


def test_an_asyncio_reconnect_that_finds_a_stale_address_looks_the_name_up_again() -> None:
    """The asyncio client's twin of the test above."""
    import asyncio

    from _rpc_aio_helpers import aio_serving_in_thread

    from buzon.aio import rpc as arpc

    proc = _child_server("unix:aold", "acalc")

    async def main() -> None:
        calc = await arpc.connect("name:acalc", timeout=8, semantics="exactly_once")
        try:
            assert await calc.call("add", 1, 2) == 3
            task = asyncio.ensure_future(calc.call("block", "x"))
            await asyncio.to_thread(_running_block, proc)
            _kill(proc)
            stale = names.register("acalc", "unix:gone-for-good")  # live record, dead address
            try:
                await asyncio.sleep(0.5)  # the reconnects meet the stale record meanwhile
            finally:
                stale.remove()
            with aio_serving_in_thread("unix:anew", calc_service(Recorder()), name="acalc"):
                done, _ = await asyncio.wait([task], timeout=20)
                assert done, "the call did not end"
                with pytest.raises(rpc.ServerRestarted):
                    task.result()
        finally:
            await calc.aclose()

    try:
        asyncio.run(main())
    finally:
        if proc.poll() is None:
            _kill(proc)


def test_a_call_whose_send_failed_goes_to_the_restarted_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other way the restart test could end in DeadlineExceeded: the server died
    before the call left the client (its send failed), so the call never ran and it is
    sent to the new server start (not ``ServerRestarted``: its outcome is known).
    The restart tests therefore kill the server only once it runs the call."""
    from buzon.rpc import _client

    proc = _child_server("unix:old2", "calc2")
    calc = rpc.connect("name:calc2", timeout=20, semantics="exactly_once")
    real_send = _client.w.send
    real_send_frame = _client.w.send_frame  # a plain call's frame, made in C
    rec = Recorder()
    try:
        assert calc.add(1, 2) == 3

        def server_dies() -> None:
            if proc.poll() is None:
                _kill(proc)  # the server dies before this call leaves
                serving_cm.__enter__()

        def dying_server_send(ch: Any, body: Any, *args: Any) -> None:
            if body[:2] == [0, "add"]:
                server_dies()
            real_send(ch, body, *args)

        def dying_server_send_frame(ch: Any, frame: Any, *args: Any) -> None:
            server_dies()  # the only call made meanwhile is add(2, 3)
            real_send_frame(ch, frame, *args)

        serving_cm = serving("unix:new2", calc_service(rec), name="calc2")
        monkeypatch.setattr(_client.w, "send", dying_server_send)
        monkeypatch.setattr(_client.w, "send_frame", dying_server_send_frame)
        try:
            assert calc.add(2, 3) == 5  # it never ran on the old server: sent again
            assert rec.ran == ["add"]
        finally:
            monkeypatch.undo()
            serving_cm.__exit__(None, None, None)
    finally:
        calc.close()
        if proc.poll() is None:
            _kill(proc)
