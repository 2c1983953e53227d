"""protocol/_fields.c: DATA frames with header fields decoded in C agree with the Python
decoder (the reference), and anything malformed still gets the Python decoder's error."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from buzon.errors import FrameError
from buzon.protocol import frames
from buzon.protocol.frames import Field, Frame, FrameDecoder, Kind, encode_frame, parse_frame


def _frame(
    codec: int, body: bytes, fields: dict[int, bytes] | None, receipt: bool = False
) -> bytes:
    data = bytearray(
        b"".join(bytes(b) for b in encode_frame(Kind.DATA, codec, body, fields=fields))
    )
    if receipt:
        data[2] |= 0x08  # the sender asks for a receipt
    return bytes(data)


def _shape(item: Any) -> tuple[Any, ...]:
    if type(item) is tuple:
        return ("plain", item[0], bytes(item[1]))
    assert isinstance(item, Frame)
    return (
        "frame",
        item.kind,
        item.codec,
        bytes(item.body),
        [bytes(b) for b in item.buffers],
        item.receipt,
        item.fields,
    )


def _decode(data: bytes, chunk: int, c: bool, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    with monkeypatch.context() as m:
        if not c:
            m.setattr(frames, "_fields_run", None)
        dec = FrameDecoder(read_size=4096)
        for i in range(0, len(data), chunk):
            dec.feed(data[i : i + chunk])
        return [_shape(f) for f in dec.frames]


def _random_frames(rng: random.Random, n: int) -> Iterator[bytes]:
    for _ in range(n):
        body = rng.randbytes(rng.choice([0, 1, 7, 60, 300]))
        codec = rng.randrange(4)
        if rng.random() < 0.3:
            yield _frame(codec, body, None, rng.random() < 0.2)
            continue
        fields = {
            rng.randrange(1, 256): rng.randbytes(rng.choice([0, 1, 4, 8, 255]))
            for _ in range(rng.randrange(1, 4))
        }
        yield _frame(codec, body, fields, rng.random() < 0.2)


def test_the_c_path_is_built_and_used() -> None:
    from buzon.protocol import _fields

    assert frames._fields_run is _fields.fields_run
    data = _frame(1, b"\x93\x00\xa3add\x92\x01\x02", {int(Field.MESSAGE_ID): b"\x07" * 8})
    frame = _fields.fields_frame(data, 1 << 20)
    assert isinstance(frame, Frame)
    assert frame.fields == {int(Field.MESSAGE_ID): b"\x07" * 8}
    assert frame.body == b"\x93\x00\xa3add\x92\x01\x02" and frame.codec == 1
    got: list[Any] = []
    assert _fields.fields_run(data + data, 0, 2 * len(data), 1 << 20, got.append) == 2 * len(data)
    assert [_shape(f) for f in got] == [_shape(frame)] * 2


@pytest.mark.parametrize("chunk", [1, 3, 64, 100000])
def test_stream_decoding_agrees_with_the_python_decoder(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(chunk)
    data = b"".join(_random_frames(rng, 200))
    fast = _decode(data, chunk, True, monkeypatch)
    assert fast == _decode(data, chunk, False, monkeypatch)
    assert len(fast) == 200


def test_parse_frame_agrees_with_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    for data in _random_frames(rng, 300):
        fast = _shape(parse_frame(data))
        with monkeypatch.context() as m:
            m.setattr(frames, "_fields_frame", None)
            assert fast == _shape(parse_frame(data))


def _bad_fields(block: bytes, body: bytes = b"x") -> bytes:
    """A DATA frame whose FIELDS block is ``block`` (raw bytes, maybe malformed)."""
    flags = 1 | frames.FIELDS_FLAG
    return (
        frames.HEADER.pack(1, 1, flags, 0, len(body))
        + len(block).to_bytes(2, "little")
        + block
        + body
    )


@pytest.mark.parametrize(
    "block",
    [
        b"\x00\x01z",  # tag 0
        b"\x05\x09abc",  # a value longer than the block
        b"\x05",  # cut short
    ],
)
def test_malformed_fields_still_raise(block: bytes) -> None:
    data = _bad_fields(block)
    with pytest.raises(FrameError):
        parse_frame(data)
    dec = FrameDecoder()
    good = _frame(1, b"\xc0", {1: b"12345678"})
    dec.feed(good + data)  # the error waits until the frame before it is taken
    assert [_shape(dec.next_frame())] == [_shape(parse_frame(good))]
    with pytest.raises(FrameError):
        dec.check()


def test_other_shapes_are_left_to_python() -> None:
    from buzon.protocol import _fields

    with_buffer = b"".join(
        bytes(b) for b in encode_frame(Kind.DATA, 3, b"p", [memoryview(b"buf")], fields={1: b"x"})
    )
    assert _fields.fields_frame(with_buffer, 1 << 20) is None
    one = _frame(1, b"abc", {1: b"12345678"})
    assert _fields.fields_frame(one, len(one) - 1) is None  # over the cap: Python raises
    assert _fields.fields_frame(one + b"\x00", 1 << 20) is None  # stray byte
    assert _fields.fields_frame(one[:-1], 1 << 20) is None  # cut short
    assert _fields.fields_frame(b"", 1 << 20) is None
    bad_codec = bytearray(one)
    bad_codec[2] = frames.FIELDS_FLAG | 5
    assert _fields.fields_frame(bytes(bad_codec), 1 << 20) is None
    with pytest.raises(FrameError):
        parse_frame(bytes(bad_codec))
    got: list[Any] = []
    assert _fields.fields_run(with_buffer, 0, len(with_buffer), 1 << 20, got.append) == 0
    assert got == []
