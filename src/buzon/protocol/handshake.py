"""The opening exchange on connection-oriented links (Unix stream, TCP).

Without an authkey::

    client                         server
    HELLO {v, pid, opts}   ──▶
                           ◀──    HELLO {v, pid, opts}            both done

With an authkey (HMAC-SHA256, a fresh 32-byte nonce each way, each side proves it
knows the key for the *other* side's nonce, so nothing can be replayed or reflected)::

    HELLO {.., nc}                         ──▶
                                           ◀──  HELLO {.., ns, mac_s = H(k, "S"|nc|ns)}
    AUTH {mac_c = H(k, "C"|ns|nc)}         ──▶
                                           ◀──  WELCOME {ok: true}      both done

A failure is reported with ``WELCOME {ok: false, error, cause}`` before the server
closes, so the client learns *why* instead of seeing a bare EOF. ``cause`` is one word
(:data:`CAUSES`: ``authkey``, ``credentials``, ``capacity``, ``timeout``, ``pending``,
``handshake``) the client maps to an exception type; ``error`` is a sentence, at most
:data:`MAX_ERROR` characters whatever the peer sent (a refusal always fits in a
handshake frame). A server may refuse before reading anything (:func:`refusal_frame`,
e.g. when it is at capacity): a client awaiting the HELLO takes a WELCOME too. Every
handshake frame is at most :data:`HANDSHAKE_MAX_FRAME` (4 KiB) and its msgpack body is
validated against a schema. Randomness (nonces) and time are inputs: the drivers pass
``os.urandom`` bytes and enforce the deadline.

The states and transitions are the table :data:`TRANSITIONS`; the docs draw it.

Options both ends must agree on travel in ``opts``: today ``capacity`` (present only
when that end stated one; ``None`` is unbounded). If both state it and the values
differ, the server refuses (``WELCOME {ok: false}``) and both ends raise
:class:`HandshakeError`; if one states it, both use it (:func:`agreed_capacity`).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import msgspec

from ..errors import (
    AuthenticationError,
    BuzonError,
    HandshakeError,
    PeerCredentialsRejected,
    ProtocolError,
)
from .frames import HANDSHAKE_MAX_FRAME, CodecId, Frame, Kind, encode_frame

__all__ = [
    "CAUSES",
    "MAX_ERROR",
    "PROTOCOL_VERSION",
    "TRANSITIONS",
    "Handshake",
    "Hello",
    "Refusal",
    "State",
    "agreed_capacity",
    "refusal_frame",
]

_UNSTATED = object()


def _capacity_text(value: object) -> str:
    return "None (unbounded)" if value is None else str(value)


def agreed_capacity(
    mine: dict[str, Any], theirs: dict[str, Any], role: str = ""
) -> tuple[bool, Any]:
    """(stated, capacity): what both ends use; raises HandshakeError if they differ.

    ``role`` ("client" or "server") is this end's: the error names each end by its
    role (the listener refuses the client with this text, so "this end" would mislead).
    """
    a = mine.get("capacity", _UNSTATED)
    b = theirs.get("capacity", _UNSTATED)
    if a is not _UNSTATED and b is not _UNSTATED and a != b:
        if role == "server":
            stated = f"the connecting client has capacity={_capacity_text(b)}, the listener"
            stated += f" has capacity={_capacity_text(a)}"
        elif role == "client":
            stated = f"the connecting client has capacity={_capacity_text(a)}, the listener"
            stated += f" has capacity={_capacity_text(b)}"
        else:
            stated = f"this end has capacity={_capacity_text(a)}, the peer has "
            stated += f"capacity={_capacity_text(b)}"
        raise HandshakeError(
            f"capacity mismatch: {stated}; state the same capacity= on both ends, or on "
            "one only (the other adopts it)"
        )
    if a is _UNSTATED and b is _UNSTATED:
        return False, None
    value = a if a is not _UNSTATED else b
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise HandshakeError(f"the peer sent an invalid capacity {value!r}")
    return True, value


PROTOCOL_VERSION = 1
NONCE_SIZE = 32


class Hello(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    v: int
    role: str
    pid: int
    opts: dict[str, Any] = {}
    nonce: bytes | None = None
    mac: bytes | None = None


class Auth(msgspec.Struct):
    mac: bytes


class Welcome(msgspec.Struct, omit_defaults=True):
    ok: bool
    error: str = ""
    cause: str = ""  # one of CAUSES on a refusal (older peers omit it)


#: Why a server refuses a peer (the ``cause`` of ``WELCOME {ok: false}``).
CAUSES = ("authkey", "credentials", "capacity", "timeout", "pending", "handshake")
#: The longest ``error`` text a refusal carries (longer ones are cut).
MAX_ERROR = 512


def clip(text: str, limit: int = MAX_ERROR) -> str:
    """``text`` cut to ``limit`` characters (peer-supplied values end up in messages)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refusal_frame(error: str, cause: str = "handshake") -> bytes:
    """A ``WELCOME {ok: false}`` telling the peer why it is turned away; it always fits
    in a handshake frame, however long ``error`` was."""
    return _frame(Kind.WELCOME, Welcome(False, clip(error), cause))


