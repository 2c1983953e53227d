"""The opening exchange, sans-IO: two Handshake objects passing bytes, no sockets."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgspec
import pytest

from buzon.errors import (
    AuthenticationError,
    FrameTooLarge,
    HandshakeError,
    MessageTooLarge,
    ProtocolError,
)
from buzon.protocol.frames import (
    HANDSHAKE_MAX_FRAME,
    CodecId,
    Frame,
    FrameDecoder,
    Kind,
    encode_frame,
)
from buzon.protocol.handshake import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    TRANSITIONS,
    Handshake,
    Hello,
    State,
)

KEY = b"right key"
NC = bytes(range(NONCE_SIZE))  # fixed nonces: randomness is an input
NS = bytes(range(100, 100 + NONCE_SIZE))


def frames_of(data: bytes) -> list[Frame]:
    """Decode bytes a side sent, with the handshake cap the drivers use."""
    dec = FrameDecoder(max_frame=HANDSHAKE_MAX_FRAME)
    dec.feed(data)
    dec.eof()
    return dec.take_all()


def deliver(src: Handshake, dst: Handshake) -> None:
    for frame in frames_of(src.outgoing()):
        dst.receive(frame)


def raw_frame(kind: int, obj: Any, codec: int = CodecId.MSGPACK) -> Frame:
    body = msgspec.msgpack.encode(obj)
    data = b"".join(bytes(p) for p in encode_frame(kind, codec, body))
    (frame,) = frames_of(data)
    return frame


def client(key: bytes | None = None, **opts: Any) -> Handshake:
    return Handshake("client", pid=111, options=opts, authkey=key, nonce=NC if key else b"")


def server(key: bytes | None = None, **opts: Any) -> Handshake:
    return Handshake("server", pid=222, options=opts, authkey=key, nonce=NS if key else b"")


def welcome_of(side: Handshake) -> dict[str, Any]:
    """The WELCOME a side queued, decoded."""
    (frame,) = frames_of(side.outgoing())
    assert frame.kind == Kind.WELCOME
    decoded: dict[str, Any] = msgspec.msgpack.decode(frame.body)
    return decoded


def mac(key: bytes, tag: bytes, first: bytes, second: bytes) -> bytes:
    """The documented MAC, computed independently of the module."""
    return hmac.new(key, b"buzon-v1 " + tag + first + second, hashlib.sha256).digest()


# -------------------------------------------------------------------------- success


def test_without_authkey() -> None:
    c, s = client(codec="msgpack"), server(codec="json")
    assert c.state is State.AWAIT_HELLO and s.state is State.AWAIT_HELLO
    assert s.outgoing() == b""  # the server speaks second
    deliver(c, s)
    assert s.done
    deliver(s, c)
    assert c.done
    assert c.outgoing() == b"" and s.outgoing() == b""
    assert s.peer is not None and c.peer is not None
    assert (s.peer.pid, s.peer.role, s.peer.opts) == (111, "client", {"codec": "msgpack"})
    assert (c.peer.pid, c.peer.role, c.peer.opts) == (222, "server", {"codec": "json"})
    assert s.peer.nonce is None and c.peer.mac is None


def test_with_authkey() -> None:
    c, s = client(KEY), server(KEY)
    deliver(c, s)  # HELLO{nc}
    assert s.state is State.AWAIT_AUTH
    deliver(s, c)  # HELLO{ns, mac_s}
    assert c.state is State.AWAIT_WELCOME
    deliver(c, s)  # AUTH{mac_c}
    assert s.done
    deliver(s, c)  # WELCOME{ok}
    assert c.done
    assert s.peer is not None and s.peer.nonce == NC
    assert c.peer is not None and c.peer.nonce == NS


def test_macs_are_the_documented_ones() -> None:
    c, s = client(KEY), server(KEY)
    deliver(c, s)
    (hello,) = frames_of(s.outgoing())
    decoded = msgspec.msgpack.decode(hello.body, type=Hello)
    assert decoded.mac == mac(KEY, b"S", NC, NS)
    c.receive(hello)
    (auth,) = frames_of(c.outgoing())
    assert auth.kind == Kind.AUTH
    assert msgspec.msgpack.decode(auth.body) == {"mac": mac(KEY, b"C", NS, NC)}


def test_every_handshake_frame_is_small_msgpack() -> None:
    c, s = client(KEY), server(KEY)
    for src, dst in ((c, s), (s, c), (c, s), (s, c)):
        data = src.outgoing()
        assert 0 < len(data) <= HANDSHAKE_MAX_FRAME
        for frame in frames_of(data):
            assert frame.codec == CodecId.MSGPACK and not frame.buffers
            dst.receive(frame)
    assert c.done and s.done


# ----------------------------------------------------------------------- wrong keys


def test_client_detects_a_server_with_the_wrong_key() -> None:
    c, s = client(KEY), server(b"other key")
    deliver(c, s)
    with pytest.raises(AuthenticationError, match="server does not know the authkey"):
        deliver(s, c)
    assert c.state is State.FAILED
    assert c.outgoing() == b""  # the client sends no proof to an impostor


def test_server_detects_a_client_with_the_wrong_key() -> None:
    s = server(KEY)
    s.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1, {}, NC)))
    s.outgoing()
    # a client that does not check the server (or guesses) sends a proof with another key
    bad = raw_frame(Kind.AUTH, {"mac": mac(b"other key", b"C", NS, NC)})
    with pytest.raises(AuthenticationError, match="client does not know the authkey"):
        s.receive(bad)
    assert s.state is State.FAILED
    verdict = welcome_of(s)
    assert verdict["ok"] is False and "authkey" in verdict["error"]


def test_reflected_server_mac_is_not_a_client_proof() -> None:
    s = server(KEY)
    s.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1, {}, NC)))
    hello = msgspec.msgpack.decode(frames_of(s.outgoing())[0].body, type=Hello)
    with pytest.raises(AuthenticationError):
        s.receive(raw_frame(Kind.AUTH, {"mac": hello.mac}))


def test_server_refusal_reaches_the_client_as_authentication_error() -> None:
    s = server(KEY)
    s.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1, {}, NC)))
    s.outgoing()
    with pytest.raises(AuthenticationError):
        s.receive(raw_frame(Kind.AUTH, {"mac": b"\x00" * 32}))
    c = client(KEY)
    c.outgoing()
    c.state = State.AWAIT_WELCOME  # as if it had verified a HELLO
    for frame in frames_of(s.outgoing()):
        with pytest.raises(AuthenticationError, match="the server refused the connection"):
            c.receive(frame)
    assert c.state is State.FAILED


def test_client_without_key_to_server_with_key() -> None:
    c, s = client(), server(KEY)
    with pytest.raises(AuthenticationError, match="pass authkey="):
        deliver(c, s)
    assert s.state is State.FAILED
    with pytest.raises(AuthenticationError, match="server refused the connection"):
        deliver(s, c)  # the queued WELCOME{ok: false} tells the client why
    assert c.state is State.FAILED


def test_client_with_key_to_server_without_key() -> None:
    c, s = client(KEY), server()
    deliver(c, s)
    assert s.done  # a keyless server does not know the client wanted proof...
    with pytest.raises(AuthenticationError, match="server did not authenticate"):
        deliver(s, c)  # ...but the client does, and refuses
    assert c.state is State.FAILED


def test_server_hello_with_a_nonce_but_client_has_no_key() -> None:
    c = client()
    c.outgoing()
    hello = Hello(PROTOCOL_VERSION, "server", 2, {}, NS, b"m" * 32)
    with pytest.raises(AuthenticationError, match="requires an authkey"):
        c.receive(raw_frame(Kind.HELLO, hello))


@pytest.mark.parametrize("nonce", [b"", b"short", bytes(NONCE_SIZE + 1)])
def test_bad_nonce_lengths(nonce: bytes) -> None:
    s = server(KEY)
    with pytest.raises(AuthenticationError):
        s.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1, {}, nonce)))
    assert welcome_of(s)["ok"] is False
    c = client(KEY)
    c.outgoing()
    with pytest.raises(AuthenticationError):
        c.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "server", 1, {}, nonce, b"m")))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="role"):
        Handshake("peer", pid=1, options={})
    with pytest.raises(ValueError, match="nonce"):
        Handshake("client", pid=1, options={}, authkey=KEY, nonce=b"short")


# ----------------------------------------------------------------- version and shape


def test_version_mismatch_server_side() -> None:
    s = server()
    with pytest.raises(HandshakeError, match="protocol v2"):
        s.receive(raw_frame(Kind.HELLO, Hello(2, "client", 1)))
    verdict = welcome_of(s)
    assert verdict["ok"] is False and "v2" in verdict["error"]
    c = client()
    c.outgoing()
    s2 = server()
    with pytest.raises(HandshakeError):
        s2.receive(raw_frame(Kind.HELLO, Hello(2, "client", 1)))
    with pytest.raises(HandshakeError, match=r"refused the connection.*v2") as info:
        deliver(s2, c)
    assert not isinstance(info.value, AuthenticationError)


def test_version_mismatch_client_side() -> None:
    c = client()
    c.outgoing()
    with pytest.raises(HandshakeError, match="protocol v9"):
        c.receive(raw_frame(Kind.HELLO, Hello(9, "server", 1)))
    assert c.state is State.FAILED
    assert c.outgoing() == b""  # only a server reports failures on the wire


def test_peer_claiming_the_wrong_role() -> None:
    s = server()
    with pytest.raises(HandshakeError, match="peer says it is a server"):
        s.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "server", 1)))
    c = client()
    with pytest.raises(HandshakeError, match="peer says it is a client"):
        c.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1)))


@pytest.mark.parametrize(
    ("role", "key", "kind"),
    [
        ("server", None, Kind.DATA),
        ("server", None, Kind.AUTH),
        ("server", None, Kind.WELCOME),
        ("server", None, Kind.CLOSE),
        ("client", None, Kind.DATA),
        ("client", None, Kind.AUTH),
        ("client", KEY, Kind.AUTH),
    ],
)
def test_unexpected_frames(role: str, key: bytes | None, kind: Kind) -> None:
    side = server(key) if role == "server" else client(key)
    side.outgoing()
    with pytest.raises(HandshakeError, match=f"unexpected {kind.name} frame"):
        side.receive(raw_frame(kind, {}))
    assert side.state is State.FAILED
    if role == "server":
        assert welcome_of(side)["ok"] is False
    else:
        assert side.outgoing() == b""


def test_frames_after_done_are_unexpected() -> None:
    c, s = client(), server()
    deliver(c, s)
    deliver(s, c)
    with pytest.raises(HandshakeError, match="unexpected HELLO"):
        s.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1)))
    with pytest.raises(HandshakeError, match="unexpected"):
        c.receive(raw_frame(Kind.WELCOME, {"ok": True}))


def test_a_second_hello_while_awaiting_auth() -> None:
    s = server(KEY)
    s.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1, {}, NC)))
    s.outgoing()
    with pytest.raises(HandshakeError, match="unexpected HELLO frame in state await-auth"):
        s.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1, {}, NC)))


def test_unknown_kind_number() -> None:
    s = server()
    with pytest.raises(HandshakeError, match="unknown frame kind 99"):
        s.receive(Frame(99, CodecId.MSGPACK, b"\x80", []))


@pytest.mark.parametrize("codec", [CodecId.RAW, CodecId.JSON, CodecId.PICKLE])
def test_only_msgpack_bodies(codec: int) -> None:
    s = server()
    frame = raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1), codec=codec)
    with pytest.raises(HandshakeError, match="msgpack body only"):
        s.receive(frame)


def test_no_out_of_band_buffers() -> None:
    s = server()
    body = msgspec.msgpack.encode(Hello(PROTOCOL_VERSION, "client", 1))
    with pytest.raises(HandshakeError, match="msgpack body only"):
        s.receive(Frame(Kind.HELLO, CodecId.MSGPACK, body, [memoryview(b"x")]))


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # not msgpack
        msgspec.msgpack.encode(42),
        msgspec.msgpack.encode({"v": "one", "role": "client", "pid": 1}),
        msgspec.msgpack.encode({"role": "client", "pid": 1}),  # no version
        msgspec.msgpack.encode({"v": 1, "role": "client", "pid": 1, "nonce": 5}),
    ],
)
def test_malformed_hello_bodies(body: bytes) -> None:
    s = server()
    with pytest.raises(HandshakeError, match="malformed HELLO"):
        s.receive(Frame(Kind.HELLO, CodecId.MSGPACK, body, []))
    assert welcome_of(s)["ok"] is False


def test_malformed_auth_and_welcome() -> None:
    s = server(KEY)
    s.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1, {}, NC)))
    s.outgoing()
    with pytest.raises(HandshakeError, match="malformed AUTH"):
        s.receive(raw_frame(Kind.AUTH, {"mac": "not bytes"}))
    c = client()
    c.outgoing()
    with pytest.raises(HandshakeError, match="malformed WELCOME"):
        c.receive(raw_frame(Kind.WELCOME, [1, 2, 3]))


def test_welcome_before_hello_is_a_refusal() -> None:
    c = client()
    c.outgoing()
    with pytest.raises(HandshakeError, match="refused the connection: busy"):
        c.receive(raw_frame(Kind.WELCOME, {"ok": False, "error": "busy"}))
    assert c.state is State.FAILED


def test_every_failure_is_a_protocol_error() -> None:
    for exc in (HandshakeError, AuthenticationError):
        assert issubclass(exc, ProtocolError)


# -------------------------------------------------------------------------- size caps


def test_oversized_handshake_frame_refused_by_the_decoder() -> None:
    big = Hello(PROTOCOL_VERSION, "client", 1, {"pad": "x" * HANDSHAKE_MAX_FRAME})
    data = b"".join(
        bytes(p) for p in encode_frame(Kind.HELLO, CodecId.MSGPACK, msgspec.msgpack.encode(big))
    )
    dec = FrameDecoder(max_frame=HANDSHAKE_MAX_FRAME)
    with pytest.raises(FrameTooLarge):
        dec.feed(data[:8])  # the header alone is enough to refuse it


def test_oversized_options_cannot_be_sent() -> None:
    with pytest.raises(MessageTooLarge):
        Handshake("client", pid=1, options={"pad": "x" * HANDSHAKE_MAX_FRAME})
    s = Handshake("server", pid=1, options={"pad": "x" * HANDSHAKE_MAX_FRAME})
    with pytest.raises(MessageTooLarge):
        s.receive(raw_frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "client", 1)))


def test_handshake_max_frame_is_4_kib() -> None:
    assert HANDSHAKE_MAX_FRAME == 4096


# ------------------------------------------------------------------------ the table


def test_transition_table_covers_what_the_code_does() -> None:
    assert set(TRANSITIONS) == {
        ("client", State.AWAIT_HELLO, Kind.HELLO),
        ("client", State.AWAIT_WELCOME, Kind.WELCOME),
        ("client", State.AWAIT_HELLO, Kind.WELCOME),
        ("server", State.AWAIT_HELLO, Kind.HELLO),
        ("server", State.AWAIT_AUTH, Kind.AUTH),
    }
