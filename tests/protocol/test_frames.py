"""The buzon frame: round trips, any split of the stream, caps before allocation, and a
decoder that only ever fails with FrameError."""

from __future__ import annotations

import array
import random
import struct
import tracemalloc
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buzon.errors import FrameError, FrameTooLarge, MessageTooLarge
from buzon.protocol.frames import (
    DEFAULT_MAX_FRAME,
    HEADER,
    VERSION,
    CodecId,
    Frame,
    FrameDecoder,
    Kind,
    encode_frame,
    parse_frame,
)

Msg = tuple[int, int, bytes, list[bytes]]  # kind, codec, body, buffers


def wire(kind: int, codec: int, body: bytes, buffers: Sequence[bytes] = ()) -> bytes:
    parts = encode_frame(kind, codec, body, [memoryview(b) for b in buffers])
    return b"".join(bytes(p) for p in parts)


def header(
    kind: int = Kind.DATA,
    flags: int = CodecId.MSGPACK,
    nbufs: int = 0,
    blen: int = 0,
    version: int = VERSION,
) -> bytes:
    return HEADER.pack(version, kind, flags, nbufs, blen)


def as_msg(frame: Frame) -> Msg:
    codec = frame.codec | (8 if frame.receipt else 0)
    return (frame.kind, codec, bytes(frame.body), [bytes(b) for b in frame.buffers])


def drain(decoder: FrameDecoder) -> list[Msg]:
    out = [as_msg(f) for f in decoder.take_all()]
    return out


SAMPLE: list[Msg] = [
    (Kind.DATA, CodecId.MSGPACK, b"\x81\xa1a\x01", []),
    (Kind.DATA, CodecId.RAW, b"", []),
    (Kind.DATA, CodecId.RAW, b"", [b"x" * 10]),
    (Kind.DATA, CodecId.JSON, b'{"k": [1, 2]}', [b"", b"abc", bytes(range(256))]),
    (Kind.HELLO, CodecId.MSGPACK, b"\x80", []),
    (Kind.CLOSE, CodecId.RAW, b"", []),
    (Kind.DATA, CodecId.RAW | 8, b"receipt asked", []),
    (Kind.DATA, CodecId.PICKLE, b"\x80\x05N.", [b"\x00" * 5000]),
]


def sample_stream() -> bytes:
    return b"".join(wire(*m) for m in SAMPLE)


# ----------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("nbufs", [0, 1, 2, 7, 255])
def test_round_trip_with_n_buffers(nbufs: int) -> None:
    rng = random.Random(nbufs)
    buffers = [rng.randbytes(rng.randrange(0, 300)) for _ in range(nbufs)]
    data = wire(Kind.DATA, CodecId.MSGPACK, b"body", buffers)
    assert len(data) == HEADER.size + 8 * nbufs + 4 + sum(map(len, buffers))
    frame = parse_frame(data)
    assert as_msg(frame) == (Kind.DATA, CodecId.MSGPACK, b"body", buffers)
    assert frame.nbytes == 4 + sum(map(len, buffers))
    dec = FrameDecoder()
    dec.feed(data)
    assert drain(dec) == [(Kind.DATA, CodecId.MSGPACK, b"body", buffers)]


def test_header_is_the_documented_byte_table() -> None:
    data = wire(Kind.DATA, CodecId.JSON, b"[1]", [b"ab", b"cde"])
    assert data == (
        bytes([1, 1, 2, 2])
        + struct.pack("<I", 3)
        + struct.pack("<QQ", 2, 3)
        + b"[1]"
        + b"ab"
        + b"cde"
    )


def test_more_than_255_buffers_refused() -> None:
    with pytest.raises(FrameError, match="at most 255"):
        encode_frame(Kind.DATA, CodecId.RAW, b"", [memoryview(b"")] * 256)


