"""The ``fifo:`` envelope (``buzon.protocol.fifo``): pieces, reassembly, resynchronisation.

No OS here: bytes in, messages and counters out, fuzzed with hypothesis.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buzon.protocol.crc32c import crc32c
from buzon.protocol.fifo import (
    ABORT,
    ACCELERATED,
    FIRST,
    LAST,
    MAGIC,
    MAX_PAYLOAD,
    MAX_PIECE_PAYLOAD,
    OVERHEAD,
    PIECE_MAX,
    POOL_KEEP,
    POOL_MIN,
    Encoder,
    Reassembler,
    piece,
)

MAX_FRAME = 1 << 20


def _feed_cut(r: Reassembler, data: bytes, cuts: list[int], now: float = 0.0) -> None:
    """Feed ``data`` in chunks whose sizes cycle through ``cuts``."""
    pos = 0
    i = 0
    while pos < len(data):
        n = cuts[i % len(cuts)] if cuts else len(data)
        r.feed(data[pos : pos + n], now)
        pos += n
        i += 1


def test_header_layout() -> None:
    enc = Encoder(pid=0x01020304, nonce=0xA0B0C0D0)
    (piece,) = enc.encode([b"hello"])
    assert len(piece) == OVERHEAD + 5 == 37
    assert piece[:4] == MAGIC
    assert piece[4] == 1  # version
    assert piece[5] == FIRST | LAST
    assert struct.unpack_from("<HIIII", piece, 6) == (0, 5, 0x01020304, 0xA0B0C0D0, 0)
    assert struct.unpack_from("<I", piece, 24)[0] == crc32c(piece[:24])
    assert piece[28:33] == b"hello"
    assert struct.unpack_from("<I", piece, 33)[0] == crc32c(piece[:33])
    (second,) = enc.encode([b""])
    assert struct.unpack_from("<I", second, 20)[0] == 1  # seq counts pieces


def test_pieces_fit_pipe_buf() -> None:
    enc = Encoder(1, 2)
    for n in (0, 1, MAX_PAYLOAD - 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 3 * MAX_PAYLOAD, 100_000):
        pieces = enc.encode([b"x" * n])
        assert all(len(p) <= PIECE_MAX for p in pieces)
        assert sum(len(p) - OVERHEAD for p in pieces) == n
        assert pieces[0][5] & FIRST and pieces[-1][5] & LAST


def test_several_buffers_are_one_message() -> None:
    enc = Encoder(1, 2)
    r = Reassembler(MAX_FRAME)
    bufs = [b"head", memoryview(b"y" * 9000), bytearray(b"tail")]
    for p in enc.encode(bufs):
        r.feed(p)
    assert list(r.messages) == [b"head" + b"y" * 9000 + b"tail"]


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(
        st.lists(st.integers(0, 3 * MAX_PAYLOAD + 7), min_size=0, max_size=5),
        min_size=1,
        max_size=4,
    ),
    garbage=st.lists(st.binary(max_size=64), max_size=6),
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.integers(1, 9000), max_size=5),
)
def test_writers_interleaved_with_garbage(
    sizes: list[list[int]], garbage: list[bytes], seed: int, cuts: list[int]
) -> None:
    """Several writers' pieces interleave at random (as the kernel may), runs of garbage
    fall between pieces, the stream is read in arbitrary cuts: every writer's messages
    arrive whole and in its order, and the garbage is counted."""
    rng = random.Random(seed)
    writers = [Encoder(pid=100 + i, nonce=rng.getrandbits(32)) for i in range(len(sizes))]
    sent = [[rng.randbytes(n) for n in ns] for ns in sizes]
    pairs = zip(writers, sent, strict=True)
    queues = [[p for m in msgs for p in w.encode([m])] for w, msgs in pairs]
    stream = bytearray()
    garbage = [g for g in garbage if g]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        stream += q.pop(0)
        if garbage and rng.random() < 0.3:
            stream += garbage.pop()
    for g in garbage:
        stream += g
    r = Reassembler(MAX_FRAME)
    _feed_cut(r, bytes(stream), cuts)
    got = list(r.messages)
    for msgs in sent:  # each writer's messages, in order, as a subsequence of what came
        it = iter(got)
        assert all(any(m == g for g in it) for m in msgs)
    assert len(got) == sum(len(m) for m in sent)
    assert r.abandoned == 0
    assert r.buffered <= OVERHEAD  # at most a tail that might start an envelope


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=20_000), cuts=st.lists(st.integers(1, 5000), max_size=4))
def test_random_bytes_never_raise_and_stay_bounded(data: bytes, cuts: list[int]) -> None:
    r = Reassembler(64 * 1024, max_pending=128 * 1024)
    _feed_cut(r, data, cuts)
    assert r.buffered <= 128 * 1024 + PIECE_MAX
    assert r.rejected_bytes <= len(data)


@settings(max_examples=100, deadline=None)
@given(
    prefix=st.binary(max_size=300),
    flips=st.lists(st.integers(0, 10**9), max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_damage_then_resynchronise(prefix: bytes, flips: list[int], seed: int) -> None:
    """A damaged message is never delivered damaged; the messages after it are."""
    rng = random.Random(seed)
    enc = Encoder(7, 7)
    bad = bytearray(b"".join(enc.encode([rng.randbytes(rng.randrange(10_000))])))
    for f in flips:
        bad[f % len(bad)] ^= 1 << (f % 8)
    good = [rng.randbytes(rng.randrange(6000)) for _ in range(3)]
    other = Encoder(8, 8)
    stream = prefix + bytes(bad) + b"".join(p for m in good for p in other.encode([m]))
    r = Reassembler(MAX_FRAME)
    r.feed(stream)
    got = list(r.messages)
    assert got[-3:] == good
    assert len(got) <= 4


def test_partial_old_frame_and_text_are_skipped() -> None:
    """What poisoned the old stream for good: a cut frame header, a shell's text."""
    enc = Encoder(1, 1)
    r = Reassembler(MAX_FRAME)
    r.feed(b"\x01\x01\x00\x00\x05")  # 5 bytes of a frame header (a writer killed mid-frame)
    r.feed(b"hello from a shell\n")
    r.feed(b"".join(enc.encode([b"good"])))
    assert list(r.messages) == [b"good"]
    assert r.rejected_frames == 1  # one run of garbage
    assert r.rejected_bytes == 5 + 19


