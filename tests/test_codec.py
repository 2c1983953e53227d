"""Codecs: round trips, typed decoding, numpy out of band with one copy, and hostile
payloads that must end in CodecError rather than a crash or an allocation."""

from __future__ import annotations

import datetime
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from buzon.codec import OOB_THRESHOLD, Codec
from buzon.errors import CodecError, PickleRejected, ValidationError
from buzon.protocol.frames import CodecId, Frame, FrameDecoder, Kind, encode_frame


class Point(msgspec.Struct):
    x: int
    y: int
    label: str = ""


def through_the_wire(codec: Codec, obj: Any, read_size: int = 256 * 1024) -> Frame:
    """Encode ``obj``, frame it, and decode the frame from a byte stream."""
    cid, body, buffers = codec.encode(obj)
    data = b"".join(bytes(p) for p in encode_frame(Kind.DATA, cid, body, buffers))
    dec = FrameDecoder(read_size=read_size)
    dec.feed(data)
    (frame,) = dec.take_all()
    return frame


def roundtrip(codec: Codec, obj: Any, type: Any = Any) -> Any:
    frame = through_the_wire(codec, obj)
    return codec.decode(frame.codec, frame.body, frame.buffers, type)


def ext(code: int, meta: Any) -> bytes:
    return msgspec.msgpack.encode(msgspec.msgpack.Ext(code, msgspec.msgpack.encode(meta)))


VALUES: list[Any] = [
    None,
    True,
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    "héllo",
    b"\x00\xff",
    [1, [2, [3]]],
    {"a": {"b": [None, 1.0]}},
    {"k" * 100: "v" * 10_000},
]


@pytest.mark.parametrize("value", VALUES)
def test_msgpack_round_trip(value: Any) -> None:
    codec = Codec()
    cid, _, buffers = codec.encode(value)
    assert cid == CodecId.MSGPACK and buffers == []
    assert roundtrip(codec, value) == value


def test_msgpack_extra_types() -> None:
    codec = Codec()
    when = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    uid = uuid.UUID(int=12345)
    assert roundtrip(codec, when, datetime.datetime) == when
    assert roundtrip(codec, uid, uuid.UUID) == uid
    assert roundtrip(codec, np.float32(1.5)) == 1.5  # numpy scalars become Python ones
    assert roundtrip(codec, np.int64(7)) == 7


@pytest.mark.parametrize("value", [v for v in VALUES if not isinstance(v, bytes)])
def test_json_round_trip(value: Any) -> None:
    codec = Codec("json")
    cid, body, buffers = codec.encode(value)
    assert cid == CodecId.JSON and buffers == []
    assert msgspec.json.decode(body) == value  # real JSON text
    assert roundtrip(codec, value) == value


def test_json_bytes_with_a_type() -> None:
    codec = Codec("json")
    assert roundtrip(codec, b"\x00\xff", bytes) == b"\x00\xff"


def test_json_refuses_arrays_with_a_hint() -> None:
    with pytest.raises(CodecError, match="use msgpack for numpy arrays"):
        Codec("json").encode(np.zeros(3))


@pytest.mark.parametrize("name", ["msgpack", "json"])
def test_struct_with_type_validates(name: Any) -> None:
    codec = Codec(name)
    p = Point(1, 2, "a")
    assert roundtrip(codec, p, Point) == p
    assert roundtrip(codec, {"x": 3, "y": 4}, Point) == Point(3, 4)
    assert roundtrip(codec, [1, 2], list[int]) == [1, 2]
    with pytest.raises(ValidationError, match="does not match Point") as info:
        roundtrip(codec, {"x": "three", "y": 4}, Point)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValidationError):
        roundtrip(codec, {"x": 1}, Point)
    with pytest.raises(ValidationError):
        roundtrip(codec, ["a"], list[int])


def test_raw_body_with_a_type() -> None:
    codec = Codec()
    assert codec.decode(CodecId.RAW, b"abc", []) == b"abc"
    assert codec.decode(CodecId.RAW, memoryview(b"abc"), [], bytes) == b"abc"
    with pytest.raises(ValidationError):
        codec.decode(CodecId.RAW, b"abc", [], int)


