"""buzon.rpc: services, typed stubs, bad input, many calls in flight, a thread-safe client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _rpc_helpers import Calc, Recorder, calc_service, serving

import buzon
from buzon import rpc
from buzon.errors import RemoteError
from buzon.protocol.frames import Field

URLS = ["unix:calc", "tcp://127.0.0.1:0", "seqpacket:calc", "shm:calc"]


@pytest.mark.parametrize("url", URLS)
def test_typed_stub_calls_a_service_on_every_stream_transport(url: str) -> None:
    rec = Recorder()
    with serving(url, calc_service(rec)) as srv:
        calc = rpc.connect(srv.address, Calc, timeout=10)
        try:
            assert calc.add(2, 3) == 5
            assert calc.echo("hé") == "hé"
            assert [calc.add(i, i) for i in range(50)] == [2 * i for i in range(50)]
        finally:
            rpc.close(calc)
    assert srv.calls == 52  # counted once the server is done with the connection


def test_untyped_proxy_call_and_keywords() -> None:
    with (
        serving("unix:kw", calc_service(Recorder())) as srv,
        rpc.connect(srv.address, timeout=10) as c,
    ):
        assert c.add(1, 2) == 3
        assert c.call("add", 1, b=2) == 3
        assert c.kw(1) == 11
        assert c.kw(1, 2, 3, 4, scale=2) == 20
        with pytest.raises(RemoteError) as info:
            c.kw(1, nope=3)
        assert info.value.code == RemoteError.INVALID_PARAMS


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1, "2"), {}), ((1,), {}), ((1, 2, 3), {}), ((1.5, 2), {}), ((), {"a": 1, "c": 2})],
    ids=["str-for-int", "too-few", "too-many", "float-for-int", "unknown-keyword"],
)
def test_wrong_arity_or_types_is_a_typed_error_and_nothing_runs(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    rec = Recorder()
    with serving("unix:bad", calc_service(rec)) as srv, rpc.connect(srv.address, timeout=10) as c:
        with pytest.raises(RemoteError) as info:
            c.call("add", *args, **kwargs)
        assert info.value.code == RemoteError.INVALID_PARAMS
        assert "add" in info.value.message
        assert rec.ran == []
        assert c.add(1, 2) == 3  # the server keeps serving, on the same connection


@pytest.mark.parametrize(
    "name",
    ["nope", "__class__", "_private", "add.__globals__", "__init__", "__getattribute__", ""],
)
def test_only_registered_methods_are_reachable(name: str) -> None:
    rec = Recorder()
    with serving("unix:allow", calc_service(rec)) as srv, rpc.connect(srv.address, timeout=10) as c:
        with pytest.raises(RemoteError) as info:
            c.call(name)
        assert info.value.code == RemoteError.METHOD_NOT_FOUND
        assert c.add(1, 1) == 2
    assert rec.ran == ["add"]


class Counter:
    """An object served by its @expose methods."""

    def __init__(self) -> None:
        self.n = 0
        self.secret_calls = 0

    @rpc.expose
    def incr(self, by: int = 1) -> int:
        self.n += by
        return self.n

    @rpc.expose(name="value")
    def current(self) -> int:
        return self.n

    def reset(self) -> None:  # not exposed
        self.secret_calls += 1
        self.n = 0

    def _hidden(self) -> None:
        self.secret_calls += 1


@pytest.mark.parametrize(
    "name", ["reset", "_hidden", "current", "__class__", "__dict__", "incr.__self__", "n"]
)
def test_an_object_exposes_only_its_marked_methods(name: str) -> None:
    obj = Counter()
    with serving("unix:obj", obj) as srv, rpc.connect(srv.address, timeout=10) as c:
        assert c.incr() == 1
        assert c.incr(by=4) == 5
        assert c.value() == 5
        with pytest.raises(RemoteError) as info:
            c.call(name)
        assert info.value.code == RemoteError.METHOD_NOT_FOUND
    assert obj.secret_calls == 0 and obj.n == 5


def test_registration_refuses_private_names_and_objects_without_exposed_methods() -> None:
    svc = rpc.Service("x")
    with pytest.raises(ValueError, match="_"):
        svc.add(lambda: None, name="_secret")
    with pytest.raises(ValueError, match="expose"):
        rpc.Server("unix:none", object())


def test_a_result_that_does_not_match_its_hint_or_cannot_be_encoded_is_an_error_reply() -> None:
    rec = Recorder()
    with serving("unix:res", calc_service(rec)) as srv, rpc.connect(srv.address, timeout=10) as c:
        with pytest.raises(RemoteError) as info:
            c.wrong_result()
        assert info.value.code == RemoteError.INVALID_RESULT
        with pytest.raises(RemoteError) as info:
            c.unencodable()
        assert info.value.code == RemoteError.INVALID_RESULT
        assert "encode" in info.value.message
        assert c.add(2, 2) == 4  # the connection is alive
    assert rec.ran == ["wrong_result", "unencodable", "add"]


def test_a_handler_exception_arrives_as_remote_error_without_its_traceback() -> None:
    with (
        serving("unix:exc", calc_service(Recorder())) as srv,
        rpc.connect(srv.address, timeout=10) as c,
    ):
        with pytest.raises(RemoteError) as info:
            c.fails("boom")
        err = info.value
        assert err.code == RemoteError.SERVER_ERROR
        assert err.data == {"type": "ValueError"}
        assert "boom" in err.message and "Traceback" not in err.message
        assert isinstance(err, buzon.BuzonError)
        assert c.add(1, 2) == 3
    assert srv.errors >= 1


def test_the_client_validates_results_against_the_protocol() -> None:
    svc = rpc.Service("liar")

    @svc.method
    def add(a: int, b: int) -> str:
        return "three"

    with serving("unix:liar", svc) as srv:
        calc = rpc.connect(srv.address, Calc, timeout=10)
        with pytest.raises(buzon.ValidationError, match="add"):
            calc.add(1, 2)
        with pytest.raises(AttributeError, match="Calc has no method"):
            calc.sub  # type: ignore[attr-defined]  # noqa: B018
        rpc.close(calc)


def test_replies_come_back_out_of_order_on_one_connection() -> None:
    rec = Recorder()
    with serving("unix:order", calc_service(rec)) as srv, rpc.connect(srv.address, timeout=20) as c:
        futures = [c.call_async("sleep_then", i, 0.05 * (5 - i)) for i in range(5)]
        assert [f.result(20) for f in futures] == [0, 1, 2, 3, 4]
    # the last call (shortest sleep) finished first: they ran at once, replies reordered
    assert rec.ran[0] == "done 4" and rec.ran[-1] == "done 0"


def test_the_client_is_thread_safe() -> None:
    with (
        serving("unix:threads", calc_service(Recorder())) as srv,
        rpc.connect(srv.address, timeout=30) as c,
    ):
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                for i in range(100):
                    assert c.add(k, i) == k + i
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert c.in_flight == 0


def test_notify_runs_without_a_reply() -> None:
    rec = Recorder()
    with (
        serving("unix:notify", calc_service(rec)) as srv,
        rpc.connect(srv.address, timeout=10) as c,
    ):
        c.notify("log", "hello")
        assert rec.event("logged").wait(10)
        c.notify("nope")  # an unknown one-way call is dropped, counted, not fatal
        assert c.add(1, 2) == 3
    assert srv.errors >= 1
    assert "log hello" in rec.ran


def test_calls_in_flight_per_connection_are_bounded_on_the_server() -> None:
    rec = Recorder()
    with (
        serving("unix:bound", calc_service(rec), max_in_flight=2) as srv,
        rpc.connect(srv.address, timeout=30) as c,
    ):
        futures = [c.call_async("block", "go") for _ in range(6)]
        deadline = time.monotonic() + 10
        while rec.max_concurrent < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # more would have started by now if the bound did not hold
        assert rec.max_concurrent == 2
        rec.event("go").set()
        assert [f.result(20) for f in futures] == ["released"] * 6
    assert rec.max_concurrent == 2


def test_calls_in_flight_are_bounded_on_the_client() -> None:
    rec = Recorder()
    with (
        serving("unix:cbound", calc_service(rec)) as srv,
        rpc.connect(srv.address, timeout=30, max_in_flight=2) as c,
    ):
        futures = [c.call_async("block", "go2") for _ in range(2)]
        with rpc.deadline(0.2), pytest.raises(buzon.DeadlineExceeded, match="max_in_flight"):
            c.call("add", 1, 2)
        rec.event("go2").set()
        assert [f.result(20) for f in futures] == ["released"] * 2
        assert c.add(1, 2) == 3


def test_junk_on_the_connection_is_refused_and_the_server_keeps_serving() -> None:
    rec = Recorder()
    with (
        serving("unix:junk", calc_service(rec)) as srv,
        buzon.connect(srv.address, timeout=10) as ch,
    ):
        ch.send("not a request")
        ch.send([0, "add", [1, 2]])  # no call id: nothing to answer to
        ch.send([9, 9, 9])
        ch._send_fields([0, 42, [1]], {Field.MESSAGE_ID: (7).to_bytes(8, "little")}, 5)
        body, fields = ch._recv_fields(10)
        assert fields is not None and fields[Field.CORRELATION] == (7).to_bytes(8, "little")
        assert body[0] == 1 and body[1][0] == RemoteError.METHOD_NOT_FOUND
        ch._send_fields([0, "add", [1, 2]], {Field.MESSAGE_ID: (8).to_bytes(8, "little")}, 5)
        body, fields = ch._recv_fields(10)
        assert body == [1, None, 3]
    assert rec.ran == ["add"]


def _serve_calc(url: str) -> None:
    rpc.serve(url, calc_service(Recorder()))


def test_a_lost_server_fails_calls_in_flight_with_unknown_outcome(runtime_dir: str) -> None:
    import multiprocessing

    url = f"unix:{runtime_dir}/lost"
    child = multiprocessing.get_context("fork").Process(target=_serve_calc, args=(url,))
    child.start()
    try:
        c = rpc.connect(url, timeout=30)
        fut = c.call_async("block", "never")
        assert c.add(1, 2) == 3
        os.kill(child.pid or 0, signal.SIGKILL)
        with pytest.raises(buzon.EndOfChannel, match="may or may not have run"):
            fut.result(15)
        with pytest.raises(buzon.EndOfChannel):
            c.add(1, 2)
        c.close()
    finally:
        child.kill()
        child.join(10)
        try:
            os.unlink(f"{runtime_dir}/lost")
        except FileNotFoundError:
            pass


def test_process_mode_serves_each_client_in_its_own_process() -> None:
    svc = rpc.Service("pid")

    @svc.method
    def pid() -> int:
        return os.getpid()

    with (
        serving("unix:proc", svc, mode="process") as srv,
        rpc.connect(srv.address, timeout=10) as c,
    ):
        assert c.pid() != os.getpid()


def test_unsupported_options_are_refused_clearly() -> None:
    svc = calc_service(Recorder())
    with pytest.raises(buzon.UnsupportedOperation, match="wire"):
        rpc.Server("unix:w", svc, wire="carrier-pigeon")
    with pytest.raises(buzon.UnsupportedOperation, match="semantics"):
        rpc.Server("unix:w", svc, semantics="exactly_twice")
    with pytest.raises(buzon.UnsupportedOperation, match="handler"):
        rpc.context()


def test_mypy_checks_calls_through_a_protocol_stub(tmp_path: Path) -> None:
    src = tmp_path / "use_stub.py"
    src.write_text(
        textwrap.dedent(
            """
            from typing import Protocol
            import buzon

            class Calc(Protocol):
                def add(self, a: int, b: int) -> int: ...

            calc = buzon.rpc.connect("unix:calc", Calc)
            ok: int = calc.add(1, 2)
            bad = calc.add(1, "2")
            wrong: str = calc.add(1, 2)
            calc.sub(1)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if ": error:" in ln]
    assert len(lines) == 3, out.stdout
    assert ':10: error: Argument 2 to "add" of "Calc"' in out.stdout
    assert ":11: error: Incompatible types in assignment" in out.stdout
    assert ':12: error: "Calc" has no attribute "sub"' in out.stdout


def test_close_from_another_thread_ends_calls_waiting_without_a_deadline() -> None:
    rec = Recorder()
    with serving("unix:closer", calc_service(rec)) as srv:
        c = rpc.connect(srv.address, timeout=None)
        box: list[BaseException] = []

        def waiter() -> None:
            try:
                c.block("closer")
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=waiter)  # it reads the connection itself, in poll()
        t.start()
        while not rec.concurrent:
            time.sleep(0.01)
        c.close()
        t.join(10)  # generous: it notices within a read slice (0.25 s)
        assert not t.is_alive(), "a waiting call did not notice the close"
        assert isinstance(box[0], buzon.ChannelClosed)
        rec.event("closer").set()