def test_encode_respects_the_cap() -> None:
    encode_frame(Kind.DATA, CodecId.RAW, b"x" * (1024 - HEADER.size), max_frame=1024)
    with pytest.raises(MessageTooLarge, match="exceeds the frame cap"):
        encode_frame(Kind.DATA, CodecId.RAW, b"x" * (1025 - HEADER.size), max_frame=1024)
    with pytest.raises(MessageTooLarge):
        encode_frame(Kind.DATA, CodecId.RAW, b"", [memoryview(b"x" * 1024)], max_frame=1024)


def test_big_body_and_buffers_are_not_copied() -> None:
    body = bytearray(10_000)
    buf = memoryview(bytearray(5000))
    parts = encode_frame(Kind.DATA, CodecId.MSGPACK, body, [buf])
    assert parts[1] is body
    assert parts[2] is buf
    small = encode_frame(Kind.DATA, CodecId.MSGPACK, b"tiny")
    assert len(small) == 1  # header and small body joined: one write


@pytest.mark.parametrize("size", [2, 1000])  # joined with the header, and passed through
def test_typed_memoryview_body_is_counted_in_bytes(size: int) -> None:
    body = memoryview(array.array("d", [1.5] * size))
    data = b"".join(bytes(p) for p in encode_frame(Kind.DATA, CodecId.RAW, body))
    frame = parse_frame(data)
    assert bytes(frame.body) == body.tobytes()


def test_body_over_4_gib_is_refused_not_a_struct_error() -> None:
    class Huge:  # only its length is looked at before the check
        def __len__(self) -> int:
            return 2**32

    with pytest.raises(MessageTooLarge, match="4 GiB"):
        encode_frame(Kind.DATA, CodecId.RAW, Huge(), max_frame=2**40)  # type: ignore[arg-type]


# ------------------------------------------------------------------ splitting the stream


def test_every_split_point_of_a_stream() -> None:
    data = sample_stream()
    expected = [tuple(m) for m in SAMPLE]
    for cut in range(len(data) + 1):
        dec = FrameDecoder()
        dec.feed(data[:cut])
        dec.feed(data[cut:])
        assert drain(dec) == expected, cut
        dec.eof()


@pytest.mark.parametrize("read_size", [1, 7, 16, 64, 256 * 1024])
def test_byte_by_byte_through_the_buffer_protocol(read_size: int) -> None:
    data = sample_stream()
    dec = FrameDecoder(read_size=read_size)
    for b in data:
        target = dec.get_buffer()
        assert len(target) >= 1
        target[0] = b
        dec.buffer_updated(1)
    assert drain(dec) == [tuple(m) for m in SAMPLE]
    assert dec.buffered == 0
    dec.eof()


@pytest.mark.parametrize("read_size", [64, 4096])
def test_every_pair_of_split_points_for_small_frames(read_size: int) -> None:
    msgs: list[Msg] = [
        (Kind.DATA, CodecId.RAW, b"ab", [b"c"]),
        (Kind.WELCOME, CodecId.MSGPACK, b"\x81", []),
    ]
    data = b"".join(wire(*m) for m in msgs)
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            dec = FrameDecoder(read_size=read_size)
            for chunk in (data[:i], data[i:j], data[j:]):
                dec.feed(chunk)
            assert drain(dec) == msgs, (i, j)


@st.composite
def messages(draw: st.DrawFn) -> Msg:
    kind = draw(st.sampled_from(list(Kind)))
    codec = draw(st.sampled_from(list(CodecId)))
    body = draw(st.binary(max_size=300))
    nbufs = draw(st.integers(0, 4)) if kind == Kind.DATA else 0
    buffers = [draw(st.binary(max_size=200)) for _ in range(nbufs)]
    return (int(kind), int(codec), body, buffers)


