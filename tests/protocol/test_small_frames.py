"""The channel core's small frames come from protocol/frames.py (``data_frame``,
``plain_data_flags``, ``loan_header``, ``frame_length``): byte for byte what the
general encoder writes and what the general parser accepts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buzon.errors import FrameError, FrameTooLarge
from buzon.protocol.frames import (
    CHUNKED_FLAG,
    DEFAULT_MAX_FRAME,
    Kind,
    data_frame,
    encode_frame,
    frame_length,
    loan_header,
    parse_frame,
    plain_data_flags,
)


def _joined(kind: int, flags: int, body: bytes, **kw: object) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(kind, flags, body, **kw))  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.sampled_from([0, 1, 2, 3, 8, 9, 10, 11]))
def test_data_frame_is_what_encode_frame_writes(body: bytes, flags: int) -> None:
    frame = data_frame(body, flags)
    assert type(frame) is bytes
    assert frame == _joined(Kind.DATA, flags, body)
    assert plain_data_flags(frame, DEFAULT_MAX_FRAME) == flags
    parsed = parse_frame(frame)
    assert (parsed.codec, bytes(parsed.body), parsed.receipt) == (flags & 7, body, flags > 7)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_data_frame_takes_any_buffer(wrap: type) -> None:
    assert data_frame(wrap(b"abc"), 1) == b"\x01\x01\x01\x00\x03\x00\x00\x00abc"
    assert plain_data_flags(wrap(data_frame(b"abc", 1)), 100) == 1


def test_data_frame_refuses_what_is_not_a_frame() -> None:
    with pytest.raises(ValueError):
        data_frame(b"x", 256)
    with pytest.raises(ValueError):
        data_frame(b"x", -1)
    with pytest.raises(TypeError):
        data_frame("text", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        plain_data_flags("text", 100)  # type: ignore[arg-type]


def test_plain_data_flags_leaves_everything_else_to_the_general_path() -> None:
    plain = data_frame(b"body", 0)
    assert plain_data_flags(plain, len(plain)) == 0  # the cap is inclusive
    not_plain = [
        plain[:-1],  # shorter than announced
        plain + b"x",  # longer
        plain[:7],  # shorter than a header
        b"",
        b"\x02" + plain[1:],  # another version
        plain[:1] + b"\x06" + plain[2:],  # another kind
        plain[:2] + bytes([4]) + plain[3:],  # codec 4: unknown
        plain[:2] + bytes([CHUNKED_FLAG]) + plain[3:],
        _joined(Kind.DATA, 0, b"f", fields={1: b"12345678"}),
        _joined(Kind.DATA, 0, b"", buffers=[memoryview(b"buf")]),
        _joined(Kind.CREDIT, 0, bytes(16)),
    ]
    for msg in not_plain:
        assert plain_data_flags(msg, DEFAULT_MAX_FRAME) == -1, msg
    assert plain_data_flags(plain, len(plain) - 1) == -1  # over the cap


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=40))
def test_plain_data_flags_never_accepts_what_parse_frame_refuses(msg: bytes) -> None:
    flags = plain_data_flags(msg, DEFAULT_MAX_FRAME)
    if flags < 0:
        return
    frame = parse_frame(msg)
    assert frame.kind == Kind.DATA and not frame.buffers and frame.fields is None
    assert (frame.codec, bytes(frame.body), frame.receipt) == (flags & 7, msg[8:], flags > 7)


@pytest.mark.parametrize(
    "frame",
    [
        _joined(Kind.DATA, 1, b"body"),
        _joined(Kind.DATA, 0, b"b", buffers=[memoryview(b"12"), memoryview(b"345")]),
        _joined(Kind.DATA, 2, b"x" * 300, fields={1: b"12345678", 5: b"unix:/x"}),
        _joined(Kind.CREDIT, 0, bytes(16)),
        _joined(Kind.HELLO, 1, b""),
    ],
)
def test_frame_length_is_the_encoded_length(frame: bytes) -> None:
    assert frame_length(frame) == len(frame)
    assert frame_length(frame, len(frame)) == len(frame)
    with pytest.raises(FrameTooLarge):
        frame_length(frame, len(frame) - 1)
    # too short to tell: -1 until the header region is there, then the length
    assert frame_length(frame[:7]) == -1
    told = [frame_length(memoryview(frame)[:n]) for n in range(len(frame) + 1)]
    first = told.index(len(frame))  # the header region is there: the payload is not read
    assert first >= 8 and set(told[:first]) == {-1} and set(told[first:]) == {len(frame)}


@pytest.mark.parametrize("garbage", [b"\x00" * 8, b"\x01\xff\x00\x00\x00\x00\x00\x00"])
def test_frame_length_refuses_what_is_not_a_header(garbage: bytes) -> None:
    with pytest.raises(FrameError):
        frame_length(garbage)


@pytest.mark.parametrize("n", [0, 1, 4096, 1 << 33])
def test_loan_header_announces_one_raw_buffer(n: int) -> None:
    head = loan_header(n)
    assert len(head) == 16 and frame_length(head, 1 << 40) == 16 + n
    if n <= 4096:
        frame = parse_frame(head + b"z" * n)
        assert frame.kind == Kind.DATA and frame.codec == 0 and bytes(frame.body) == b""
        assert [bytes(b) for b in frame.buffers] == [b"z" * n]
