"""``buzon.protocol._stream``, the C twin of the stream frames' hot path, against the
Python decoder it speeds up (which stays the reference): the same frames, errors and
left-overs for any stream, split anywhere; and its write, byte for byte. Also run
under AddressSanitizer by ``make sanitize``."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buzon.errors import FrameError
from buzon.protocol import _stream, frames
from buzon.protocol.frames import HEADER, FrameDecoder, Kind, encode_frame

_CREDIT = encode_frame(Kind.CREDIT, 0, b"\0" * 16)


def _plain(flags: int, body: bytes) -> bytes:
    return HEADER.pack(1, 1, flags, 0, len(body)) + body


# one frame of the stream: plain ones the C run takes, and every kind it must leave alone
_frame = st.one_of(
    st.builds(_plain, st.sampled_from([0, 1, 2, 3, 8, 9]), st.binary(max_size=300)),
    st.builds(
        lambda body, n: b"".join(bytes(b) for b in encode_frame(Kind.DATA, 0, b"", [body] * n)),
        st.binary(max_size=50).map(memoryview),
        st.integers(1, 2),
    ),
    st.just(b"".join(bytes(b) for b in _CREDIT)),
    st.builds(_plain, st.sampled_from([0x10, 0x40, 0x80]), st.binary(max_size=20)),  # flags
    st.builds(lambda b: HEADER.pack(2, 1, 0, 0, len(b)) + b, st.binary(max_size=20)),  # version
    st.builds(lambda b: HEADER.pack(1, 1, 0, 0, 5000) + b, st.binary(max_size=20)),  # too big
)


def _decode(stream: bytes, cuts: list[int], read_size: int, use_c: bool) -> Iterator[object]:
    saved = frames._plain_run
    frames._plain_run = _stream.plain_run if use_c else None  # type: ignore[assignment]
    try:
        dec = FrameDecoder(max_frame=4096, read_size=read_size)
        pos = 0
        for cut in [*sorted(cuts), len(stream)]:
            part = stream[pos:cut]
            pos = max(pos, cut)
            try:
                dec.feed(part)
            except FrameError as exc:
                yield ("error", type(exc).__name__, str(exc))
                return
            while dec.frames:
                f = dec.next_frame()
                yield (f.kind, f.codec, f.receipt, bytes(f.body), [bytes(b) for b in f.buffers])
            while dec.control:
                yield ("control", dec.control.popleft())
        yield ("left", dec.buffered)
    finally:
        frames._plain_run = saved


def test_a_read_that_ends_one_byte_into_a_header_at_the_buffer_s_end() -> None:
    """The C run leaves one byte of the next header at the very end of the read buffer:
    the decoder looked at the byte after it (is it a CREDIT?), past the buffer
    (IndexError; found by hypothesis under ``make sanitize``)."""
    parts = [b"\x00", b"\x00", b"\x00" * 3, b"\x00" * 7, b"\x00" * 11, b""]
    stream = b"".join(_plain(0, p) for p in parts)
    assert list(_decode(stream, [], 64, True)) == list(_decode(stream, [], 64, False))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_frame, max_size=12),
    st.lists(st.integers(0, 4000), max_size=4),
    st.sampled_from([64, 256, 1024, 8192]),
)
def test_the_decoder_gives_the_same_with_and_without_c(
    parts: list[bytes], cuts: list[int], read_size: int
) -> None:
    stream = b"".join(parts)
    with_c = list(_decode(stream, cuts, read_size, True))
    without = list(_decode(stream, cuts, read_size, False))
    assert with_c == without


def test_plain_run_hands_out_a_run_and_stops_at_the_first_other_frame() -> None:
    data = _plain(0, b"a") + _plain(8, b"bc") + b"".join(bytes(b) for b in _CREDIT)
    got: list[tuple[int, bytes]] = []
    pos = _stream.plain_run(data, 0, len(data), 4096, got.append)
    assert got == [(0, b"a"), (8, b"bc")]
    assert pos == 9 + 10
    got.clear()
    assert _stream.plain_run(data, 0, 12, 4096, got.append) == 9  # the second is cut short
    assert _stream.plain_run(bytearray(data), 9, 19, 9, got.append) == 9  # over the limit
    assert got == [(0, b"a")]


def test_plain_run_refuses_bad_arguments_and_passes_errors_on() -> None:
    with pytest.raises(ValueError):
        _stream.plain_run(b"x" * 8, 0, 9, 100, print)
    with pytest.raises(ValueError):
        _stream.plain_run(b"x" * 8, 5, 4, 100, print)
    with pytest.raises(TypeError):
        _stream.plain_run(object(), 0, 0, 100, print)  # type: ignore[arg-type]

    def boom(item: object) -> None:
        raise RuntimeError("append failed")

    with pytest.raises(RuntimeError, match="append failed"):
        _stream.plain_run(_plain(0, b"z"), 0, 9, 100, boom)


@pytest.mark.parametrize("size", [0, 1, 64, 4088])
def test_write_frame_writes_header_and_payload(size: int) -> None:
    r, w = os.pipe()
    try:
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert _stream.write_frame(w, 9, data) == size + 8
        assert os.read(r, 10000) == _plain(9, data)
    finally:
        os.close(r)
        os.close(w)


def test_write_frame_reports_a_full_pipe_and_a_bad_fd() -> None:
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        with pytest.raises(BlockingIOError):
            while True:
                _stream.write_frame(w, 0, b"x" * 4000)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(OSError) as info:
        _stream.write_frame(w, 0, b"x")  # closed now
    assert info.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        _stream.write_frame(0, 256, b"x")
    with pytest.raises(TypeError):
        _stream.write_frame(0, 0, bytearray(b"x"))  # type: ignore[arg-type]