@settings(max_examples=150, deadline=None)
@given(
    msgs=st.lists(messages(), max_size=6),
    cuts=st.lists(st.integers(1, 400), max_size=40),
    read_size=st.sampled_from([8, 33, 256, 4096, 256 * 1024]),
)
def test_any_chunking_gives_the_same_frames(
    msgs: list[Msg], cuts: list[int], read_size: int
) -> None:
    data = b"".join(wire(*m) for m in msgs)
    dec = FrameDecoder(read_size=read_size)
    pos = 0
    for n in cuts:
        dec.feed(data[pos : pos + n])
        pos += n
    dec.feed(data[pos:])
    # CREDIT frames are kept apart (the channel applies them before older messages)
    assert drain(dec) == [m for m in msgs if m[0] != Kind.CREDIT]
    credits = [(int(Kind.CREDIT), f & 7 | f & 8, body, []) for f, body in dec.control]
    assert _merges_of(credits, msgs)
    dec.eof()


def _merges_of(credits: list[Msg], msgs: list[Msg]) -> bool:
    """Whether ``credits`` (the decoder's control entries, in order) are ``msgs``'
    CREDIT frames with some runs of back-to-back plain ones (flags 0 or 8, a 16-byte
    body) taken as one: the last one's body, "blocked" (8) if any was. The decoder
    merges a run it holds in one read, so which runs merge depends on the chunking."""
    wanted = [(i, m) for i, m in enumerate(msgs) if m[0] == Kind.CREDIT]

    def plain(m: Msg) -> bool:
        return m[1] in (0, 8) and len(m[2]) == 16 and not m[3]

    def fits(k: int, c: int) -> bool:  # credits[c:] from wanted[k:]
        if c == len(credits) or k == len(wanted):
            return c == len(credits) and k == len(wanted)
        end = k + 1
        while True:
            run = [m for _, m in wanted[k:end]]
            blocked = 8 if any(m[1] & 8 for m in run) else 0
            merged = run[0] if len(run) == 1 else (int(Kind.CREDIT), blocked, run[-1][2], [])
            if merged == credits[c] and fits(end, c + 1):
                return True
            if end == len(wanted) or wanted[end][0] != wanted[end - 1][0] + 1:
                return False
            if not (plain(wanted[end - 1][1]) and plain(wanted[end][1])):
                return False
            end += 1

    return fits(0, 0)


def test_a_run_of_plain_credits_may_merge_and_the_check_allows_it() -> None:
    """Two identical plain CREDITs back to back in one read come out as one entry
    (a case hypothesis found); the check above takes that and refuses a lost one."""
    credit = (int(Kind.CREDIT), 0, b"\x01" * 16, [])
    data = wire(*credit) * 2
    dec = FrameDecoder(read_size=256)
    dec.feed(data)
    assert len(dec.control) == 1
    got = [(int(Kind.CREDIT), f & 7 | f & 8, body, []) for f, body in dec.control]
    assert _merges_of(got, [credit, credit])
    assert not _merges_of(got, [credit, (int(Kind.DATA), 0, b"", []), credit])


def test_large_frame_gets_an_exact_buffer_read_in_place() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB, over half the read buffer
    data = wire(Kind.DATA, CodecId.RAW, b"", [payload])
    dec = FrameDecoder(read_size=64 * 1024)
    dec.feed(data[:100])
    region = dec.get_buffer()
    # the next read lands directly in the frame's own buffer, sized to what is missing
    assert len(region) == len(data) - 100
    region[:] = data[100:]
    dec.buffer_updated(len(region))
    (frame,) = dec.take_all()
    assert bytes(frame.buffers[0]) == payload
    assert frame.buffers[0].obj is region.obj  # the same memory, no further copy


def test_many_small_frames_from_one_read() -> None:
    data = b"".join(wire(Kind.DATA, CodecId.RAW, bytes([i])) for i in range(200))
    dec = FrameDecoder()
    target = dec.get_buffer()
    target[: len(data)] = data
    dec.buffer_updated(len(data))
    assert [bytes(f.body) for f in dec.take_all()] == [bytes([i]) for i in range(200)]


# ------------------------------------------------------------------------------- caps


