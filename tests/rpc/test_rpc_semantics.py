"""Call semantics through the chaos relay: connections reset while replies are on their
way. at_most_once says the outcome is unknown; at_least_once retries and may run a call
twice; exactly_once retries and runs every side effect once (the completion table)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from _rpc_helpers import serving

import buzon
from buzon import rpc
from buzon.errors import RemoteError
from buzon.protocol.frames import Field
from buzon.testing.chaos import ChaosRelay, Faults

CALLS = 30


def _effects() -> tuple[rpc.Service, Counter[str]]:
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    svc = rpc.Service("effects")

    @svc.method
    def incr(key: str) -> int:
        with lock:
            counts[key] += 1
            return counts[key]

    @svc.method
    def fail(key: str) -> None:
        with lock:
            counts[key] += 1
        raise ValueError(key)

    return svc, counts


@contextmanager
def _through_chaos(seed: int) -> Iterator[tuple[rpc.Server, ChaosRelay, Counter[str]]]:
    svc, counts = _effects()
    # replies lose their connection: the call ran, its answer never arrives
    faults = Faults(reply=Faults(reset=0.25))
    with (
        serving("unix:effects", svc) as srv,
        ChaosRelay("unix:front", srv.address, profile=faults, seed=seed) as relay,
    ):
        yield srv, relay, counts


def test_exactly_once_runs_each_side_effect_once_through_reset_connections() -> None:
    with _through_chaos(seed=11) as (srv, relay, counts):
        c = rpc.connect(relay.address, timeout=60, semantics="exactly_once")
        try:
            results = [c.incr(f"k{i}") for i in range(CALLS)]
            with pytest.raises(RemoteError, match="raised ValueError"):
                c.fail("f")
        finally:
            c.close()
        resets = relay.statistics().get("resets", 0)
    assert results == [1] * CALLS  # every answer is the first execution's
    assert all(counts[f"k{i}"] == 1 for i in range(CALLS)), counts
    assert counts["f"] == 1
    assert c.retries > 0, "the relay reset nothing: the test proved nothing"
    assert srv.table.replayed > 0, "no retry was answered from the table"
    assert resets is None or resets > 0


def test_at_least_once_retries_and_may_run_a_call_twice() -> None:
    with _through_chaos(seed=11) as (_, _relay, counts):
        c = rpc.connect(_relay.address, timeout=60, semantics="at_least_once")
        try:
            results = [c.incr(f"k{i}") for i in range(CALLS)]
        finally:
            c.close()
    assert all(counts[f"k{i}"] >= 1 for i in range(CALLS))
    assert c.retries > 0
    assert sum(counts.values()) > CALLS, "no call ran twice: the relay did not bite"
    assert any(r > 1 for r in results)  # an answer from a second execution


def test_at_most_once_reports_an_unknown_outcome() -> None:
    with _through_chaos(seed=11) as (_, relay, _counts):
        c = rpc.connect(relay.address, timeout=60)
        try:
            with pytest.raises(buzon.EndOfChannel, match="may or may not have run"):
                for i in range(CALLS * 10):
                    c.incr(f"k{i}")
        finally:
            c.close()


def test_the_same_exactly_once_id_with_other_arguments_is_refused() -> None:
    svc, counts = _effects()
    cid = b"client-0000000001"

    def request(ch: buzon.Channel, call_id: int, key: str) -> list[object]:
        fields = {Field.MESSAGE_ID: call_id.to_bytes(8, "little")}
        ch._send_fields([0, "incr", [key], None, [cid, 1, 1]], fields, 5)
        body, _ = ch._recv_fields(10)
        assert isinstance(body, list)
        return body

    with serving("unix:refuse", svc) as srv, buzon.connect(srv.address, timeout=10) as ch:
        assert request(ch, 1, "a") == [1, None, 1]
        refused = request(ch, 2, "b")
        assert isinstance(refused[1], list) and refused[1][0] == RemoteError.INVALID_REQUEST
        assert request(ch, 3, "a") == [1, None, 1]  # the recorded answer, not a new run
        assert srv.table.replayed == 1
    assert counts == Counter({"a": 1})


def test_acknowledged_entries_are_collected() -> None:
    svc, _ = _effects()
    with serving("unix:ack", svc) as srv:
        c = rpc.connect(srv.address, timeout=10, semantics="exactly_once")
        try:
            for i in range(50):
                c.incr(f"k{i}")
            assert len(srv.table) <= 2  # each request acknowledges the ones before it
        finally:
            c.close()


def test_a_malformed_exactly_once_key_is_refused() -> None:
    svc, counts = _effects()
    with serving("unix:badkey", svc) as srv, buzon.connect(srv.address, timeout=10) as ch:
        fields = {Field.MESSAGE_ID: (1).to_bytes(8, "little")}
        ch._send_fields([0, "incr", ["a"], None, ["not bytes", -1]], fields, 5)
        body, _ = ch._recv_fields(10)
        assert body[1][0] == RemoteError.INVALID_REQUEST
    assert not counts


def test_a_retry_waits_for_the_first_attempt_only_until_its_deadline() -> None:
    release = threading.Event()
    ran: list[str] = []
    svc = rpc.Service("slow")

    @svc.method
    def slow(key: str) -> str:
        ran.append(key)
        release.wait(30)
        return key

    cid = b"client-0000000002"
    body = [0, "slow", ["k"], None, [cid, 1, 1]]
    with (
        serving("unix:retry", svc) as srv,
        buzon.connect(srv.address, timeout=10) as first,
        buzon.connect(srv.address, timeout=10) as retry,
    ):
        first._send_fields(body, {Field.MESSAGE_ID: (1).to_bytes(8, "little")}, 5)
        while not ran:
            threading.Event().wait(0.01)
        fields = {
            Field.MESSAGE_ID: (1).to_bytes(8, "little"),
            Field.DEADLINE: (200).to_bytes(4, "little"),
        }
        retry._send_fields(body, fields, 5)
        late, _ = retry._recv_fields(10)
        assert late[1][0] == RemoteError.DEADLINE_EXCEEDED
        release.set()
        assert first._recv_fields(10)[0] == [1, None, "k"]
        retry._send_fields(body, {Field.MESSAGE_ID: (2).to_bytes(8, "little")}, 5)
        assert retry._recv_fields(10)[0] == [1, None, "k"]  # now answered from the table
    assert ran == ["k"]
