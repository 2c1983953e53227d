"""wire="jsonrpc": Content-Length framing (sans-IO, fuzzed), the JSON-RPC 2.0 spec's
section 7 examples answered exactly, both roles on one connection, cancellation, and
python-lsp-server (pylsp) as the peer nobody here wrote."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _rpc_helpers import Recorder, calc_service, serving
from hypothesis import given, settings
from hypothesis import strategies as st

import buzon
from buzon import rpc
from buzon.errors import FrameError, FrameTooLarge, RemoteError
from buzon.rpc._jsonrpc import CANCEL_METHOD, JsonRpcClient
from buzon.rpc._jsonrpc_codec import MAX_HEADER, FrameDecoder, encode_frame
from buzon.rpc._msgpack import _Stream

_VENV_PYLSP = os.path.join(os.path.dirname(sys.executable), "pylsp")
PYLSP = _VENV_PYLSP if os.access(_VENV_PYLSP, os.X_OK) else shutil.which("pylsp")
needs_pylsp = pytest.mark.skipif(
    PYLSP is None,
    reason="python-lsp-server (pylsp) is not installed; `make install` installs it (dev extra)",
)


NOT_FOUND = {"code": -32601, "message": "Method not found"}
INVALID = {"code": -32600, "message": "Invalid Request"}
PARSE = {"code": -32700, "message": "Parse error"}


# -- framing (sans-IO) ------------------------------------------------------------------


def test_frames_split_at_any_byte_come_out_whole_and_in_order() -> None:
    bodies = [b"{}", b'{"a":"\xc3\xa9"}', b"[" + b"1," * 5000 + b"1]", b"null"]
    stream = b"".join(encode_frame(b) for b in bodies)
    for step in (1, 3, 7, 4096, len(stream)):
        dec = FrameDecoder()
        out: list[bytes] = []
        for i in range(0, len(stream), step):
            out += dec.feed(stream[i : i + step])
        assert out == bodies and dec.buffered == 0


def test_headers_as_lsp_allows_them_are_accepted() -> None:
    dec = FrameDecoder()
    data = (
        b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n"
        b"content-length:  2\r\n\r\n{}"
        b"Content-Length: 4\r\nContent-Type: application/vscode-jsonrpc; charset=utf8\r\n\r\nnull"
    )
    assert dec.feed(data) == [b"{}", b"null"]


MALFORMED = [
    (b"\r\n\r\n{}", "not 'Name: value'"),
    (b"Content-Type: x\r\n\r\n{}", "without Content-Length"),
    (b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}", "twice"),
    (b"Content-Length: -2\r\n\r\n", "not a number"),
    (b"Content-Length: 0x10\r\n\r\n", "not a number"),
    (b"Content-Length: \r\n\r\n", "not a number"),
    (b"Content-Length: 1" + b"0" * 30 + b"\r\n\r\n", "not a number"),
    (b"Content-Length 2\r\n\r\n{}", "not 'Name: value'"),
    (b" Content-Length: 2\r\n\r\n{}", "not 'Name: value'"),
    (b"Content-L\xc3\xa9ngth: 2\r\n\r\n{}", "ASCII"),
    (b"Content-Length: 2\r\nContent-Type: text/json; charset=latin-1\r\n\r\n{}", "not UTF-8"),
]


@pytest.mark.parametrize(("data", "why"), MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_headers_are_refused_with_the_reason_and_the_decoder_stays_broken(
    data: bytes, why: str
) -> None:
    dec = FrameDecoder()
    with pytest.raises(FrameError, match=why):
        dec.feed(data)
    with pytest.raises(FrameError, match=why):
        dec.feed(encode_frame(b"{}"))  # a broken stream cannot be resynchronised


def test_a_huge_content_length_is_refused_from_the_header_before_the_body() -> None:
    dec = FrameDecoder(max_message=1 << 20)
    with pytest.raises(FrameTooLarge, match="limit"):
        dec.feed(b"Content-Length: 4294967296\r\n\r\n")  # 4 GiB announced, 0 bytes sent
    dec = FrameDecoder(max_message=1 << 20)
    assert dec.feed(b"Content-Length: 1048576\r\n\r\n") == []  # at the limit: may still come


def test_a_header_without_end_is_refused_at_its_bound() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"X-Pad: " + b"a" * (MAX_HEADER - 20)) == []
    with pytest.raises(FrameError, match="header over"):
        dec.feed(b"a" * 64)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_fuzz_any_bytes_give_bodies_or_a_frame_error_and_stay_bounded(
    junk: bytes, cuts: list[int]
) -> None:
    dec = FrameDecoder(max_message=256, max_header=128)
    pos = 0
    i = 0
    try:
        while pos < len(junk):
            step = cuts[i % len(cuts)]
            for body in dec.feed(junk[pos : pos + step]):
                assert len(body) <= 256
            assert dec.buffered <= 128 + 3 + 256
            pos += step
            i += 1
    except FrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=300), max_size=8),
    st.lists(st.integers(1, 97), min_size=1, max_size=10),
)
def test_fuzz_framed_bodies_round_trip_through_any_split(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    dec = FrameDecoder(max_message=300)
    out: list[bytes] = []
    pos = i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += dec.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert out == bodies


def test_error_objects_use_the_standard_messages_and_keep_the_detail_in_data() -> None:
    from buzon.rpc._jsonrpc_codec import error_object, peer_error

    assert error_object(RemoteError("no method 'x'", -32601)) == NOT_FOUND
    assert error_object(RemoteError("add: bad b", -32602)) == {
        "code": -32602,
        "message": "Invalid params",
        "data": "add: bad b",
    }
    assert error_object(RemoteError("db down", -32603))["data"] == "db down"
    assert error_object(RemoteError("boom", -32000, {"type": "ValueError"})) == {
        "code": -32000,
        "message": "boom",
        "data": {"type": "ValueError"},
    }
    err = peer_error({"code": -32601, "message": "Method Not Found: x"})
    assert (err.code, err.message, err.data) == (-32601, "Method Not Found: x", None)
    assert peer_error("junk").code == -32603  # a malformed error object, still typed


# -- a peer written in the test ----------------------------------------------------------


class _SockStream(_Stream):
    def __init__(self, s: socket.socket) -> None:
        self.s = s

    def read(self, timeout: float) -> bytes | None:
        self.s.settimeout(timeout)
        try:
            return self.s.recv(65536)
        except TimeoutError:
            return None
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        self.s.sendall(data)

    def close(self) -> None:
        self.s.close()


def spec_service(seen: list[Any]) -> rpc.Service:
    """The methods the examples of the JSON-RPC 2.0 spec (section 7) call."""
    svc = rpc.Service("spec")

    @svc.method
    def subtract(minuend: int, subtrahend: int) -> int:
        return minuend - subtrahend

    @svc.method
    def sum(*values: int) -> int:
        total = 0
        for v in values:
            total += v
        return total

    @svc.method
    def update(*values: int) -> None:
        seen.append(("update", values))

    @svc.method
    def notify_hello(*values: int) -> None:
        seen.append(("notify_hello", values))

    @svc.method
    def notify_sum(*values: int) -> None:
        seen.append(("notify_sum", values))

    @svc.method
    def get_data() -> list[Any]:
        return ["hello", 5]

    @svc.method
    def ping() -> str:
        return "pong"

    return svc


class FakePeer:
    """The far end of a socketpair: raw frames in and out."""

    def __init__(self, s: socket.socket) -> None:
        self.s = s
        self.dec = FrameDecoder()
        self.ready: list[bytes] = []
        s.settimeout(10)

    def send_body(self, body: str | bytes) -> None:
        self.s.sendall(encode_frame(body.encode() if isinstance(body, str) else body))

    def send(self, obj: Any) -> None:
        self.send_body(json.dumps(obj))

    def recv(self) -> Any:
        while not self.ready:
            data = self.s.recv(65536)
            assert data, "the session closed the connection"
            self.ready += self.dec.feed(data)
        return json.loads(self.ready.pop(0))


@pytest.fixture
def fake_peer() -> Iterator[tuple[JsonRpcClient, FakePeer, list[Any]]]:
    ours, theirs = socket.socketpair()
    seen: list[Any] = []
    session = JsonRpcClient(_SockStream(ours), spec_service(seen), timeout=10)
    try:
        yield session, FakePeer(theirs), seen
    finally:
        session.close()
        theirs.close()


# (name, what the client sends, what the server answers; None: no response at all)
SECTION_7: list[tuple[str, str, Any]] = [
    (
        "positional 1",
        '{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}',
        {"jsonrpc": "2.0", "result": 19, "id": 1},
    ),
    (
        "positional 2",
        '{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}',
        {"jsonrpc": "2.0", "result": -19, "id": 2},
    ),
    (
        "named 1",
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42},'
        ' "id": 3}',
        {"jsonrpc": "2.0", "result": 19, "id": 3},
    ),
    (
        "named 2",
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23},'
        ' "id": 4}',
        {"jsonrpc": "2.0", "result": 19, "id": 4},
    ),
    (
        "notification update",
        '{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}',
        None,
    ),
    ("notification foobar", '{"jsonrpc": "2.0", "method": "foobar"}', None),
    (
        "non-existent method",
        '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
        {"jsonrpc": "2.0", "error": NOT_FOUND, "id": "1"},
    ),
    (
        "invalid JSON",
        '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
        {"jsonrpc": "2.0", "error": PARSE, "id": None},
    ),
    (
        "invalid Request object",
        '{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
        {"jsonrpc": "2.0", "error": INVALID, "id": None},
    ),
    (
        "batch, invalid JSON",
        '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        '{"jsonrpc": "2.0", "method"]',
        {"jsonrpc": "2.0", "error": PARSE, "id": None},
    ),
    ("empty array", "[]", {"jsonrpc": "2.0", "error": INVALID, "id": None}),
    ("invalid batch [1]", "[1]", [{"jsonrpc": "2.0", "error": INVALID, "id": None}]),
    (
        "invalid batch [1,2,3]",
        "[1,2,3]",
        [{"jsonrpc": "2.0", "error": INVALID, "id": None}] * 3,
    ),
    (
        "mixed batch",
        '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},'
        '{"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},'
        '{"foo": "boo"},'
        '{"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},'
        '{"jsonrpc": "2.0", "method": "get_data", "id": "9"}]',
        [
            {"jsonrpc": "2.0", "result": 7, "id": "1"},
            {"jsonrpc": "2.0", "result": 19, "id": "2"},
            {"jsonrpc": "2.0", "error": INVALID, "id": None},
            {"jsonrpc": "2.0", "error": NOT_FOUND, "id": "5"},
            {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"},
        ],
    ),
    (
        "all notifications",
        '[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
        '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]',
        None,
    ),
]


@pytest.mark.parametrize(
    ("sent", "expected"), [c[1:] for c in SECTION_7], ids=[c[0] for c in SECTION_7]
)
def test_every_example_of_the_spec_section_7_is_answered_exactly(
    fake_peer: tuple[JsonRpcClient, FakePeer, list[Any]], sent: str, expected: Any
) -> None:
    _, peer, _ = fake_peer
    peer.send_body(sent)
    # a request sent after it: its answer comes first exactly when the example gets none
    peer.send({"jsonrpc": "2.0", "method": "ping", "id": "after"})
    first = peer.recv()
    if expected is None:
        assert first == {"jsonrpc": "2.0", "result": "pong", "id": "after"}
        peer.send({"jsonrpc": "2.0", "method": "ping", "id": "again"})
        assert peer.recv() == {"jsonrpc": "2.0", "result": "pong", "id": "again"}
        return
    second = peer.recv()
    pong = {"jsonrpc": "2.0", "result": "pong", "id": "after"}
    # the two are answered concurrently: the example's answer is the one that is not pong
    assert pong in (first, second)
    answer = second if first == pong else first
    if isinstance(expected, list):  # a batch's responses may come in any order
        key = json.dumps
        assert sorted(answer, key=key) == sorted(expected, key=key)
    else:
        assert answer == expected


def test_hostile_bodies_get_parse_errors_and_the_session_goes_on(
    fake_peer: tuple[JsonRpcClient, FakePeer, list[Any]],
) -> None:
    _, peer, _ = fake_peer
    for body in (b"[" * 100_000, b"{" * 50_000, b'"\xff\xfe"', b"", b"1e999999"):
        peer.send_body(body)
        answer = peer.recv()
        if answer == {"jsonrpc": "2.0", "error": INVALID, "id": None}:
            assert body == b"1e999999"  # valid JSON (infinity), not a request
            continue
        assert answer == {"jsonrpc": "2.0", "error": PARSE, "id": None}, body[:10]
    peer.send({"jsonrpc": "2.0", "method": "ping", "id": 1})
    assert peer.recv() == {"jsonrpc": "2.0", "result": "pong", "id": 1}


def test_an_error_whose_data_json_cannot_carry_is_still_answered() -> None:
    ours, theirs = socket.socketpair()
    svc = rpc.Service("odd")

    @svc.method
    def odd() -> None:
        raise RemoteError("odd data", -32050, object())

    session = JsonRpcClient(_SockStream(ours), svc, timeout=10)
    peer = FakePeer(theirs)
    try:
        peer.send([{"jsonrpc": "2.0", "method": "odd", "id": 1}])
        peer.send({"jsonrpc": "2.0", "method": "odd", "id": 2})
        got = [peer.recv(), peer.recv()]
        batch = got[0] if isinstance(got[0], list) else got[1]
        single = got[1] if isinstance(got[0], list) else got[0]
        assert batch == [
            {"jsonrpc": "2.0", "error": {"code": -32050, "message": "odd data"}, "id": 1}
        ]
        assert single == {
            "jsonrpc": "2.0",
            "error": {"code": -32050, "message": "odd data"},
            "id": 2,
        }
    finally:
        session.close()
        theirs.close()


def test_malformed_responses_are_counted_and_never_answered(
    fake_peer: tuple[JsonRpcClient, FakePeer, list[Any]],
) -> None:
    session, peer, _ = fake_peer
    peer.send({"id": 1, "result": 2})  # no "jsonrpc"
    peer.send({"jsonrpc": "2.0", "id": 1, "result": 2, "error": NOT_FOUND})  # both
    peer.send({"jsonrpc": "2.0", "result": 2})  # no id
    peer.send([{"jsonrpc": "2.0", "error": PARSE}, {"jsonrpc": "2.0", "id": 99, "result": 0}])
    peer.send({"jsonrpc": "2.0", "method": "ping", "id": "next"})
    assert peer.recv() == {"jsonrpc": "2.0", "result": "pong", "id": "next"}
    assert session.errors == 5


def test_notifications_ran_and_nothing_outside_the_service_did(
    fake_peer: tuple[JsonRpcClient, FakePeer, list[Any]],
) -> None:
    session, peer, seen = fake_peer
    for _, sent, _ in SECTION_7:
        peer.send_body(sent)
    peer.send({"jsonrpc": "2.0", "method": "__class__", "id": 10})
    peer.send({"jsonrpc": "2.0", "method": "subtract", "params": [1, "2"], "id": 11})
    peer.send({"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 1}, "id": 12})
    answers: dict[Any, Any] = {}
    while not {10, 11, 12} <= answers.keys():
        got = peer.recv()
        for one in got if isinstance(got, list) else [got]:
            answers[one["id"]] = one
    assert answers[10]["error"] == NOT_FOUND
    assert answers[11]["error"]["code"] == -32602 and "invalid" in answers[11]["error"]["data"]
    assert answers[12]["error"]["code"] == -32602
    assert ("update", (1, 2, 3, 4, 5)) in seen
    assert ("notify_sum", (1, 2, 4)) in seen
    assert seen.count(("notify_hello", (7,))) == 2
    assert session.errors >= 8


def test_a_malformed_header_ends_the_session_and_fails_calls_in_flight(
    fake_peer: tuple[JsonRpcClient, FakePeer, list[Any]],
) -> None:
    session, peer, _ = fake_peer
    box: list[BaseException] = []

    def call() -> None:
        try:
            session.call("anything", 1)
        except BaseException as exc:
            box.append(exc)

    t = threading.Thread(target=call)
    t.start()
    assert peer.recv()["method"] == "anything"
    peer.s.sendall(b"Content-Length: lots\r\n\r\n")
    t.join(10)
    assert len(box) == 1 and isinstance(box[0], FrameError) and "not a number" in str(box[0])
    with pytest.raises(FrameError):
        session.call("again")


def test_the_client_side_positional_named_notify_batch_and_errors(
    fake_peer: tuple[JsonRpcClient, FakePeer, list[Any]],
) -> None:
    session, peer, _ = fake_peer
    out: list[Any] = []

    def client() -> None:
        out.append(session.call("subtract", 42, 23))
        out.append(session.call("subtract", minuend=42, subtrahend=23))
        session.notify("update", 1, 2)
        session.notify("initialized")
        out.append(session.call_batch([("sum", [1, 2]), ("nope", None), ("get", {"k": 1})]))
        try:
            session.call("nope")
        except RemoteError as exc:
            out.append(exc)

    t = threading.Thread(target=client)
    t.start()
    req = peer.recv()
    assert req == {"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": req["id"]}
    peer.send({"jsonrpc": "2.0", "result": 19, "id": req["id"]})
    req = peer.recv()
    assert req["params"] == {"minuend": 42, "subtrahend": 23}
    peer.send({"jsonrpc": "2.0", "result": 19, "id": req["id"]})
    assert peer.recv() == {"jsonrpc": "2.0", "method": "update", "params": [1, 2]}
    assert peer.recv() == {"jsonrpc": "2.0", "method": "initialized"}  # no params: left out
    batch = peer.recv()
    assert [m["method"] for m in batch] == ["sum", "nope", "get"]
    assert "params" not in batch[1] and batch[2]["params"] == {"k": 1}
    peer.send(  # answered out of order, as the spec allows
        [
            {"jsonrpc": "2.0", "result": {"v": 1}, "id": batch[2]["id"]},
            {"jsonrpc": "2.0", "error": NOT_FOUND, "id": batch[1]["id"]},
            {"jsonrpc": "2.0", "result": 3, "id": batch[0]["id"]},
        ]
    )
    req = peer.recv()
    peer.send(
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "no", "data": 7}, "id": req["id"]}
    )
    t.join(10)
    assert out[:2] == [19, 19]
    assert out[2][0] == 3 and out[2][2] == {"v": 1}
    assert isinstance(out[2][1], RemoteError) and out[2][1].code == -32601
    assert isinstance(out[3], RemoteError) and (out[3].code, out[3].data) == (-32601, 7)
    with pytest.raises(TypeError, match="not both"):
        session.call("subtract", 1, subtrahend=2)


def test_requests_in_flight_are_bounded_and_the_excess_refused_without_running() -> None:
    ours, theirs = socket.socketpair()
    rec = Recorder()
    session = JsonRpcClient(_SockStream(ours), calc_service(rec), timeout=10, max_in_flight=2)
    peer = FakePeer(theirs)
    try:
        for n in (1, 2):
            peer.send({"jsonrpc": "2.0", "method": "block", "params": [f"b{n}"], "id": n})
        deadline = time.monotonic() + 10
        while rec.concurrent < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        peer.send({"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 3})
        peer.send({"jsonrpc": "2.0", "method": "log", "params": ["dropped"]})
        peer.send([{"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 4}])
        assert peer.recv() == {
            "jsonrpc": "2.0",
            "error": {"code": -32004, "message": "over 2 requests in flight on this connection"},
            "id": 3,
        }
        assert peer.recv()["error"]["code"] == -32004  # the batch, as one
        rec.event("b1").set()
        rec.event("b2").set()
        assert {peer.recv()["id"], peer.recv()["id"]} == {1, 2}
        peer.send({"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 5})
        assert peer.recv() == {"jsonrpc": "2.0", "result": 3, "id": 5}
        assert rec.ran == ["add"] and session.errors == 3
    finally:
        session.close()
        theirs.close()


# -- two buzon sessions: both roles, cancellation ---------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[JsonRpcClient, JsonRpcClient, Recorder]]:
    a, b = socket.socketpair()
    rec = Recorder()
    svc = calc_service(rec)

    @svc.method
    def ask_back(x: int) -> int:
        return int(left.call("add", x, 1)) * 10  # a callback into the caller, while it waits

    left = JsonRpcClient(_SockStream(a), calc_service(Recorder()), timeout=10)
    right = JsonRpcClient(_SockStream(b), svc, timeout=10)
    try:
        yield left, right, rec
    finally:
        left.close()
        right.close()


def test_both_roles_on_one_connection_with_a_nested_callback(
    pair: tuple[JsonRpcClient, JsonRpcClient, Recorder],
) -> None:
    left, right, _ = pair
    assert left.add(2, 3) == 5
    assert right.call("add", a=2, b=40) == 42
    assert left.call("ask_back", 4) == 50
    assert left.call("kw", 1, 2, 3, 4) == 10
    with pytest.raises(RemoteError) as info:
        left.call("fails", "boom")
    assert info.value.code == RemoteError.SERVER_ERROR and "boom" in info.value.message


def test_an_expired_deadline_sends_cancel_request_and_the_handler_sees_it(
    pair: tuple[JsonRpcClient, JsonRpcClient, Recorder],
) -> None:
    left, _, rec = pair
    with rpc.deadline(0.3), pytest.raises(buzon.DeadlineExceeded, match="cancel sent"):
        left.call("block", "slow")
    assert rec.event("slow:cancelled").wait(10)  # the handler saw context().cancelled
    assert rec.cancelled == ["slow"]
    assert left.add(1, 1) == 2  # the late answer to the cancelled call is dropped


def test_cancel_request_is_the_lsp_notification_with_the_id(
    fake_peer: tuple[JsonRpcClient, FakePeer, list[Any]],
) -> None:
    session, peer, _ = fake_peer
    with rpc.deadline(0.2), pytest.raises(buzon.DeadlineExceeded):
        session.call("slow")
    req = peer.recv()
    cancel = peer.recv()
    assert cancel == {"jsonrpc": "2.0", "method": CANCEL_METHOD, "params": {"id": req["id"]}}


def test_served_with_rpc_server_over_unix(runtime_dir: str) -> None:
    rec = Recorder()
    with (
        serving("unix:jrpc", calc_service(rec), wire="jsonrpc") as srv,
        rpc.connect(srv.address, wire="jsonrpc", timeout=10) as c,
    ):
        assert c.add(20, 22) == 42
        assert c.call_batch([("add", [1, 2]), ("echo", {"value": "x"})]) == [3, "x"]
        with pytest.raises(RemoteError) as info:
            c.call("add", 1, "x")
        assert info.value.code == -32602
        with rpc.deadline(0.3), pytest.raises(buzon.DeadlineExceeded):
            c.call("block", "served")
        assert rec.event("served:cancelled").wait(10)
    # a server shut down with a client still connected: the client's call fails
    with serving("unix:jrpc3", calc_service(rec), wire="jsonrpc", grace=0.5) as srv:
        c = rpc.connect(srv.address, wire="jsonrpc", timeout=10)
        assert c.add(1, 2) == 3
    try:
        with pytest.raises(buzon.BuzonError):
            for _ in range(100):  # the close may take a moment to be seen
                c.add(1, 2)
                time.sleep(0.05)
    finally:
        c.close()
    with pytest.raises(buzon.UnsupportedOperation, match="at-most-once"):
        rpc.connect("unix:jrpc", wire="jsonrpc", semantics="exactly_once")
    with pytest.raises(buzon.UnsupportedOperation, match="at-most-once"):
        rpc.Server("unix:jrpc2", calc_service(rec), wire="jsonrpc", semantics="exactly_once")


# -- python-lsp-server -------------------------------------------------------------------


@needs_pylsp
def test_pylsp_initialize_unknown_method_shutdown_exit() -> None:
    assert PYLSP is not None
    ls = rpc.connect_process([PYLSP], wire="jsonrpc", timeout=60)
    try:
        result = ls.call("initialize", processId=os.getpid(), rootUri=None, capabilities={})
        assert isinstance(result["capabilities"], dict) and result["capabilities"]
        ls.notify("initialized")
        with pytest.raises(RemoteError) as info:
            ls.call("buzon/noSuchMethod", x=1)
        assert info.value.code == -32601
        assert ls.call("shutdown") is None
        ls.notify("exit")
        proc = ls._stream.proc  # type: ignore[attr-defined]
        end = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        assert proc.returncode == 0  # pylsp exits by itself after shutdown + exit
    finally:
        ls.close()