@pytest.mark.parametrize("value", [object(), {1, 2j}, Path("/x")])
def test_unsupported_objects_are_codec_errors(value: Any) -> None:
    with pytest.raises(CodecError, match="cannot encode"):
        Codec().encode(value)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        Codec("yaml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pickle=True"):
        Codec("pickle")


def test_unknown_codec_id() -> None:
    with pytest.raises(CodecError, match="unknown codec id 6"):
        Codec().decode(6, b"", [])


@pytest.mark.parametrize("body", [b"\xc1", b"\x92\x01", b"\xdb\xff\xff\xff\xff"])
def test_malformed_msgpack(body: bytes) -> None:
    with pytest.raises(CodecError, match="cannot decode msgpack"):
        Codec().decode(CodecId.MSGPACK, body, [])


def test_malformed_json() -> None:
    with pytest.raises(CodecError, match="cannot decode json"):
        Codec("json").decode(CodecId.JSON, b'{"a": ', [])


def test_container_lengths_are_checked_against_the_bytes() -> None:
    # an array header announcing 2**32-1 elements in a 5-byte body
    with pytest.raises(CodecError):
        Codec().decode(CodecId.MSGPACK, b"\xdd\xff\xff\xff\xff", [])


# ------------------------------------------------------------------------ numpy arrays

ARRAYS: list[Any] = [
    np.arange(1000, dtype=np.float64),
    np.arange(24_000, dtype=np.int32).reshape(20, 30, 40),
    np.ones((64, 64), dtype=np.complex128),
    np.zeros(4096, dtype=np.uint8),
    np.arange(600, dtype=">i4"),  # non-native byte order
    np.array([True, False] * 600),
    np.arange(200).astype("datetime64[s]"),
    np.arange(200).astype("timedelta64[ms]"),
    np.array(["abc", "défghi"] * 100),
    np.full((), 3.0, dtype=np.float64).repeat(0).reshape(0, 5),  # empty: in band
]


@pytest.mark.parametrize("arr", ARRAYS, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_arrays_round_trip(arr: Any) -> None:
    codec = Codec()
    out = roundtrip(codec, arr)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "arr", [a for a in ARRAYS if a.nbytes >= OOB_THRESHOLD], ids=lambda a: a.dtype.str
)
def test_arrays_travel_out_of_band(arr: Any) -> None:
    codec = Codec()
    _, body, buffers = codec.encode(arr)
    assert len(buffers) == 1
    assert buffers[0].nbytes == arr.nbytes
    assert len(body) < 100  # only the small record is in the body
    # no copy on the way out: the buffer is the array's own memory
    assert np.shares_memory(np.frombuffer(buffers[0], dtype=np.uint8), arr)


@pytest.mark.parametrize("read_size", [4096, 256 * 1024])  # large-frame path and small-frame path
def test_decoded_array_lives_in_the_frame_buffer(read_size: int) -> None:
    arr = np.arange(5000, dtype=np.float64)
    codec = Codec()
    frame = through_the_wire(codec, arr, read_size=read_size)
    assert len(frame.buffers) == 1
    out = codec.decode(frame.codec, frame.body, frame.buffers)
    np.testing.assert_array_equal(out, arr)
    # one copy in all: the decoded array is a view of the frame's receive buffer
    assert np.shares_memory(out, np.frombuffer(frame.buffers[0], dtype=np.uint8))


def test_small_arrays_travel_in_band() -> None:
    codec = Codec()
    arr = np.arange(10, dtype=np.int16)
    _, _, buffers = codec.encode(arr)
    assert buffers == []
    np.testing.assert_array_equal(roundtrip(codec, arr), arr)


def test_non_contiguous_arrays_are_sent_contiguous() -> None:
    base = np.arange(10_000, dtype=np.float64).reshape(100, 100)
    for view in (base.T, base[::2, ::3], base[:, 5]):
        out = roundtrip(Codec(), view)
        np.testing.assert_array_equal(out, view)