class Refusal(HandshakeError):
    """A server's decision to turn a peer away, with its cause (one of :data:`CAUSES`)."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def cause_of(exc: BaseException) -> str:
    """The refusal cause an error raised on the server side stands for."""
    if isinstance(exc, Refusal):
        return exc.cause
    if isinstance(exc, AuthenticationError):
        return "authkey"
    if isinstance(exc, PeerCredentialsRejected):
        return "credentials"
    return "handshake"


class State(Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"
    AWAIT_WELCOME = "await-welcome"
    DONE = "done"
    FAILED = "failed"


# (role, state, frame kind received) -> the states it may lead to (the first without an
# authkey, the second with one). Any frame may also lead to FAILED when its content is
# wrong; a (role, state, kind) not listed is a HandshakeError.
TRANSITIONS: dict[tuple[str, State, Kind], tuple[State, ...]] = {
    ("client", State.AWAIT_HELLO, Kind.HELLO): (State.DONE, State.AWAIT_WELCOME),
    ("client", State.AWAIT_WELCOME, Kind.WELCOME): (State.DONE,),
    ("client", State.AWAIT_HELLO, Kind.WELCOME): (State.FAILED,),  # refused at once
    ("server", State.AWAIT_HELLO, Kind.HELLO): (State.DONE, State.AWAIT_AUTH),
    ("server", State.AWAIT_AUTH, Kind.AUTH): (State.DONE,),
}

_hello_dec = msgspec.msgpack.Decoder(Hello)
_auth_dec = msgspec.msgpack.Decoder(Auth)
_welcome_dec = msgspec.msgpack.Decoder(Welcome)
_enc = msgspec.msgpack.Encoder()


def _same(a: bytes, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)


def _mac(key: bytes, tag: bytes, first: bytes, second: bytes) -> bytes:
    import hashlib  # here, not at module level: importing buzon does not load OpenSSL
    import hmac

    return hmac.new(key, b"buzon-v1 " + tag + first + second, hashlib.sha256).digest()


def _frame(kind: Kind, obj: Any) -> bytes:
    return b"".join(
        bytes(b)
        for b in encode_frame(
            kind, CodecId.MSGPACK, _enc.encode(obj), max_frame=HANDSHAKE_MAX_FRAME
        )
    )


class Handshake:
    """One side of the exchange. Call :meth:`receive` with each frame; send :meth:`outgoing`.

    ``options`` are this side's channel options (codec, pickle, capacity...); after
    :attr:`done`, :attr:`peer` holds the other side's HELLO.
    """

    def __init__(
        self,
        role: str,
        *,
        pid: int,
        options: dict[str, Any],
        authkey: bytes | None = None,
        nonce: bytes = b"",
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError("role is 'client' or 'server'")
        if authkey is not None and len(nonce) != NONCE_SIZE:
            raise ValueError(f"an authkey needs a {NONCE_SIZE}-byte nonce from os.urandom")
        self.role = role
        self.pid = pid
        self.options = options
        self.authkey = authkey
        self.nonce = nonce
        self.peer: Hello | None = None
        self._out: list[bytes] = []
        if role == "client":
            self.state = State.AWAIT_HELLO
            self._out.append(
                _frame(
                    Kind.HELLO,
                    Hello(PROTOCOL_VERSION, "client", pid, options, nonce if authkey else None),
                )
            )
        else:
            self.state = State.AWAIT_HELLO

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    def outgoing(self) -> bytes:
        """Bytes to write now (possibly empty)."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive(self, frame: Frame) -> None:
        """Consume one frame. Raises HandshakeError/AuthenticationError on failure;
        a server queues a WELCOME{ok: false} first so the client learns why."""
        try:
            kind = Kind(frame.kind)
        except ValueError:
            raise self._fail(HandshakeError(f"unknown frame kind {frame.kind} in handshake"))
        if (self.role, self.state, kind) not in TRANSITIONS:
            raise self._fail(
                HandshakeError(f"unexpected {kind.name} frame in state {self.state.value}")
            )
        if frame.codec != CodecId.MSGPACK or frame.buffers:
            raise self._fail(HandshakeError("handshake frames carry a msgpack body only"))
        try:
            if self.role == "client":
                self._client(kind, frame.body)
            else:
                self._server(kind, frame.body)
        except msgspec.DecodeError as exc:
            raise self._fail(
                HandshakeError(f"malformed {kind.name}: {clip(str(exc), 200)}")
            ) from exc

    # -- roles ------------------------------------------------------------------------

    def _check_hello(self, hello: Hello, expected_role: str) -> None:
        if hello.v != PROTOCOL_VERSION:
            raise self._fail(
                HandshakeError(
                    f"peer speaks protocol v{hello.v}; this side speaks v{PROTOCOL_VERSION}"
                )
            )
        if hello.role != expected_role:
            raise self._fail(
                HandshakeError(
                    f"peer says it is a {clip(hello.role, 40)}, expected {expected_role}"
                )
            )

    def _client(self, kind: Kind, body: bytes | bytearray | memoryview) -> None:
        if kind is Kind.WELCOME and self.state is State.AWAIT_HELLO:  # refused at once
            welcome = _welcome_dec.decode(body)
            self.state = State.FAILED
            raise _refusal(welcome)
        if kind is Kind.HELLO:
            hello = _hello_dec.decode(body)
            self._check_hello(hello, "server")
            self.peer = hello
            try:
                agreed_capacity(self.options, hello.opts, "client")
            except HandshakeError as exc:
                raise self._fail(exc) from None
            if self.authkey is None:
                if hello.nonce is not None:
                    raise self._fail(
                        AuthenticationError("the server requires an authkey; pass authkey=")
                    )
                self.state = State.DONE
                return
            if hello.nonce is None or hello.mac is None or len(hello.nonce) != NONCE_SIZE:
                raise self._fail(
                    AuthenticationError("the server did not authenticate (it has no authkey)")
                )
            expect = _mac(self.authkey, b"S", self.nonce, hello.nonce)
            if not _same(expect, hello.mac):
                raise self._fail(AuthenticationError("the server does not know the authkey"))
            self._out.append(
                _frame(Kind.AUTH, Auth(_mac(self.authkey, b"C", hello.nonce, self.nonce)))
            )
            self.state = State.AWAIT_WELCOME
            return
        welcome = _welcome_dec.decode(body)
        if not welcome.ok:
            self.state = State.FAILED
            raise _refusal(welcome)
        self.state = State.DONE

    def _server(self, kind: Kind, body: bytes | bytearray | memoryview) -> None:
        if kind is Kind.HELLO:
            hello = _hello_dec.decode(body)
            self._check_hello(hello, "client")
            self.peer = hello
            try:
                agreed_capacity(self.options, hello.opts, "server")
            except HandshakeError as exc:
                raise self._fail(exc) from None
            if self.authkey is None:
                # A client that asked for proof learns from our mac-less HELLO that we
                # have no key, and fails on its side with a clear message.
                self._out.append(
                    _frame(Kind.HELLO, Hello(PROTOCOL_VERSION, "server", self.pid, self.options))
                )
                self.state = State.DONE
                return
            if hello.nonce is None or len(hello.nonce) != NONCE_SIZE:
                raise self._fail(
                    AuthenticationError("the client sent no authkey proof; pass authkey=")
                )
            mac = _mac(self.authkey, b"S", hello.nonce, self.nonce)
            self._out.append(
                _frame(
                    Kind.HELLO,
                    Hello(PROTOCOL_VERSION, "server", self.pid, self.options, self.nonce, mac),
                )
            )
            self.state = State.AWAIT_AUTH
            return
        auth = _auth_dec.decode(body)
        assert self.authkey is not None and self.peer is not None and self.peer.nonce is not None
        expect = _mac(self.authkey, b"C", self.nonce, self.peer.nonce)
        if not _same(expect, auth.mac):
            raise self._fail(AuthenticationError("the client does not know the authkey"))
        self._out.append(_frame(Kind.WELCOME, Welcome(True)))
        self.state = State.DONE

    def refuse(self, reason: str, cause: str) -> Refusal:
        """A server turns the peer away after all (``cause``: one of :data:`CAUSES`):
        what it was about to send is replaced by a refusal. Returns the error to raise."""
        self._out.clear()
        exc = Refusal(reason, cause)
        self.state = State.FAILED
        if self.role == "server":
            self._out.append(refusal_frame(reason, cause))
        return exc

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        """Enter FAILED; a server queues WELCOME{ok: false} so the client hears why."""
        self.state = State.FAILED
        if self.role == "server":
            self._out.append(refusal_frame(str(exc), cause_of(exc)))
        return exc


def _refusal(welcome: Welcome) -> BuzonError:
    """The client's error for a server's refusal: its type follows the cause."""
    error = clip(welcome.error)
    text = f"the server refused the connection: {error}"
    if welcome.cause == "authkey" or (not welcome.cause and "authkey" in error):
        return AuthenticationError(text)
    if welcome.cause == "credentials":
        return PeerCredentialsRejected(text)
    return HandshakeError(text)
