"""protocol/_rpc.c, its exactly-once block: ``parse`` / ``parse_parts`` of an
exactly-once request give what the general path (the channel's decoder, the server's
checks of the key, the completion table's ``_digest``) makes of it, or None (the
general path decides); never anything else. ``enc`` is the msgpack of ``[method,
args, None]`` as msgspec writes it, whatever encoding the wire used, so a retry gets
the same digest on either path."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgspec
import pytest
from _rpc_once_ref import reference_once
from hypothesis import given, settings
from hypothesis import strategies as st

from buzon.codec import Codec
from buzon.protocol import _rpc
from buzon.protocol.frames import Field, Kind, encode_frame, parse_frame
from buzon.rpc import _wire as w
from buzon.rpc._completion import _digest, _digest_of

_CODEC = Codec()

_PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=300),
    st.binary(max_size=300),
)


def _fields(call_id: int, ms: int) -> dict[int, bytes]:
    fields = {int(Field.MESSAGE_ID): w.id_field(call_id)}
    if ms >= 0:
        fields[int(Field.DEADLINE)] = ms.to_bytes(4, "little")
    return fields


def _frame(body_bytes: bytes, fields: dict[int, bytes]) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(Kind.DATA, 1, body_bytes, fields=fields))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _both(data: bytes) -> tuple[Any, Any]:
    frame = parse_frame(data, 1 << 20)
    return _rpc.parse(data, 1 << 20), _rpc.parse_parts(frame.fields or {}, frame.body)


_KEYS = st.tuples(
    st.binary(min_size=1, max_size=64),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2**64 - 1),
).map(lambda k: [k[0], max(k[1], k[2]), min(k[1], k[2])])


@settings(max_examples=300, deadline=None)
@given(
    method=st.text(max_size=40),
    args=st.lists(_PLAIN, max_size=20),
    key=_KEYS,
    call_id=st.integers(min_value=0, max_value=2**63 - 1),
    ms=st.one_of(st.just(-1), st.integers(min_value=0, max_value=2**32 - 1)),
)
def test_an_exactly_once_request_parses_as_the_general_path_reads_it(
    method: str, args: list[Any], key: list[Any], call_id: int, ms: int
) -> None:
    data = _rpc.request(method, args, call_id, ms, key)
    assert data is not None
    ref = reference_once(data)
    assert ref is not None
    for got in _both(data):
        assert _same(got, ref)
        body = msgspec.msgpack.decode(parse_frame(data, 1 << 20).body)
        assert _digest_of(got[4][4]) == _digest(body)  # the table's digest, either path


# -- encodings msgspec does not write, but decodes: the same values, the same enc ---


def _enc_int(x: int, wide: int) -> bytes:
    forms: list[bytes] = []
    if 0 <= x < 128:
        forms.append(bytes([x]))
    if -32 <= x < 0:
        forms.append(struct.pack(">b", x))
    for tag, fmt, lo, hi in (
        (0xCC, ">B", 0, 2**8 - 1),
        (0xCD, ">H", 0, 2**16 - 1),
        (0xCE, ">I", 0, 2**32 - 1),
        (0xCF, ">Q", 0, 2**64 - 1),
        (0xD0, ">b", -(2**7), 2**7 - 1),
        (0xD1, ">h", -(2**15), 2**15 - 1),
        (0xD2, ">i", -(2**31), 2**31 - 1),
        (0xD3, ">q", -(2**63), 2**63 - 1),
    ):
        if lo <= x <= hi:
            forms.append(bytes([tag]) + struct.pack(fmt, x))
    return forms[wide % len(forms)]


def _enc_len(n: int, small: int | None, tags: tuple[int, int, int], wide: int) -> bytes:
    forms = [] if small is None else [bytes([small | n])]
    for tag, fmt in zip(tags, (">B", ">H", ">I"), strict=True):
        if n < 2 ** (8 * struct.calcsize(fmt)):
            forms.append(bytes([tag]) + struct.pack(fmt, n))
    return forms[wide % len(forms)]


def _enc(v: Any, wide: int) -> bytes:
    if v is None:
        return b"\xc0"
    if v is True or v is False:
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        return _enc_int(v, wide)
    if isinstance(v, float):
        try:
            single = struct.pack(">f", v)
        except OverflowError:
            single = b""
        if wide % 2 and single and (math.isnan(v) or struct.unpack(">f", single)[0] == v):
            return b"\xca" + single
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        raw = v.encode()
        small = 0xA0 if len(raw) < 32 else None
        return _enc_len(len(raw), small, (0xD9, 0xDA, 0xDB), wide) + raw
    assert isinstance(v, bytes)
    return _enc_len(len(v), None, (0xC4, 0xC5, 0xC6), wide) + v


def _enc_array(items: list[bytes], wide: int) -> bytes:
    n = len(items)
    forms = [bytes([0x90 | n])] if n < 16 else []
    forms += [b"\xdc" + struct.pack(">H", n), b"\xdd" + struct.pack(">I", n)]
    return forms[wide % len(forms)] + b"".join(items)


@settings(max_examples=300, deadline=None)
@given(
    method=st.text(max_size=40),
    args=st.lists(_PLAIN, max_size=18),
    key=_KEYS,
    widths=st.lists(st.integers(min_value=0, max_value=7), min_size=26, max_size=26),
)
def test_an_unusual_encoding_gives_the_same_values_and_enc(
    method: str, args: list[Any], key: list[Any], widths: list[int]
) -> None:
    body = (
        b"\x95\x00"
        + _enc(method, widths[0])
        + _enc_array([_enc(a, widths[2 + i]) for i, a in enumerate(args)], widths[1])
        + b"\xc0"
        + _enc_array([_enc(k, widths[21 + i]) for i, k in enumerate(key)], widths[20])
    )
    data = _frame(body, _fields(9, 250))
    ref = reference_once(data)
    assert ref is not None
    for got in _both(data):
        assert _same(got, ref)  # enc: msgspec's encoding, not the wire's bytes


@settings(max_examples=500, deadline=None)
@given(
    arg=_PLAIN,
    cut=st.integers(min_value=0, max_value=200),
    flips=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=4),
)
def test_a_damaged_request_parses_as_none_or_as_the_general_path_reads_it(
    arg: Any, cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(_rpc.request("m", [arg], 5, 9 if cut % 2 else -1, [b"cid", 7, 3]) or b"")
    for at, value in flips:
        if at < len(data):
            data[at] = value
    data = data[: max(0, len(data) - cut % 7)]
    got = _rpc.parse(bytes(data), 1 << 20)
    if got is not None and got[0] == w.ONCE:
        assert _same(got, reference_once(bytes(data)))


def _body(*items: Any) -> bytes:
    return msgspec.msgpack.encode(list(items))


@pytest.mark.parametrize(
    "body",
    [
        _body(0, "m", [1], {}, [b"c", 1, 1]),  # keywords: not nil
        _body(0, "m", [1], None, [b"c", 1]),  # a key of two
        _body(0, "m", [1], None, [b"c", 1, 1, 1]),
        _body(0, "m", [1], None, [b"", 1, 1]),  # an empty client id
        _body(0, "m", [1], None, [b"c" * 65, 1, 1]),
        _body(0, "m", [1], None, ["c", 1, 1]),  # a str client id
        _body(0, "m", [1], None, [b"c", True, 1]),  # a bool is not a sequence number
        _body(0, "m", [1], None, [b"c", 1, False]),
        _body(0, "m", [1], None, [b"c", 1, 2]),  # acknowledged past itself
        _body(0, "m", [1], None, [b"c", 1, -1]),
        _body(0, "m", [1], None, [b"c", -2, -3]),
        _body(0, "m", [1], None, [b"c", 1.0, 1]),
        _body(0, "m", [[1]], None, [b"c", 1, 1]),  # an argument not plain
        _body(0, ["x", 1], [1], None, [b"c", 1, 1]),  # a remote object's method
        _body(0, "m", {"a": 1}, None, [b"c", 1, 1]),
        _body(2, "m", [1], None, [b"c", 1, 1]),  # a notify
        _body(1, None, 1, None, [b"c", 1, 1]),
        _body(0, "m", [b"x" * 5000], None, [b"c", 1, 1]),  # past what C re-encodes
    ],
)
def test_other_five_element_bodies_are_left_to_the_general_path(body: bytes) -> None:
    data = _frame(body, _fields(3, -1))
    assert _both(data) == (None, None)


def test_a_request_without_a_call_id_is_left_to_the_general_path() -> None:
    body = _body(0, "m", [1], None, [b"c", 1, 1])
    assert _both(_frame(body, {int(Field.CORRELATION): w.id_field(1)})) == (None, None)
    assert _both(_frame(body, {int(Field.MESSAGE_ID): w.id_field(2**63)})) == (None, None)


def test_as_message_gives_the_general_path_the_request_back() -> None:
    data = _rpc.request("m", [1, "a"], 4, 70, [b"c", 3, 2])
    got = _rpc.parse(data or b"", 1 << 20)
    assert got is not None
    body, fields = w.as_message(*got)
    assert body == [0, "m", [1, "a"], None, [b"c", 3, 2]]
    assert fields == _fields(4, 70)
