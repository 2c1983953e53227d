"""multiprocessing.connection compatibility: framing, the authkey handshake, and real
interop with the standard library (in-process for this Python, in a subprocess for
3.12+ interpreters when one is installed)."""

from __future__ import annotations

import functools
import glob
import hmac
import multiprocessing
import multiprocessing.connection as mpc
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buzon.errors import (
    AuthenticationError,
    FrameError,
    FrameTooLarge,
    HandshakeError,
    MessageTooLarge,
    ProtocolError,
)
from buzon.protocol.mpcompat import (
    AUTH_MAX_MESSAGE,
    CHALLENGE,
    DIGESTS,
    FAILURE,
    WELCOME,
    AuthState,
    ClientAuth,
    MessageDecoder,
    ServerAuth,
    encode_header,
    encode_message,
)

TIMEOUT = 20.0
KEY = b"buzon test key"
SIZES = [0, 1, 64 * 1024, 3 * 1024 * 1024 + 7]


def pattern(n: int, tag: int) -> bytes:
    """Deterministic, non-periodic bytes; the subprocess peer computes the same."""
    return random.Random(2 * n + tag).randbytes(n)


def stream_of(payloads: Sequence[bytes]) -> bytes:
    return b"".join(b"".join(encode_message(p)) for p in payloads)


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    if not os.path.isdir("/proc/self/fd"):
        yield
        return
    before = len(os.listdir("/proc/self/fd"))
    yield
    assert len(os.listdir("/proc/self/fd")) == before, "a test leaked file descriptors"


# ---------------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, b"\x00\x00\x00\x00"),
        (5, b"\x00\x00\x00\x05"),
        (0x7FFFFFFF, b"\x7f\xff\xff\xff"),
        (0x80000000, b"\xff\xff\xff\xff" + b"\x00\x00\x00\x00\x80\x00\x00\x00"),
        (1 << 40, b"\xff\xff\xff\xff" + (1 << 40).to_bytes(8, "big")),
    ],
)
def test_encode_header_matches_the_byte_table(n: int, expected: bytes) -> None:
    assert encode_header(n) == expected


@pytest.mark.parametrize("n", [-1, 1 << 64])
def test_encode_header_rejects_impossible_lengths(n: int) -> None:
    with pytest.raises(ValueError):
        encode_header(n)


class _Recorder(mpc.Connection):
    """A stdlib Connection whose writes are recorded instead of performed."""

    sent: list[Any]

    def _send(self, buf: Any, write: Any = None) -> None:
        self.sent.append(buf)


