"""Every error buzon raises, in one rooted tree.

Catch :class:`BuzonError` to catch them all. Where a builtin already names the
situation, the buzon class also inherits it, so ``except TimeoutError`` and
``except queue.Empty`` keep working::

    BuzonError
    ├── AddressError (ValueError)            a URL that cannot name an endpoint
    ├── Timeout (TimeoutError)               a blocking call ran out of time
    │   └── DeadlineExceeded                 an RPC call's deadline passed (buzon.rpc)
    ├── ChannelError                         the state of one channel
    │   ├── Empty (queue.Empty)              recv_nowait found no message
    │   ├── Full (queue.Full)                send_nowait could not queue the message
    │   ├── EndOfChannel (EOFError)          the peer closed; nothing more will arrive
    │   │   └── ServerRestarted              an RPC server restarted mid-call (buzon.rpc)
    │   ├── ChannelClosed                    this end was closed by its owner
    │   ├── Undelivered                      a receipt's message can no longer be taken
    │   └── MessageTooLarge                  over the frame cap or the transport's unit
    ├── ConnectError (ConnectionError)       establishing a link failed
    │   ├── ConnectionRefused (ConnectionRefusedError)
    │   ├── NoSuchEndpoint (FileNotFoundError)
    │   └── EndpointInUse (FileExistsError)
    ├── PermissionDenied (PermissionError)   the OS said no
    ├── SecurityError                        buzon said no, to keep you safe
    │   ├── UnsafePath                       symlink, foreign owner, loose mode
    │   ├── PeerCredentialsRejected          SO_PEERCRED names another user
    │   └── InsecureBind                     non-loopback TCP without authentication
    ├── ProtocolError                        the bytes on the wire are wrong
    │   ├── FrameError                       malformed or truncated frame
    │   │   └── FrameTooLarge                a length over the cap, before allocating
    │   ├── HandshakeError                   the opening exchange failed
    │   └── AuthenticationError              the authkey challenge failed
    ├── CodecError                           a payload cannot be encoded or decoded
    │   ├── ValidationError (ValueError)     decoded, but not the ``type=`` asked for
    │   └── PickleRejected                   a pickle frame on a channel without pickle
    ├── RemoteError                          an RPC call failed on the server (buzon.rpc)
    └── UnsupportedOperation                 the transport cannot do this

OS errors are translated into this tree in exactly one place, :func:`from_oserror`.
"""

from __future__ import annotations

import errno
import queue

__all__ = [
    "AddressError",
    "AuthenticationError",
    "BuzonError",
    "ChannelClosed",
    "ChannelError",
    "CodecError",
    "ConnectError",
    "DeadlineExceeded",
    "ConnectionRefused",
    "Empty",
    "EndOfChannel",
    "EndpointInUse",
    "FrameError",
    "FrameTooLarge",
    "Full",
    "HandshakeError",
    "InsecureBind",
    "MessageTooLarge",
    "NoSuchEndpoint",
    "PeerCredentialsRejected",
    "PermissionDenied",
    "PickleRejected",
    "ProtocolError",
    "RemoteError",
    "SecurityError",
    "ServerRestarted",
    "Timeout",
    "UnsafePath",
    "Undelivered",
    "UnsupportedOperation",
    "ValidationError",
    "from_oserror",
]


class BuzonError(Exception):
    """Root of every error raised by buzon."""


class AddressError(BuzonError, ValueError):
    """The address cannot name an endpoint (bad scheme, port, path or name)."""


class Timeout(BuzonError, TimeoutError):
    """A blocking operation did not complete before its timeout."""


class DeadlineExceeded(Timeout):
    """An RPC call's deadline passed before its reply came; the server was told to cancel it.

    The deadline is the nearest ``buzon.rpc.deadline`` block in force, or the client's
    default ``timeout``."""


class ChannelError(BuzonError):
    """Something about the state of one channel."""


class Empty(ChannelError, queue.Empty):
    """``recv_nowait`` found no complete message."""


class Full(ChannelError, queue.Full):
    """``send_nowait`` could not queue the message without waiting."""


class EndOfChannel(ChannelError, EOFError):
    """The peer closed its end: every message it sent has been received."""


class ServerRestarted(EndOfChannel):
    """An ``exactly_once`` RPC call's server restarted with it in flight: outcome unknown.

    The call may or may not have run; it is not sent again (``buzon.rpc.ServerRestarted``
    too).

    Either the client reconnected to another start of the server (a new instance id in
    the connection handshake, at a fixed address or through ``name:NAME``) whose
    completion table is in memory and so has no record of the call, or the server's
    SQLite table says the call was running when the server stopped and its handler is
    not ``@buzon.rpc.transactional``.
    """


class ChannelClosed(ChannelError):
    """The channel (or listener) was closed by this process."""


class Undelivered(ChannelError):
    """A receipt failed: the channel broke or closed before the receiver took the message.

    When it was *this* end that closed (``close()`` with receipts pending), no
    acknowledgement can be read any more, so the receiver may still take the message:
    its fate is unknown, and the error says so. Wait for the receipts before closing
    to know.
    """


class MessageTooLarge(ChannelError):
    """The message exceeds the frame cap or what the transport can carry at once.

    Raised by ``recv_bytes_into`` when the received message does not fit the given
    buffer: the message was taken, and :attr:`message` holds it (bytes), so nothing is
    lost (as ``multiprocessing``'s ``BufferTooShort`` carries it). Elsewhere
    :attr:`message` is None."""

    message: bytes | None = None


class ConnectError(BuzonError, ConnectionError):
    """A connection could not be established."""