def test_several_arrays_each_get_a_buffer() -> None:
    codec = Codec()
    msg = {"a": np.zeros(500), "b": [np.ones(300), np.ones(3)], "c": "text"}
    _, _, buffers = codec.encode(msg)
    assert [b.nbytes for b in buffers] == [4000, 2400]
    out = roundtrip(codec, msg)
    np.testing.assert_array_equal(out["a"], msg["a"])
    np.testing.assert_array_equal(out["b"][0], np.ones(300))
    np.testing.assert_array_equal(out["b"][1], np.ones(3))
    assert out["c"] == "text"


def test_more_arrays_than_buffer_slots_fall_back_in_band() -> None:
    codec = Codec()
    arrays = [np.full(128, i, dtype=np.float64) for i in range(300)]
    _, _, buffers = codec.encode(arrays)
    assert len(buffers) == 255
    out = roundtrip(codec, arrays)
    for a, b in zip(arrays, out, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "arr",
    [
        np.array([object(), 1], dtype=object),
        np.zeros(3, dtype=[("a", "f8"), ("b", "O")]),
    ],
)
def test_object_arrays_refused(arr: Any) -> None:
    with pytest.raises(CodecError, match="dtype=object"):
        Codec().encode({"payload": arr})


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_big_top_level_bytes_travel_out_of_band(kind: Any) -> None:
    data = kind(os.urandom(OOB_THRESHOLD))
    codec = Codec()
    _, body, buffers = codec.encode(data)
    assert len(buffers) == 1 and len(body) < 16
    assert roundtrip(codec, data) == bytes(data)


def test_small_bytes_stay_in_band() -> None:
    _, _, buffers = Codec().encode(b"x" * (OOB_THRESHOLD - 1))
    assert buffers == []


# --------------------------------------------------------------------- hostile records


def ndarray_record(*meta: Any) -> bytes:
    return ext(1, list(meta))


HOSTILE: list[tuple[str, bytes, list[bytes]]] = [
    ("buffer index past the end", ndarray_record("<f8", [1], 5), [b"x" * 8]),
    ("negative index, no data", ndarray_record("<f8", [1], -1), []),
    ("index is a string", ndarray_record("<f8", [1], "0"), [b"x" * 8]),
    ("index is None", ndarray_record("<f8", [1], None), [b"x" * 8]),
    ("too few bytes", ndarray_record("<f8", [2], 0), [b"x" * 8]),
    ("too many bytes", ndarray_record("<f8", [1], 0), [b"x" * 9]),
    ("in-band bytes too short", ndarray_record("<i4", [3], -1, b"abc"), []),
    ("in-band data not bytes", ndarray_record("<i4", [1], -1, "abcd"), []),
    ("object dtype", ndarray_record("|O", [1], -1, b"x" * 8), []),
    ("object dtype out of band", ndarray_record("O", [1], 0), [b"x" * 8]),
    ("object inside a structured dtype", ndarray_record("<f8,O", [1], -1, b"x" * 16), []),
    ("structured dtype", ndarray_record("<f8,<i4", [1], -1, b"x" * 12), []),
    ("subarray dtype", ndarray_record("(2,)<f8", [1], -1, b"x" * 16), []),
    ("dtype is a list", ndarray_record([["a", "<f8"]], [1], -1, b"x" * 8), []),
    ("dtype too long", ndarray_record("<" + "U" + "9" * 20, [1], -1, b""), []),
    ("dtype nonsense", ndarray_record("<q9z", [1], -1, b""), []),
    ("object dtype with a size", ndarray_record("|O8", [1], -1, b"x" * 8), []),
    ("negative dimension", ndarray_record("<f8", [-1], -1, b""), []),
    ("infinite dimension", ndarray_record("<f8", [float("inf")], -1, b""), []),
    ("shape not a list", ndarray_record("<f8", 3, -1, b"x" * 24), []),
    ("shape of lists", ndarray_record("<f8", [[1]], -1, b"x" * 8), []),
    ("astronomical shape", ndarray_record("<f8", [2**62, 2**62], -1, b""), []),
    ("too many dimensions", ndarray_record("<f8", [1] * 70, -1, b"x" * 8), []),
    ("zero itemsize", ndarray_record("V0", [4], -1, b""), []),
    ("record too short", ndarray_record("<f8", [1]), []),
    ("record too long", ndarray_record("<f8", [1], -1, b"x" * 8, 0), []),
    ("record not a list", ext(1, {"dtype": "<f8"}), []),
    ("record not msgpack", msgspec.msgpack.encode(msgspec.msgpack.Ext(1, b"\xc1")), []),
    ("buffer record past the end", ext(2, 3), [b"x"]),
    ("buffer record negative", ext(2, -1), [b"x"]),
    ("buffer record not an int", ext(2, "0"), [b"x"]),
    ("unknown extension", ext(9, 0), []),
]