class _Sized:
    """Claims a huge length without holding the bytes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("n", [0, 5, 16384, 16385, 0x7FFFFFFF, 0x80000000, 1 << 40])
def test_header_is_the_one_the_stdlib_writes(n: int) -> None:
    r, w = os.pipe()
    os.close(w)
    rec = _Recorder(r)
    try:
        rec.sent = []
        payload: Any = b"x" * n if n <= 16385 else _Sized(n)
        rec._send_bytes(payload)  # type: ignore[attr-defined]
        header = b"".join(b for b in rec.sent if isinstance(b, bytes))[: len(encode_header(n))]
        assert header == encode_header(n)
    finally:
        rec.close()


def test_small_payload_is_one_joined_buffer() -> None:
    assert encode_message(b"hello") == [b"\x00\x00\x00\x05hello"]
    assert encode_message(b"") == [b"\x00\x00\x00\x00"]


def test_big_payload_is_not_copied() -> None:
    data = b"a" * 100_000
    out = encode_message(data)
    assert out[0] == encode_header(100_000)
    assert out[1] is data
    arr = bytearray(100_000)
    out = encode_message(arr)
    arr[-1] = 7
    view = out[1]
    assert isinstance(view, memoryview)
    assert view[-1] == 7  # shares the caller's memory
    view.release()


def test_typed_buffers_are_sent_as_bytes() -> None:
    import array

    a = array.array("i", range(10_000))
    out = encode_message(a)
    assert out[0] == encode_header(a.itemsize * 10_000)
    assert bytes(out[1]) == a.tobytes()


def test_encode_respects_max_message() -> None:
    with pytest.raises(MessageTooLarge):
        encode_message(b"x" * 11, max_message=10)
    assert encode_message(b"x" * 10, max_message=10)


def test_encode_uses_the_long_form_over_2_gib() -> None:
    import mmap

    n = 0x80000001
    try:
        m = mmap.mmap(-1, n)  # untouched anonymous pages cost no memory
    except (OSError, OverflowError, MemoryError):
        pytest.skip("cannot map 2 GiB of address space here")
    try:
        out = encode_message(m)
        assert out[0] == b"\xff\xff\xff\xff" + n.to_bytes(8, "big")
        assert isinstance(out[1], memoryview) and out[1].nbytes == n
        out[1].release()
        del out
    finally:
        m.close()


def _messages(dec: MessageDecoder) -> list[bytes]:
    return [bytes(m) for m in dec.messages]


PAYLOADS = [b"", b"a", b"hello world", bytes(range(256)) * 3, b"", b"z" * 40, b"q" * 100]


@pytest.mark.parametrize("read_size", [64, 256 * 1024])
def test_decoder_survives_a_split_at_every_byte(read_size: int) -> None:
    long_form = struct.pack("!iQ", -1, 7) + b"longer!"
    stream = stream_of(PAYLOADS) + long_form
    expected = [*PAYLOADS, b"longer!"]
    for cut in range(len(stream) + 1):
        dec = MessageDecoder(read_size=read_size)
        dec.feed(stream[:cut])
        dec.feed(stream[cut:])
        assert _messages(dec) == expected, cut
        dec.eof()


def test_decoder_byte_by_byte_through_the_buffer_protocol() -> None:
    stream = stream_of(PAYLOADS)
    dec = MessageDecoder(read_size=64)
    for byte in stream:
        target = dec.get_buffer()
        assert len(target) >= 1
        target[0] = byte
        dec.buffer_updated(1)
    assert _messages(dec) == PAYLOADS
    assert dec.buffered == 0


@settings(max_examples=200, deadline=None, database=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    chunks=st.lists(st.integers(min_value=1, max_value=97), min_size=1),
    read_size=st.sampled_from([64, 128, 4096]),
)
def test_decoder_any_chunking(payloads: list[bytes], chunks: list[int], read_size: int) -> None:
    stream = memoryview(stream_of(payloads))
    dec = MessageDecoder(read_size=read_size)
    i = pos = 0
    while pos < len(stream):
        target = dec.get_buffer()
        n = min(chunks[i % len(chunks)], len(target), len(stream) - pos)
        target[:n] = stream[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        i += 1
    assert _messages(dec) == payloads
    dec.eof()


def test_big_message_gets_an_exact_buffer_read_in_place() -> None:
    dec = MessageDecoder(read_size=1024)
    dec.feed(encode_header(10_000) + b"ab")
    assert dec.buffered == 2
    target = dec.get_buffer()
    assert len(target) == 9_998  # exactly the rest of the payload, nothing more
    target[:] = b"c" * 9_998
    target.release()
    dec.buffer_updated(9_998)
    (msg,) = dec.messages
    assert isinstance(msg, bytearray) and len(msg) == 10_000
    assert msg[:3] == b"abc"


def test_many_small_messages_in_one_read() -> None:
    payloads = [bytes([i]) * i for i in range(50)]
    dec = MessageDecoder(read_size=64 * 1024)
    stream = stream_of(payloads)
    target = dec.get_buffer()
    target[: len(stream)] = stream
    target.release()
    dec.buffer_updated(len(stream))
    assert _messages(dec) == payloads
    assert all(type(m) is bytes for m in dec.messages)


def test_oversize_rejected_from_the_header_alone() -> None:
    dec = MessageDecoder(max_message=1000)
    dec.feed(encode_header(1000))  # exactly the cap: fine, waits for the payload
    assert not dec.messages
    dec = MessageDecoder(max_message=1000)
    with pytest.raises(FrameTooLarge):
        dec.feed(encode_header(1001))
    with pytest.raises(FrameError):  # final: the stream is out of sync
        dec.get_buffer()


def test_oversize_long_form_rejected_before_allocating() -> None:
    dec = MessageDecoder(max_message=1 << 30)
    tracemalloc.start()
    try:
        # Allocating 1 TiB first would raise MemoryError, not FrameTooLarge.
        with pytest.raises(FrameTooLarge):
            dec.feed(encode_header(1 << 40))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_negative_length_is_a_frame_error() -> None:
    dec = MessageDecoder()
    with pytest.raises(FrameError, match="negative"):
        dec.feed(struct.pack("!i", -2))


def test_eof_inside_a_message() -> None:
    for partial in (b"\x00\x00", encode_header(10) + b"abc", encode_header(200_000) + b"x"):
        dec = MessageDecoder(read_size=1024)
        dec.feed(partial)
        with pytest.raises(FrameError, match="stream ended"):
            dec.eof()
    MessageDecoder().eof()  # nothing pending: a clean end


def test_decoder_read_size_floor() -> None:
    with pytest.raises(ValueError):
        MessageDecoder(read_size=16)


# ------------------------------------------------------------- handshake, in memory


def counter_random() -> Callable[[int], bytes]:
    state = {"i": 0}

    def draw(n: int) -> bytes:
        state["i"] += 1
        return bytes([state["i"]]) * n

    return draw


def pump(a: ServerAuth | ClientAuth, b: ServerAuth | ClientAuth) -> None:
    for _ in range(8):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for m in src.outgoing():
                dst.receive_data(m)
                moved = True
        if not moved:
            return


@pytest.mark.parametrize("server_digest", [None, "md5", "sha256", "sha3_384"])
@pytest.mark.parametrize("client_digest", ["auto", None, "sha384"])
def test_handshake_between_our_two_sides(server_digest: str | None, client_digest: str) -> None:
    server = ServerAuth(KEY, counter_random(), digest=server_digest)
    client = ClientAuth(KEY, counter_random(), digest=client_digest)
    assert server.state is AuthState.AWAIT_ANSWER
    assert client.state is AuthState.AWAIT_CHALLENGE
    pump(server, client)
    assert server.done and client.done
    answered = "md5" if server_digest is None else server_digest
    assert client.answer_digest == server.peer_digest == answered
    mirrored = {"auto": answered, None: "md5"}.get(client_digest, client_digest)
    assert server.answer_digest == client.peer_digest == mirrored
    assert server.outgoing() == [] and client.outgoing() == []


def test_legacy_challenge_bytes_are_exactly_the_stdlib_ones() -> None:
    rnd = bytes(range(20))
    server = ServerAuth(KEY, rnd)
    (challenge,) = server.outgoing()
    assert challenge == struct.pack("!i", 31) + b"#CHALLENGE#" + rnd
    answer = hmac.new(KEY, rnd, "md5").digest()
    server.receive(answer)
    assert server.outgoing() == [struct.pack("!i", 9) + WELCOME]
    assert server.state is AuthState.AWAIT_CHALLENGE


def test_modern_challenge_and_answer_format() -> None:
    server = ServerAuth(KEY, b"r" * 40, digest="sha256")
    (challenge,) = server.outgoing()
    body = b"{sha256}" + b"r" * 40
    assert challenge[4:] == CHALLENGE + body
    client = ClientAuth(KEY, counter_random())
    client.receive_data(challenge)
    (answer,) = client.outgoing()
    assert answer[4:] == b"{sha256}" + hmac.new(KEY, body, "sha256").digest()


def test_random_callable_is_asked_for_20_or_40_bytes() -> None:
    asked: list[int] = []

    def draw(n: int) -> bytes:
        asked.append(n)
        return b"\x01" * n

    ServerAuth(KEY, draw)
    ServerAuth(KEY, draw, digest="sha256")
    assert asked == [20, 40]
    with pytest.raises(ValueError, match="random source"):
        ServerAuth(KEY, lambda n: b"short")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"authkey": "text"}, TypeError),
        ({"digest": "sha1"}, ValueError),
        ({"allow_md5": False}, ValueError),  # a legacy challenge is MD5
        ({"digest": "md5", "allow_md5": False}, ValueError),
        ({"random": b"x" * 19}, ValueError),
        ({"random": b"x" * (AUTH_MAX_MESSAGE - len(CHALLENGE) - 10 + 1)}, ValueError),
    ],
)
def test_constructor_checks(kwargs: dict[str, Any], error: type[Exception]) -> None:
    args: dict[str, Any] = {"authkey": KEY, "random": counter_random(), **kwargs}
    with pytest.raises(error):
        ServerAuth(**args)


@pytest.mark.parametrize("server_digest", [None, "sha256"])
def test_wrong_key_fails_both_sides(server_digest: str | None) -> None:
    server = ServerAuth(KEY, counter_random(), digest=server_digest)
    client = ClientAuth(b"another key", counter_random())
    client.receive_data(b"".join(server.outgoing()))
    with pytest.raises(AuthenticationError, match="digest received was wrong"):
        server.receive_data(b"".join(client.outgoing()))
    assert server.state is AuthState.FAILED
    failure = server.outgoing()
    assert failure == [struct.pack("!i", 9) + FAILURE]
    with pytest.raises(AuthenticationError, match="rejected our authkey"):
        client.receive_data(failure[0])
    assert client.state is AuthState.FAILED
    with pytest.raises(HandshakeError, match="already failed"):
        server.receive(b"anything")
    with pytest.raises(HandshakeError, match="already failed"):
        client.receive_data(b"anything")


def test_client_checks_the_server_too() -> None:
    """A server that passes our challenge with a wrong HMAC is refused (mutual auth)."""
    server = ServerAuth(KEY, counter_random())
    client = ClientAuth(KEY, counter_random())

    def pump_once(src: ServerAuth | ClientAuth, dst: ServerAuth | ClientAuth) -> None:
        for m in src.outgoing():
            dst.receive_data(m)

    pump_once(server, client)  # challenge
    pump_once(client, server)  # answer
    pump_once(server, client)  # WELCOME
    assert client.state is AuthState.AWAIT_ANSWER
    client.outgoing()  # the client's challenge, which a fake server answers badly
    with pytest.raises(AuthenticationError, match="digest received was wrong"):
        client.receive(b"\x00" * 16)
    assert client.outgoing() == [struct.pack("!i", 9) + FAILURE]


def test_allow_md5_false_rejects_a_311_style_answer() -> None:
    server = ServerAuth(KEY, counter_random(), digest="sha256", allow_md5=False)
    (challenge,) = server.outgoing()
    legacy_answer = hmac.new(KEY, challenge[4 + len(CHALLENGE) :], "md5").digest()
    with pytest.raises(AuthenticationError, match="MD5"):
        server.receive(legacy_answer)
    assert server.outgoing() == [struct.pack("!i", 9) + FAILURE]


def test_auto_client_without_md5_challenges_a_legacy_server_in_sha256() -> None:
    server = ServerAuth(KEY, counter_random())
    client = ClientAuth(KEY, counter_random(), allow_md5=False)
    pump(server, client)
    assert server.done and client.done
    assert client.answer_digest == "md5"  # answering MD5 is the verifier's business
    assert client.peer_digest == "sha256"


@pytest.mark.parametrize(
    ("message", "error", "match"),
    [
        (b"#HELLO#" + b"x" * 20, HandshakeError, "expected a #CHALLENGE#"),
        (CHALLENGE + b"x" * 19, HandshakeError, "malformed challenge"),
        (CHALLENGE + b"x" * 30, HandshakeError, "malformed challenge"),
        (CHALLENGE + b"{sha1}" + b"x" * 40, AuthenticationError, "unsupported"),
        (b"x" * (AUTH_MAX_MESSAGE + 1), FrameTooLarge, "cap"),
    ],
)
def test_bad_challenges(message: bytes, error: type[Exception], match: str) -> None:
    client = ClientAuth(KEY, counter_random())
    with pytest.raises(error, match=match):
        client.receive(message)
    assert client.state is AuthState.FAILED
    assert client.outgoing() == []


@pytest.mark.parametrize("answer", [b"", b"x" * 20, b"{sha256}short", b"{nope}" + b"x" * 32])
def test_bad_answers_are_refused_with_failure(answer: bytes) -> None:
    server = ServerAuth(KEY, counter_random())
    server.outgoing()
    with pytest.raises(AuthenticationError):
        server.receive(answer)
    assert server.outgoing() == [struct.pack("!i", 9) + FAILURE]


def test_unexpected_verdict() -> None:
    client = ClientAuth(KEY, counter_random())
    client.receive(CHALLENGE + b"x" * 20)
    with pytest.raises(HandshakeError, match="#WELCOME# or #FAILURE#"):
        client.receive(b"#MAYBE#")


def test_oversize_handshake_header_rejected_before_buffering() -> None:
    server = ServerAuth(KEY, counter_random())
    with pytest.raises(FrameTooLarge):
        server.receive_data(encode_header(AUTH_MAX_MESSAGE + 1))
    client = ClientAuth(KEY, counter_random())
    with pytest.raises(FrameTooLarge):
        client.receive_data(struct.pack("!iQ", -1, 1 << 62))


def test_handshake_split_at_every_byte_and_unused_data_kept() -> None:
    server = ServerAuth(KEY, counter_random(), digest="sha256")
    client = ClientAuth(KEY, counter_random())
    for _ in range(3):
        for byte in b"".join(server.outgoing()):
            client.receive_data(bytes([byte]))
        wire = b"".join(client.outgoing())
        if client.done:  # the client pipelines its first message after WELCOME
            wire += b"".join(encode_message(b"first")) + b"\x00\x00"
        for byte in wire:
            server.receive_data(bytes([byte]))
    assert server.done and client.done
    dec = MessageDecoder()
    dec.feed(server.unused_data)
    assert _messages(dec) == [b"first"] and dec.buffered == 2


def test_receive_after_done_is_an_error() -> None:
    server = ServerAuth(KEY, counter_random())
    client = ClientAuth(KEY, counter_random())
    pump(server, client)
    with pytest.raises(HandshakeError, match="over"):
        server.receive(WELCOME)
    client.receive_data(b"later")
    assert client.unused_data == b"later"


def test_digests_table() -> None:
    assert {"md5", "sha256", "sha384", "sha3_256", "sha3_384"} == DIGESTS


# ---------------------------------------------- interop with the real standard library


def write_all(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """A vectored write loop, as a non-blocking driver would do it."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        n = sock.sendmsg(views)
        while n:
            if n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def handshake(sock: socket.socket, auth: ServerAuth | ClientAuth) -> bytes:
    try:
        while not auth.done:
            write_all(sock, auth.outgoing())
            data = sock.recv(4096)
            if not data:
                raise EOFError("the peer closed during the handshake")
            auth.receive_data(data)
        write_all(sock, auth.outgoing())
        return auth.unused_data
    except ProtocolError:
        write_all(sock, auth.outgoing())  # the FAILURE, so the peer fails cleanly
        raise