@pytest.mark.parametrize(
    "announce",
    [
        header(blen=0xFFFFFFFF),  # 4 GiB body
        header(nbufs=1) + struct.pack("<Q", 2**62),  # a huge out-of-band buffer
        header(nbufs=2) + struct.pack("<QQ", 2**63, 2**63),  # lengths that overflow u64
        header(nbufs=255, blen=0xFFFFFFFF),  # refused before its table even arrives
    ],
)
def test_oversize_rejected_before_allocating(announce: bytes) -> None:
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge, match="the cap is"):
            dec.feed(announce)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes allocated for a refused frame"
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\x01")  # the error stays until the cap changes
    with pytest.raises(FrameTooLarge):
        dec.check()


def test_too_large_is_re_evaluated_when_the_cap_grows() -> None:
    # a handshake reads with a small cap; a data frame right behind it waits for the real one
    hello = wire(Kind.HELLO, CodecId.MSGPACK, b"\x80")
    data = wire(Kind.DATA, CodecId.RAW, b"x" * 5000)
    dec = FrameDecoder(max_frame=4096)
    dec.feed(hello + data)  # no error yet: the HELLO comes first
    assert drain(dec) == [(Kind.HELLO, CodecId.MSGPACK, b"\x80", [])]
    with pytest.raises(FrameTooLarge):
        dec.check()
    dec.max_frame = DEFAULT_MAX_FRAME
    dec.check()
    assert drain(dec) == [(Kind.DATA, CodecId.RAW, b"x" * 5000, [])]
    dec.feed(hello)
    assert len(dec.frames) == 1


def test_too_large_stays_too_large_under_a_cap_still_too_small() -> None:
    dec = FrameDecoder(max_frame=4096)
    with pytest.raises(FrameTooLarge):
        dec.feed(header(blen=10_000))
    dec.max_frame = 8192
    with pytest.raises(FrameTooLarge, match="the cap is 8192"):
        dec.check()


def test_cap_is_inclusive() -> None:
    body = b"x" * (2048 - HEADER.size)
    data = wire(Kind.DATA, CodecId.RAW, body)
    dec = FrameDecoder(max_frame=2048)
    dec.feed(data)
    assert len(dec.frames) == 1
    with pytest.raises(FrameTooLarge):
        FrameDecoder(max_frame=2047).feed(data)
    with pytest.raises(FrameTooLarge):
        parse_frame(data, max_frame=2047)


def test_default_cap_is_64_mib() -> None:
    assert DEFAULT_MAX_FRAME == 64 * 1024 * 1024
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(header(blen=DEFAULT_MAX_FRAME))


# ------------------------------------------------------------------ truncation and EOF


def test_truncated_stream_fails_at_eof() -> None:
    data = sample_stream()
    for cut in range(1, len(data)):
        dec = FrameDecoder()
        dec.feed(data[:cut])
        if dec.buffered == 0:
            dec.eof()  # the cut fell between two frames: a clean end
            continue
        with pytest.raises(FrameError, match="stream ended inside a frame"):
            dec.eof()


def test_clean_eof() -> None:
    dec = FrameDecoder()
    dec.eof()
    dec.feed(wire(Kind.DATA, CodecId.RAW, b"x"))
    dec.eof()
    assert len(dec.frames) == 1