@pytest.mark.parametrize(("body", "buffers"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_ext_records_are_codec_errors(body: bytes, buffers: list[bytes]) -> None:
    codec = Codec()
    with pytest.raises(CodecError):
        codec.decode(CodecId.MSGPACK, body, [memoryview(b) for b in buffers])
    # nested inside a container too, and the codec keeps working afterwards
    with pytest.raises(CodecError):
        codec.decode(CodecId.MSGPACK, b"\x91" + body, [memoryview(b) for b in buffers])
    assert codec.decode(CodecId.MSGPACK, b"\x01", []) == 1


def test_deep_nesting_is_a_codec_error() -> None:
    codec = Codec()
    with pytest.raises(CodecError, match="recursion"):
        codec.decode(CodecId.MSGPACK, b"\x91" * 200_000 + b"\xc0", [])
    with pytest.raises(CodecError, match="recursion"):
        Codec("json").decode(CodecId.JSON, b"[" * 200_000 + b"]" * 200_000, [])
    deep: list[Any] = []
    for _ in range(200_000):
        deep = [deep]
    with pytest.raises(CodecError, match="recursion"):
        codec.encode(deep)
    assert roundtrip(codec, {"still": "works"}) == {"still": "works"}


# ------------------------------------------------------------------------------ pickle


class _Canary:
    """Unpickling this creates a file: proof that unpickling happened."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_pickle_frames_rejected_unless_enabled(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    body = pickle.dumps(_Canary(str(canary)), protocol=5)
    for name in ("msgpack", "json"):
        with pytest.raises(PickleRejected, match="without being unpickled"):
            Codec(name).decode(CodecId.PICKLE, body, [])
    assert not canary.exists()


def test_pickle_when_enabled_sends_buffers_out_of_band() -> None:
    codec = Codec("pickle", allow_pickle=True)
    arr = np.arange(10_000, dtype=np.float64)
    cid, _, buffers = codec.encode({"arr": arr, "set": {1, 2}})
    assert cid == CodecId.PICKLE
    assert len(buffers) == 1 and buffers[0].nbytes == arr.nbytes
    out = roundtrip(codec, {"arr": arr, "set": {1, 2}})
    np.testing.assert_array_equal(out["arr"], arr)
    assert out["set"] == {1, 2}


def test_msgpack_channel_with_pickle_allowed_still_decodes_pickle_frames() -> None:
    sender = Codec("pickle", allow_pickle=True)
    receiver = Codec("msgpack", allow_pickle=True)
    assert roundtrip_between(sender, receiver, {3, 4}) == {3, 4}


def roundtrip_between(sender: Codec, receiver: Codec, obj: Any) -> Any:
    frame = through_the_wire(sender, obj)
    return receiver.decode(frame.codec, frame.body, frame.buffers)


def test_pickle_type_check_and_errors() -> None:
    codec = Codec("pickle", allow_pickle=True)
    with pytest.raises(ValidationError, match="expected int, got str"):
        roundtrip(codec, "text", int)
    with pytest.raises(CodecError, match="cannot unpickle"):
        codec.decode(CodecId.PICKLE, b"\x80\x05garbage", [])
    with pytest.raises(CodecError, match="cannot encode"):
        codec.encode(lambda: None)