def recv_message(sock: socket.socket, dec: MessageDecoder) -> bytes | bytearray:
    while not dec.messages:
        target = dec.get_buffer()
        n = sock.recv_into(target)
        target.release()
        if n == 0:
            dec.eof()
            raise EOFError("the peer closed")
        dec.buffer_updated(n)
    return dec.messages.popleft()


def our_side(sock: socket.socket, auth: ServerAuth | ClientAuth, sizes: Sequence[int]) -> None:
    """Authenticate, then for each size: receive the peer's message, send ours."""
    dec = MessageDecoder(read_size=64 * 1024)
    dec.feed(handshake(sock, auth))
    for n in sizes:
        got = recv_message(sock, dec)
        assert len(got) == n and got == pattern(n, 0), f"message of {n} bytes differs"
        write_all(sock, encode_message(pattern(n, 1)))


def stdlib_side(conn: mpc.Connection, role: str, key: bytes, sizes: Sequence[int]) -> str:
    if role == "server":
        mpc.deliver_challenge(conn, key)
        mpc.answer_challenge(conn, key)
    else:
        mpc.answer_challenge(conn, key)
        mpc.deliver_challenge(conn, key)
    for n in sizes:
        conn.send_bytes(pattern(n, 0))
        got = conn.recv_bytes()
        assert got == pattern(n, 1), f"message of {n} bytes differs"
    return "ok"