def test_false_header_does_not_hold_good_pieces() -> None:
    """Garbage that starts like an envelope is rejected by its header CRC at once: the
    good piece behind it is delivered without waiting for the bytes it announced."""
    enc = Encoder(1, 1)
    fake = MAGIC + bytes([1, FIRST | LAST, 0, 0]) + struct.pack("<I", 4000) + bytes(16)
    r = Reassembler(MAX_FRAME)
    r.feed(fake + b"".join(enc.encode([b"good"])))
    assert list(r.messages) == [b"good"]


def test_unfinished_message_dropped_when_writer_starts_another() -> None:
    enc = Encoder(1, 1)
    r = Reassembler(MAX_FRAME)
    first = enc.encode([b"a" * 10_000])
    r.feed(first[0])  # the send gave up after one piece
    for p in enc.encode([b"b" * 10_000]):
        r.feed(p)
    assert list(r.messages) == [b"b" * 10_000]
    assert r.abandoned == 1 and r.rejected_frames == 1


def test_abort_and_orphans() -> None:
    enc = Encoder(1, 1)
    r = Reassembler(MAX_FRAME)
    pieces = enc.encode([b"a" * 10_000])
    r.feed(pieces[0])
    r.feed(enc.abort())
    assert r.buffered == 0 and r.abandoned == 1
    r.feed(pieces[1])  # a piece whose message is gone: dropped, not delivered
    assert not r.messages and r.abandoned == 2


