"""Wire compatibility with :mod:`multiprocessing.connection`, sans-IO.

A ``multiprocessing.connection.Connection`` on a socket or a pipe (``Listener``,
``Client``, ``Pipe`` on POSIX) frames each ``send_bytes`` payload with a length
prefix, and ``Listener``/``Client`` given an ``authkey`` run an HMAC challenge in
both directions before the first message. This module speaks both, so a buzon
channel can talk to a plain Python program that only has the standard library.

Message framing (identical in CPython 3.8 through 3.13; integers big-endian)::

    offset  size  field
    0       4     length    i32, 0 .. 0x7fffffff
    4       n     payload   the send_bytes argument, verbatim

    payloads over 0x7fffffff bytes use the long form:
    0       4     marker    i32, -1 (ff ff ff ff)
    4       8     length    u64
    12      n     payload

Senders only use the long form above 0x7fffffff bytes; receivers accept it for any
length (CPython does too). Any other negative length is a :class:`FrameError`.

:class:`MessageDecoder` has the buffered-protocol shape of
:class:`buzon.protocol.frames.FrameDecoder`: the transport reads into
:meth:`~MessageDecoder.get_buffer` and reports with
:meth:`~MessageDecoder.buffer_updated`. Small messages are cut out of one reusable
read buffer, many per system call; a message over half that buffer gets an
exactly-sized ``bytearray`` of its own and the rest of it is read straight into it.
The announced length is checked against ``max_message`` before anything is
allocated for it.

The authkey handshake. ``Listener.accept`` runs ``deliver_challenge`` then
``answer_challenge``; ``Client`` runs them in the other order, so each side proves
the key to the other (every message below is framed as above)::

    server (Listener side, ServerAuth)          client (Client side, ClientAuth)
    "#CHALLENGE#" + C1               ------>
                                     <------    answer(C1)
    "#WELCOME#" or "#FAILURE#"       ------>
                                     <------    "#CHALLENGE#" + C2
    answer(C2)                       ------>
                                     <------    "#WELCOME#" or "#FAILURE#"

A challenge ``C`` comes in two formats:

* legacy (Python <= 3.11): exactly 20 random bytes; ``answer(C)`` is the raw
  16-byte HMAC-MD5 of ``C`` under the authkey;
* modern (Python >= 3.12): ``b"{name}"`` + random bytes (CPython sends 40), where
  name is one of :data:`DIGESTS`; ``answer(C)`` is ``b"{name}"`` + HMAC-name of the
  *whole* ``C``, prefix included, so the prefix cannot be altered unseen.

A 3.11 peer answers every challenge with raw HMAC-MD5, whatever its format, and a
3.12+ verifier accepts that (16 bytes, no prefix) for either format; this module
does the same unless built with ``allow_md5=False``. A 3.11 verifier only accepts
raw HMAC-MD5, so :class:`ServerAuth` offers the legacy format by default, and
:class:`ClientAuth` offers the format the server used. Handshake messages are at
most :data:`AUTH_MAX_MESSAGE` (256) bytes, as in CPython.

Randomness is an input: the challenge bytes, or an ``os.urandom``-like callable,
come from the caller. This module is sans-IO: no sockets, no selectors, no clocks.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, NoReturn

from ..errors import (
    AuthenticationError,
    FrameError,
    FrameTooLarge,
    HandshakeError,
    frame_cap_exceeded,
)
from .frames import DEFAULT_MAX_FRAME

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "AUTH_MAX_MESSAGE",
    "CHALLENGE",
    "DIGESTS",
    "FAILURE",
    "WELCOME",
    "AuthState",
    "ClientAuth",
    "MessageDecoder",
    "ServerAuth",
    "encode_header",
    "encode_message",
]

AUTH_MAX_MESSAGE = 256
CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
DIGESTS = frozenset({"md5", "sha256", "sha384", "sha3_256", "sha3_384"})

_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")
_LONG = struct.Struct("!iQ")
_I32_MAX = 0x7FFFFFFF
_JOIN_LIMIT = 16 * 1024  # below this, header and payload go out as one bytes
_LEGACY_RANDOM = 20  # a legacy challenge is exactly this long
_MODERN_RANDOM = 40  # what CPython 3.12+ appends after "{name}"
_MD5_LEN = 16
_MAX_NAME = max(len(d) for d in DIGESTS)
_MAX_RANDOM = AUTH_MAX_MESSAGE - len(CHALLENGE) - _MAX_NAME - 2

Payload = bytes | bytearray | memoryview
Random = bytes | Callable[[int], bytes]


# --------------------------------------------------------------------------- framing


def encode_header(nbytes: int) -> bytes:
    """The length prefix of a ``nbytes``-byte message (4 bytes, or 12 for the long form)."""
    if not 0 <= nbytes < 1 << 64:
        raise ValueError(f"a message length must be in [0, 2**64), not {nbytes}")
    if nbytes > _I32_MAX:
        return _LONG.pack(-1, nbytes)
    return _I32.pack(nbytes)


def encode_message(
    payload: ReadableBuffer, *, max_message: int | None = None
) -> list[bytes | memoryview]:
    """Return one message as buffers for a vectored write, as ``send_bytes`` frames it.

    A payload up to 16 KiB is joined to its header in one ``bytes``; a larger one is
    passed through uncopied (the ``bytes`` itself, or a byte view of anything else).
    ``payload`` is any C-contiguous buffer (bytes, bytearray, memoryview, a numpy
    array, an mmap...). With ``max_message``, a longer payload raises
    :class:`MessageTooLarge` before anything is built.
    """
    view = memoryview(payload)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    n = view.nbytes
    if max_message is not None and n > max_message:
        raise frame_cap_exceeded(n, max_message)
    header = encode_header(n)
    if n <= _JOIN_LIMIT:
        return [header + view]
    return [header, payload if isinstance(payload, bytes) else view]


def _read_header(data: bytes | bytearray | memoryview, start: int, avail: int) -> tuple[int, int]:
    """Parse the length prefix at ``start``: ``(header length, payload length)``.

    Returns ``(0, 0)`` when ``avail`` bytes are not enough to know yet.
    """
    if avail < 4:
        return 0, 0
    (size,) = _I32.unpack_from(data, start)
    if size >= 0:
        return 4, size
    if size != -1:
        raise FrameError(f"negative message length {size} (only -1 marks the long form)")
    if avail < 12:
        return 0, 0
    return 12, _U64.unpack_from(data, start + 4)[0]


class MessageDecoder:
    """Incremental decoder of ``send_bytes`` messages from a byte stream.

    Feed it with :meth:`get_buffer`/:meth:`buffer_updated` (zero-copy reads) or
    :meth:`feed`; take complete payloads from :attr:`messages` (``bytes`` for small
    ones, an exactly-sized ``bytearray`` for big ones). ``max_message`` caps the
    payload length and is checked before allocating; it may be changed between
    reads. Any error is final: the stream is out of sync after it.
    """

    __slots__ = (
        "_buf",
        "_end",
        "_failed",
        "_large",
        "_large_got",
        "_start",
        "max_message",
        "messages",
    )

    def __init__(self, max_message: int = DEFAULT_MAX_FRAME, read_size: int = 256 * 1024) -> None:
        if read_size < 64:
            raise ValueError(f"read_size must be at least 64 bytes, not {read_size}")
        self.max_message = max_message
        self.messages: deque[bytes | bytearray] = deque()
        self._buf = bytearray(read_size)
        self._start = 0
        self._end = 0
        self._large: bytearray | None = None  # exactly-sized payload of one big message
        self._large_got = 0
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete message."""
        return (self._end - self._start) + (self._large_got if self._large is not None else 0)

    def get_buffer(self) -> memoryview:
        """The writable region the next read should fill (never empty)."""
        if self._failed:
            raise FrameError("the decoder already failed; the stream is out of sync")
        if self._large is not None:
            return memoryview(self._large)[self._large_got :]
        if self._end == len(self._buf):
            self._compact()
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written into the region :meth:`get_buffer` returned."""
        if self._large is not None:
            self._large_got += nbytes
            if self._large_got == len(self._large):
                self.messages.append(self._large)
                self._large = None
                self._large_got = 0
            return
        self._end += nbytes
        self._parse()

    def feed(self, data: ReadableBuffer) -> None:
        """Copy ``data`` in, whatever its size, and parse what completes."""
        mv = memoryview(data).cast("B")
        while mv:
            target = self.get_buffer()
            n = min(len(target), len(mv))
            target[:n] = mv[:n]
            mv = mv[n:]
            self.buffer_updated(n)

    def eof(self) -> None:
        """The stream ended. Raises :class:`FrameError` if a message was cut short."""
        if self.buffered:
            self._failed = True
            raise FrameError(
                f"stream ended inside a message ({self.buffered} bytes of it received)"
            )

    def _compact(self) -> None:
        # An incomplete small message is under half the buffer (see _parse), so this
        # always frees room.
        n = self._end - self._start
        self._buf[:n] = self._buf[self._start : self._end]
        self._start, self._end = 0, n

    def _parse(self) -> None:
        buf = self._buf
        view = memoryview(buf)
        half = len(buf) // 2
        start, end = self._start, self._end
        try:
            while True:
                avail = end - start
                # _read_header inlined: this loop runs once per small message.
                if avail < 4:
                    break
                (size,) = _I32.unpack_from(buf, start)
                hlen = 4
                if size < 0:
                    if size != -1:
                        raise FrameError(f"negative message length {size} (only -1 is valid)")
                    if avail < 12:
                        break
                    (size,) = _U64.unpack_from(buf, start + 4)
                    hlen = 12
                if size > self.max_message:
                    raise FrameTooLarge(
                        f"message announces {size} bytes; the cap is {self.max_message}"
                    )
                if hlen + size > half:
                    # A big message: give it its own buffer and read the rest into it.
                    large = bytearray(size)
                    got = min(avail - hlen, size)
                    large[:got] = view[start + hlen : start + hlen + got]
                    start += hlen + got
                    if got == size:
                        self.messages.append(large)
                        continue
                    self._large, self._large_got = large, got
                    break
                if avail < hlen + size:
                    break
                self.messages.append(bytes(view[start + hlen : start + hlen + size]))
                start += hlen + size
        except FrameError:
            self._failed = True
            raise
        finally:
            view.release()
            if start == end:
                start = end = 0
            self._start, self._end = start, end


# --------------------------------------------------------------------------- handshake


class AuthState(Enum):
    """Where a handshake stands: which message it waits for, or how it ended."""

    AWAIT_ANSWER = "await answer"  # our challenge is out; the peer's HMAC is due
    AWAIT_CHALLENGE = "await challenge"  # the peer's challenge is due
    AWAIT_VERDICT = "await verdict"  # our HMAC is out; WELCOME or FAILURE is due
    DONE = "done"
    FAILED = "failed"


# The handshake as a table: the messages each role waits for, in order. The actions
# follow from the state: whenever the next state is AWAIT_ANSWER our challenge goes
# out first (the peer answers only what it was sent); an accepted answer is followed
# by WELCOME (a rejected one by FAILURE); a received challenge by our answer.
_SCRIPTS: dict[str, tuple[AuthState, ...]] = {
    "server": (AuthState.AWAIT_ANSWER, AuthState.AWAIT_CHALLENGE, AuthState.AWAIT_VERDICT),
    "client": (AuthState.AWAIT_CHALLENGE, AuthState.AWAIT_VERDICT, AuthState.AWAIT_ANSWER),
}

_AUTO = "auto"


def _frame(payload: bytes) -> bytes:
    return _I32.pack(len(payload)) + payload


def _same(a: bytes, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)


def _mac(authkey: bytes, message: bytes, name: str) -> bytes:
    import hmac  # here, not at module level: importing buzon does not load OpenSSL

    return hmac.new(authkey, message, name).digest()


def _split_answer(answer: bytes) -> tuple[str, bytes]:
    """``(digest name, mac)`` of an answer: raw MD5, or ``b"{name}"`` + mac."""
    if len(answer) == _MD5_LEN:
        return "md5", answer
    if answer.startswith(b"{"):
        close = answer.find(b"}", 1, _MAX_NAME + 2)
        if close > 0:
            name = answer[1:close].decode("ascii", "replace")
            if name in DIGESTS:
                return name, answer[close + 1 :]
    raise AuthenticationError(
        f"the peer's answer ({len(answer)} bytes) is neither a raw HMAC-MD5 nor "
        f"'{{name}}' + HMAC with a digest among {sorted(DIGESTS)}"
    )


def _challenge_digest(body: bytes) -> str | None:
    """The digest a challenge asks for: None for the legacy raw HMAC-MD5."""
    if len(body) == _LEGACY_RANDOM:
        return None
    if len(body) > _LEGACY_RANDOM and body.startswith(b"{"):
        close = body.find(b"}", 1, _MAX_NAME + 2)
        if close > 0:
            name = body[1:close].decode("ascii", "replace")
            if name in DIGESTS:
                return name
            raise AuthenticationError(f"the peer's challenge asks for digest {name!r}, unsupported")
    raise HandshakeError(
        f"malformed challenge: {len(body)} bytes, neither 20 random bytes (Python <= 3.11) "
        "nor a '{name}' prefix (Python >= 3.12)"
    )


class _Authenticator:
    """One side of the mutual handshake; the role picks the script from _SCRIPTS."""

    _role = ""

    def __init__(
        self,
        authkey: bytes | bytearray | memoryview,
        random: Random,
        *,
        digest: str | None,
        allow_md5: bool,
    ) -> None:
        if not isinstance(authkey, bytes | bytearray | memoryview):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
        if digest is not None and digest != _AUTO and digest not in DIGESTS:
            raise ValueError(f"digest must be None (legacy) or one of {sorted(DIGESTS)}")
        if digest in (None, "md5") and not allow_md5:
            raise ValueError("an MD5 (or legacy) challenge needs allow_md5=True")
        if isinstance(random, bytes | bytearray) and not (
            _LEGACY_RANDOM <= len(random) <= _MAX_RANDOM
        ):
            raise ValueError(
                f"challenge bytes must be {_LEGACY_RANDOM} to {_MAX_RANDOM} long, not {len(random)}"
            )
        self._authkey = bytes(authkey)
        self._random = random
        self._digest = digest
        self._allow_md5 = allow_md5
        self._script = _SCRIPTS[self._role]
        self._step = 0
        self._state = self._script[0]
        self._challenge = b""  # the body of the challenge we sent (the HMAC input)
        self._out: list[bytes] = []
        self._inbuf = bytearray()
        self._error: Exception | None = None
        self.unused_data = b""
        """Bytes given to :meth:`receive_data` after the handshake's last message."""
        self.peer_digest: str | None = None
        """The HMAC the peer answered our challenge with (``"md5"``, ``"sha256"``...)."""
        self.answer_digest: str | None = None
        """The HMAC we answered the peer's challenge with."""
        self._peer_format: str | None = None  # digest the peer's challenge asked for
        if self._state is AuthState.AWAIT_ANSWER:
            self._send_challenge()

    # ---- public surface

    @property
    def state(self) -> AuthState:
        return self._state

    @property
    def done(self) -> bool:
        """Both directions authenticated; write :meth:`outgoing` one last time."""
        return self._state is AuthState.DONE

    def outgoing(self) -> list[bytes]:
        """Complete framed messages to write now, in order (taken: a second call is empty).

        After an error there may still be a ``#FAILURE#`` here: write it, best
        effort, before closing, so the peer fails cleanly instead of seeing EOF.
        """
        out, self._out = self._out, []
        return out

    def receive_data(self, data: Payload) -> None:
        """Raw stream bytes from the peer; whole messages in them are handled in order.

        Bytes past the handshake's last message are kept in :attr:`unused_data` for
        the channel's :class:`MessageDecoder`.
        """
        if self._state is AuthState.DONE:
            self.unused_data += bytes(data)
            return
        if self._state is AuthState.FAILED:
            raise HandshakeError("the handshake already failed") from self._error
        self._inbuf += data
        buf = self._inbuf
        while not self.done:
            hlen, size = _read_header(buf, 0, len(buf))
            if hlen and size > AUTH_MAX_MESSAGE:
                self._fail(
                    FrameTooLarge(
                        f"handshake message announces {size} bytes; the cap is {AUTH_MAX_MESSAGE}"
                    )
                )
            if not hlen or len(buf) < hlen + size:
                return
            message = bytes(buf[hlen : hlen + size])
            del buf[: hlen + size]
            self.receive(message)
        self.unused_data = bytes(buf)
        buf.clear()

    def receive(self, payload: Payload) -> None:
        """One complete message (its payload, without the length prefix) from the peer."""
        if self._state is AuthState.FAILED:
            raise HandshakeError("the handshake already failed") from self._error
        if self._state is AuthState.DONE:
            raise HandshakeError("the handshake is over; this message belongs to the channel")
        message = bytes(payload)
        if len(message) > AUTH_MAX_MESSAGE:
            self._fail(
                FrameTooLarge(
                    f"handshake message of {len(message)} bytes; the cap is {AUTH_MAX_MESSAGE}"
                )
            )
        state = self._state
        if state is AuthState.AWAIT_ANSWER:
            self._check_answer(message)
        elif state is AuthState.AWAIT_CHALLENGE:
            self._answer(message)
        else:
            self._check_verdict(message)
        self._step += 1
        if self._step == len(self._script):
            self._state = AuthState.DONE
            return
        self._state = self._script[self._step]
        if self._state is AuthState.AWAIT_ANSWER:
            self._send_challenge()

    # ---- the three kinds of step

    def _fail(self, error: Exception) -> NoReturn:
        self._state = AuthState.FAILED
        self._error = error
        raise error

    def _send_challenge(self) -> None:
        digest = self._digest
        if digest == _AUTO:
            # Mirror the peer: a legacy peer may only verify HMAC-MD5. Unless MD5 is
            # refused here, in which case only a modern peer can pass anyway.
            digest = self._peer_format
            if digest in (None, "md5") and not self._allow_md5:
                digest = "sha256"
        if digest is None:
            random = self._draw(_LEGACY_RANDOM)[:_LEGACY_RANDOM]
            self._challenge = random
        else:
            self._challenge = b"{" + digest.encode("ascii") + b"}" + self._draw(_MODERN_RANDOM)
        self._out.append(_frame(CHALLENGE + self._challenge))

    def _draw(self, n: int) -> bytes:
        if isinstance(self._random, bytes | bytearray):
            return bytes(self._random)
        got = self._random(n)
        if len(got) != n:
            raise ValueError(f"the random source returned {len(got)} bytes, not {n}")
        return bytes(got)

    def _check_answer(self, answer: bytes) -> None:
        try:
            name, mac = _split_answer(answer)
            if name == "md5" and not self._allow_md5:
                raise AuthenticationError(
                    "the peer answered with HMAC-MD5, which this side refuses (allow_md5=False)"
                )
            try:
                expected = _mac(self._authkey, self._challenge, name)
            except ValueError:  # e.g. MD5 disabled by a FIPS build
                raise AuthenticationError(f"digest {name!r} is not available here")
            if len(mac) != len(expected) or not _same(mac, expected):
                raise AuthenticationError(
                    "digest received was wrong (the peer holds another authkey)"
                )
        except AuthenticationError as exc:
            self._out.append(_frame(FAILURE))
            self._fail(exc)
        self.peer_digest = name
        self._out.append(_frame(WELCOME))

    def _answer(self, message: bytes) -> None:
        if not message.startswith(CHALLENGE):
            self._fail(HandshakeError(f"expected a #CHALLENGE# message, got {message[:32]!r}"))
        body = message[len(CHALLENGE) :]
        try:
            name = _challenge_digest(body)
        except (AuthenticationError, HandshakeError) as exc:
            self._fail(exc)
        self._peer_format = name
        if name is None:
            try:
                self._out.append(_frame(_mac(self._authkey, body, "md5")))
                self.answer_digest = "md5"
                return
            except ValueError:  # no MD5 here: answer as 3.12 does, the peer will judge
                name = "sha256"
        answer = b"{" + name.encode("ascii") + b"}" + _mac(self._authkey, body, name)
        self._out.append(_frame(answer))
        self.answer_digest = name

    def _check_verdict(self, message: bytes) -> None:
        if message == WELCOME:
            return
        if message == FAILURE:
            self._fail(AuthenticationError("the peer rejected our authkey (digest sent was wrong)"))
        self._fail(HandshakeError(f"expected #WELCOME# or #FAILURE#, got {message[:32]!r}"))