class StdlibPeer:
    """A stdlib Connection on one end of a socketpair, driven by a thread."""

    def __init__(self, target: Callable[[mpc.Connection], str]) -> None:
        self.ours, theirs = socket.socketpair()
        self.ours.settimeout(TIMEOUT)
        self.conn = mpc.Connection(os.dup(theirs.fileno()))
        theirs.close()
        self.result: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(target,), daemon=True)

    def _run(self, target: Callable[[mpc.Connection], str]) -> None:
        try:
            self.result = target(self.conn)
        except BaseException as exc:
            self.error = exc

    def outcome(self) -> str:
        """Wait for the stdlib side (our socket still open) and return or raise its outcome."""
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the stdlib side hung"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def __enter__(self) -> StdlibPeer:
        self.thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.ours.close()  # a stdlib side still reading gets EOF
        self.thread.join(TIMEOUT)
        self.conn.close()
        assert not self.thread.is_alive(), "the stdlib side hung"


@pytest.mark.parametrize("digest", [None, "sha256"])
def test_stdlib_client_with_our_server(digest: str | None) -> None:
    with StdlibPeer(lambda c: stdlib_side(c, "client", KEY, SIZES)) as peer:
        auth = ServerAuth(KEY, os.urandom, digest=digest)
        our_side(peer.ours, auth, SIZES)
        assert peer.outcome() == "ok"
        assert auth.peer_digest == auth.answer_digest == "md5"  # a 3.11 peer


