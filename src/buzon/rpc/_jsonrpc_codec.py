"""``wire="jsonrpc"``, sans-IO: LSP ``Content-Length`` framing and JSON-RPC 2.0 messages.

Nothing here reads or writes a socket: :class:`FrameDecoder` is fed bytes and returns
the complete message bodies, :func:`encode_frame` frames one body, and
:func:`classify` / :func:`error_response` / :func:`parse` turn bodies into the
JSON-RPC 2.0 objects and back. The session (``_jsonrpc.py``) does the I/O.

A frame is a header block (ASCII lines ``Name: value`` ended by ``\\r\\n``, then an
empty line) and a body of exactly ``Content-Length`` bytes (UTF-8 JSON)::

    Content-Length: 58\\r\\n
    \\r\\n
    {"jsonrpc":"2.0","method":"initialize","params":{},"id":1}

The header block is refused (:class:`~buzon.errors.FrameError`) when it is longer than
``max_header`` bytes without its empty line, when a line is not ``Name: value`` in
ASCII, when ``Content-Length`` is missing, repeated or not a plain decimal number, or
when ``Content-Type`` names a charset other than UTF-8; a ``Content-Length`` over
``max_message`` is refused with :class:`~buzon.errors.FrameTooLarge`. All of it is
decided from the header alone, before the body is waited for or anything is allocated
for it. A stream that broke once cannot be resynchronised: the decoder stays broken.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..errors import FrameError, FrameTooLarge, RemoteError

__all__ = [
    "MAX_HEADER",
    "MAX_MESSAGE",
    "STANDARD_MESSAGES",
    "FrameDecoder",
    "classify",
    "encode_frame",
    "error_response",
    "parse",
]

MAX_HEADER = 4096
MAX_MESSAGE = 64 * 1024 * 1024
_END = b"\r\n\r\n"
_DIGITS = frozenset(b"0123456789")

STANDARD_MESSAGES = {
    RemoteError.PARSE_ERROR: "Parse error",
    RemoteError.INVALID_REQUEST: "Invalid Request",
    RemoteError.METHOD_NOT_FOUND: "Method not found",
    RemoteError.INVALID_PARAMS: "Invalid params",
    RemoteError.INTERNAL_ERROR: "Internal error",
}

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def encode_frame(body: bytes) -> bytes:
    """``body`` (UTF-8 JSON) with its ``Content-Length`` header."""
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def _content_length(block: bytes, max_message: int) -> int:
    """The body size announced by one header block (without its final empty line)."""
    length = -1
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name or not line.isascii() or name.strip() != name:
            raise FrameError(f"JSON-RPC header line {line[:80]!r} is not 'Name: value' in ASCII")
        key = name.lower()
        value = value.strip(b" \t")
        if key == b"content-length":
            if length >= 0:
                raise FrameError("JSON-RPC header: Content-Length given twice")
            if not value or not _DIGITS.issuperset(value) or len(value) > 20:
                raise FrameError(f"JSON-RPC header: Content-Length {value[:40]!r} is not a number")
            length = int(value)
            if length > max_message:
                raise FrameTooLarge(
                    f"JSON-RPC message of {length} bytes announced; the limit is {max_message}"
                )
        elif key == b"content-type":
            charset = value.lower().partition(b"charset=")[2].strip(b" \t\"'")
            if charset and charset not in (b"utf-8", b"utf8"):
                raise FrameError(f"JSON-RPC header: charset {charset[:40]!r} is not UTF-8")
    if length < 0:
        raise FrameError("JSON-RPC header without Content-Length")
    return length


class FrameDecoder:
    """Split a byte stream into ``Content-Length`` framed bodies (sans-IO)::

        dec = FrameDecoder()
        for body in dec.feed(data):      # bytes, as they arrive
            ...                          # each complete body, in order

    Raises :class:`~buzon.errors.FrameError` / :class:`~buzon.errors.FrameTooLarge`
    for a malformed or oversized header (see the module); after that every
    :meth:`feed` raises the same error again.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, max_header: int = MAX_HEADER) -> None:
        self.max_message = max_message
        self.max_header = max_header
        self._buf = bytearray()
        self._need = -1  # body size of the frame being read, -1 while in its header
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a complete body."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take ``data``; return the bodies it completed (possibly none)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[bytes] = []
        try:
            self._split(out)
        except FrameError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        return out

    def _split(self, out: list[bytes]) -> None:
        buf = self._buf
        pos = 0
        while True:
            if self._need < 0:
                end = buf.find(_END, pos, pos + self.max_header + len(_END))
                if end < 0:
                    if len(buf) - pos > self.max_header + len(_END) - 1:
                        raise FrameError(
                            f"JSON-RPC header over {self.max_header} bytes without its end"
                        )
                    break
                self._need = _content_length(bytes(buf[pos:end]), self.max_message)
                pos = end + len(_END)
            if len(buf) - pos < self._need:
                break
            out.append(bytes(buf[pos : pos + self._need]))
            pos += self._need
            self._need = -1
        del buf[:pos]