class ConnectionRefused(ConnectError, ConnectionRefusedError):
    """The endpoint exists but nobody accepts (or reads) there."""


class NoSuchEndpoint(ConnectError, FileNotFoundError):
    """Nothing exists at the address."""


class EndpointInUse(ConnectError, FileExistsError):
    """Something already listens at (or owns) the address."""


class PermissionDenied(BuzonError, PermissionError):
    """The operating system refused access."""


class SecurityError(BuzonError):
    """buzon refused to proceed because doing so would be unsafe."""


class UnsafePath(SecurityError):
    """A path is a symlink, owned by another user, or has loose permissions."""


class PeerCredentialsRejected(SecurityError):
    """The peer process runs as a user this endpoint does not accept."""


class InsecureBind(SecurityError):
    """A non-loopback bind without authentication; pass ``authkey=`` or ``insecure=True``."""


class ProtocolError(BuzonError):
    """The peer sent bytes that violate the protocol."""


class FrameError(ProtocolError):
    """A malformed, truncated or unknown frame."""


class FrameTooLarge(FrameError):
    """A frame announced a length above the cap; nothing was allocated for it."""


class HandshakeError(ProtocolError):
    """The opening exchange failed (wrong version, malformed message, refused, timeout)."""


class AuthenticationError(ProtocolError):
    """The authkey challenge failed in one direction or the other."""


class CodecError(BuzonError):
    """A payload could not be encoded or decoded."""


class ValidationError(CodecError, ValueError):
    """The payload decoded, but does not match the ``type=`` requested."""


class PickleRejected(CodecError):
    """A pickle frame arrived on a channel that did not enable pickle; it was not unpickled."""


class RemoteError(BuzonError):
    """An RPC call failed on the other side: ``.code``, ``.message`` and ``.data`` say how.

    ``code`` is an int, ``message`` a str and ``data`` any encodable value (or None).
    The codes below follow JSON-RPC 2.0 where it has one; an exception raised by a
    handler arrives as ``SERVER_ERROR`` with the exception's type name in ``data``
    (never its traceback), and a handler may raise ``RemoteError`` itself to choose
    the code.
    """

    PARSE_ERROR = -32700  # the request could not be decoded
    INVALID_REQUEST = -32600  # decoded, but not a request
    METHOD_NOT_FOUND = -32601  # no such method exposed (nothing ran)
    INVALID_PARAMS = -32602  # wrong arity or types for the method's hints (nothing ran)
    INTERNAL_ERROR = -32603  # the server failed around the handler
    SERVER_ERROR = -32000  # the handler raised an exception
    INVALID_RESULT = -32001  # the result does not match its hint or cannot be encoded
    DEADLINE_EXCEEDED = -32002  # the deadline passed before the handler ran
    CANCELLED = -32003  # the caller cancelled the call
    OVERLOADED = -32004  # too many calls in flight on this connection
    # exactly_once: the call was running when its server stopped (crash, restart); its
    # side effects may or may not have happened, and it is not run again
    OUTCOME_UNKNOWN = -32005

    def __init__(self, message: str, code: int = SERVER_ERROR, data: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.code, self.data))


class UnsupportedOperation(BuzonError):
    """The transport cannot perform this operation (e.g. sending on a read-only FIFO end)."""


def size_text(n: int) -> str:
    """``67108864`` -> ``"64 MiB"``: a byte count as people write it (for messages)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def frame_cap_exceeded(total: int, max_frame: int) -> MessageTooLarge:
    """The error for a frame of ``total`` bytes over the cap: it names the cap and the
    knob that raises it (the receiving end checks the cap too, so both ends)."""
    return MessageTooLarge(
        f"frame of {total} bytes ({size_text(total)}) exceeds the frame cap of {max_frame} "
        f"bytes ({size_text(max_frame)}): pass a larger max_frame= (up to 1 TiB) to "
        "connect/listen/pipe on both ends, or send the data in smaller messages"
    )


_ERRNO_MAP: dict[int, type[BuzonError]] = {
    errno.ECONNREFUSED: ConnectionRefused,
    errno.ENXIO: ConnectionRefused,  # FIFO opened for writing with no reader
    errno.ENOENT: NoSuchEndpoint,
    errno.ESRCH: NoSuchEndpoint,  # signalling a process that does not exist
    errno.EADDRINUSE: EndpointInUse,
    errno.EEXIST: EndpointInUse,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
    errno.EMSGSIZE: MessageTooLarge,
    errno.ETIMEDOUT: Timeout,
    errno.EPIPE: EndOfChannel,
    errno.ECONNRESET: EndOfChannel,
    errno.ENOTCONN: EndOfChannel,
    errno.ELOOP: UnsafePath,
    errno.EADDRNOTAVAIL: AddressError,
    errno.ENAMETOOLONG: AddressError,
}


def from_oserror(exc: OSError, what: str = "") -> BuzonError:
    """Translate an ``OSError`` into the buzon tree (the only place that does so).

    The original exception is kept as ``__cause__`` by callers using ``raise ... from``;
    the errno and the address are part of the message so the user sees what failed.
    """
    cls = _ERRNO_MAP.get(exc.errno or 0, BuzonError)
    reason = exc.strerror or str(exc)
    hint = ""
    if exc.errno == errno.ENXIO:
        reason = "no process has the FIFO open for reading"
    elif exc.errno == errno.ESRCH:
        reason = "no such process"
    elif exc.errno == errno.ECONNREFUSED:
        hint = " (is anybody listening there?)"
    message = f"{what}: {reason}{hint}" if what else f"{reason}{hint}"
    err = cls(message)
    err.errno = exc.errno  # type: ignore[attr-defined]
    return err
