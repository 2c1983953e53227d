"""Exactly-once requests taken apart in C (protocol/_rpc.c, its exactly-once block)
and the in-memory table's lean path: the same contracts as the general path. A retry
is answered from the record whichever path each attempt took (the digest is the same
bytes), a late copy of a call the client has acknowledged never runs again, anything
the C parse leaves alone gets the general path's answer."""

from __future__ import annotations

import struct
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
from _rpc_helpers import serving

import buzon
from buzon import rpc
from buzon.errors import RemoteError
from buzon.protocol import _rpc
from buzon.protocol.frames import Field, Kind, encode_frame
from buzon.rpc import _wire as w

CID = b"client-once-fast-1"


def _service(counts: Counter[str]) -> rpc.Service:
    lock = threading.Lock()
    svc = rpc.Service("effects")

    @svc.method
    def incr(key: str, by: float = 1.0) -> int:
        with lock:
            counts[key] += 1
            return counts[key]

    return svc


def _frame(body: bytes, call_id: int) -> bytes:
    fields = {int(Field.MESSAGE_ID): w.id_field(call_id)}
    return b"".join(bytes(b) for b in encode_frame(Kind.DATA, 1, body, fields=fields))


def _ask(ch: buzon.Channel, frame: bytes) -> list[Any]:
    w.send_frame(ch, frame, 5)
    body, _ = ch._recv_fields(10)
    assert isinstance(body, list)
    return body


def _canonical(call_id: int, key: str, by: float, seq: int, acked: int) -> bytes:
    frame = _rpc.request("incr", [key, by], call_id, -1, [CID, seq, acked])
    assert frame is not None
    return frame


def _unusual(call_id: int, key: str, by: float, seq: int, acked: int) -> bytes:
    """The same request as msgpack msgspec does not write: the kind as a uint8 (the C
    parse leaves it to the general path), ``by`` as a float32, the key's ints wide."""
    raw = key.encode()
    body = (
        b"\x95\xcc\x00\xa4incr\x92"
        + bytes([0xD9, len(raw)])
        + raw
        + b"\xca"
        + struct.pack(">f", by)
        + b"\xc0\x93\xc4"
        + bytes([len(CID)])
        + CID
        + b"\xcf"
        + struct.pack(">Q", seq)
        + b"\xd3"
        + struct.pack(">q", acked)
    )
    assert msgspec.msgpack.decode(body) == [0, "incr", [key, by], None, [CID, seq, acked]]
    assert _rpc.parse(_frame(body, call_id), 1 << 20) is None
    return _frame(body, call_id)


@pytest.mark.parametrize("table", [None, "calls.db"])
@pytest.mark.parametrize("key", ["k", "k" * 40])  # short: its msgpack; long: its BLAKE2b
def test_a_retry_on_the_other_path_is_answered_from_the_record(
    tmp_path: Path, table: str | None, key: str
) -> None:
    counts: Counter[str] = Counter()
    path = None if table is None else str(tmp_path / table)
    with (
        serving("unix:oncepaths", _service(counts), table=path) as srv,
        buzon.connect(srv.address, timeout=10) as ch,
    ):
        assert _ask(ch, _canonical(1, key, 0.5, 1, 1)) == [1, None, 1]
        assert _ask(ch, _unusual(2, key, 0.5, 1, 1)) == [1, None, 1]  # replayed
        assert _ask(ch, _unusual(3, key, 0.5, 2, 1)) == [1, None, 2]  # a new call
        assert _ask(ch, _canonical(4, key, 0.5, 2, 1)) == [1, None, 2]  # replayed
        refused = _ask(ch, _canonical(5, key, 0.25, 2, 1))  # other arguments
        assert refused[1][0] == RemoteError.INVALID_REQUEST
        assert srv.table.replayed == 2
    assert counts == Counter({key: 2})


@pytest.mark.parametrize("table", [None, "calls.db"])
def test_a_late_copy_of_an_acknowledged_call_is_not_run_again(
    tmp_path: Path, table: str | None
) -> None:
    """A copy of call 1 that arrives after the client acknowledged its reply (a request
    from a connection the client gave up, read late): its entry is collected, so only
    the acknowledgement says it ran; it is refused instead of run a second time."""
    counts: Counter[str] = Counter()
    path = None if table is None else str(tmp_path / table)
    with (
        serving("unix:oncelate", _service(counts), table=path) as srv,
        buzon.connect(srv.address, timeout=10) as ch,
    ):
        assert _ask(ch, _canonical(1, "a", 1.0, 1, 1)) == [1, None, 1]
        assert _ask(ch, _canonical(2, "b", 1.0, 2, 2)) == [1, None, 1]  # acknowledges 1
        late = _ask(ch, _canonical(3, "a", 1.0, 1, 1))
        assert late[1][0] == RemoteError.INVALID_REQUEST and "acknowledged" in late[1][1]
        late = _ask(ch, _unusual(4, "a", 1.0, 1, 1))  # on the general path too
        assert late[1][0] == RemoteError.INVALID_REQUEST
        assert _ask(ch, _canonical(5, "c", 1.0, 3, 2)) == [1, None, 1]  # goes on
    assert counts == Counter({"a": 1, "b": 1, "c": 1})


def test_what_the_c_parse_takes_gets_the_general_path_s_answers() -> None:
    counts: Counter[str] = Counter()
    with (
        serving("unix:onceerr", _service(counts)) as srv,
        buzon.connect(srv.address, timeout=10) as ch,
    ):
        frame = _rpc.request("nope", [1], 1, -1, [CID, 1, 1])
        assert frame is not None
        assert _ask(ch, frame)[1][0] == RemoteError.METHOD_NOT_FOUND
        frame = _rpc.request("incr", [1, 2, 3], 2, -1, [CID, 2, 2])
        assert frame is not None
        assert _ask(ch, frame)[1][0] == RemoteError.INVALID_PARAMS  # recorded as its reply
        assert _ask(ch, _canonical(3, "x", 1.0, 3, 3)) == [1, None, 1]  # still serving
        assert len(srv.table) == 1  # the earlier ones are acknowledged: collected
    assert counts == Counter({"x": 1})


def test_threads_sharing_an_exactly_once_client_through_chaos_run_each_call_once() -> None:
    """Threads of one client mix the solo first attempt and the retry loop, their
    sequence numbers and acknowledgements interleaved, while the relay resets
    connections with replies on their way: every call answered by its first execution,
    none refused as a late copy (acknowledgements never pass a number still open)."""
    from buzon.testing.chaos import ChaosRelay, Faults

    counts: Counter[str] = Counter()
    errors: list[BaseException] = []
    faults = Faults(reply=Faults(reset=0.2))
    with (
        serving("unix:oncethreads", _service(counts)) as srv,
        ChaosRelay("unix:oncefront", srv.address, profile=faults, seed=5) as relay,
    ):
        c = rpc.connect(relay.address, timeout=60, semantics="exactly_once")

        def worker(n: int) -> None:
            try:
                for i in range(20):
                    assert c.incr(f"t{n}-{i}") == 1
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        finally:
            c.close()
    assert not errors, errors
    assert len(counts) == 120 and set(counts.values()) == {1}, counts
    assert c.retries > 0, "the relay reset nothing: the test proved nothing"