def test_our_client_with_stdlib_server() -> None:
    with StdlibPeer(lambda c: stdlib_side(c, "server", KEY, SIZES)) as peer:
        auth = ClientAuth(KEY, os.urandom)
        our_side(peer.ours, auth, SIZES)
        assert peer.outcome() == "ok"


@pytest.mark.parametrize("digest", [None, "sha256"])
def test_wrong_key_stdlib_client_and_our_server(digest: str | None) -> None:
    with StdlibPeer(lambda c: stdlib_side(c, "client", b"other key", SIZES)) as peer:
        with pytest.raises(AuthenticationError, match="digest received was wrong"):
            our_side(peer.ours, ServerAuth(KEY, os.urandom, digest=digest), SIZES)
        with pytest.raises(multiprocessing.AuthenticationError):
            peer.outcome()


def test_wrong_key_our_client_and_stdlib_server() -> None:
    with StdlibPeer(lambda c: stdlib_side(c, "server", b"other key", SIZES)) as peer:
        with pytest.raises(AuthenticationError, match="rejected our authkey"):
            our_side(peer.ours, ClientAuth(KEY, os.urandom), SIZES)
        with pytest.raises(multiprocessing.AuthenticationError, match="digest received was wrong"):
            peer.outcome()


def test_stdlib_reads_the_long_form_header() -> None:
    def read(conn: mpc.Connection) -> str:
        return conn.recv_bytes().decode()

    with StdlibPeer(read) as peer:
        peer.ours.sendall(struct.pack("!iQ", -1, 5) + b"hello")
        assert peer.outcome() == "hello"