# -- messages --------------------------------------------------------------------------


def parse(body: bytes) -> Any:
    """The JSON value of one body; ``RemoteError`` PARSE_ERROR if it is not JSON."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:  # nested too deep
        raise RemoteError(
            STANDARD_MESSAGES[RemoteError.PARSE_ERROR], RemoteError.PARSE_ERROR, str(exc)
        ) from None


def _valid_id(value: Any) -> bool:
    return value is None or type(value) in (str, int, float)


def classify(obj: Any) -> tuple[str, Any]:
    """What one JSON-RPC object is: ``("request", obj)``, ``("notification", obj)``,
    ``("response", obj)``, ``("ignored", obj)`` (shaped like a response but malformed:
    counted, never answered, so two peers cannot trade errors for ever), or
    ``("invalid", id)`` (answer INVALID_REQUEST with that id: the object's id when it
    had a valid one, else None)."""
    if type(obj) is not dict:
        return "invalid", None
    if "method" not in obj and ("result" in obj or "error" in obj):
        ok = obj.get("jsonrpc") == "2.0" and "id" in obj and ("result" in obj) != ("error" in obj)
        return ("response", obj) if ok else ("ignored", obj)
    if obj.get("jsonrpc") != "2.0":
        return "invalid", obj.get("id") if _valid_id(obj.get("id")) else None
    if "method" in obj:
        if type(obj["method"]) is not str:
            return "invalid", obj.get("id") if _valid_id(obj.get("id")) else None
        params = obj.get("params", None)
        if "params" in obj and type(params) not in (list, dict):
            return "invalid", obj.get("id") if _valid_id(obj.get("id")) else None
        if "id" not in obj:
            return "notification", obj
        if not _valid_id(obj["id"]):
            return "invalid", None
        return "request", obj
    return "invalid", obj.get("id") if _valid_id(obj.get("id")) else None


def error_object(error: RemoteError) -> dict[str, Any]:
    """The ``error`` member for ``error``: the spec's message for the standard codes
    (the detail goes in ``data``, except for -32700/-32600/-32601, answered exactly as
    the spec's examples are)."""
    standard = STANDARD_MESSAGES.get(error.code)
    if standard is None:
        out: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.data is not None:
            out["data"] = error.data
        return out
    out = {"code": error.code, "message": standard}
    if error.code in (RemoteError.INVALID_PARAMS, RemoteError.INTERNAL_ERROR):
        detail = error.message if error.message != standard else error.data
        if detail is not None:
            out["data"] = detail
    return out


def error_response(msgid: Any, error: RemoteError) -> dict[str, Any]:
    """A response object carrying ``error`` for ``msgid`` (its ``data`` left out when
    JSON cannot carry it: the answer still goes)."""
    obj = error_object(error)
    if "data" in obj:
        try:
            obj["data"] = msgspec.Raw(_encoder.encode(obj["data"]))
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            del obj["data"]
    return {"jsonrpc": "2.0", "error": obj, "id": msgid}


def peer_error(value: Any) -> RemoteError:
    """A response's ``error`` member as a :class:`~buzon.errors.RemoteError`."""
    if type(value) is dict and type(value.get("code")) is int:
        message = value.get("message")
        return RemoteError(
            message if isinstance(message, str) else str(message), value["code"], value.get("data")
        )
    return RemoteError(f"malformed JSON-RPC error {value!r}", RemoteError.INTERNAL_ERROR, value)