def test_frame_timeout_drops_a_dead_writer() -> None:
    dead, alive = Encoder(1, 1), Encoder(2, 2)
    r = Reassembler(MAX_FRAME, frame_timeout=30.0)
    r.feed(dead.encode([b"a" * 10_000])[0], now=100.0)
    assert r.deadline() == 130.0
    r.feed(b"".join(alive.encode([b"ok"])), now=110.0)
    r.expire(129.0)
    assert r.buffered > 0
    r.expire(131.0)
    assert r.buffered == 0 and r.deadline() is None
    assert list(r.messages) == [b"ok"] and r.abandoned == 1


def test_memory_caps() -> None:
    """A message over max_frame is dropped as it grows; at most max_writers messages are
    in reassembly; their bytes stay under max_pending."""
    r = Reassembler(8192, max_writers=4, max_pending=20_000)
    big = Encoder(1, 1)
    for p in big.encode([b"x" * 20_000]):
        r.feed(p)
    assert not r.messages and r.buffered == 0 and r.abandoned >= 1
    for i in range(10):  # ten writers, each one piece into a message
        r.feed(Encoder(10 + i, 0).encode([b"y" * 6000])[0], now=float(i))
        assert len(r._partial) <= 4
        assert r.buffered <= 20_000


@pytest.mark.parametrize("cut", [1, 3, 27, 28, 29, 31, 32, 33, 4095, 4096, 4097])
def test_every_cut_of_the_stream(cut: int) -> None:
    enc = Encoder(3, 4)
    msgs = [b"m" * n for n in (0, 1, 4068, 4069, 20_000)]
    r = Reassembler(MAX_FRAME)
    _feed_cut(r, b"".join(p for m in msgs for p in enc.encode([m])), [cut])
    assert list(r.messages) == msgs
    assert r.rejected_frames == 0


def test_large_pieces_and_a_cut_write() -> None:
    """Pieces over PIPE_BUF (written where the kernel keeps a write contiguous): one cut
    short leaves a stump the reader skips once the FIFO is drained; the piece sent
    again whole completes the message, and another writer's pieces are not held."""
    body = random.Random(5).randbytes(500_000)
    whole = [piece(FIRST, body[: 300_000 - 44_000], 9, 9, 7)]
    second = piece(LAST, body[256_000:], 9, 9, 8)
    other = Encoder(1, 1).encode([b"other"])[0]
    r = Reassembler(MAX_FRAME)
    r.feed(whole[0])
    r.feed(second[:100_000])  # the write was cut short here
    r.feed(other)
    assert list(r.messages) == []  # "other" waits behind the stump's announced length
    r.drained()  # the FIFO is empty: the stump is junk
    assert r.stumps == 1 and r.rejected_frames == 0  # a cut write is no garbage
    r.feed(other)
    r.feed(second)  # sent again, whole
    assert list(r.messages) == [b"other", body]
    assert r.stump_bytes == 100_000 + len(other) and r.rejected_bytes == 0
    # a stump followed at once by other pieces is found without waiting for a drain
    r.feed(second[:50_000] + b"".join(Encoder(2, 2).encode([b"x" * 300_000])))
    assert len(r.messages) == 3 and r.stumps == 2 and r.rejected_frames == 0
    assert MAX_PIECE_PAYLOAD >= 256_000


# -- the C speedup (protocol/_envelope.c) against the Python reference ------------------

FRAME_HEAD = struct.Struct("<BBBBI")


def _frame(kind: int, flags: int, body: bytes, buffers: tuple[bytes, ...] = ()) -> bytes:
    table = b"".join(struct.pack("<Q", len(b)) for b in buffers)
    return (
        FRAME_HEAD.pack(1, kind, flags, len(buffers), len(body)) + table + body + b"".join(buffers)
    )


