"""buzon.rpc deadlines and cancellation: the caller's budget on the wire, nested calls,
a cancel message the handler sees, a default deadline instead of hanging for ever."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from _rpc_helpers import Recorder, calc_service, serving

import buzon
from buzon import rpc
from buzon.errors import DeadlineExceeded, RemoteError
from buzon.protocol.frames import Field


def test_deadline_raises_and_the_handler_sees_the_cancel() -> None:
    rec = Recorder()
    with serving("unix:dl", calc_service(rec)) as srv, rpc.connect(srv.address, timeout=None) as c:
        with rpc.deadline(0.3), pytest.raises(DeadlineExceeded):
            c.block("dl")
        assert rec.event("dl:cancelled").wait(10)
        assert c.add(1, 2) == 3  # the late reply is dropped, the connection goes on
        time.sleep(0.4)
        assert c.add(2, 2) == 4
        assert c.late <= 1


def test_cancelling_a_future_tells_the_server_before_any_deadline() -> None:
    rec = Recorder()
    with (
        serving("unix:cancel", calc_service(rec)) as srv,
        rpc.connect(srv.address, timeout=None) as c,
    ):
        fut = c.call_async("block", "cx")
        time.sleep(0.1)
        assert fut.cancel()
        assert rec.event("cx:cancelled").wait(10)  # no deadline: only the message did it
        assert rec.cancelled == ["cx"]
        assert c.add(1, 2) == 3


def test_interrupting_a_waiting_caller_cancels_the_call() -> None:
    rec = Recorder()
    with (
        serving("unix:intr", calc_service(rec)) as srv,
        rpc.connect(srv.address, timeout=None) as c,
    ):
        main = threading.get_ident()

        def interrupt() -> None:  # a real SIGINT: it interrupts the waiting poll()
            rec.event("intr:started").wait(5)
            time.sleep(0.2)
            signal.pthread_kill(main, signal.SIGINT)

        threading.Thread(target=interrupt).start()
        rec.event("intr:started").set()
        with pytest.raises(KeyboardInterrupt):
            c.block("intr")
        assert rec.event("intr:cancelled").wait(10)
        assert c.add(1, 2) == 3


def test_the_default_deadline_bounds_every_call() -> None:
    rec = Recorder()
    with (
        serving("unix:default", calc_service(rec)) as srv,
        rpc.connect(srv.address, timeout=0.3) as c,
    ):
        with pytest.raises(DeadlineExceeded):
            c.block("default")
        assert rec.event("default:cancelled").wait(10)
        # a deadline block can shorten the default, never extend it
        with rpc.deadline(100):
            budget = c.budget()
        assert budget is not None and 0 < budget <= 0.3


def test_the_deadline_travels_and_nested_calls_inherit_it() -> None:
    inner_rec = Recorder()
    with serving("unix:inner", calc_service(inner_rec)) as inner:
        outer_svc = rpc.Service("outer")
        inner_client = rpc.connect(inner.address, timeout=None)

        @outer_svc.method
        def relay() -> list[float | None]:
            mine = rpc.context().deadline
            left = None if mine is None else mine - time.monotonic()
            return [left, inner_client.budget()]  # a nested call made while handling

        with (
            serving("unix:outer", outer_svc) as outer,
            rpc.connect(outer.address, timeout=None) as c,
        ):
            assert c.relay() == [None, None]  # no deadline anywhere: none on the wire
            with rpc.deadline(5.0):
                mine, nested = c.relay()  # nested: what the inner handler saw
            assert 0 < mine <= 5.0
            assert 0 < nested <= mine
        inner_client.close()


def test_a_request_whose_deadline_passed_does_not_run() -> None:
    rec = Recorder()
    with (
        serving("unix:late", calc_service(rec)) as srv,
        buzon.connect(srv.address, timeout=10) as ch,
    ):
        fields = {Field.MESSAGE_ID: (1).to_bytes(8, "little"), Field.DEADLINE: bytes(4)}
        ch._send_fields([0, "add", [1, 2]], fields, 5)
        body, _ = ch._recv_fields(10)
        assert body[1][0] == RemoteError.DEADLINE_EXCEEDED
    assert rec.ran == []


def test_deadline_blocks_nest_and_validate() -> None:
    with rpc.deadline(10) as outer:
        with rpc.deadline(100) as inner:
            assert inner == outer  # never extended
        with rpc.deadline(1) as shorter:
            assert shorter < outer
    with pytest.raises(ValueError), rpc.deadline(-1):
        pass
