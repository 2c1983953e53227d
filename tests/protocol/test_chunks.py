"""CHUNKED frames (abortable large messages), header fields, optional control kinds,
and the decoder's memory bound: what a peer announces commits nothing."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buzon.errors import FrameError
from buzon.protocol.frames import (
    ABORT_SEGMENT,
    HEADER,
    Field,
    FrameDecoder,
    Kind,
    abort_marker,
    chunk_frame,
    encode_frame,
    parse_frame,
)


def _wire(bufs: list) -> bytes:  # type: ignore[type-arg]
    return b"".join(bytes(b) for b in bufs)


def _chunked(payload: bytes, segment: int, body: bytes = b"") -> tuple[bytes, list[int]]:
    bufs = encode_frame(Kind.DATA, 0, body, [memoryview(payload)] if payload else [])
    out, points = chunk_frame(bufs, segment=segment)
    return _wire(out), points


def _feed(dec: FrameDecoder, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        dec.feed(data[i : i + step])


@pytest.mark.parametrize("size", [1, 999, 1000, 1001, 5000])
@pytest.mark.parametrize("step", [1, 3, 4096, 1 << 30])
def test_chunked_frame_round_trips_whatever_the_read_sizes(size: int, step: int) -> None:
    payload = os.urandom(size)
    data, _ = _chunked(payload, 1000, body=b"\x01\x02")
    dec = FrameDecoder(read_size=2048)
    _feed(dec, data, step)
    frame = dec.next_frame()
    assert bytes(frame.body) == b"\x01\x02"
    assert bytes(frame.buffers[0]) == payload
    assert not dec.buffered


def test_an_aborted_frame_is_dropped_and_the_stream_goes_on() -> None:
    payload = os.urandom(5000)
    data, points = _chunked(payload, 1000)
    after = _wire(encode_frame(Kind.DATA, 0, b"next"))
    assert len(points) == 6  # after the header, then after each segment (before END)
    for point in points:
        dec = FrameDecoder(read_size=2048)
        _feed(dec, data[:point] + abort_marker() + after, 7)
        assert dec.aborted == 1
        assert [bytes(f.body) for f in dec.take_all()] == [b"next"]


def test_an_abort_inside_a_segment_is_payload_not_an_abort() -> None:
    """Only a segment length can abort: 0xFFFFFFFF inside a segment is data."""
    payload = b"\xff" * 4000
    data, _ = _chunked(payload, 1000)
    dec = FrameDecoder()
    dec.feed(data)
    assert bytes(dec.next_frame().buffers[0]) == payload and dec.aborted == 0


def test_a_segment_longer_than_the_payload_left_is_an_error() -> None:
    data, points = _chunked(os.urandom(100), 1000)
    bad = bytearray(data)
    bad[points[0] : points[0] + 4] = (101).to_bytes(4, "little")
    with pytest.raises(FrameError, match="segment of 101 bytes"):
        FrameDecoder().feed(bytes(bad))


def test_a_chunked_frame_is_refused_on_a_message_link() -> None:
    data, _ = _chunked(os.urandom(100), 1000)
    with pytest.raises(FrameError, match="CHUNKED frame on a message link"):
        parse_frame(data)


def test_a_stream_ending_inside_a_chunked_frame_is_reported() -> None:
    data, points = _chunked(os.urandom(3000), 1000)
    dec = FrameDecoder()
    dec.feed(data[: points[1] + 2])  # half a segment length
    with pytest.raises(FrameError, match="stream ended inside a frame"):
        dec.eof()


def test_abort_marker_value() -> None:
    assert abort_marker() == ABORT_SEGMENT.to_bytes(4, "little")


@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(max_size=3000),
    segment=st.integers(1, 1500),
    cut=st.integers(0, 10),
    step=st.integers(1, 600),
)
def test_fuzz_chunk_abort_anywhere(payload: bytes, segment: int, cut: int, step: int) -> None:
    """A frame aborted at any abort point, or complete, leaves the decoder in sync."""
    data, points = _chunked(payload, segment, body=b"b")
    after = _wire(encode_frame(Kind.DATA, 2, b"{}"))
    dec = FrameDecoder(read_size=1024)
    if points and cut < len(points):
        _feed(dec, data[: points[cut]] + abort_marker() + after, step)
        assert dec.aborted == 1
        frames = dec.take_all()
        assert [f.codec for f in frames] == [2]
    else:
        _feed(dec, data + after, step)
        frames = dec.take_all()
        assert b"".join(bytes(b) for b in frames[0].buffers) == payload
        assert frames[1].codec == 2
    assert not dec.buffered


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=8, max_size=200))
def test_fuzz_garbage_after_a_chunked_header_raises_frame_error_only(junk: bytes) -> None:
    head = bytearray(HEADER.pack(1, Kind.DATA, 0x10, 1, 0) + (50).to_bytes(8, "little"))
    dec = FrameDecoder(read_size=256)
    try:
        dec.feed(bytes(head) + junk)
    except FrameError:
        pass


# -- header fields --------------------------------------------------------------------


def test_header_fields_travel_with_the_frame_on_streams_and_messages() -> None:
    fields = {Field.MESSAGE_ID: (7).to_bytes(8, "little"), Field.REPLY_TO: b"unix:calc", 200: b""}
    data = _wire(encode_frame(Kind.DATA, 1, b"\xc0", fields=fields))
    assert parse_frame(data).fields == fields
    for step in (1, 5, 1000):
        dec = FrameDecoder(read_size=64)
        _feed(dec, data, step)
        frame = dec.next_frame()
        assert frame.fields == fields and bytes(frame.body) == b"\xc0"


def test_header_fields_survive_chunking() -> None:
    fields = {Field.CORRELATION: b"12345678"}
    bufs = encode_frame(Kind.DATA, 0, b"", [memoryview(os.urandom(3000))], fields=fields)
    out, _ = chunk_frame(bufs, segment=1000)
    dec = FrameDecoder()
    dec.feed(_wire(out))
    assert dec.next_frame().fields == fields


@pytest.mark.parametrize(
    "block",
    [b"\x03\x00\x01\x05\x00", b"\x02\x00\x00\x00", b"\x01\x00\x01"],
    ids=["value-cut-short", "tag-zero", "field-cut-short"],
)
def test_malformed_fields_are_frame_errors(block: bytes) -> None:
    data = HEADER.pack(1, Kind.DATA, 0x20, 0, 0) + block
    with pytest.raises(FrameError):
        parse_frame(data)


def test_fields_count_against_the_frame_cap() -> None:
    big = {i: bytes(255) for i in range(1, 40)}
    data = _wire(encode_frame(Kind.DATA, 0, b"", fields=big))
    with pytest.raises(FrameError):
        FrameDecoder(max_frame=4096).feed(data)


# -- optional control kinds -----------------------------------------------------------


def test_unknown_optional_control_frames_are_skipped() -> None:
    dec = FrameDecoder()
    dec.feed(HEADER.pack(1, 99, 0, 0, 3) + b"abc" + _wire(encode_frame(Kind.DATA, 0, b"x")))
    assert dec.skipped == 1
    assert [bytes(f.body) for f in dec.take_all()] == [b"x"]


def test_kinds_below_64_must_be_known() -> None:
    with pytest.raises(FrameError, match="unknown frame kind 63"):
        FrameDecoder().feed(HEADER.pack(1, 63, 0, 0, 0))


# -- memory follows bytes received ----------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_header_announcing_64_mib_commits_no_memory() -> None:
    """Defect 4: sixteen bytes made the decoder zero-fill the whole announced size."""
    decoders = [FrameDecoder() for _ in range(10)]
    head = HEADER.pack(1, Kind.DATA, 0, 1, 0) + (60 * 2**20).to_bytes(8, "little")
    before = _rss()
    for dec in decoders:
        dec.feed(head + b"x" * 100)
    grown = _rss() - before
    assert grown < 40 * 2**20, f"10 announced 60 MiB frames grew RSS by {grown >> 20} MiB"
    assert all(dec.buffered for dec in decoders)


def test_a_big_message_still_arrives_whole() -> None:
    payload = os.urandom(3 * 2**20 + 5)
    dec = FrameDecoder()
    _feed(dec, _wire(encode_frame(Kind.DATA, 0, b"", [memoryview(payload)])), 256 * 1024)
    assert bytes(dec.next_frame().buffers[0]) == payload