def test_unauthenticated_messages_both_directions() -> None:
    """Plain ``multiprocessing.connection`` framing, as ``Pipe()``/``Client`` without authkey."""

    def echo(conn: mpc.Connection) -> str:
        for _ in SIZES:
            conn.send_bytes(conn.recv_bytes())
        return "ok"

    with StdlibPeer(echo) as peer:
        dec = MessageDecoder()
        for n in SIZES:
            write_all(peer.ours, encode_message(pattern(n, 3)))
            assert recv_message(peer.ours, dec) == pattern(n, 3)
        assert peer.outcome() == "ok"


# --------------------------------------------- interop with Python 3.12+ (subprocess)

CHILD = r"""
import random, sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
fd, role, key = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3])
sizes = [int(s) for s in sys.argv[4:]]
pattern = lambda n, tag: random.Random(2 * n + tag).randbytes(n)
conn = Connection(fd)
try:
    if role == "server":
        deliver_challenge(conn, key)
        answer_challenge(conn, key)
    else:
        answer_challenge(conn, key)
        deliver_challenge(conn, key)
    for n in sizes:
        conn.send_bytes(pattern(n, 0))
        if conn.recv_bytes() != pattern(n, 1):
            print("mismatch", n)
            sys.exit(1)
    print("ok")
except AuthenticationError as exc:
    print("AuthenticationError:", exc)
finally:
    conn.close()
"""