def _as_buffers(
    data: bytes, cuts: list[int], kinds: list[int]
) -> list[bytes | bytearray | memoryview]:
    """``data`` as a list of buffers of mixed types."""
    out: list[bytes | bytearray | memoryview] = []
    pos = 0
    for i, c in enumerate([*cuts, len(data)]):
        part = data[pos : max(pos, min(len(data), pos + c))]
        pos += len(part)
        kind = kinds[i % len(kinds)] if kinds else 0
        out.append(part if kind == 0 else bytearray(part) if kind == 1 else memoryview(part))
        if pos >= len(data):
            break
    return out


def test_the_speedup_is_built() -> None:
    """The project builds it (``make install``); the sanitizer run tests it."""
    from buzon.protocol import _envelope

    assert ACCELERATED and _envelope.piece(FIRST | LAST, [b"x"], 1, 2, 3) == piece(
        FIRST | LAST, b"x", 1, 2, 3
    )


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=0, max_size=12),
    cuts=st.lists(st.integers(0, 3000), max_size=3),
    kinds=st.lists(st.integers(0, 2), max_size=3),
    pid=st.integers(0, 2**32 - 1),
    seq=st.sampled_from([0, 1, 2**32 - 3, 2**32 - 1, 12345]),
    start=st.integers(0, 3),
    limit=st.integers(0, 20_000),
)
def test_c_encoder_matches_python(
    sizes: list[int],
    cuts: list[int],
    kinds: list[int],
    pid: int,
    seq: int,
    start: int,
    limit: int,
) -> None:
    """Same pieces, same packed writes, same piece numbers, byte for byte."""
    rng = random.Random(sum(sizes) + pid)
    msgs = [_as_buffers(rng.randbytes(n), cuts, kinds) for n in sizes]
    fast, ref = Encoder(pid, ~pid, accelerated=True), Encoder(pid, ~pid, accelerated=False)
    fast.seq = ref.seq = seq
    assert fast.pack(msgs, start, limit) == ref.pack(msgs, start, limit)
    data, end, after = ref.pack(msgs, start, limit)
    first = min(start, len(msgs))
    assert len(data) <= limit and first <= end <= len(msgs)
    assert after == (seq + end - first) & 0xFFFFFFFF
    for bufs in msgs:
        assert fast.encode(bufs) == ref.encode(bufs)
        assert fast.seq == ref.seq
    assert fast.abort() == ref.abort()


def _hostile_stream(rng: random.Random, items: int) -> tuple[bytes, int]:
    """Writers' pieces interleaved with everything a reader must survive: frames the C
    scan takes (plain DATA, receipt bit), frames only Python takes (buffers, another
    kind), messages that are no frame, several-piece messages, aborts, garbage, damaged
    pieces and stumps of cut writes. Returns the stream and how many good frames."""
    writers = [Encoder(10 + i, rng.getrandbits(32), accelerated=False) for i in range(3)]
    out = bytearray()
    for _ in range(items):
        w = rng.choice(writers)
        what = rng.random()
        if what < 0.45:
            body = rng.randbytes(rng.choice([0, 1, 7, 60, 500, MAX_PAYLOAD - 8]))
            pieces = w.encode([_frame(1, rng.choice([0, 1, 2, 3, 8 | 1]), body)])
        elif what < 0.55:
            pieces = w.encode([_frame(1, 1, b"body", (rng.randbytes(rng.randrange(50)),))])
        elif what < 0.6:
            pieces = w.encode([_frame(6, 0, rng.randbytes(16))])  # CREDIT: a frame, kind 6
        elif what < 0.65:
            pieces = w.encode([rng.randbytes(rng.randrange(40))])  # no frame
        elif what < 0.7:  # the shape of a plain frame, one header byte wrong or unusual
            head = bytearray(FRAME_HEAD.pack(1, 1, 1, 0, 5))
            i, v = rng.choice([(0, 2), (1, 0), (1, 2), (1, 64), (2, 0x11), (2, 0x21), (2, 0x41)])
            head[i] = rng.choice([v, 0x81, 7, 4, 9])
            pieces = w.encode([bytes(head) + b"body!"])
        elif what < 0.78:
            n = rng.randrange(MAX_PAYLOAD, 3 * MAX_PAYLOAD)
            pieces = w.encode([_frame(1, 1, rng.randbytes(n))])
            if rng.random() < 0.3:  # given up after its first piece
                pieces = [pieces[0], w.abort()]
        elif what < 0.85:
            pieces = [rng.randbytes(rng.randrange(1, 60))]  # garbage
            if rng.random() < 0.5:
                pieces[0] = MAGIC + pieces[0]
        elif what < 0.93:
            (p,) = w.encode([_frame(1, 1, rng.randbytes(rng.randrange(100)))])
            bad = bytearray(p)
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
            pieces = [bytes(bad)]
        else:
            (p,) = w.encode([_frame(1, 1, rng.randbytes(200))])
            pieces = [p[: rng.randrange(29, len(p))]]  # a stump
        out += b"".join(pieces)
    return bytes(out), items


