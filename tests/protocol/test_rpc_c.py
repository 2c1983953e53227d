"""protocol/_rpc.c: the RPC messages' common case framed in C is byte for byte the frame
the reference path writes (the codec's msgpack body, ``encode_frame`` with the header
fields), and anything it does not handle is left to that path (None), never framed
differently."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from _rpc_once_ref import reference_once
from hypothesis import given, settings
from hypothesis import strategies as st

from buzon.codec import Codec
from buzon.protocol import _rpc
from buzon.protocol.frames import Field, Kind, encode_frame
from buzon.rpc import _wire as w

_CODEC = Codec()


def _reference(body: list[Any], fields: dict[int, bytes]) -> bytes:
    codec, payload, buffers = _CODEC.encode(body)
    assert not buffers
    return b"".join(bytes(b) for b in encode_frame(Kind.DATA, codec, payload, fields=fields))


def _request_ref(method: str, args: list[Any], call_id: int, ms: int) -> bytes:
    fields = {int(Field.MESSAGE_ID): w.id_field(call_id)}
    if ms >= 0:
        fields[int(Field.DEADLINE)] = ms.to_bytes(4, "little")
    return _reference([w.REQUEST, method, args], fields)


def _reply_ref(call_id: int, result: Any) -> bytes:
    return _reference([w.REPLY, None, result], {int(Field.CORRELATION): w.id_field(call_id)})


_INT_EDGES = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
    2**63 - 1, 2**63, 2**64 - 1, -1, -31, -32, -33, -127, -128, -129, -32767, -32768,
    -32769, -(2**31), -(2**31) - 1, -(2**63),
]  # fmt: skip
_PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from(_INT_EDGES),
    st.floats(allow_nan=False),
    st.text(max_size=300),
    st.binary(max_size=300),
)


@settings(max_examples=400, deadline=None)
@given(
    method=st.text(min_size=1, max_size=40),
    args=st.lists(_PLAIN, max_size=20),
    call_id=st.integers(min_value=0, max_value=2**64 - 1),
    ms=st.one_of(st.just(-1), st.integers(min_value=0, max_value=2**32 - 1)),
    as_tuple=st.booleans(),
)
def test_a_request_is_the_reference_frame(
    method: str, args: list[Any], call_id: int, ms: int, as_tuple: bool
) -> None:
    got = _rpc.request(method, tuple(args) if as_tuple else args, call_id, ms)
    assert got == _request_ref(method, args, call_id, ms)


@settings(max_examples=400, deadline=None)
@given(result=_PLAIN, call_id=st.integers(min_value=0, max_value=2**64 - 1))
def test_a_reply_is_the_reference_frame(result: Any, call_id: int) -> None:
    assert _rpc.reply(call_id, result) == _reply_ref(call_id, result)


@pytest.mark.parametrize("value", [*_INT_EDGES, 0.0, -0.0, math.inf, 1e300, "é" * 40])
def test_edges_are_the_reference_frame(value: Any) -> None:
    assert _rpc.reply(7, value) == _reply_ref(7, value)
    assert _rpc.request("m", [value, value], 7, 5) == _request_ref("m", [value, value], 7, 5)


def test_nan_decodes_the_same() -> None:
    got = _rpc.reply(1, math.nan)
    assert got is not None
    assert math.isnan(msgspec.msgpack.decode(got[20:])[2])


class _Int(int):
    pass


class _Str(str):
    pass


@pytest.mark.parametrize(
    "value",
    [
        2**64,  # past 64 bits: the codec's error
        -(2**63) - 1,
        "\ud800",  # a lone surrogate: the codec's error
        _Int(3),  # subclasses: the codec decides (enums, enc_hook)
        _Str("x"),
        [1],  # containers: references may hide inside
        {"a": 1},
        (1,),
        bytearray(b"x"),
        object(),
        "x" * 5000,  # past the small frame
        b"x" * 5000,
    ],
)
def test_what_is_not_plain_is_left_to_the_codec(value: Any) -> None:
    assert _rpc.reply(1, value) is None
    assert _rpc.request("m", [1, value], 1, -1) is None


def test_a_request_needs_a_str_method_and_a_sequence_of_args() -> None:
    assert _rpc.request(_Str("m"), [], 1, -1) is None
    assert _rpc.request(b"m", [], 1, -1) is None  # type: ignore[arg-type]
    assert _rpc.request("m", iter([1]), 1, -1) is None  # type: ignore[arg-type]
    assert _rpc.request("m", [1] * 70000, 1, -1) is None  # past the small frame


def test_a_deadline_past_u32_is_clamped() -> None:
    assert _rpc.request("m", [], 1, 2**40) == _request_ref("m", [], 1, 2**32 - 1)


def test_bad_ids_raise() -> None:
    with pytest.raises(OverflowError):
        _rpc.reply(-1, 1)
    with pytest.raises(OverflowError):
        _rpc.request("m", [], 2**64, -1)
    with pytest.raises(TypeError):
        _rpc.reply(1)  # type: ignore[call-arg]


# -- the way back: parse / parse_parts ------------------------------------------------


def _reference_parse(data: bytes) -> tuple[Any, ...] | None:
    """What the channel's decoder and the RPC checks make of a frame, in the shape
    ``parse`` gives for the common case (None: not the common case)."""
    from buzon.protocol.frames import parse_frame

    try:
        frame = parse_frame(data, 1 << 20)
        body = msgspec.msgpack.decode(frame.body)
    except Exception:
        return None
    fields = frame.fields or {}
    if frame.codec != 1 or frame.buffers or frame.receipt or type(body) is not list:
        return None
    if len(body) == 5:
        return reference_once(data)  # an exactly-once request: test_rpc_once_c.py
    if len(body) != 3:
        return None
    plain = (int, float, str, bytes, bool, type(None))
    ident = fields.get(int(Field.MESSAGE_ID))
    corr = fields.get(int(Field.CORRELATION))
    if body[0] == 1 and body[1] is None and type(body[2]) in plain:
        if corr is None or len(corr) != 8 or int.from_bytes(corr, "little") >= 2**63:
            return None
        return (1, int.from_bytes(corr, "little"), -1, body[2], None)
    if (
        body[0] == 0
        and type(body[1]) is str
        and type(body[2]) is list
        and all(type(a) in plain for a in body[2])
    ):
        if ident is None or len(ident) != 8 or int.from_bytes(ident, "little") >= 2**63:
            return None
        ms = fields.get(int(Field.DEADLINE))
        ms_value = int.from_bytes(ms, "little") if ms is not None and len(ms) == 4 else -1
        return (0, int.from_bytes(ident, "little"), ms_value, body[1], body[2])
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(
    method=st.text(max_size=40),
    args=st.lists(_PLAIN, max_size=20),
    call_id=st.integers(min_value=0, max_value=2**63 - 1),
    ms=st.one_of(st.just(-1), st.integers(min_value=0, max_value=2**32 - 1)),
    result=_PLAIN,
)
def test_parse_gives_what_the_reference_decoder_gives(
    method: str, args: list[Any], call_id: int, ms: int, result: Any
) -> None:
    for data in (_request_ref(method, args, call_id, ms), _reply_ref(call_id, result)):
        ref = _reference_parse(data)
        assert ref is not None
        assert _same(_rpc.parse(data, 1 << 20), ref)
        from buzon.protocol.frames import parse_frame

        frame = parse_frame(data, 1 << 20)
        assert _same(_rpc.parse_parts(frame.fields, frame.body), ref)


@settings(max_examples=500, deadline=None)
@given(
    result=_PLAIN,
    cut=st.integers(min_value=0, max_value=200),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
)
def test_parse_of_damaged_frames_is_none_or_the_reference(
    result: Any, cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(_reply_ref(5, result) if cut % 2 else _request_ref("m", [result], 5, 9))
    for at, value in flips:
        if at < len(data):
            data[at] = value
    data = data[: max(0, len(data) - cut % 7)]
    got = _rpc.parse(bytes(data), 1 << 20)
    if got is not None:  # only ever what the general path makes of it
        assert _same(got, _reference_parse(bytes(data)))


def test_parse_leaves_other_shapes_to_the_general_path() -> None:
    assert _rpc.parse(_reply_ref(1, 2), 10) is None  # past max_frame
    assert _rpc.parse(_reference([1, None, [1]], {3: w.id_field(1)}), 1 << 20) is None
    assert _rpc.parse(_reference([1, [1, "e", None], None], {3: w.id_field(1)}), 1 << 20) is None
    assert _rpc.parse(_reference([0, "m", [1]], {3: w.id_field(1)}), 1 << 20) is None  # no id
    assert _rpc.parse(_reference([0, "m", [1], None], {1: w.id_field(1)}), 1 << 20) is None
    assert _rpc.parse(_reference([0, ["x", 1], [1]], {1: w.id_field(1)}), 1 << 20) is None
    assert _rpc.parse(_reference([2, "m", [1]], {1: w.id_field(1)}), 1 << 20) is None
    assert _rpc.parse(_reference([0, "m", [1]], {1: w.id_field(2**63)}), 1 << 20) is None
    receipt = bytearray(_reply_ref(1, 2))
    receipt[2] |= 0x08
    assert _rpc.parse(bytes(receipt), 1 << 20) is None
    assert _rpc.parse(b"", 1 << 20) is None
    assert _rpc.parse_parts(None, b"") is None  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _rpc.parse("not a buffer", 1 << 20)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    args=st.lists(_PLAIN, max_size=8),
    client=st.binary(min_size=1, max_size=64),
    seq=st.integers(min_value=1, max_value=2**63 - 1),
    call_id=st.integers(min_value=0, max_value=2**64 - 1),
    ms=st.one_of(st.just(-1), st.integers(min_value=0, max_value=2**32 - 1)),
)
def test_an_exactly_once_request_is_the_reference_frame(
    args: list[Any], client: bytes, seq: int, call_id: int, ms: int
) -> None:
    key = [client, seq, seq - 1]
    fields = {int(Field.MESSAGE_ID): w.id_field(call_id)}
    if ms >= 0:
        fields[int(Field.DEADLINE)] = ms.to_bytes(4, "little")
    ref = _reference([w.REQUEST, "m", args, None, key], fields)
    assert _rpc.request("m", args, call_id, ms, key) == ref
    assert _rpc.request("m", args, call_id, ms, None) == _request_ref("m", args, call_id, ms)
    assert _same(_rpc.parse(ref, 1 << 20), reference_once(ref))  # test_rpc_once_c.py


def test_a_key_that_is_not_plain_is_left_to_the_codec() -> None:
    assert _rpc.request("m", [1], 1, -1, [b"c", [1], 0]) is None
    assert _rpc.request("m", [1], 1, -1, {"a": 1}) is None  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    result=_PLAIN,
    call_id=st.integers(min_value=0, max_value=2**63 - 1),
    tail=st.binary(max_size=40),
    cut=st.integers(min_value=0, max_value=8),
)
def test_parse_of_a_buffer_prefix_is_parse_of_those_bytes(
    result: Any, call_id: int, tail: bytes, cut: int
) -> None:
    """``parse(buf, max_frame, n)`` (a stream's read buffer, the channel's hook) reads
    exactly ``buf[:n]``: the bytes after it never change the answer, and a frame cut
    short or followed by more bytes is not one whole frame (None)."""
    frame = _rpc.reply(call_id, result)
    assert frame is not None
    buf = bytearray(frame + tail)
    assert _rpc.parse(buf, 1 << 20, len(frame)) == _rpc.parse(frame, 1 << 20)
    assert _rpc.parse(buf, 1 << 20, len(frame)) == (w.REPLY, call_id, -1, result, None) or (
        isinstance(result, float) and math.isnan(result)
    )
    if tail:
        assert _rpc.parse(buf, 1 << 20, len(buf)) is None  # two frames' worth: not one
    assert _rpc.parse(buf, 1 << 20, max(0, len(frame) - 1 - cut)) is None


def test_parse_refuses_a_length_past_the_buffer() -> None:
    frame = _rpc.reply(1, 2)
    assert frame is not None
    with pytest.raises(ValueError):
        _rpc.parse(frame, 1 << 20, len(frame) + 1)
    with pytest.raises(ValueError):
        _rpc.parse(frame, 1 << 20, -1)
    assert _rpc.parse(frame, len(frame) - 1, len(frame)) is None  # the frame cap holds