@functools.cache
def find_python(version: str) -> str | None:
    """An interpreter of ``version``: $BUZON_INTEROP_PYTHONS, PATH, or pyenv's versions."""
    candidates = [p for p in os.environ.get("BUZON_INTEROP_PYTHONS", "").split(os.pathsep) if p]
    candidates.append(shutil.which(f"python{version}") or "")
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates += sorted(
        glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", "python3"))
    )
    probe = "import sys; print('%d.%d' % sys.version_info[:2])"
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-c", probe], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == version:
            return exe
    return None


def run_with_child(
    version: str, role: str, key: bytes, ours: Callable[[socket.socket], None]
) -> str:
    exe = find_python(version)
    if exe is None:
        pytest.skip(f"no Python {version} found (set BUZON_INTEROP_PYTHONS)")
    a, b = socket.socketpair()
    with a:
        with b:
            args = [exe, "-c", CHILD, str(b.fileno()), role, key.hex(), *map(str, SIZES)]
            proc = subprocess.Popen(
                args, pass_fds=[b.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        a.settimeout(TIMEOUT)
        try:
            ours(a)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err.decode()
    return str(out.decode().strip())


NEW_PYTHONS = ["3.12", "3.13"]


@pytest.mark.parametrize("version", NEW_PYTHONS)
@pytest.mark.parametrize("digest", [None, "sha256"])
def test_new_python_client_with_our_server(version: str, digest: str | None) -> None:
    auth = ServerAuth(KEY, os.urandom, digest=digest)
    assert run_with_child(version, "client", KEY, lambda s: our_side(s, auth, SIZES)) == "ok"
    assert auth.peer_digest == ("md5" if digest is None else digest)
    assert auth.answer_digest == "sha256"  # 3.12+ challenges in the modern format


@pytest.mark.parametrize("version", NEW_PYTHONS)
def test_our_client_with_new_python_server(version: str) -> None:
    auth = ClientAuth(KEY, os.urandom)
    assert run_with_child(version, "server", KEY, lambda s: our_side(s, auth, SIZES)) == "ok"
    assert auth.answer_digest == auth.peer_digest == "sha256"


@pytest.mark.parametrize("version", NEW_PYTHONS)
@pytest.mark.parametrize("role", ["client", "server"])
def test_wrong_key_with_new_python(version: str, role: str) -> None:
    def ours(sock: socket.socket) -> None:
        auth: ServerAuth | ClientAuth
        auth = ServerAuth(KEY, os.urandom) if role == "client" else ClientAuth(KEY, os.urandom)
        with pytest.raises(AuthenticationError):
            our_side(sock, auth, SIZES)

    out = run_with_child(version, role, b"other key", ours)
    assert out.startswith("AuthenticationError"), out