# ----------------------------------------------------------------- malformed headers


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (header(version=0), "unsupported frame version 0"),
        (header(version=2), "unsupported frame version 2"),
        (header(version=255), "unsupported frame version"),
        (header(kind=0), "unknown frame kind 0"),
        (header(kind=7), "unknown frame kind 7"),
        (header(kind=255), "unknown frame kind"),
        (header(flags=0x40), "reserved flag bits"),
        (header(kind=Kind.HELLO, flags=0x10), "reserved flag bits"),  # CHUNKED: DATA only
        (header(kind=Kind.CREDIT, flags=0x20), "reserved flag bits"),  # FIELDS: DATA only
        (header(kind=Kind.HELLO, flags=0x08), "reserved flag bits"),  # receipts: DATA only
        (header(flags=0x80 | CodecId.RAW), "reserved flag bits"),
        (header(flags=4), "unknown codec id 4"),
        (header(flags=7), "unknown codec id 7"),
        (header(kind=Kind.HELLO, nbufs=1), "only DATA frames"),
        (header(kind=Kind.CLOSE, nbufs=3), "only DATA frames"),
    ],
)
def test_malformed_header(data: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        FrameDecoder().feed(data)
    with pytest.raises(FrameError, match=match):
        parse_frame(data + bytes(64))


def test_frames_before_a_bad_one_are_delivered_first() -> None:
    good = wire(Kind.DATA, CodecId.RAW, b"ok")
    dec = FrameDecoder()
    dec.feed(good + header(version=9))  # the error waits behind the good frame
    assert drain(dec) == [(Kind.DATA, CodecId.RAW, b"ok", [])]
    with pytest.raises(FrameError, match="unsupported frame version 9"):
        dec.check()
    with pytest.raises(FrameError):
        dec.get_buffer()  # final: the stream is out of sync


def test_malformed_frame_is_final_even_if_the_cap_changes() -> None:
    dec = FrameDecoder(max_frame=4096)
    with pytest.raises(FrameError, match="reserved flag bits"):
        dec.feed(header(flags=0x40))
    dec.max_frame = DEFAULT_MAX_FRAME
    with pytest.raises(FrameError, match="out of sync"):
        dec.feed(wire(Kind.DATA, CodecId.RAW, b"ok"))


# ------------------------------------------------------------------------- datagrams


def test_parse_frame_exact() -> None:
    for msg in SAMPLE:
        assert as_msg(parse_frame(wire(*msg))) == msg


def test_parse_frame_stray_bytes() -> None:
    data = wire(Kind.DATA, CodecId.RAW, b"abc", [b"de"])
    with pytest.raises(FrameError, match="1 stray bytes"):
        parse_frame(data + b"!")
    with pytest.raises(FrameError, match="stray bytes"):
        parse_frame(data + data)


def test_parse_frame_truncated_at_every_length() -> None:
    data = wire(Kind.DATA, CodecId.RAW, b"abc", [b"de", b"f"])
    for n in range(len(data)):
        with pytest.raises(FrameError, match="truncated frame"):
            parse_frame(data[:n])


def test_parse_frame_accepts_any_buffer_type() -> None:
    data = wire(Kind.DATA, CodecId.RAW, b"abc", [b"de"])
    for form in (data, bytearray(data), memoryview(data)):
        assert as_msg(parse_frame(form)) == (Kind.DATA, CodecId.RAW, b"abc", [b"de"])


def test_parse_frame_oversize() -> None:
    with pytest.raises(FrameTooLarge):
        parse_frame(header(blen=5000) + bytes(5000), max_frame=4096)


# ------------------------------------------------------------------------------ fuzz


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(3)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)) :]
        else:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
    return bytes(b)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000), split=st.integers(0, 2000))
def test_random_bytes_only_ever_raise_frame_errors(data: bytes, split: int) -> None:
    dec = FrameDecoder(max_frame=1 << 20, read_size=512)
    try:
        dec.feed(data[:split])
        dec.feed(data[split:])
        dec.eof()
    except FrameError:  # FrameTooLarge included
        pass
    try:
        parse_frame(data, max_frame=1 << 20)
    except FrameError:
        pass


def test_mutated_valid_streams_only_ever_raise_frame_errors() -> None:
    rng = random.Random(1234)
    base = sample_stream()
    for _ in range(2000):
        data = _mutate(rng, base)
        dec = FrameDecoder(max_frame=1 << 20, read_size=rng.choice([16, 512, 65536]))
        try:
            pos = 0
            while pos < len(data):
                n = rng.randrange(1, 64)
                dec.feed(data[pos : pos + n])
                pos += n
            dec.eof()
        except FrameError:
            continue
        for frame in dec.take_all():  # whatever survived is a well-formed frame
            assert frame.kind in set(Kind)
            assert frame.codec in set(CodecId)
            assert not frame.buffers or frame.kind == Kind.DATA