def _read_all(
    r: Reassembler, data: bytes, rng: random.Random, drains: bool
) -> tuple[bytes, tuple[int, ...]]:
    """Feed ``data`` in random reads, take the output in random-sized buffers (as a
    channel's frame decoder would), now and then declaring the source drained."""
    out = bytearray()
    pos = 0
    while pos < len(data) or r.messages:
        n = min(rng.randrange(1, 9000), len(data) - pos)
        dst = memoryview(bytearray(rng.choice([8, 100, 5000, 300_000])))
        mode = rng.random()
        drained = drains and rng.random() < 0.2
        if n and mode < 0.3 and r.direct and n <= dst.nbytes:  # the read went into dst
            dst[:n] = data[pos : pos + n]
            pos += n
            out += dst[: r.received_in_place(dst, n, 0.0, drained)]
            continue
        if n:
            view = r.get_buffer()
            n = min(n, view.nbytes)
            view[:n] = data[pos : pos + n]
            view.release()
            pos += n
            if mode < 0.6:  # the reader's one call per read
                out += dst[: r.received(n, dst, 0, 0.0, drained)]
                continue
            r.buffer_updated(n, 0.0, parse=False)
        out += dst[: r.read_into(dst)]
        if drained:
            r.drained()
    dst = memoryview(bytearray(1 << 20))
    out += dst[: r.read_into(dst)]
    counts = (r.rejected_frames, r.rejected_bytes, r.abandoned, r.refused, r.stumps)
    return bytes(out), (*counts, r.stump_bytes, r.buffered)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), items=st.integers(1, 60), drains=st.booleans())
def test_c_scan_matches_python(seed: int, items: int, drains: bool) -> None:
    """The reader with the C scan gives exactly the stream and the counters of the
    Python reader (and of ``feed`` + :attr:`messages`, the reference), whatever the
    input and however it is cut into reads and output buffers."""
    data, _ = _hostile_stream(random.Random(seed), items)
    fast = Reassembler(MAX_FRAME, frames=True, join=False)
    ref = Reassembler(MAX_FRAME, frames=True, join=False, accelerated=False)
    got = _read_all(fast, data, random.Random(seed + 1), drains)
    assert got == _read_all(ref, data, random.Random(seed + 1), drains)
    if not drains:
        whole = Reassembler(MAX_FRAME, frames=True, accelerated=False)
        whole.feed(data)
        assert got[0] == b"".join(whole.messages)  # type: ignore[arg-type]


