"""protocol/_rpc.c: the RPC messages' common case framed in C is byte for byte the frame
the reference path writes (the codec's msgpack body, ``encode_frame`` with the header
fields), and anything it does not handle is left to that path (None), never framed
differently."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
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