class ServerAuth(_Authenticator):
    """The ``Listener`` side of the handshake: challenge the peer, then answer its challenge.

    ``random`` is the challenge's random part (20 to 235 bytes, so the challenge
    fits 256; a legacy challenge uses the first 20) or an ``os.urandom``-like
    callable, asked for 20 bytes (legacy) or 40 (modern). ``digest=None`` (the
    default) sends the legacy challenge that every Python verifies; a name from
    :data:`DIGESTS` sends the 3.12+ format. ``allow_md5=False`` rejects raw HMAC-MD5
    answers (and so 3.11 clients). The challenge is in :meth:`outgoing` at once.
    """

    _role = "server"

    def __init__(
        self,
        authkey: bytes | bytearray | memoryview,
        random: Random,
        *,
        digest: str | None = None,
        allow_md5: bool = True,
    ) -> None:
        super().__init__(authkey, random, digest=digest, allow_md5=allow_md5)


class ClientAuth(_Authenticator):
    """The ``Client`` side: answer the server's challenge, then challenge the server.

    Any challenge format the server sends is answered in kind. ``digest="auto"``
    (the default) sends back the format the server used (legacy to a legacy
    server, which may only verify HMAC-MD5); ``None`` or a name from
    :data:`DIGESTS` force one. ``random`` and ``allow_md5`` are as for
    :class:`ServerAuth`.
    """

    _role = "client"

    def __init__(
        self,
        authkey: bytes | bytearray | memoryview,
        random: Random,
        *,
        digest: str | None = _AUTO,
        allow_md5: bool = True,
    ) -> None:
        super().__init__(authkey, random, digest=digest, allow_md5=allow_md5)