def test_c_scan_refuses_what_is_no_frame() -> None:
    """One writer's enveloped bytes that are no frame (or a frame over max_frame) are
    dropped and counted; the good frames around them pass, in order."""
    enc = Encoder(1, 1)
    good = [_frame(1, 1, b"a" * n) for n in (0, 10, 200)]
    stream = b"".join(
        enc.encode([m])[0]
        for m in (good[0], b"not a frame", good[1], _frame(1, 1, b"z" * 300), good[2])
    )
    r = Reassembler(256, frames=True)
    r.feed(b"")
    r.buffer_updated(0)
    view = r.get_buffer()
    view[: len(stream)] = stream
    view.release()
    r.buffer_updated(len(stream), parse=False)
    dst = memoryview(bytearray(4096))
    n = r.read_into(dst)
    assert bytes(dst[:n]) == b"".join(good)
    assert r.refused == 2 and r.rejected_frames == 2


@pytest.mark.parametrize("accelerated", [True, False])
def test_each_run_of_garbage_counts_once(accelerated: bool) -> None:
    """Garbage, good pieces, garbage again, each read on its own: two runs of rejected
    bytes, whichever way the good pieces were unwrapped (in place or not)."""
    r = Reassembler(MAX_FRAME, frames=True, accelerated=accelerated)
    good = Encoder(1, 1).encode([_frame(1, 1, b"ok")])[0]
    out = bytearray()
    for chunk in (b"junk" * 10, good, good, b"junk" * 10, good):
        dst = memoryview(bytearray(PIECE_MAX))
        if r.direct:
            dst[: len(chunk)] = chunk
            out += dst[: r.received_in_place(dst, len(chunk), 0.0, True)]
        else:
            view = r.get_buffer()
            view[: len(chunk)] = chunk
            view.release()
            out += dst[: r.received(len(chunk), dst, 0, 0.0, True)]
    assert out == _frame(1, 1, b"ok") * 3
    assert r.rejected_frames == 2 and r.rejected_bytes == 80


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_big_pieces_in_reused_buffers_come_out_intact(seed: int) -> None:
    """A reader of frames keeps the payloads of big pieces (POOL_MIN or more) in
    buffers it reuses once their message was handed out: messages of several big
    pieces from two writers, interleaved, one of them given up half-way, read in cuts
    into output buffers of any size, come out exactly as the reference reassembles
    them, and the reader keeps at most POOL_KEEP such buffers."""
    rng = random.Random(seed)
    writers = [(11, 1), (22, 2)]
    seqs = [0, 0]
    streams: list[list[bytes]] = [[], []]
    for n in range(6):
        w = rng.randrange(2)
        size = 600_000 if n == 3 else rng.choice([POOL_MIN, 300_000, 600_000])
        msg = _frame(1, 0, rng.randbytes(size - 8))  # a DATA frame of that whole size
        step = rng.choice([POOL_MIN, 200_000, MAX_PIECE_PAYLOAD])
        cuts = [*range(0, len(msg), step), len(msg)]
        pieces = []
        for k in range(len(cuts) - 1):
            flags = (FIRST if k == 0 else 0) | (LAST if k == len(cuts) - 2 else 0)
            pieces.append(piece(flags, msg[cuts[k] : cuts[k + 1]], *writers[w], seqs[w]))
            seqs[w] += 1
        if n == 3:  # given up after its first piece
            pieces = [pieces[0], piece(ABORT, b"", *writers[w], seqs[w])]
            seqs[w] += 1
        streams[w].extend(pieces)
    data = b""
    while streams[0] or streams[1]:  # interleave the writers piece by piece
        w = rng.randrange(2) if streams[0] and streams[1] else (0 if streams[0] else 1)
        data += streams[w].pop(0)
    fast = Reassembler(MAX_FRAME, frames=True, join=False)
    ref = Reassembler(MAX_FRAME, frames=True, accelerated=False)
    ref.feed(data)
    # (never drained: reads of at most 9000 bytes find big pieces unfinished)
    got = _read_all(fast, data, random.Random(seed + 1), False)
    assert got[0] == b"".join(ref.messages)  # type: ignore[arg-type]
    assert fast.abandoned == ref.abandoned == 1
    assert fast._pool is not None and 1 <= len(fast._pool) <= POOL_KEEP
